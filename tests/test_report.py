"""The report pipeline: suites -> report.json -> Markdown / HTML / JUnit, and the CLI around it.

Oracles: Python's own html.parser and xml.etree parse what we write; JSON round-trips;
numbers placed in a fake suite must come back out unchanged; a fake suite that fails or
raises must be named, with its reason, in every output's headline.
"""
import html.parser
import json
import os
import re
import subprocess
import sys
import types
import xml.etree.ElementTree as ET

import pytest

from nonsmooth.reports import Check, Figure, SuiteResult, Table, _report
from nonsmooth.reports._cli import main as cli_main
from nonsmooth.reports._suite import inputs


def _fake_suite_module(name, result=None, exc=None, calls=None):
    mod = types.ModuleType(f"nonsmooth.reports._suite_{name}")

    def run(*, quick=False, progress=None):
        if calls is not None:
            calls.append(name)
        if progress is not None:
            progress(f"{name}: the step before the error")
        if exc is not None:
            with inputs(op="rank", regularization="kl", n=5, regularization_strength=0.3):
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
    slow = SuiteResult("slow", "Slow suite", [Check("ran", True)],
                       tables=[Table("speed", ["op", "target"], [["sort", "MISSED: 0.61 > 0.5x torch.sort"],
                                                                 ["rank", "met"]])],
                       warnings=["sort: MISSED: 0.61 > 0.5x torch.sort"])
    calls = []
    mods = {"good": _fake_suite_module("good", good, calls=calls), "bad": _fake_suite_module("bad", bad),
            "slow": _fake_suite_module("slow", slow),
            "boom": _fake_suite_module("boom", exc=RuntimeError("oracle: SLSQP failed: Iteration limit reached")),
            "stop": _fake_suite_module("stop", exc=KeyboardInterrupt())}
    mods["calls"] = calls
    for n, m in mods.items():
        if n != "calls":
            monkeypatch.setitem(sys.modules, m.__name__, m)
    monkeypatch.setattr(_report, "SUITES", _report.SUITES + tuple(n for n in mods if n != "calls"))
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
    assert data["schema"] == "nonsmooth-report" and data["schema_version"] == 2
    assert [s["name"] for s in data["suites"]] == ["good", "bad", "boom"]
    assert data["summary"] == {"suites_total": 3, "suites_passed": 1, "suites_failed": 1, "suites_errored": 1,
                               "checks_total": 3, "checks_passed": 2, "checks_failed": 1, "warnings": 0}
    assert data["passed"] is False and data["partial"] is False and data["verdict"] == "failed"
    assert [s["status"] for s in data["suites"]] == ["passed", "failed", "errored"]
    good = data["suites"][0]
    assert good["checks"][0]["numbers"] == {"value": 4.0}
    assert good["checks"][1]["numbers"]["v"] == "nan"  # JSON has no NaN: kept as text, not dropped
    assert "Iteration limit reached" in data["suites"][2]["error"]
    assert data["command"].startswith("nonsmooth report --out") and "--quick" in data["command"]
    assert "fixed" in data["seed"]

    page = paths["html"].read_text()
    parser = _Collector()
    parser.feed(page)
    assert parser.tags.count("svg") == len(FIGS)
    external = [v for k, v in parser.attrs if k in ("src", "href") and v and not v.startswith(("#", "data:"))]
    assert external == []  # self-contained: opens offline
    assert "<script src" not in page and "<link" not in page
    assert re.findall(r"(?:src|href)=\"https?:", page) == []
    for fig in FIGS:
        assert fig.title in page
    assert page.count("<details class=\"suite\"") == 3
    for suite in data["suites"]:
        assert f'id="suite-{suite["name"]}"' in page
    assert 'id="check-good-two-plus-two"' in page and 'href="#check-good-two-plus-two"' in page

    md = paths["markdown"].read_text()
    assert "x\\|y" in md  # pipes escaped so the table stays a table
    assert "**FAIL**" in md and "Iteration limit reached" in md
    assert '<a id="check-bad-must-fail"></a>' in md

    root = ET.fromstring(paths["junit"].read_text())
    assert root.get("tests") == "3" and root.get("failures") == "1" and root.get("errors") == "1"
    names = [tc.get("name") for tc in root.iter("testcase")]
    assert "must fail" in names and "two plus two" in names


def _banner(page: str) -> str:
    m = re.search(r'<div class="banner (\w+)" role="status" id="verdict">(.*?)</div>', page, re.S)
    assert m, "no verdict banner"
    return m.group(1), re.sub(r"<[^>]+>", "", m.group(2))


