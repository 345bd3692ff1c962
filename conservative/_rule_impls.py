"""How the engine reads each rule: active kink sites, their branch options, and how a
chosen branch rewrites a primitive's outputs and tangents.  Plain NumPy.

A *site* is one place where a nonsmooth primitive sits at a kink at the traced point:
an element of relu's input at 0, a tie in maximum(a, b), a group of tied elements of a
sort.  Each site has *options* (branches).  An option carries *conditions*: strict
linear inequalities on the first-order tangents of the primitive's inputs that hold on
the open region where that branch is the one in force (``dz > 0`` for relu's right
branch, ``da - db > 0`` for maximum picking ``a``).  A condition is a list of
``(input_position, flat_element, coefficient)``.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable

import numpy as np

from ._rules import RULES, Rule, _requires_holds, evaluate

MAX_PERMUTATION_GROUP = 5  # tied groups larger than this are sampled, never enumerated


@dataclasses.dataclass
class Option:
    label: str
    conds: list  # list of conditions; each a list of (input_pos, flat_index, coef)
    data: Any = None


@dataclasses.dataclass
class Site:
    node: int
    key: tuple
    kind: str  # "kink" | "jump" | "tie" | "compare" | "nonlipschitz" | "norm" | "unsupported"
    options: list
    text: str
    clarke: Any = None  # local Clarke set of the primitive at this site (interval or text)
    discrete: bool = False  # branches change values (jumps, comparisons, indices)
    complete: bool = True  # options cover every branch (False: sampled)
    weight: int = 1  # how many kinks this site counts for against exact_budget
    members: Any = None  # positions of a tied group (selection sites)


def _flat(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).reshape(-1)


def _fmt(v: float) -> str:
    return f"{float(v) + 0.0:.6g}"  # + 0.0 prints -0 as 0


# --------------------------------------------------------------------------- unary / jump


_EVAL_CACHE: dict = {}


def _eval_cached(expr, params):
    key = (expr, tuple(sorted((k, v) for k, v in params.items() if isinstance(v, (int, float)) or v is None)))
    v = _EVAL_CACHE.get(key)
    if v is None:
        v = _EVAL_CACHE[key] = evaluate(expr, params)
    return v


def _lattice_offset(kink) -> float:
    return evaluate(kink.at, {"n": 0.0})


def unary_sites(node_i, node, rule: Rule, x: np.ndarray, tol: float) -> list[Site]:
    params = {**rule.params, **node.params}
    xf = _flat(x)
    sites = []
    if rule.impl == "nonlipschitz":
        if rule.name == "pow":
            p = params.get("exponent")
            if p is None or not isinstance(p, (int, float)):
                return sites
            p = float(p)
            if (p == int(p) and p >= 0) or p >= 1:
                return sites  # smooth (integer) or C^1 at 0
        for e in np.nonzero(np.abs(xf) <= tol)[0]:
            sites.append(Site(node_i, ("e", int(e)), "nonlipschitz", [Option("framework", [], None)],
                              f"{rule.name} at input element {int(e)} = {_fmt(xf[e])}: infinite slope",
                              clarke="none (not Lipschitz)"))
        return sites
    for ki, kink in enumerate(rule.kinks):
        if kink.requires and not _requires_holds(kink.requires, params):
            continue
        if kink.lattice:
            off = _lattice_offset(kink)
            n = np.round(xf - off)
            hit = np.abs(xf - (n + off)) <= tol
            if kink.lattice == "nonzero_integers":
                hit &= n != 0
            where = np.nonzero(hit)[0]
            nvals = n[where]
        else:
            at = _eval_cached(kink.at, params)
            where = np.nonzero(np.abs(xf - at) <= tol)[0]
            nvals = np.zeros(len(where))
        fixed = None
        for e, nv in zip(where, nvals):
            if fixed is None or kink.lattice:
                # the same expressions for every element of a non-lattice kink: evaluate them once
                p = {**params, "n": float(nv)}
                left, right = evaluate(kink.left, p), evaluate(kink.right, p)
                if kink.continuous or not kink.left_value:
                    lv = rv = None
                else:
                    lv, rv = evaluate(kink.left_value, p), evaluate(kink.right_value, p)
                fixed = (left, right, lv, rv)
            left, right, lv, rv = fixed
            jump = lv is not None and lv != rv
            if not jump and left == right:
                opts = [Option("both", [], (left, None))]
            else:
                opts = [Option("left", [[(0, int(e), -1.0)]], (left, lv)),
                        Option("right", [[(0, int(e), 1.0)]], (right, rv))]
            clarke = ("none (jump)" if jump else (min(left, right), max(left, right)))
            text = (f"{rule.name} at input element {int(e)} = {_fmt(xf[e])} (kink at "
                    f"{_fmt(xf[e]) if kink.lattice else kink.at}): "
                    + (f"jump {lv} -> {rv}" if jump else f"left {_fmt(left)}, right {_fmt(right)}"))
            sites.append(Site(node_i, ("e", int(e), ki), "jump" if jump else "kink", opts, text,
                              clarke=clarke, discrete=jump))
    return sites


def unary_apply(choices, xs, tans, outs, out_tans, k):
    """Rewrite relu-like outputs at the chosen elements: tangent = slope * input tangent."""
    out = outs[0] if not any(o.data[1] is not None for _, o in choices) else _flat(outs[0]).copy()
    t_in = tans[0]
    t_out = _tan2d(out_tans[0], k, _flat(outs[0]).size).copy()
    for site, opt in choices:
        e = site.key[1]
        slope, value = opt.data
        t_out[:, e] = 0.0 if t_in is None else slope * t_in[:, e]
        if value is not None:
            out[e] = value
    return [np.asarray(out).reshape(np.shape(outs[0]))], [t_out]


def unary_lex(site, rowfn):
    if len(site.options) == 1:
        return site.options[0]
    row = rowfn([(0, site.key[1], 1.0)])
    s = _first_sign(row)
    return site.options[1] if s >= 0 else site.options[0]


def _first_sign(row: np.ndarray, eps: float = 0.0) -> int:
    nz = np.nonzero(np.abs(row) > eps)[0]
    return 0 if len(nz) == 0 else int(np.sign(row[nz[0]]))


def _tan2d(t, k, size):
    if t is None:
        return np.zeros((k, size))
    return np.asarray(t, dtype=np.float64).reshape(k, size)


# --------------------------------------------------------------------------- pick / compare


def _broadcast_index(shape_in, shape_out):
    n = int(np.prod(shape_in)) if len(shape_in) else 1
    return np.broadcast_to(np.arange(n).reshape(shape_in), shape_out).reshape(-1)


def binary_sites(node_i, node, rule: Rule, a, b, out_shape, tol, float_operands=True) -> list[Site]:
    if not float_operands:
        return []  # integers and booleans have no tangents: a tie there is no kink
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ia = _broadcast_index(a.shape, out_shape)
    ib = _broadcast_index(b.shape, out_shape)
    av, bv = a.reshape(-1)[ia], b.reshape(-1)[ib]
    tie = np.nonzero((np.abs(av - bv) <= tol) & np.isfinite(av))[0]
    sites = []
    sel = rule.selection
    for e in tie:
        up = [[(0, int(ia[e]), 1.0), (1, int(ib[e]), -1.0)]]  # a rises above b
        down = [[(0, int(ia[e]), -1.0), (1, int(ib[e]), 1.0)]]
        if rule.impl == "pick":
            first, second = (up, down) if sel == "max" else (down, up)
            opts = [Option("first", first, 0), Option("second", second, 1)]
            sites.append(Site(node_i, ("e", int(e)), "tie", opts,
                              f"{rule.name}({_fmt(av[e])}, {_fmt(bv[e])}) tie at output element {int(e)}",
                              clarke="conv{da, db}"))
        else:
            gt = {"ge": True, "gt": True, "le": False, "lt": False, "eq": False, "ne": True}[sel]
            lt = {"ge": False, "gt": False, "le": True, "lt": True, "eq": False, "ne": True}[sel]
            opts = [Option("a>b", up, gt), Option("a<b", down, lt)]
            sites.append(Site(node_i, ("e", int(e)), "compare", opts,
                              f"comparison {sel}({_fmt(av[e])}, {_fmt(bv[e])}) tie at element {int(e)}",
                              clarke="none (boolean flips)", discrete=True))
    return sites


def pick_apply(choices, xs, tans, outs, out_tans, k, out_shape):
    size = int(np.prod(out_shape)) if len(out_shape) else 1
    a, b = (np.asarray(x, dtype=np.float64) for x in xs[:2])
    ia = _broadcast_index(a.shape, out_shape)
    ib = _broadcast_index(b.shape, out_shape)
    ta, tb = tans[0], tans[1]
    t_out = _tan2d(out_tans[0], k, size).copy()
    val = _flat(outs[0]).copy()
    for site, opt in choices:
        e = site.key[1]
        if isinstance(opt.data, tuple) and opt.data[0] == "mix":  # a convention: (1 - s) da + s db
            s = opt.data[1]
            t_out[:, e] = (0.0 if ta is None else (1.0 - s) * ta[:, ia[e]]) + (0.0 if tb is None else s * tb[:, ib[e]])
            continue
        if opt.data == 0:
            t_out[:, e] = 0.0 if ta is None else ta[:, ia[e]]
            val[e] = a.reshape(-1)[ia[e]]
        else:
            t_out[:, e] = 0.0 if tb is None else tb[:, ib[e]]
            val[e] = b.reshape(-1)[ib[e]]
    return [val.reshape(out_shape)], [t_out]


def compare_apply(choices, outs):
    val = np.asarray(outs[0]).reshape(-1).copy()
    for site, opt in choices:
        val[site.key[1]] = opt.data
    return [val.reshape(np.shape(outs[0]))], [None]


def binary_lex(site, rowfn):
    row = rowfn(site.options[0].conds[0])
    s = _first_sign(row)
    return site.options[0] if s > 0 else site.options[1] if s < 0 else site.options[0]


# --------------------------------------------------------------------------- selections


def tie_groups(v: np.ndarray, tol: float) -> list[np.ndarray]:
    """Groups of (flat) positions whose values are tied within ``tol``."""
    order = np.argsort(v, kind="stable")
    sv = v[order]
    fin = np.isfinite(sv)
    brk = np.nonzero(~((np.diff(sv) <= tol) & fin[1:] & fin[:-1]))[0] + 1
    groups = [g for g in np.split(order, brk) if len(g) > 1]
    return groups


def base_order(v: np.ndarray) -> np.ndarray:
    """Total order of positions: by value, ties by position (a rank per position)."""
    order = np.lexsort((np.arange(v.size), v))
    return order


def ranks_from_order(order: np.ndarray) -> np.ndarray:
    r = np.empty(order.size, dtype=np.float64)
    r[order] = np.arange(order.size, dtype=np.float64)
    return r


def reorder(order: np.ndarray, group: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Put the members of ``group`` (which occupy some slots of ``order``) in ``perm`` order."""
    order = order.copy()
    slots = np.nonzero(np.isin(order, group))[0]
    order[slots] = perm
    return order


