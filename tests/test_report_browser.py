"""index.html opened in real headless Chromium: every figure renders, no text leaves its box.

Oracle: the browser's own layout.  Injected JavaScript opens every collapsible section,
then compares each SVG text element's rendered bounding box with its figure's box and
with the other text of the same figure (overlapping tick labels are the classic failure
of hand-made plots).  Screenshots are saved as artifacts.

- ``test_report_renders_in_chromium``: a report of fake suites with every figure kind at
  its worst (30 long category labels, 58 bars, log axes, error bars, an image with
  levels), one failing and one erroring suite, plus the real quick sort suite.
- ``test_full_report_renders_in_chromium``: the report in ``$NONSMOOTH_REPORT_DIR``
  (``.ci/run`` sets it after running the full ``nonsmooth report``); its screenshots and
  measurements go into that folder.

Both skip, saying why, only when Chromium is not installed; with
``NONSMOOTH_REQUIRE_CHROMIUM=1`` (set by ``.ci/run``) a missing Chromium fails instead.
"""
import json
import os
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _chromium import Chromium, find_chromium  # noqa: E402

from nonsmooth.reports import Check, Figure, SuiteResult, Table, _report  # noqa: E402

pytest.importorskip("matplotlib")

WIDTH, HEIGHT = 1280, 900

_MEASURE = r"""
(() => {
  document.querySelectorAll('details.suite').forEach(d => { d.open = true; });
  const page = document.documentElement;
  const figures = [];
  document.querySelectorAll('figure').forEach(fig => {
    const svg = fig.querySelector('svg.plot');
    const entry = {id: fig.id, svg: !!svg};
    if (!svg) { entry.note = fig.textContent.slice(0, 200); figures.push(entry); return; }
    const box = svg.getBoundingClientRect();
    const container = fig.parentElement.getBoundingClientRect();
    const texts = [...svg.querySelectorAll('text')].map(t => {
      const r = t.getBoundingClientRect();
      return {text: t.textContent.trim(), l: r.left, t: r.top, r: r.right, b: r.bottom};
    }).filter(t => t.text && t.r - t.l > 0 && t.b - t.t > 0);
    const tol = 0.5;
    entry.width = box.width; entry.height = box.height; entry.texts = texts.length;
    entry.outside = texts.filter(t => t.l < box.left - tol || t.r > box.right + tol ||
                                      t.t < box.top - tol || t.b > box.bottom + tol).map(t => t.text);
    entry.overlaps = [];
    for (let i = 0; i < texts.length; i++) for (let j = i + 1; j < texts.length; j++) {
      const a = texts[i], b = texts[j];
      const w = Math.min(a.r, b.r) - Math.max(a.l, b.l), h = Math.min(a.b, b.b) - Math.max(a.t, b.t);
      if (w > 1 && h > 2) entry.overlaps.push([a.text, b.text]);
    }
    entry.beyondContainer = box.right > container.right + 1 || box.left < container.left - 1;
    entry.beyondPage = box.right > page.clientWidth + 1;
    figures.push(entry);
  });
  return {figures, scrollWidth: page.scrollWidth, clientWidth: page.clientWidth};
})()
"""


def _browser_or_skip():
    binary = find_chromium()
    if binary is None:
        if os.environ.get("NONSMOOTH_REQUIRE_CHROMIUM"):
            pytest.fail("NONSMOOTH_REQUIRE_CHROMIUM is set but chromium is not installed")
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
    return Chromium(binary)


