"""report.json (as a dict) -> Markdown, self-contained HTML, JUnit XML.

Every renderer reads only the JSON dict, so a report can be re-rendered from a saved
``report.json`` and the three outputs can never disagree with it.  The page is laid out
summary-first: a banner stating the outcome (red when a suite failed or errored, naming
it and why), the verdict table and the headline figures on the first screen, the command
line that reproduces the run, then one collapsible section per suite with an anchor per
check.  Check text is shown in full, never cut.
"""
from __future__ import annotations

import html
import json
import re
import xml.etree.ElementTree as ET

from . import _plot

MAX_HEADLINE_FIGURES = 4


# --------------------------------------------------------------------------- shared


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _missed(v) -> bool:
    return isinstance(v, str) and v.startswith("MISSED")


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", "<br>")


def _status(suite: dict) -> str:
    if suite.get("status"):
        return suite["status"]
    return "errored" if suite.get("error") else ("passed" if suite["passed"] else "failed")


def _counts(report: dict) -> dict:
    """The summary, recomputed for schema-1 files that lack the failed/errored counts."""
    s = dict(report["summary"])
    suites = report["suites"]
    s.setdefault("suites_errored", sum(_status(x) == "errored" for x in suites))
    s.setdefault("suites_failed", sum(_status(x) == "failed" for x in suites))
    s.setdefault("checks_failed", s["checks_total"] - s["checks_passed"])
    s.setdefault("warnings", sum(len(x.get("warnings") or []) for x in suites))
    return s


def check_anchors(suite: dict) -> list[str]:
    """One unique, stable anchor per check: ``check-<suite>-<slug of the check name>``."""
    seen: dict = {}
    out = []
    for c in suite["checks"]:
        slug = re.sub(r"[^a-z0-9]+", "-", str(c["name"]).lower()).strip("-")[:72] or "check"
        base = f"check-{suite['name']}-{slug}"
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out


def _reason(suite: dict) -> str:
    """Why a suite did not pass, in one line."""
    if suite.get("error"):
        return suite["error"].strip().splitlines()[-1] if suite["error"].strip() else "raised an exception"
    failed = [c["name"] for c in suite["checks"] if not c["passed"]]
    shown = "; ".join(failed[:3]) + (f"; and {len(failed) - 3} more" if len(failed) > 3 else "")
    return f"{len(failed)} of {len(suite['checks'])} checks failed: {shown}"


def headline(report: dict) -> str:
    """The outcome in one sentence, as the banner of report.md and index.html states it."""
    s = _counts(report)
    suites = report["suites"]
    if report.get("partial"):
        text = (f"PARTIAL: {report.get('interrupted_reason') or 'interrupted'}; "
                f"only the {len(suites)} suite(s) below ran.")
    elif report["passed"]:
        text = f"PASSED: all {s['suites_total']} suites passed, {s['checks_passed']}/{s['checks_total']} checks."
    else:
        bad = [x for x in suites if _status(x) != "passed"]
        parts = [f"{x['name']} {_status(x)} ({_reason(x)})" for x in bad]
        text = (f"FAILED: {len(bad)} of {s['suites_total']} suites did not pass "
                f"({s['suites_failed']} failed, {s['suites_errored']} errored; "
                f"{s['checks_passed']}/{s['checks_total']} checks passed): " + "; ".join(parts) + ".")
    if s["warnings"]:
        text += (f" {s['warnings']} warning(s), e.g. benchmark targets MISSED "
                 "(timings are reported, not pass/fail).")
    return text


def _repro_lines(report: dict) -> list[tuple[str, str]]:
    env = report.get("environment") or {}
    versions = ", ".join(f"{k} {env[k]}" for k in ("nonsmooth", "python", "numpy", "scipy", "sympy", "torch",
                                                    "jax", "jaxlib") if env.get(k))
    pav = env.get("pav") or {}
    rows = [
        ("command", report.get("command") or "nonsmooth report" + (" --quick" if report.get("quick") else "")),
        ("seed", report.get("seed") or "fixed seeds in every suite"),
        ("versions", versions),
        ("machine", f"{env.get('platform', '?')}, {env.get('cpu_count', '?')} CPUs, "
                    f"{env.get('implementation', '')} {env.get('python', '')}, PAV backend "
                    f"{pav.get('backend', '?')}"),
        ("generated", f"{report['generated']} ({'quick' if report.get('quick') else 'full'} run, "
                      f"{report['seconds']:.1f} s)"),
    ]
    return rows