def permutation_options(group: np.ndarray, rng: np.random.Generator | None, *, winner: str = ""):
    """Orderings of a tied group (ascending), each with its chain of strict conditions."""
    m = len(group)
    if m <= MAX_PERMUTATION_GROUP:
        perms = [np.array(p) for p in itertools.permutations(group.tolist())]
        complete = True
    else:
        rng = rng or np.random.default_rng(0)
        perms = []
        for w in group:  # each member on top and at the bottom, rest in position order
            rest = [g for g in group if g != w]
            perms.append(np.array(rest + [w]))
            perms.append(np.array([w] + rest))
        perms += [rng.permutation(group) for _ in range(8)]
        complete = False
    opts = []
    for p in perms:
        conds = [[(0, int(p[i + 1]), 1.0), (0, int(p[i]), -1.0)] for i in range(m - 1)]
        opts.append(Option("order " + "<".join(str(int(q)) for q in p), conds, p))
    return opts, complete


def select_lex(site, rowfn):
    group = site.members
    rows = np.stack([rowfn([(0, int(g), 1.0)]) for g in group])  # (m, k)
    keys = [np.arange(len(group))] + [rows[:, j] for j in range(rows.shape[1] - 1, -1, -1)]
    perm = group[np.lexsort(keys)]
    conds = [[(0, int(perm[i + 1]), 1.0), (0, int(perm[i]), -1.0)] for i in range(len(group) - 1)]
    return Option("lex " + "<".join(str(int(q)) for q in perm), conds, perm)