def _inspect(index: Path, shots: Path) -> dict:
    """Open the page, measure it closed and open, save screenshots; return the measurements."""
    shots.mkdir(parents=True, exist_ok=True)
    with _browser_or_skip() as browser:
        browser.open(index.resolve().as_uri(), width=WIDTH, height=HEIGHT)
        closed = browser.evaluate("document.documentElement.scrollHeight")
        overview = browser.evaluate(
            "(() => { const r = document.querySelector('.overview').getBoundingClientRect();"
            " return {top: r.top, bottom: r.bottom}; })()")
        banner = browser.evaluate("document.getElementById('verdict').textContent")
        browser.screenshot(shots / "screenshot-summary.png")
        browser.screenshot(shots / "screenshot-page.png", full_page=True)
        layout = browser.evaluate(_MEASURE)
        opened = browser.evaluate("document.documentElement.scrollHeight")
        # a suite's section with its figures, as a reader sees it opened (the README's second picture)
        clip = browser.evaluate(
            "(() => { const s = document.querySelector('#suite-sort') || "
            "[...document.querySelectorAll('details.suite')].find(d => d.querySelector('figure'));"
            " if (!s) return null; const r = s.getBoundingClientRect();"
            " return {x: 0, y: r.top + window.scrollY - 8, width: document.documentElement.clientWidth,"
            " height: Math.min(r.height + 16, 1500)}; })()")
        if clip:
            browser.screenshot(shots / "screenshot-figures.png", clip=clip)
    result = {"page_height_px": closed, "page_height_all_open_px": opened, "viewport": [WIDTH, HEIGHT],
              "overview_bottom_px": overview["bottom"], "banner": banner.strip(), **layout,
              "screenshots": [str(p) for p in sorted(shots.glob("screenshot-*.png"))]}
    (shots / "browser-check.json").write_text(json.dumps(result, indent=1))
    return result


def _assert_figures_render(result: dict, n_expected: int) -> None:
    figures = result["figures"]
    assert len(figures) == n_expected
    not_drawn = [f for f in figures if not f["svg"]]
    assert not_drawn == [], f"figures not drawn: {not_drawn}"
    for f in figures:
        assert f["width"] > 150 and f["height"] > 100, f
        assert f["texts"] >= 2, f  # tick labels at least: text stayed text
        assert f["outside"] == [], f"{f['id']}: text outside its figure: {f['outside']}"
        assert f["overlaps"] == [], f"{f['id']}: overlapping text: {f['overlaps'][:5]}"
        assert not f["beyondContainer"] and not f["beyondPage"], f
    assert result["scrollWidth"] <= result["clientWidth"] + 1  # nothing forces a sideways scroll


def _module(name, result=None, exc=None):
    mod = types.ModuleType(f"nonsmooth.reports._suite_{name}")

    def run(*, quick=False, progress=None):
        if exc is not None:
            raise exc
        return result

    mod.run = run
    return mod


def _stress_figures():
    cats = [f"primitive_{i} @ x = {i / 7:.3f} (spelling #{i % 3})" for i in range(30)]
    return [
        Figure("many long categories", "bar", cats, {"torch": [i % 5 for i in range(30)],
                                                      "jax": [(i + 2) % 5 for i in range(30)]},
               xlabel="case", ylabel="count", headline=True),
        Figure("58 certificates, log scale", "bar", [f"certificate_name_{i:02d}" for i in range(58)],
               {"seconds": [10 ** (-3 + (i % 7) / 2) for i in range(58)]}, ylabel="seconds", logy=True),
        Figure("three dtypes with error bars", "bar", ["float16", "float32", "float64"],
               {"kernels": [0.2, 0.0, 0.0], "term by term": [1.0, 0.1, 0.0]},
               errors={"kernels": [[0.1, 0.3], [0, 0.1], [0, 0.1]], "term by term": [[0.8, 1], [0, 0.2], [0, 0.1]]},
               ylabel="fraction of initialisations", headline=True),
        Figure("log-log with gaps and a reference", "line", [16, 64, 256, 1024, 4096],
               {"measured RMS error": [0.2, 0.1, None, 0.026, 0.013], "theory": [0.21, 0.105, 0.052, 0.026, 0.013]},
               xlabel="N (samples)", ylabel="RMS error", logx=True, logy=True, reference={"tolerance": 0.01},
               headline=True),
        Figure("five series, less than one decade", "line", [0.3, 0.5, 1, 2, 3],
               {f"x[{i}] = value number {i}": [i + v for v in (0, 0.1, 0.2, 0.3, 0.4)] for i in range(5)},
               xlabel="strength", ylabel="soft rank", logx=True, headline=True),
        Figure("zone", "image", [i / 2 - 8 for i in range(31)], {"z": [[(i * j) % 2 for j in range(31)]
                                                                     for i in range(31)]},
               y=[i / 2 - 8 for i in range(31)], xlabel="a (ulps)", ylabel="b (ulps)",
               levels={0: "same gradient", 1: "bifurcates"}),
        Figure("continuous image", "image", [0, 1, 2, 3], {"z": [[0.1, 0.5, 0.9, 1.3], [1.0, 2.0, 3.0, 4.0]]},
               y=[0, 1], zlabel="residual"),
        Figure("intervals", "interval", [f"relu @ 0 #{i}" for i in range(12)],
               {"torch AD": [0.0] * 12, "jax AD": [1.0, None] * 6},
               intervals={"Clarke set": [[0.0, 1.0]] * 11 + [[1.0, 1.0]]}, ylabel="derivative"),
    ]