# --------------------------------------------------------------------------- Markdown


def _md_error(suite: dict) -> list[str]:
    d = suite.get("error_detail")
    if not d:
        return ["```", suite["error"].rstrip(), "```", ""]
    out = [f"> **ERRORED** — `{d['type']}`: {_md_escape(d['message'])}", ">",
           f"> where: `{d.get('where', '')}`", ">", "> inputs:", ">"]
    out += [f"> - {k}: `{v}`" for k, v in d.get("inputs", {}).items()]
    out += [">", f"> **What to do:** {d.get('hint', '')}", "",
            "<details><summary>Full traceback</summary>", "", "```", d.get("traceback", "").rstrip(), "```",
            "", "</details>", ""]
    return out


def to_markdown(report: dict) -> str:
    s = _counts(report)
    out = ["# nonsmooth correctness report", "",
           f"> **{html.escape(report.get('headline') or headline(report))}**", ""]
    out += [f"Generated {report['generated']} by nonsmooth {report['nonsmooth_version']} "
            f"({'quick' if report.get('quick') else 'full'} run, {report['seconds']:.1f} s): "
            f"{s['suites_passed']}/{s['suites_total']} suites passed, {s['suites_failed']} failed, "
            f"{s['suites_errored']} errored; {s['checks_passed']}/{s['checks_total']} checks passed; "
            f"{s['warnings']} warning(s).", "",
            "| suite | status | checks | warnings | seconds |", "|---|---|---|---|---|"]
    for suite in report["suites"]:
        n = len(suite["checks"])
        k = sum(c["passed"] for c in suite["checks"])
        st = _status(suite)
        st = st if st == "passed" else f"**{st.upper()}**"
        w = len(suite.get("warnings") or [])
        out.append(f"| [{suite['title']}](#suite-{suite['name']}) | {st} | {k}/{n} | "
                   f"{f'**{w} MISSED**' if w else ''} | {suite['seconds']:.1f} |")
    out.append("")
    warnings = [(x["name"], w) for x in report["suites"] for w in x.get("warnings") or []]
    if warnings:
        out += ["**Warnings** (do not fail a suite):", ""] + [f"- {name}: {_md_escape(w)}" for name, w in warnings]
        out.append("")
    out += ["## Reproduce", ""] + [f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}"
                                   for k, v in _repro_lines(report)] + [""]
    fig_no = 0
    for suite in report["suites"]:
        st = _status(suite)
        out += [f'<a id="suite-{suite["name"]}"></a>', "",
                f"## {suite['title']} — {st if st == 'passed' else st.upper()}", ""]
        if suite.get("summary"):
            out += [suite["summary"], ""]
        if suite.get("error"):
            out += _md_error(suite)
        for w in suite.get("warnings") or []:
            out.append(f"- **warning**: {_md_escape(w)}")
        if suite.get("warnings"):
            out.append("")
        if suite["checks"]:
            out += ["| check | result | detail |", "|---|---|---|"]
            for c, anchor in zip(suite["checks"], check_anchors(suite)):
                out.append(f'| <a id="{anchor}"></a>{_md_escape(c["name"])} | '
                           f"{'pass' if c['passed'] else '**FAIL**'} | {_md_escape(c.get('detail', ''))} |")
            out.append("")
        for t in suite.get("tables", []):
            out += [f"**{t['title']}**", "", "| " + " | ".join(_md_escape(str(c)) for c in t["columns"]) + " |",
                    "|" + "---|" * len(t["columns"])]
            for row in t["rows"]:
                out.append("| " + " | ".join(f"**{_md_escape(_cell(v))}**" if _missed(v) else _md_escape(_cell(v))
                                             for v in row) + " |")
            if t.get("note"):
                out += ["", f"_{t['note']}_"]
            out.append("")
        for f in suite.get("figures", []):
            fig_no += 1
            out += [f"_Figure {fig_no}: {f['title']}."
                    + (f" {f['caption']}" if f.get("caption") else "") + " (drawn in index.html)_", ""]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- HTML