# --------------------------------------------------------------------------- norms


def norm_slices(shape, dim) -> tuple[np.ndarray, tuple]:
    """(n_slices, slice_size) positions of the reduced elements of each output element."""
    nd = len(shape)
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        dims = tuple(range(nd))
    else:
        dims = tuple(sorted(d % nd for d in (dim if isinstance(dim, (list, tuple)) else [dim])))
    keep = tuple(d for d in range(nd) if d not in dims)
    pos = np.arange(int(np.prod(shape)) if nd else 1).reshape(shape)
    moved = np.transpose(pos, keep + dims) if nd else pos.reshape(1)
    n_out = int(np.prod([shape[d] for d in keep])) if keep else 1
    return moved.reshape(n_out, -1), dims


def norm_sites(node_i, node, x, tol) -> list[Site]:
    x = np.asarray(x, dtype=np.float64)
    ordv = node.params.get("ord", 2)
    slices, _ = norm_slices(x.shape, node.params.get("dim"))
    xf = x.reshape(-1)
    sites = []
    for o, members in enumerate(slices):
        vals = xf[members]
        if ordv in (2, 2.0):
            if np.all(np.abs(vals) <= tol):
                m = len(members)
                opts = [Option(f"u=+e{j}", [], ("e", j, 1.0)) for j in range(m)]
                opts += [Option(f"u=-e{j}", [], ("e", j, -1.0)) for j in range(m)]
                sites.append(Site(node_i, ("n", o), "norm", opts,
                                  f"2-norm of a zero vector (output element {o})",
                                  clarke="unit ball", complete=False, weight=m))
        elif ordv in (1, 1.0):
            # ||x||_1 = sum |x_i|: each zero element is an abs kink, slope -1 or +1
            for e in members[np.abs(vals) <= tol]:
                opts = [Option("left", [[(0, int(e), -1.0)]], ("l1", -1.0)),
                        Option("right", [[(0, int(e), 1.0)]], ("l1", 1.0))]
                sites.append(Site(node_i, ("e", int(e), o), "kink", opts,
                                  f"1-norm with input element {int(e)} = 0 (output element {o})",
                                  clarke=(-1.0, 1.0)))
        elif ordv == math.inf:
            # ||x||_inf = max_i max(x_i, -x_i): a selection among the signed entries that
            # attain the max (both signs of every entry when x = 0)
            top = float(np.max(np.abs(vals))) if len(vals) else 0.0
            hit = np.nonzero(np.abs(np.abs(vals) - top) <= tol)[0]
            cands = [(int(members[j]), sg) for j in hit
                     for sg in ((1.0, -1.0) if top <= tol else (float(np.sign(vals[j])),))]
            if len(cands) > 1:
                opts = []
                for e, sg in cands:
                    conds = [[(0, e, sg), (0, e2, -sg2)] for e2, sg2 in cands if (e2, sg2) != (e, sg)]
                    opts.append(Option(f"{'+' if sg > 0 else '-'}x{e}", conds, ("inf", e, sg)))
                sites.append(Site(node_i, ("n", o), "norminf", opts,
                                  f"inf-norm with {len(cands)} tied signed entries (output element {o})",
                                  clarke="conv of the tied signed unit vectors", weight=len(cands) - 1))
        elif np.any(np.abs(vals) <= tol) or (ordv in (math.inf, -math.inf) and len(np.unique(np.abs(vals))) < len(vals)):
            sites.append(Site(node_i, ("n", o), "unsupported", [Option("framework", [], None)],
                              f"norm with ord={ordv} at a zero or tied element (output element {o}); "
                              "rewrite it with abs/max to audit it", complete=False))
    return sites


