"""Figures (as their report.json dicts) drawn with matplotlib into inline SVG.

Contract: :func:`figure_svg` takes a :class:`~nonsmooth.reports.Figure` as a dict and
returns one ``<svg>`` element (no XML prolog) that the HTML report embeds as is, so the
page stays one self-contained file that opens offline.  Text stays text
(``svg.fonttype = none``, DejaVu Sans, the font matplotlib lays it out with), so it is
searchable and a browser can check that no label leaves its figure.  Titles are not
drawn: the report puts them in the figure's caption.  Every id inside an SVG is salted
with ``uid`` so several figures can share one page.  Output is deterministic (no date).

Nothing here rotates tick labels: category axes with long or many labels become
horizontal bar charts instead, so labels never overlap each other.
"""
from __future__ import annotations

import importlib.util
import io
import math
import re
import textwrap

_PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#882255", "#444444")
_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")
FULL_SIZE = (6.4, 3.5)     # inches: about 610 x 335 CSS px
SMALL_SIZE = (4.1, 2.45)   # the summary screen's headline figures
_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def available() -> bool:
    """Whether matplotlib is installed (``pip install 'nonsmooth[report]'``)."""
    return importlib.util.find_spec("matplotlib") is not None


def _num(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def _pow10(value, _pos=None) -> str:
    """Log-axis tick text as one plain string: 0.05 or 200 near 1, else 10⁻⁴ or 2·10⁻⁴."""
    if value <= 0 or not math.isfinite(value):
        return ""
    exponent = math.floor(math.log10(value) + 1e-9)
    mantissa = value / 10 ** exponent
    if abs(mantissa - round(mantissa)) > 1e-6:
        return ""
    mantissa = int(round(mantissa))
    if -2 <= exponent <= 3:  # 0.01 ... 5000 read better as plain numbers
        return f"{mantissa * 10.0 ** exponent:.{max(0, -exponent)}f}"
    power = "10" + str(exponent).translate(_SUPERSCRIPT)
    return power if mantissa == 1 else f"{mantissa}\u00b7{power}"


def _log_axis(axis, values) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    finite = [v for v in values if v > 0 and math.isfinite(v)]
    axis.set_major_formatter(FuncFormatter(_pow10))
    span = math.log10(max(finite) / min(finite)) if len(finite) > 1 else 0.0
    if span < 1.5:  # under two decades there are too few powers of ten: label 2 and 5 as well
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_minor_formatter(NullFormatter())


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(str(text), width)) or str(text)


def _legend(ax, n_entries: int, small: bool, *, inside_ok: bool = True) -> None:
    if n_entries == 0:
        return
    if inside_ok and n_entries <= 3:
        ax.legend(loc="best", frameon=True, framealpha=0.85, edgecolor="#cccccc")
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)


def _references(ax, fig: dict, horizontal: bool = True) -> int:
    n = 0
    for i, (label, value) in enumerate((fig.get("reference") or {}).items()):
        v = _num(value)
        if math.isnan(v):
            continue
        style = dict(color="#555555", linestyle=("--", ":", "-.")[i % 3], linewidth=1.0, label=str(label))
        (ax.axhline if horizontal else ax.axvline)(v, **style)
        n += 1
    return n


def _draw_line(ax, fig: dict, small: bool) -> None:
    import numpy as np

    xs = [_num(v) for v in fig.get("x") or []]
    n = 0
    all_y = []
    for i, (name, ys) in enumerate((fig.get("series") or {}).items()):
        y = np.array([_num(v) for v in list(ys)[: len(xs)]], dtype=float)
        x = np.array(xs[: len(y)], dtype=float)
        if fig.get("logx"):
            y[x <= 0] = np.nan
        if fig.get("logy"):
            y[y <= 0] = np.nan
        if not np.isfinite(y).any():
            continue
        all_y.extend(y[np.isfinite(y)].tolist())
        ax.plot(x, y, color=_PALETTE[i % len(_PALETTE)], linewidth=1.6,
                marker=_MARKERS[i % len(_MARKERS)] if len(x) <= 30 else None, markersize=3.5,
                label=_wrap(name, 26))
        n += 1
    n += _references(ax, fig)
    if fig.get("logx"):
        ax.set_xscale("log")
        _log_axis(ax.xaxis, xs)
    if fig.get("logy"):
        ax.set_yscale("log")
        _log_axis(ax.yaxis, all_y + [_num(v) for v in (fig.get("reference") or {}).values()])
    if n == 0:
        ax.text(0.5, 0.5, "no finite data", ha="center", va="center", transform=ax.transAxes)
    _legend(ax, n, small)