_CSS = """
:root{--ok:#17702f;--bad:#b00020;--warn:#8a5a00;--line:#d9d9d9;--muted:#5f6368}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1f1f1f;
 max-width:1260px;margin:0 auto;padding:14px 18px 40px}
h1{font-size:21px;margin:0}h2{font-size:17px;margin:26px 0 8px}h3{font-size:14px;margin:16px 0 6px}
.meta{color:var(--muted);margin:2px 0 10px;font-size:13px}
a{color:#0b57d0}code{font-family:"DejaVu Sans Mono",monospace;font-size:12.5px;background:#f3f3f3;padding:1px 4px;
 border-radius:3px;overflow-wrap:anywhere}
.banner{border-radius:6px;padding:9px 13px;margin:8px 0;font-size:14.5px;border:1px solid}
.banner.pass{background:#e7f4ea;border-color:#9ccfa8;color:#0f4d21}
.banner.fail{background:#fde7ea;border-color:#e59aa6;color:#7a0016}
.banner.partial,.banner.warn{background:#fff4d6;border-color:#e3c36d;color:#5c3d00}
.banner ul{margin:4px 0 0 0;padding-left:20px}.banner li{margin:2px 0}
.banner details{display:inline}.banner details[open]{display:block}
.banner summary{cursor:pointer;display:inline;text-decoration:underline;color:#0b57d0}
.overview{display:grid;grid-template-columns:minmax(380px,480px) 1fr;gap:18px;align-items:start;margin-top:10px}
table{border-collapse:collapse;font-size:13px}td,th{border-bottom:1px solid var(--line);padding:4px 8px;text-align:left;
 vertical-align:top}th{background:#f5f5f5;font-weight:600}
.verdicts table{width:100%}.verdicts td:nth-child(3),.verdicts th:nth-child(3){white-space:nowrap;text-align:right}
.badge{display:inline-block;border-radius:10px;padding:0 8px;font-size:12px;font-weight:700;white-space:nowrap}
.badge.passed{background:#dff1e3;color:var(--ok)}.badge.failed,.badge.errored{background:#fbd9de;color:var(--bad)}
.badge.warn{background:#fdecc2;color:var(--warn)}
.headline-figures{display:grid;grid-template-columns:1fr 1fr;gap:8px 14px}
figure{margin:0}figcaption{font-size:12.5px;color:#333;margin-top:2px}
.headline-figures figcaption{font-size:12px}
svg.plot{display:block;max-width:100%;height:auto}
.repro{margin-top:14px;font-size:13px}.repro table{width:100%}.repro th{width:90px;background:none;font-weight:600}
details.suite{border:1px solid var(--line);border-radius:6px;margin:8px 0;background:#fff}
details.suite>summary{cursor:pointer;padding:8px 12px;font-size:15px;font-weight:600;list-style-position:outside;
 margin-left:14px}
details.suite[open]>summary{border-bottom:1px solid var(--line)}
.suite-body{padding:6px 14px 12px}.muted{color:var(--muted);font-weight:400;font-size:13px}
.figures{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:14px;margin:10px 0}
table.checks{width:100%}table.checks td.detail{white-space:pre-wrap;overflow-wrap:anywhere}
table.checks td.result{white-space:nowrap;font-weight:700}td.pass{color:var(--ok)}td.fail{color:var(--bad)}
tr.failed-check{background:#fff1f3}tr:target{outline:2px solid #0b57d0}
a.anchor{color:#9aa0a6;text-decoration:none;margin-right:4px}a.anchor:hover{color:#0b57d0}
details.numbers summary{cursor:pointer;color:var(--muted);font-size:12px}
details.numbers pre{white-space:pre-wrap;overflow-wrap:anywhere;font-size:11.5px;max-height:320px;overflow:auto}
.data-table{display:block;overflow-x:auto;max-width:100%}.note{font-size:12.5px;color:#444}
td.missed{color:var(--bad);font-weight:700}
.error-block{border:1px solid #e59aa6;background:#fff5f6;border-radius:6px;padding:8px 12px;margin:8px 0}
.error-block pre{white-space:pre-wrap;overflow-wrap:anywhere;font-size:12px;background:#fafafa;padding:8px}
.error-block .message{white-space:pre-wrap;overflow-wrap:anywhere;font-weight:600}
.toolbar{float:right;font-size:12.5px}.toolbar button{font:inherit;margin-left:6px;cursor:pointer}
@media (max-width:900px){.overview{grid-template-columns:1fr}.figures{grid-template-columns:1fr}}
"""