def norm_lex(site, rowfn, members):
    rows = np.stack([rowfn([(0, int(g), 1.0)]) for g in members])  # (m, k)
    for j in range(rows.shape[1]):
        c = rows[:, j]
        nrm = np.linalg.norm(c)
        if nrm > 0:
            return Option("lex", [], ("u", c / nrm))
    return Option("lex", [], ("u", np.zeros(len(members))))


def norminf_lex(site, rowfn):
    best, best_row = site.options[0], None
    for opt in site.options:
        _, e, sg = opt.data
        row = sg * rowfn([(0, e, 1.0)])
        if best_row is None or _lex_greater(row, best_row):
            best, best_row = opt, row
    return best


def _lex_greater(a, b) -> bool:
    d = np.nonzero(a != b)[0]
    return bool(len(d) and a[d[0]] > b[d[0]])


def norm_apply(choices, x, tans, outs, out_tans, k, slices):
    t_in = tans[0]
    size = _flat(outs[0]).size
    t_out = _tan2d(out_tans[0], k, size).copy()
    for site, opt in choices:
        if opt.data is None:
            continue
        if opt.data[0] == "inf":
            _, e, sg = opt.data
            o = site.key[1]
            t_out[:, o] = 0.0 if t_in is None else sg * t_in[:, e]
            continue
        if opt.data[0] == "l1":  # framework's slope at 0 is sign(0) = 0: add the chosen one
            e, o = site.key[1], site.key[2]
            if t_in is not None:
                t_out[:, o] += opt.data[1] * t_in[:, e]
            continue
        o = site.key[1]
        members = slices[o]
        if opt.data[0] == "e":
            u = np.zeros(len(members))
            u[opt.data[1]] = opt.data[2]
        else:
            u = opt.data[1]
        t_out[:, o] = 0.0 if t_in is None else t_in[:, members] @ u
    return [outs[0]], [t_out]