def _horizontal(categories: list, n_series: int, small: bool) -> bool:
    """Vertical bars only when every label fits under its bar without rotation."""
    width_chars = 60 if small else 90
    return len(categories) * max(n_series, 1) > 12 or sum(len(c) + 3 for c in categories) > width_chars


def _draw_bar(ax, fig: dict, small: bool) -> None:
    import numpy as np

    cats = [str(c) for c in fig.get("x") or []]
    series = fig.get("series") or {}
    errors = fig.get("errors") or {}
    k = max(1, len(series))
    horizontal = _horizontal(cats, k, small)
    slot = 0.8 / k
    log = bool(fig.get("logy"))
    values = []
    pos = np.arange(len(cats), dtype=float)
    for j, (name, ys) in enumerate(series.items()):
        v = np.array([_num(y) for y in list(ys)[: len(cats)]] + [math.nan] * (len(cats) - len(ys)), dtype=float)
        if log:
            v[v <= 0] = np.nan
        values.extend(v[np.isfinite(v)].tolist())
        offset = pos - 0.4 + slot * (j + 0.5)
        err = None
        if name in errors:
            lo_hi = np.array([[_num(a) for a in pair] for pair in errors[name]], dtype=float)
            err = np.abs(np.vstack([v - lo_hi[:, 0], lo_hi[:, 1] - v]))
        color = _PALETTE[j % len(_PALETTE)]
        if horizontal:
            ax.barh(offset, np.nan_to_num(v, nan=0.0), height=slot * 0.92, color=color, label=_wrap(name, 26),
                    xerr=err, error_kw=dict(ecolor="#333333", capsize=2, linewidth=0.9))
        else:
            ax.bar(offset, np.nan_to_num(v, nan=0.0), width=slot * 0.92, color=color, label=_wrap(name, 26),
                   yerr=err, error_kw=dict(ecolor="#333333", capsize=2, linewidth=0.9))
    n_ref = _references(ax, fig, horizontal=not horizontal)
    value_axis = ax.xaxis if horizontal else ax.yaxis
    if log:
        (ax.set_xscale if horizontal else ax.set_yscale)("log")
        if values:
            _log_axis(value_axis, values)
            # the axis starts below the smallest bar, so every bar has a visible length
            if horizontal:
                ax.set_xlim(min(values) / 4, None)
            else:
                ax.set_ylim(min(values) / 4, None)
    if horizontal:
        ax.set_yticks(pos, cats)
        ax.invert_yaxis()  # first category on top, as it is read
        ax.grid(axis="y", visible=False)
        ax.set_ylim(len(cats) - 0.5, -0.5)
        ax.set_xlabel(fig.get("ylabel", ""))
        ax.set_ylabel(fig.get("xlabel", ""))
    else:
        ax.set_xticks(pos, cats)
        ax.grid(axis="x", visible=False)
        ax.set_xlim(-0.5, len(cats) - 0.5)
        ax.set_xlabel(fig.get("xlabel", ""))
        ax.set_ylabel(fig.get("ylabel", ""))
    if not values:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    _legend(ax, (len(series) if len(series) > 1 else 0) + n_ref, small, inside_ok=not horizontal)


def _draw_image(ax, fig: dict, small: bool) -> None:
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    z = np.array([[_num(v) for v in row] for row in (fig.get("series") or {}).get("z") or []], dtype=float)
    if z.size == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    xs = np.array([_num(v) for v in fig.get("x") or range(z.shape[1])], dtype=float)
    ys = np.array([_num(v) for v in fig.get("y") or range(z.shape[0])], dtype=float)
    dx = (xs[-1] - xs[0]) / max(len(xs) - 1, 1) if len(xs) > 1 else 1.0
    dy = (ys[-1] - ys[0]) / max(len(ys) - 1, 1) if len(ys) > 1 else 1.0
    extent = (xs[0] - dx / 2, xs[-1] + dx / 2, ys[0] - dy / 2, ys[-1] + dy / 2)
    levels = {float(k): str(v) for k, v in (fig.get("levels") or {}).items()}
    if levels:
        keys = sorted(levels)
        colors = ["#e8eef5", "#D55E00", "#0072B2", "#009E73"][: len(keys)]
        bounds = [keys[0] - 0.5] + [(a + b) / 2 for a, b in zip(keys, keys[1:])] + [keys[-1] + 0.5]
        ax.imshow(z, origin="lower", extent=extent, aspect="auto", interpolation="nearest",
                  cmap=ListedColormap(colors), norm=BoundaryNorm(bounds, len(colors)))
        handles = [Patch(facecolor=c, edgecolor="#999999", label=levels[k]) for k, c in zip(keys, colors)]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    else:
        im = ax.imshow(z, origin="lower", extent=extent, aspect="auto", interpolation="nearest", cmap="viridis")
        bar = ax.figure.colorbar(im, ax=ax)
        if fig.get("zlabel"):
            bar.set_label(fig["zlabel"])
    ax.grid(False)