@pytest.fixture
def stress_suites(monkeypatch):
    good = SuiteResult("good", "Every figure kind at its worst", [Check("a check", True, "x " * 400)],
                       tables=[Table("bench", ["op", "target"], [["sort", "MISSED: 0.61 > 0.5x torch.sort"]])],
                       figures=_stress_figures(), warnings=["sort: MISSED: 0.61 > 0.5x torch.sort"])
    bad = SuiteResult("bad", "A failing suite", [Check("must fail", False, "1 != 2", {"got": 1})])
    mods = {"good": _module("good", good), "bad": _module("bad", bad),
            "boom": _module("boom", exc=RuntimeError("oracle: SLSQP failed: Iteration limit reached"))}
    for m in mods.values():
        monkeypatch.setitem(sys.modules, m.__name__, m)
    monkeypatch.setattr(_report, "SUITES", _report.SUITES + tuple(mods))


def test_report_renders_in_chromium(tmp_path, stress_suites):
    report, paths = _report.run_report(out=tmp_path / "report", quick=True, suites=["good", "bad", "boom", "sort"],
                                       show_progress=False)
    n_figures = sum(len(s["figures"]) for s in report["suites"])
    n_headline = min(4, sum(f["headline"] for s in report["suites"] for f in s["figures"]))
    shots = Path(os.environ.get("NONSMOOTH_SCREENSHOT_DIR") or tmp_path / "shots")
    result = _inspect(paths["html"], shots)
    _assert_figures_render(result, n_figures + n_headline)
    assert result["banner"].startswith("FAILED") and "boom" in result["banner"].lower()
    assert "ERRORED" in result["banner"] and "Iteration limit reached" in result["banner"]
    assert (shots / "screenshot-summary.png").stat().st_size > 20_000
    print(f"screenshots: {result['screenshots']}")


def test_full_report_renders_in_chromium():
    folder = os.environ.get("NONSMOOTH_REPORT_DIR")
    if not folder:
        pytest.skip("set NONSMOOTH_REPORT_DIR to a folder written by `nonsmooth report` (.ci/run does)")
    folder = Path(folder)
    report = json.loads((folder / "report.json").read_text())
    n_figures = sum(len(s["figures"]) for s in report["suites"])
    n_headline = min(4, sum(bool(f.get("headline")) for s in report["suites"] for f in s["figures"]))
    result = _inspect(folder / "index.html", folder)
    _assert_figures_render(result, n_figures + n_headline)
    # summary first: the verdict table and the headline figures fit on the first screen
    assert result["overview_bottom_px"] <= HEIGHT, result["overview_bottom_px"]
    assert result["banner"].startswith("PASSED" if report["passed"] else "FAILED")
    print(f"page height {result['page_height_px']} px (all sections open: {result['page_height_all_open_px']} px); "
          f"screenshots: {result['screenshots']}")


def test_the_browser_check_catches_text_outside_and_overlapping(tmp_path):
    # the failures of the hand-written plots this report used to draw: a label running off the
    # figure, and two x labels on top of each other
    page = tmp_path / "bad.html"
    page.write_text(
        '<!DOCTYPE html><html><body><div class="overview"></div><div id="verdict">x</div><div>'
        '<figure id="bad"><svg class="plot" width="200" height="120" xmlns="http://www.w3.org/2000/svg">'
        '<text x="150" y="50" font-size="14">a label that runs off</text>'
        '<text x="10" y="90" font-size="12">overlap one</text><text x="30" y="92" font-size="12">overlap two</text>'
        "</svg></figure></div></body></html>")
    result = _inspect(page, tmp_path / "shots")
    (fig,) = result["figures"]
    assert fig["outside"] == ["a label that runs off"]
    assert ["overlap one", "overlap two"] in fig["overlaps"]
    with pytest.raises(AssertionError, match="text outside its figure"):
        _assert_figures_render(result, 1)
