"""The report pipeline: suites -> report.json -> Markdown / HTML / JUnit, and the CLI around it.

Oracles: Python's own html.parser and xml.etree parse what we write; JSON round-trips;
numbers placed in a fake suite must come back out unchanged.
"""
import html.parser
import json
import shutil
import subprocess
import sys
import types
import xml.etree.ElementTree as ET

import pytest

from nonsmooth.reports import Check, Figure, SuiteResult, Table, _report
from nonsmooth.reports._cli import main as cli_main
from nonsmooth.reports._svg import figure_svg


def _fake_suite_module(name, result=None, exc=None):
    mod = types.ModuleType(f"nonsmooth.reports._suite_{name}")

    def run(*, quick=False, progress=None):
        if exc is not None:
            raise exc
        return result

    mod.run = run
    return mod


FIGS = [
    Figure("line log-log", "line", [1, 10, 100, 1000], {"err": [1.0, 0.31, 0.1, 0.031], "ref": [1, 0.3, 0.1, float("nan")]},
           xlabel="N", ylabel="error", logx=True, logy=True),
    Figure("bars", "bar", ["torch", "jax"], {"abs'(0)": [0.0, 1.0]}),
    Figure("zone", "image", [0, 1, 2], {"z": [[0, 1, 0], [1, 1, 0]]}, y=[0, 1]),
]


@pytest.fixture
def fake_suites(monkeypatch):
    good = SuiteResult("good", "Good suite", [Check("two plus two", True, "4 == 4", {"value": 4.0}),
                                              Check("nan survives", True, "", {"v": float("nan")})],
                       tables=[Table("T", ["a", "b"], [[1, 2.5], ["x|y", "z"]])], figures=FIGS)
    bad = SuiteResult("bad", "Bad suite", [Check("must fail", False, "1 != 2", {"got": 1, "want": 2})])
    mods = {"good": _fake_suite_module("good", good), "bad": _fake_suite_module("bad", bad),
            "boom": _fake_suite_module("boom", exc=RuntimeError("suite exploded")),
            "stop": _fake_suite_module("stop", exc=KeyboardInterrupt())}
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, m.__name__, m)
    monkeypatch.setattr(_report, "SUITES", _report.SUITES + tuple(mods))
    return mods


class _Collector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)


def test_report_files_parse_and_agree(tmp_path, fake_suites):
    report, paths = _report.run_report(out=tmp_path, quick=True, suites=["good", "bad", "boom"],
                                       show_progress=False)
    data = json.loads(paths["json"].read_text())
    assert data["schema"] == "nonsmooth-report" and data["schema_version"] == 1
    assert [s["name"] for s in data["suites"]] == ["good", "bad", "boom"]
    assert data["summary"] == {"suites_total": 3, "suites_passed": 1, "checks_total": 3, "checks_passed": 2}
    assert data["passed"] is False and data["partial"] is False
    good = data["suites"][0]
    assert good["checks"][0]["numbers"] == {"value": 4.0}
    assert good["checks"][1]["numbers"]["v"] == "nan"  # JSON has no NaN: kept as text, not dropped
    assert "suite exploded" in data["suites"][2]["error"]

    page = paths["html"].read_text()
    parser = _Collector()
    parser.feed(page)
    assert parser.tags.count("svg") == len(FIGS)
    external = [v for k, v in parser.attrs if k in ("src", "href") and v and not v.startswith("#")]
    assert external == []  # self-contained: opens offline
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    for fig in FIGS:
        assert fig.title in page

    md = paths["markdown"].read_text()
    assert "x\\|y" in md  # pipes escaped so the table stays a table
    assert "**FAIL**" in md and "suite exploded" in md

    root = ET.fromstring(paths["junit"].read_text())
    assert root.get("tests") == "3" and root.get("failures") == "1" and root.get("errors") == "1"
    names = [tc.get("name") for tc in root.iter("testcase")]
    assert "must fail" in names and "two plus two" in names


