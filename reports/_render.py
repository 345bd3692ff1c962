"""report.json (as a dict) -> Markdown, self-contained HTML, JUnit XML.

Every renderer reads only the JSON dict, so a report can be re-rendered from a saved
``report.json`` and the three outputs can never disagree with it.
"""
from __future__ import annotations

import html
import xml.etree.ElementTree as ET

from ._svg import figure_svg


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def to_markdown(report: dict) -> str:
    out = ["# nonsmooth correctness report", ""]
    if report.get("partial"):
        out += ["> **PARTIAL REPORT** — interrupted before every suite ran: "
                f"{report.get('interrupted_reason', 'interrupted')}.", ""]
    s = report["summary"]
    out += [f"Generated {report['generated']} by nonsmooth {report['nonsmooth_version']} "
            f"({'quick' if report.get('quick') else 'full'} run, {report['seconds']:.1f} s).", "",
            f"**{s['checks_passed']}/{s['checks_total']} checks passed** in {s['suites_total']} suites; "
            f"{'all passed' if report['passed'] else 'SOME FAILED'}.", "",
            "| suite | result | checks | seconds |", "|---|---|---|---|"]
    for suite in report["suites"]:
        n = len(suite["checks"])
        k = sum(c["passed"] for c in suite["checks"])
        status = "error" if suite.get("error") else ("pass" if suite["passed"] else "FAIL")
        out.append(f"| [{suite['title']}](#{suite['name']}) | {status} | {k}/{n} | {suite['seconds']:.1f} |")
    out.append("")
    for suite in report["suites"]:
        out += [f'<a id="{suite["name"]}"></a>', f"## {suite['title']}", ""]
        if suite.get("summary"):
            out += [suite["summary"], ""]
        if suite.get("error"):
            out += ["```", suite["error"].rstrip(), "```", ""]
        if suite["checks"]:
            out += ["| check | result | detail |", "|---|---|---|"]
            for c in suite["checks"]:
                out.append(f"| {_md_escape(c['name'])} | {'pass' if c['passed'] else '**FAIL**'} | "
                           f"{_md_escape(c.get('detail', ''))[:300]} |")
            out.append("")
        for t in suite.get("tables", []):
            out += [f"**{t['title']}**", "", "| " + " | ".join(map(str, t["columns"])) + " |",
                    "|" + "---|" * len(t["columns"])]
            for row in t["rows"]:
                out.append("| " + " | ".join(_md_escape(_cell(v)) for v in row) + " |")
            if t.get("note"):
                out += ["", f"_{t['note']}_"]
            out.append("")
        for f in suite.get("figures", []):
            out += [f"_Figure: {f['title']} (see index.html)_", ""]
    return "\n".join(out) + "\n"


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}.pass{color:#17702f;font-weight:600}.fail{color:#b00020;font-weight:700}
.partial{background:#fff3cd;border:1px solid #e0c36c;padding:.6em}pre{background:#f6f6f6;padding:.6em;overflow:auto}
.figures{display:flex;flex-wrap:wrap;gap:1em}.figure{border:1px solid #ddd}
"""


def to_html(report: dict) -> str:
    e = html.escape
    s = report["summary"]
    body = [f"<h1>nonsmooth correctness report</h1>"]
    if report.get("partial"):
        body.append(f'<p class="partial"><b>Partial report</b>: interrupted before every suite ran '
                    f'({e(str(report.get("interrupted_reason", "interrupted")))}).</p>')
    body.append(f"<p>Generated {e(report['generated'])} by nonsmooth {e(report['nonsmooth_version'])} "
                f"({'quick' if report.get('quick') else 'full'} run, {report['seconds']:.1f} s). "
                f"<b>{s['checks_passed']}/{s['checks_total']} checks passed</b>.</p>")
    body.append("<table><tr><th>suite</th><th>result</th><th>checks</th><th>seconds</th></tr>")
    for suite in report["suites"]:
        n = len(suite["checks"])
        k = sum(c["passed"] for c in suite["checks"])
        cls, word = ("pass", "pass") if suite["passed"] else ("fail", "error" if suite.get("error") else "FAIL")
        body.append(f'<tr><td><a href="#{e(suite["name"])}">{e(suite["title"])}</a></td>'
                    f'<td class="{cls}">{word}</td><td>{k}/{n}</td><td>{suite["seconds"]:.1f}</td></tr>')
    body.append("</table>")
    for suite in report["suites"]:
        body.append(f'<section id="{e(suite["name"])}"><h2>{e(suite["title"])}</h2>')
        if suite.get("summary"):
            body.append(f"<p>{e(suite['summary'])}</p>")
        if suite.get("error"):
            body.append(f"<pre>{e(suite['error'])}</pre>")
        if suite["checks"]:
            body.append("<table><tr><th>check</th><th>result</th><th>detail</th></tr>")
            for c in suite["checks"]:
                cls = "pass" if c["passed"] else "fail"
                body.append(f'<tr><td>{e(c["name"])}</td><td class="{cls}">{"pass" if c["passed"] else "FAIL"}'
                            f'</td><td>{e(str(c.get("detail", "")))}</td></tr>')
            body.append("</table>")
        for t in suite.get("tables", []):
            body.append(f"<h3>{e(t['title'])}</h3><table><tr>"
                        + "".join(f"<th>{e(str(c))}</th>" for c in t["columns"]) + "</tr>")
            for row in t["rows"]:
                body.append("<tr>" + "".join(f"<td>{e(_cell(v))}</td>" for v in row) + "</tr>")
            body.append("</table>")
            if t.get("note"):
                body.append(f"<p><i>{e(t['note'])}</i></p>")
        if suite.get("figures"):
            body.append('<div class="figures">')
            for f in suite["figures"]:
                body.append(figure_svg(f))
            body.append("</div>")
        body.append("</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>nonsmooth correctness report</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


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
                fail = ET.SubElement(tc, "failure", message=str(c.get("detail", ""))[:500])
                fail.text = str(c.get("numbers", ""))
        if suite.get("error"):
            tc = ET.SubElement(ts, "testcase", classname=f"nonsmooth.{suite['name']}", name="suite")
            err = ET.SubElement(tc, "error", message="suite raised")
            err.text = suite["error"]
            errors += 1
        total += len(checks)
        failures += n_fail
    root.set("tests", str(total))
    root.set("failures", str(failures))
    root.set("errors", str(errors))
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