def test_failed_and_errored_suites_head_every_output(tmp_path, fake_suites):
    report, paths = _report.run_report(out=tmp_path, quick=True, suites=["good", "bad", "boom"],
                                       show_progress=False)
    # JSON: the headline names both suites and why; the errored one carries its inputs and a hint
    assert report["headline"].startswith("FAILED: 2 of 3 suites did not pass (1 failed, 1 errored")
    assert "bad failed (1 of 1 checks failed: must fail)" in report["headline"]
    assert "boom errored (RuntimeError: oracle: SLSQP failed: Iteration limit reached)" in report["headline"]
    detail = report["suites"][2]["error_detail"]
    assert detail["type"] == "RuntimeError"
    assert detail["inputs"]["n"] == 5 and detail["inputs"]["regularization_strength"] == 0.3
    assert detail["inputs"]["suite"] == "boom" and detail["inputs"]["quick"] is True
    assert detail["inputs"]["step"] == "boom: the step before the error"
    assert "nonsmooth report --suites boom --quick" in detail["hint"]
    assert detail["hint"].startswith("The independent reference (the oracle) failed")
    assert "test_report.py" in detail["where"] and "Traceback" in detail["traceback"]

    # HTML: a red banner first, naming each suite and its reason; the error block leads with
    # the message, inputs and what to do, and keeps the traceback folded away
    page = paths["html"].read_text()
    kind, text = _banner(page)
    assert kind == "fail" and text.startswith("FAILED 2 of 3 suites did not pass (1 failed, 1 errored)")
    assert "Bad suite FAILED: 1 of 1 checks failed: must fail" in text
    assert "Boom ERRORED: RuntimeError: oracle: SLSQP failed: Iteration limit reached" in text
    block = page[page.index('<div class="error-block">'):]
    assert block.index("Iteration limit reached") < block.index("What to do") < block.index("Full traceback")
    assert "<details><summary>Full traceback</summary>" in block
    assert "regularization_strength" in block and "0.3" in block
    assert page.index('id="verdict"') < page.index('class="overview"') < page.index('id="suite-good"')
    assert '<details class="suite" id="suite-bad" open>' in page  # what failed is open
    assert '<details class="suite" id="suite-good">' in page  # what passed is folded

    # Markdown: the same headline as the first thing after the title
    md = paths["markdown"].read_text().splitlines()
    assert md[2].startswith("> **FAILED: 2 of 3 suites did not pass")
    assert "| [Boom](#suite-boom) | **ERRORED** |" in "\n".join(md)
    assert any("What to do" in line for line in md)


def test_a_passing_report_says_so_and_counts_missed_targets(tmp_path, fake_suites):
    report, paths = _report.run_report(out=tmp_path, suites=["good", "slow"], show_progress=False)
    assert report["passed"] is True and report["summary"]["warnings"] == 1
    assert report["headline"].startswith("PASSED: all 2 suites passed, 3/3 checks.")
    assert "1 warning(s), e.g. benchmark targets MISSED" in report["headline"]
    page = paths["html"].read_text()
    kind, text = _banner(page)
    assert kind == "pass" and text.startswith("PASSED All 2 suites passed")
    assert '<div class="banner warn"' in page and "sort: MISSED: 0.61 &gt; 0.5x torch.sort" in page
    assert '<span class="badge warn">1 MISSED</span>' in page  # in the verdict table, on the first screen
    assert '<td class="missed">MISSED: 0.61 &gt; 0.5x torch.sort</td>' in page
    md = paths["markdown"].read_text()
    assert "**1 MISSED**" in md and "**MISSED: 0.61 > 0.5x torch.sort**" in md


def test_check_text_is_never_cut(tmp_path, fake_suites):
    _, paths = _report.run_report(out=tmp_path, suites=["good"], show_progress=False)
    long = "x " * 400
    result = SuiteResult("good", "Good", [Check("long", True, long.strip() + " END")])
    fake_suites["good"].run = lambda **kw: result
    _, paths = _report.run_report(out=tmp_path, suites=["good"], show_progress=False)
    for key in ("html", "markdown", "json"):
        assert (long.strip() + " END") in paths[key].read_text()
    assert "…" not in paths["html"].read_text()