def _draw_interval(ax, fig: dict, small: bool) -> None:
    import numpy as np

    cats = [str(c) for c in fig.get("x") or []]
    pos = np.arange(len(cats), dtype=float)
    n = 0
    for i, (name, spans) in enumerate((fig.get("intervals") or {}).items()):
        lo = np.array([_num(s[0]) if s else math.nan for s in spans], dtype=float)
        hi = np.array([_num(s[1]) if s else math.nan for s in spans], dtype=float)
        ok = np.isfinite(lo) & np.isfinite(hi)
        ax.hlines(pos[: len(lo)][ok], lo[ok], hi[ok], colors="#bbbbbb", linewidth=7, label=_wrap(name, 26),
                  zorder=1)
        # a one-point set still shows as a short bar
        point = ok & (hi - lo < 1e-9)
        ax.plot(lo[point], pos[: len(lo)][point], linestyle="none", marker="|", markersize=11,
                markeredgewidth=7, color="#bbbbbb", zorder=1)
        n += 1
    series = fig.get("series") or {}
    k = max(len(series), 1)
    for j, (name, ys) in enumerate(series.items()):
        v = np.array([_num(y) for y in ys], dtype=float)
        offset = pos[: len(v)] + (j - (k - 1) / 2) * 0.22
        ax.plot(v, offset, linestyle="none", marker=_MARKERS[j % len(_MARKERS)], markersize=5,
                color=_PALETTE[j % len(_PALETTE)], label=_wrap(name, 26), zorder=3)
        n += 1
    ax.set_yticks(pos, cats)
    ax.set_ylim(len(cats) - 0.5, -0.5)
    ax.grid(axis="y", visible=False)
    ax.set_xlabel(fig.get("ylabel", ""))
    ax.set_ylabel(fig.get("xlabel", ""))
    _legend(ax, n, small, inside_ok=False)


_DRAW = {"line": _draw_line, "bar": _draw_bar, "image": _draw_image, "interval": _draw_interval}


def _size(fig: dict, small: bool) -> tuple[float, float]:
    w, h = SMALL_SIZE if small else FULL_SIZE
    kind = fig.get("kind", "line")
    cats = fig.get("x") or []
    if kind == "interval" or (kind == "bar" and _horizontal([str(c) for c in cats], len(fig.get("series") or {}),
                                                          small)):
        per_row = 0.2 * max(1, len(fig.get("series") or {})) if kind == "bar" else 0.26
        h = max(h, 0.9 + per_row * len(cats))
    return w, h


def figure_svg(fig: dict, *, small: bool = False, uid: str = "fig") -> str:
    """One ``<svg>`` element drawing ``fig`` (a Figure's JSON dict).

    Example:
        >>> svg = figure_svg({"title": "t", "kind": "line", "x": [1, 2], "series": {"y": [1, 4]}})
        >>> svg.startswith("<svg") and "</svg>" in svg
        True
    """
    import matplotlib
    from matplotlib.figure import Figure as MplFigure

    kind = fig.get("kind", "line")
    if kind not in _DRAW:
        raise ValueError(f"figure kind must be one of {sorted(_DRAW)}, got {kind!r}")
    rc = {
        "svg.fonttype": "none",
        "svg.hashsalt": uid,
        "font.family": "DejaVu Sans",
        "font.size": 8.5 if small else 9.5,
        "axes.titlesize": 9.5,
        "legend.fontsize": 7.5 if small else 8.5,
        "xtick.labelsize": 7.5 if small else 8.5,
        "ytick.labelsize": 7.5 if small else 8.5,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.color": "#e4e4e4",
        "grid.linewidth": 0.7,
        "axes.axisbelow": True,
        "text.parse_math": False,
    }
    with matplotlib.rc_context(rc):
        mfig = MplFigure(figsize=_size(fig, small), layout="constrained")
        ax = mfig.add_subplot()
        _DRAW[kind](ax, fig, small)
        if kind in ("line", "image"):
            ax.set_xlabel(fig.get("xlabel", ""))
            ax.set_ylabel(fig.get("ylabel", ""))
        buf = io.StringIO()
        mfig.savefig(buf, format="svg", bbox_inches="tight", pad_inches=0.04,
                     metadata={"Date": None, "Creator": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, count=1, flags=re.S)
    label = str(fig.get("title", "")).replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
    svg = svg.replace("<svg ", f'<svg class="plot" role="img" aria-label="{label}" ', 1)
    # a generic fallback after DejaVu Sans, the font the layout was computed with
    return svg.replace("font-family: 'DejaVu Sans'", "font-family: 'DejaVu Sans', sans-serif").strip()
