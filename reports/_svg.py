"""Figures as inline SVG, so the HTML report is one self-contained offline file.

Hand-written rather than matplotlib: the report must render on a bare install, and
inline SVG keeps every plot inspectable text (the tests parse it).
"""
from __future__ import annotations

import html
import math

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
_W, _H = 560, 320
_L, _R, _T, _B = 64, 150, 30, 48  # margins: room for tick labels and the legend


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _scale(lo, hi, log):
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
    if hi == lo:
        hi = lo + 1.0
    return lo, hi


def _ticks(lo, hi, log, n=5):
    if log:
        a, b = math.floor(lo), math.ceil(hi)
        step = max(1, (b - a) // n)
        decades = [10.0 ** e for e in range(a, b + 1, step)]
        if b - a <= 2:  # a span of a decade or two needs 2x and 5x ticks to be readable
            decades = sorted(m * d for d in decades for m in (1, 2, 5))
        return [t for t in decades if lo - 1e-9 <= math.log10(t) <= hi + 1e-9]
    span = hi - lo
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    out, v = [], start
    while v <= hi + 1e-12 * abs(step):
        out.append(round(v, 12))
        v += step
    return out


def _fmt(v):
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.0e}"
    return f"{v:g}"


def _frame(title, xlabel, ylabel):
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
             f'viewBox="0 0 {_W} {_H}" role="img" aria-label="{html.escape(title)}" class="figure">',
             f'<rect width="{_W}" height="{_H}" fill="white"/>',
             f'<text x="{_W / 2 - _R / 2}" y="18" text-anchor="middle" font-size="13" '
             f'font-family="sans-serif">{html.escape(title)}</text>']
    parts.append(f'<text x="{_L + (_W - _L - _R) / 2}" y="{_H - 8}" text-anchor="middle" font-size="11" '
                 f'font-family="sans-serif">{html.escape(xlabel)}</text>')
    parts.append(f'<text x="14" y="{_T + (_H - _T - _B) / 2}" text-anchor="middle" font-size="11" '
                 f'font-family="sans-serif" transform="rotate(-90 14 {_T + (_H - _T - _B) / 2})">'
                 f'{html.escape(ylabel)}</text>')
    return parts


def _legend(parts, names, colors=None):
    for i, name in enumerate(names):
        y = _T + 14 * i
        color = colors[i] if colors else _PALETTE[i % len(_PALETTE)]
        parts.append(f'<rect x="{_W - _R + 10}" y="{y}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{_W - _R + 24}" y="{y + 9}" font-size="10" font-family="sans-serif">'
                     f'{html.escape(str(name))[:22]}</text>')