_JS = """
function openTarget(){var id=decodeURIComponent(location.hash.slice(1));if(!id)return;
 var el=document.getElementById(id);if(!el)return;
 for(var p=el;p;p=p.parentElement){if(p.tagName==='DETAILS')p.open=true;}el.scrollIntoView();}
window.addEventListener('hashchange',openTarget);document.addEventListener('DOMContentLoaded',openTarget);
function setAll(open){document.querySelectorAll('details.suite').forEach(function(d){d.open=open;});}
"""


def _figure_html(fig: dict, number: int, *, small: bool, uid: str) -> str:
    e = html.escape
    # the first screen shows the title only; the full caption is with the figure in its suite
    caption = (f"<figcaption><b>Figure {number}.</b> {e(fig.get('title', ''))}."
               + (f" {e(fig['caption'])}" if fig.get("caption") and not small else "") + "</figcaption>")
    if not _plot.available():
        body = ('<p class="note">Figure not drawn: matplotlib is not installed '
                "(pip install 'nonsmooth[report]').</p>")
    else:
        try:
            body = _plot.figure_svg(fig, small=small, uid=uid)
        except Exception as err:  # a broken figure must not take the report down with it
            body = f'<p class="note">Figure not drawn: {e(type(err).__name__)}: {e(str(err))}</p>'
    return f'<figure id="{uid}">{body}{caption}</figure>'


def _error_html(suite: dict) -> str:
    e = html.escape
    d = suite.get("error_detail")
    if not d:
        return f'<div class="error-block"><pre>{e(suite["error"])}</pre></div>'
    rows = "".join(f"<tr><th>{e(str(k))}</th><td><code>{e(str(v))}</code></td></tr>"
                   for k, v in (d.get("inputs") or {}).items())
    return (f'<div class="error-block"><p class="message">{e(d["type"])}: {e(d["message"])}</p>'
            f"<p>Where: <code>{e(d.get('where', ''))}</code></p>"
            f"<p><b>Inputs</b></p><table>{rows}</table>"
            f"<p><b>What to do:</b> {e(d.get('hint', ''))}</p>"
            f"<details><summary>Full traceback</summary><pre>{e(d.get('traceback', ''))}</pre></details></div>")


def _table_html(t: dict) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(c))}</th>" for c in t["columns"])
    body = "".join("<tr>" + "".join(f'<td class="missed">{e(_cell(v))}</td>' if _missed(v) else f"<td>{e(_cell(v))}</td>"
                                    for v in row) + "</tr>" for row in t["rows"])
    note = f'<p class="note">{e(t["note"])}</p>' if t.get("note") else ""
    return f'<h3>{e(t["title"])}</h3><table class="data-table"><tr>{head}</tr>{body}</table>{note}'


def _badge(status: str) -> str:
    word = {"passed": "passed", "failed": "FAILED", "errored": "ERRORED"}.get(status, status)
    return f'<span class="badge {html.escape(status)}">{word}</span>'