def test_ctrl_c_leaves_a_partial_report(tmp_path, fake_suites):
    report, paths = _report.run_report(out=tmp_path, suites=["good", "stop", "bad"], show_progress=False)
    assert report["partial"] is True and report["passed"] is False
    assert [s["name"] for s in report["suites"]] == ["good"]
    assert "PARTIAL" in paths["markdown"].read_text()
    assert "Partial report" in paths["html"].read_text()


def test_unknown_suite_and_bad_jobs_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown suite"):
        _report.run_report(out=tmp_path, suites=["nope"], show_progress=False)
    with pytest.raises(ValueError, match="jobs must be >= 1, got 0"):
        _report.run_report(out=tmp_path, suites=["environment"], jobs=0, show_progress=False)


def test_svg_line_places_points_on_log_axes():
    svg = figure_svg(FIGS[0].to_json())
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    circles = [(float(c.get("cx")), float(c.get("cy"))) for c in root.iter(ns + "circle")]
    # 4 finite points of "err" + 3 of "ref" (the NaN is dropped, not drawn at 0)
    assert len(circles) == 7
    err = circles[:4]
    dx = [b[0] - a[0] for a, b in zip(err, err[1:])]
    assert max(dx) - min(dx) < 0.2  # equal decades are equally spaced on a log axis
    dy = [b[1] - a[1] for a, b in zip(err, err[1:])]
    assert all(d > 0 for d in dy)  # decreasing error is drawn going down (SVG y grows downward)


def test_cli_rejects_bad_arguments(capsys, tmp_path):
    assert cli_main(["report", "--out", str(tmp_path), "--frameworks", "tensorflow"]) == 2
    assert "tensorflow" in capsys.readouterr().err
    assert cli_main(["report", "--out", str(tmp_path), "--suites", "environment,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["bench", "nonexistent"])


def test_doctor_reports_the_backend_in_use(capsys):
    from nonsmooth.solvers._isotonic import pav_backend

    code = cli_main(["doctor", "--json", "--require-c"])
    env = json.loads(capsys.readouterr().out)
    assert env["pav"]["backend"] == pav_backend()
    assert code == (0 if pav_backend() == "c" else 1)


def test_cli_help_is_complete():
    out = subprocess.run([sys.executable, "-m", "nonsmooth", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("report", "audit", "rules", "prove", "bench", "doctor"):
        assert cmd in out.stdout


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_report_renders_in_headless_chromium(tmp_path, fake_suites):
    _, paths = _report.run_report(out=tmp_path, suites=["good"], show_progress=False)
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1200,1600", paths["html"].as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000


def test_prove_options_reach_the_prove_command(capsys):
    assert cli_main(["prove", "--list"]) == 0
    listed = capsys.readouterr().out
    from nonsmooth.proofs import catalog

    for proof in catalog():
        assert proof.name in listed


def _strip_timing(suite):
    return {k: v for k, v in suite.items() if k != "seconds"}


def test_jobs_run_suites_in_processes_with_the_serial_result(tmp_path):
    serial, _ = _report.run_report(out=tmp_path / "a", suites=["environment", "proofs"], quick=True,
                                   show_progress=False)
    pooled, _ = _report.run_report(out=tmp_path / "b", suites=["environment", "proofs"], quick=True, jobs=2,
                                   show_progress=False)
    assert [s["name"] for s in pooled["suites"]] == ["environment", "proofs"]
    assert [len(s["checks"]) for s in pooled["suites"]] == [len(s["checks"]) for s in serial["suites"]]
    assert [[c["passed"] for c in s["checks"]] for s in pooled["suites"]] == \
        [[c["passed"] for c in s["checks"]] for s in serial["suites"]]


@pytest.mark.slow
def test_scheduler_address_runs_suites_on_dask(tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        report, _ = _report.run_report(out=tmp_path, suites=["environment"], quick=True,
                                       scheduler=cluster.scheduler_address, show_progress=False)
    assert report["suites"][0]["name"] == "environment"
    assert report["suites"][0]["checks"][0]["name"] == "C PAV kernel loaded"