def line_svg(fig: dict) -> str:
    xs = fig.get("x") or []
    series = fig.get("series") or {}
    logx, logy = bool(fig.get("logx")), bool(fig.get("logy"))
    pts = {}
    for name, ys in series.items():
        p = []
        for x, y in zip(xs, ys):
            x, y = _num(x), _num(y)
            if x is None or y is None or (logx and x <= 0) or (logy and y <= 0):
                continue
            p.append((x, y))
        pts[name] = p
    allx = [x for p in pts.values() for x, _ in p]
    ally = [y for p in pts.values() for _, y in p]
    parts = _frame(fig.get("title", ""), fig.get("xlabel", ""), fig.get("ylabel", ""))
    if not allx:
        parts.append(f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle">no finite data</text></svg>')
        return "\n".join(parts)
    x0, x1 = _scale(min(allx), max(allx), logx)
    y0, y1 = _scale(min(ally), max(ally), logy)
    pw, ph = _W - _L - _R, _H - _T - _B

    def px(x):
        v = math.log10(x) if logx else x
        return _L + (v - x0) / (x1 - x0) * pw

    def py(y):
        v = math.log10(y) if logy else y
        return _T + ph - (v - y0) / (y1 - y0) * ph

    parts.append(f'<rect x="{_L}" y="{_T}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    for t in _ticks(x0, x1, logx):
        X = px(t)
        if _L - 1 <= X <= _L + pw + 1:
            parts.append(f'<line x1="{X:.1f}" y1="{_T + ph}" x2="{X:.1f}" y2="{_T + ph + 4}" stroke="#888"/>')
            parts.append(f'<text x="{X:.1f}" y="{_T + ph + 16}" text-anchor="middle" font-size="10" '
                         f'font-family="sans-serif">{_fmt(t)}</text>')
    for t in _ticks(y0, y1, logy):
        Y = py(t)
        if _T - 1 <= Y <= _T + ph + 1:
            parts.append(f'<line x1="{_L - 4}" y1="{Y:.1f}" x2="{_L + pw}" y2="{Y:.1f}" stroke="#eee"/>')
            parts.append(f'<text x="{_L - 6}" y="{Y + 3:.1f}" text-anchor="end" font-size="10" '
                         f'font-family="sans-serif">{_fmt(t)}</text>')
    for i, (name, p) in enumerate(pts.items()):
        color = _PALETTE[i % len(_PALETTE)]
        if len(p) > 1:
            d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in p)
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{d}"/>')
        for x, y in p:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.2" fill="{color}"/>')
    _legend(parts, list(pts))
    parts.append("</svg>")
    return "\n".join(parts)


def bar_svg(fig: dict) -> str:
    cats = [str(c) for c in fig.get("x") or []]
    series = fig.get("series") or {}
    vals = [_num(v) for ys in series.values() for v in ys]
    vals = [v for v in vals if v is not None]
    parts = _frame(fig.get("title", ""), fig.get("xlabel", ""), fig.get("ylabel", ""))
    if not cats or not vals:
        parts.append(f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle">no data</text></svg>')
        return "\n".join(parts)
    lo, hi = min(0.0, min(vals)), max(0.0, max(vals))
    if hi == lo:
        hi = lo + 1
    pw, ph = _W - _L - _R, _H - _T - _B
    py = lambda y: _T + ph - (y - lo) / (hi - lo) * ph  # noqa: E731
    parts.append(f'<rect x="{_L}" y="{_T}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    for t in _ticks(lo, hi, False):
        parts.append(f'<text x="{_L - 6}" y="{py(t) + 3:.1f}" text-anchor="end" font-size="10" '
                     f'font-family="sans-serif">{_fmt(t)}</text>')
        parts.append(f'<line x1="{_L}" y1="{py(t):.1f}" x2="{_L + pw}" y2="{py(t):.1f}" stroke="#eee"/>')
    k = max(1, len(series))
    gw = pw / len(cats)
    bw = gw * 0.8 / k
    for j, (name, ys) in enumerate(series.items()):
        color = _PALETTE[j % len(_PALETTE)]
        for i, y in enumerate(ys[: len(cats)]):
            y = _num(y)
            if y is None:
                continue
            x = _L + i * gw + gw * 0.1 + j * bw
            top, bot = py(max(y, 0)), py(min(y, 0))
            parts.append(f'<rect x="{x:.1f}" y="{top:.1f}" width="{bw:.1f}" height="{max(bot - top, 0.5):.1f}" '
                         f'fill="{color}"><title>{html.escape(name)} / {html.escape(cats[i])}: {y:g}</title></rect>')
    for i, c in enumerate(cats):
        X = _L + (i + 0.5) * gw
        parts.append(f'<text x="{X:.1f}" y="{_T + ph + 14}" text-anchor="end" font-size="9" '
                     f'font-family="sans-serif" transform="rotate(-30 {X:.1f} {_T + ph + 14})">'
                     f'{html.escape(c)[:18]}</text>')
    _legend(parts, list(series))
    parts.append("</svg>")
    return "\n".join(parts)


def image_svg(fig: dict) -> str:
    z = (fig.get("series") or {}).get("z") or []
    parts = _frame(fig.get("title", ""), fig.get("xlabel", ""), fig.get("ylabel", ""))
    rows = len(z)
    cols = max((len(r) for r in z), default=0)
    if not rows or not cols:
        parts.append(f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle">no data</text></svg>')
        return "\n".join(parts)
    flat = [v for r in z for v in (_num(x) for x in r) if v is not None]
    lo, hi = (min(flat), max(flat)) if flat else (0.0, 1.0)
    if hi == lo:
        hi = lo + 1
    pw, ph = _W - _L - _R, _H - _T - _B
    cw, ch = pw / cols, ph / rows
    for i, r in enumerate(z):
        for j, v in enumerate(r):
            v = _num(v)
            if v is None:
                color = "#cccccc"
            else:
                t = (v - lo) / (hi - lo)
                color = f"rgb({int(255 * t)},{int(80 + 60 * (1 - t))},{int(255 * (1 - t))})"
            # row 0 at the bottom, as on a y axis
            parts.append(f'<rect x="{_L + j * cw:.2f}" y="{_T + (rows - 1 - i) * ch:.2f}" '
                         f'width="{cw + 0.3:.2f}" height="{ch + 0.3:.2f}" fill="{color}"/>')
    parts.append(f'<rect x="{_L}" y="{_T}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    _legend(parts, [f"low {lo:g}", f"high {hi:g}"], ["rgb(0,140,255)", "rgb(255,80,0)"])
    parts.append("</svg>")
    return "\n".join(parts)


def figure_svg(fig: dict) -> str:
    """Render a Figure (as its JSON dict) to an SVG string."""
    kind = fig.get("kind", "line")
    if kind == "bar":
        return bar_svg(fig)
    if kind == "image":
        return image_svg(fig)
    return line_svg(fig)