def to_html(report: dict) -> str:
    e = html.escape
    s = _counts(report)
    suites = report["suites"]
    verdict = "partial" if report.get("partial") else ("pass" if report["passed"] else "fail")
    body = ['<header><div class="toolbar"><button type="button" onclick="setAll(true)">expand all</button>'
            '<button type="button" onclick="setAll(false)">collapse all</button></div>'
            "<h1>nonsmooth correctness report</h1>"
            f'<p class="meta">{e(report["generated"])} · nonsmooth {e(str(report["nonsmooth_version"]))} · '
            f'{"quick" if report.get("quick") else "full"} run · {report["seconds"]:.1f} s · '
            '<a href="#reproduce">how to reproduce</a></p></header>']

    # The banner: the outcome, and for each suite that did not pass, its name and why.
    bad = [x for x in suites if _status(x) != "passed"]
    if report.get("partial"):
        word, lead = "PARTIAL", (f"{report.get('interrupted_reason') or 'interrupted'}; only the "
                                 f"{len(suites)} suite(s) below ran.")
    elif report["passed"]:
        word, lead = "PASSED", (f"All {s['suites_total']} suites passed, "
                                f"{s['checks_passed']}/{s['checks_total']} checks.")
    else:
        word, lead = "FAILED", (f"{len(bad)} of {s['suites_total']} suites did not pass ({s['suites_failed']} "
                                f"failed, {s['suites_errored']} errored); {s['checks_passed']}/{s['checks_total']} "
                                "checks passed.")
    items = ""
    if bad:
        items = "<ul>" + "".join(
            f'<li><a href="#suite-{e(x["name"])}">{e(x["title"])}</a> <b>{_status(x).upper()}</b>: '
            f"{e(_reason(x))}</li>" for x in bad) + "</ul>"
    body.append(f'<div class="banner {verdict}" role="status" id="verdict"><b>{e(word)}</b> {e(lead)}{items}</div>')
    warnings = [(x, w) for x in suites for w in x.get("warnings") or []]
    if warnings:
        per_suite: dict = {}
        for x, _ in warnings:
            per_suite[x["name"]] = per_suite.get(x["name"], 0) + 1
        where = ", ".join(f'<a href="#suite-{e(n)}">{e(n)}</a> {k}' for n, k in per_suite.items())
        listed = "".join(f"<li>{e(x['name'])}: {e(w)}</li>" for x, w in warnings)
        body.append(f'<div class="banner warn" role="status"><b>{len(warnings)} warning(s)</b> ({where}): '
                    "benchmark targets MISSED and other findings that do not fail a suite; timings depend on "
                    f"the machine's load. <details><summary>list them</summary><ul>{listed}</ul></details></div>")

    # First screen: the verdict table and the headline figures.
    rows = []
    for x in suites:
        n, k = len(x["checks"]), sum(bool(c["passed"]) for c in x["checks"])
        w = len(x.get("warnings") or [])
        warn = f' <span class="badge warn">{w} MISSED</span>' if w else ""
        rows.append(f'<tr><td><a href="#suite-{e(x["name"])}">{e(x["title"])}</a></td>'
                    f"<td>{_badge(_status(x))}{warn}</td><td>{k}/{n}</td></tr>")
    totals = (f"<tr><th>total</th><th>{s['suites_passed']}/{s['suites_total']} passed</th>"
              f"<th>{s['checks_passed']}/{s['checks_total']}</th></tr>")
    figures = [(x, f) for x in suites for f in x.get("figures", [])]
    numbers = {id(f): i for i, (_, f) in enumerate(figures, 1)}
    head_figs = [(x, f) for x, f in figures if f.get("headline")][:MAX_HEADLINE_FIGURES]
    head_html = "".join(
        _figure_html(f, numbers[id(f)], small=True, uid=f"head{numbers[id(f)]}").replace(
            "<figcaption>", f'<figcaption><a href="#fig{numbers[id(f)]}">{e(x["name"])}</a> · ', 1)
        for x, f in head_figs)
    body.append('<main class="overview"><section class="verdicts"><table><tr><th>suite</th><th>status</th>'
                f'<th>checks</th></tr>{"".join(rows)}{totals}</table></section>'
                f'<section class="headline-figures">{head_html}</section></main>')

    repro = "".join(f"<tr><th>{e(k)}</th><td>{f'<code>{e(v)}</code>' if k == 'command' else e(v)}</td></tr>"
                    for k, v in _repro_lines(report))
    body.append(f'<section class="repro" id="reproduce"><h2>Reproduce this run</h2><table>{repro}</table></section>')

    body.append("<h2>Details by suite</h2>")
    for x in suites:
        st = _status(x)
        n, k = len(x["checks"]), sum(bool(c["passed"]) for c in x["checks"])
        warn_note = f" · {len(x['warnings'])} warning(s)" if x.get("warnings") else ""
        part = [f'<details class="suite" id="suite-{e(x["name"])}"{"" if st == "passed" else " open"}>'
                f"<summary>{_badge(st)} {e(x['title'])} <span class=\"muted\">· {k}/{n} checks · "
                f"{x['seconds']:.1f} s{warn_note}</span></summary><div class=\"suite-body\">"]
        if x.get("summary"):
            part.append(f"<p>{e(x['summary'])}</p>")
        if x.get("error"):
            part.append(_error_html(x))
        if x.get("warnings"):
            part.append("<ul>" + "".join(f'<li class="missed">{e(w)}</li>' for w in x["warnings"]) + "</ul>")
        if x.get("figures"):
            part.append('<div class="figures">' + "".join(
                _figure_html(f, numbers[id(f)], small=False, uid=f"fig{numbers[id(f)]}") for f in x["figures"])
                + "</div>")
        if x["checks"]:
            part.append('<table class="checks"><tr><th>check</th><th>result</th><th>detail</th></tr>')
            for c, anchor in zip(x["checks"], check_anchors(x)):
                ok = bool(c["passed"])
                numbers_html = ""
                if c.get("numbers"):
                    numbers_html = ('<details class="numbers"><summary>numbers</summary><pre>'
                                    f"{e(json.dumps(c['numbers'], indent=1))}</pre></details>")
                row_class = "" if ok else ' class="failed-check"'
                part.append(f'<tr id="{e(anchor)}"{row_class}>'
                            f'<td><a class="anchor" href="#{e(anchor)}" title="link to this check">¶</a>'
                            f'{e(c["name"])}</td><td class="result {"pass" if ok else "fail"}">'
                            f'{"pass" if ok else "FAIL"}</td><td class="detail">{e(str(c.get("detail", "")))}'
                            f"{numbers_html}</td></tr>")
            part.append("</table>")
        for t in x.get("tables", []):
            part.append(_table_html(t))
        part.append("</div></details>")
        body.append("".join(part))
    title = f"nonsmooth report — {word}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{e(title)}</title><style>{_CSS}</style><script>{_JS}</script></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# --------------------------------------------------------------------------- JUnit