def test_benchmark_tables_turn_missed_targets_into_warnings():
    from nonsmooth.reports._suite_benchmarks import missed_targets

    t = Table("sort", ["shape", "dtype", "op", "ours / floor (target <= 1.3)", "target"],
              [["(128, 1000)", "float64", "soft_rank", 1.1, "MISSED: 0.61 > 0.5x torch.sort"],
               ["(1, 1000)", "float32", "soft_sort", 1.6, "met"]])
    got = missed_targets("sort", t)
    assert got == ["sort: (128, 1000) float64 soft_rank: MISSED: 0.61 > 0.5x torch.sort",
                   "sort: (1, 1000) float32 soft_sort met: MISSED: ours / floor (target <= 1.3) = 1.6 > 1.3"]


def test_the_output_folder_is_checked_before_any_suite_runs(fake_suites):
    with pytest.raises(_report.OutputDirError, match="'/dev/null/x': Not a directory"):
        _report.run_report(out="/dev/null/x", suites=["good"], show_progress=False)
    assert fake_suites["calls"] == []


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path, fake_suites, capsys):
    _report.run_report(out=tmp_path, suites=["good", "bad"], show_progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines() == ["[1/2] good: running", "[1/2] good         passed 2/2 checks (0.0 s)",
                                "[2/2] bad: running", "[2/2] bad          FAILED 0/1 checks (0.0 s)"]


def test_progress_is_a_tqdm_bar_on_a_terminal(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    code = ("from nonsmooth.reports import run_report; "
            f"run_report(out={str(tmp_path)!r}, quick=True, suites=['environment'])")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=120) == 0
    os.close(leader)
    out = b"".join(chunks).decode(errors="replace")
    assert "\r" in out and "suites" in out  # tqdm redraws one line in place
    assert "[1/1] environment  passed 3/3 checks" in out


def test_ctrl_c_leaves_a_partial_report(tmp_path, fake_suites):
    report, paths = _report.run_report(out=tmp_path, suites=["good", "stop", "bad"], show_progress=False)
    assert report["partial"] is True and report["passed"] is False
    assert [s["name"] for s in report["suites"]] == ["good"]
    assert "PARTIAL: interrupted (Ctrl-C) after 1 of 3 suites" in paths["markdown"].read_text()
    assert '<div class="banner partial" role="status" id="verdict"><b>PARTIAL</b>' in paths["html"].read_text()
    assert report["verdict"] == "partial"


def test_unknown_suite_and_bad_jobs_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown suite"):
        _report.run_report(out=tmp_path, suites=["nope"], show_progress=False)
    with pytest.raises(ValueError, match="jobs must be an integer >= 1, got 0"):
        _report.run_report(out=tmp_path, suites=["environment"], jobs=0, show_progress=False)


def test_log_axes_space_decades_equally_and_label_them():
    from nonsmooth.reports._plot import figure_svg

    svg = figure_svg(FIGS[0].to_json(), uid="t")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    # tick labels are text (svg.fonttype none): find the x-axis decades (groups "xtick_*") and where they sit
    ticks = {}
    for g in root.iter(ns + "g"):
        if not (g.get("id") or "").startswith("xtick_"):
            continue
        for t in g.iter(ns + "text"):
            label = "".join(t.itertext()).strip()
            if label in ("1", "10", "100", "1000"):
                ticks.setdefault(label, []).append(float(t.get("x")))
    xs = [min(ticks[k]) for k in ("1", "10", "100", "1000")]
    gaps = [b - a for a, b in zip(xs, xs[1:])]
    assert all(g > 0 for g in gaps) and max(gaps) - min(gaps) < 0.5  # equal decades, equal spacing
    texts = ["".join(t.itertext()) for t in root.iter(ns + "text")]
    assert "line log-log" not in texts and root.get("aria-label") == "line log-log"  # title: the caption


def test_every_figure_kind_draws_text_as_text():
    from nonsmooth.reports._plot import figure_svg

    for i, fig in enumerate(FIGS):
        svg = figure_svg(fig.to_json(), uid=f"k{i}")
        assert svg.startswith("<svg") and "<text" in svg and "font-family: 'DejaVu Sans'" in svg
        assert re.search(r'id="([^"]+)"', svg)
    with pytest.raises(ValueError, match="kind must be one of"):
        Figure("bad", "pie", [], {})


def test_cli_rejects_bad_arguments(capsys, tmp_path):
    assert cli_main(["report", "--out", str(tmp_path), "--frameworks", "tensorflow"]) == 2
    assert "tensorflow" in capsys.readouterr().err
    assert cli_main(["report", "--out", str(tmp_path), "--suites", "environment,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert cli_main(["bench", "nonexistent"]) == 2


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