def to_junit(report: dict) -> str:
    root = ET.Element("testsuites", name="nonsmooth report")
    total = failures = errors = 0
    for suite in report["suites"]:
        checks = suite["checks"]
        n_fail = sum(not c["passed"] for c in checks)
        ts = ET.SubElement(root, "testsuite", name=suite["name"], tests=str(max(len(checks), 1)),
                           failures=str(n_fail), errors="1" if suite.get("error") else "0",
                           time=f"{suite['seconds']:.3f}")
        for c in checks:
            tc = ET.SubElement(ts, "testcase", classname=f"nonsmooth.{suite['name']}", name=c["name"])
            if not c["passed"]:
                fail = ET.SubElement(tc, "failure", message=str(c.get("detail", "")).splitlines()[0][:500]
                                     if c.get("detail") else "check failed")
                fail.text = str(c.get("detail", "")) + "\n" + json.dumps(c.get("numbers", {}), indent=1)
        if suite.get("error"):
            tc = ET.SubElement(ts, "testcase", classname=f"nonsmooth.{suite['name']}", name="suite")
            d = suite.get("error_detail") or {}
            err = ET.SubElement(tc, "error", message=suite["error"].strip().splitlines()[-1][:500]
                                if suite["error"].strip() else "suite raised", type=d.get("type", "Exception"))
            err.text = (f"inputs: {json.dumps(d.get('inputs', {}))}\nwhat to do: {d.get('hint', '')}\n\n"
                        + d.get("traceback", suite["error"])) if d else suite["error"]
            errors += 1
        total += len(checks)
        failures += n_fail
    root.set("tests", str(total))
    root.set("failures", str(failures))
    root.set("errors", str(errors))
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
