"""A traced program with every active kink frozen on one branch, as a smooth function.

For a full pattern (one option per active site) the program near x coincides, on that
pattern's region, with the *frozen* program: each active site replaced by the smooth
piece its option names (relu's right branch by the identity, max's tie by the operand
it picks, elu's left branch by its exponential piece up to second order).  The frozen
program is built from the framework's own primitives, so the framework's autodiff gives
the Jacobian and the Hessians of every kink argument along the pattern, which the
second-order analysis needs.

Contract: ``frozen_conditions`` returns ``None`` (with a reason) for sites it cannot
freeze (tie orders of sorts, norms, jumps and comparisons); otherwise the function it
returns evaluates the pattern's kink arguments exactly up to second order at x.
"""
from __future__ import annotations

import numpy as np

from ._ir import Lit, Var
from ._rules import RULES, evaluate
from . import _rule_impls as R


def _curvatures(rule, params, ki):
    """Second derivatives (left piece, right piece) at kink ``ki``, or None if unknown."""
    p = {**rule.params, **params}
    if rule.piecewise_affine:
        return 0.0, 0.0
    name = rule.name
    if name == "hardswish":
        return ((0.0, 1.0 / 3.0), (1.0 / 3.0, 0.0))[ki]
    if name == "elu":
        return float(p["scale"]) * float(p["alpha"]) * float(p["input_scale"]) ** 2, 0.0
    if name == "selu":
        return float(p["alpha"]) * float(p["scale"]), 0.0
    if name == "celu":
        return 1.0 / float(p["alpha"]), 0.0
    return None


def base_values(P) -> dict:
    """Every variable's float64 value at x (NumPy), through the framework's program."""
    cached = getattr(P, "_base_values", None)
    if cached is not None:
        return cached
    g, be = P.graph, P.be
    vals = {v.id: be.input(x) for v, x in zip(g.inputs, P.xs64)}
    for cid, c in g.consts.items():
        vals[cid] = be.const(c)
    for node in g.nodes:
        ins = [vals[v.id] if isinstance(v, Var) else (v.value if isinstance(v, Lit) else None) for v in node.inputs]
        for o, val in zip(node.outputs, be.eval(node, ins)):
            vals[o.id] = val
    P._base_values = vals
    return vals


def frozen_conditions(P, pattern: dict, conds: list):
    """``(fn, None)`` with ``fn(x_flat) -> [g_c(x)]`` for the conditions ``conds``
    (``(node index, ((pos, elem, coef), ...))``), or ``(None, reason)``."""
    g, be = P.graph, P.be
    vals0 = base_values(P)
    overrides = {}
    for (ni, key), opt in pattern.items():
        site_node = g.nodes[ni]
        rule = RULES[site_node.rule]
        overrides.setdefault(ni, []).append((key, opt))
    plans = {}
    for ni, items in overrides.items():
        node = g.nodes[ni]
        rule = RULES[node.rule]
        out_shape = node.outputs[0].shape
        size = int(np.prod(out_shape)) if len(out_shape) else 1
        if rule.impl == "unary":
            u0 = np.asarray(be.asnumpy(vals0[node.inputs[0].id]), dtype=np.float64).reshape(-1)
            v0 = np.asarray(be.asnumpy(vals0[node.outputs[0].id]), dtype=np.float64).reshape(-1)
            mask = np.zeros(size, dtype=bool)
            slope, curv = np.zeros(size), np.zeros(size)
            for key, opt in items:
                if key[0] != "e" or opt.data is None or opt.data[1] is not None:
                    return None, f"{node.describe()}: a jump cannot be frozen"
                e, ki = key[1], key[2] if len(key) > 2 else 0
                c = _curvatures(rule, node.params, ki)
                if c is None:
                    return None, f"{rule.name}: the curvature of its pieces is unknown"
                mask[e] = True
                slope[e] = float(opt.data[0])
                curv[e] = c[0] if opt.label == "left" else c[1]
            plans[ni] = ("unary", mask.reshape(out_shape), u0.reshape(out_shape), v0.reshape(out_shape),
                         slope.reshape(out_shape), curv.reshape(out_shape))
        elif rule.impl == "pick":
            pick_a = np.zeros(size, dtype=bool)
            pick_b = np.zeros(size, dtype=bool)
            for key, opt in items:
                if not isinstance(opt.data, int):
                    return None, f"{node.describe()}: only a vertex choice can be frozen"
                (pick_a if opt.data == 0 else pick_b)[key[1]] = True
            plans[ni] = ("pick", pick_a.reshape(out_shape), pick_b.reshape(out_shape))
        else:
            return None, f"{rule.name} ({rule.impl}) sites are not frozen by the second-order analysis"
    by_node: dict = {}
    for j, (ni, cond) in enumerate(conds):
        by_node.setdefault(ni, []).append((j, cond))
    sizes = [int(np.prod(x.shape)) if len(x.shape) else 1 for x in P.xs64]
    consts = {cid: be.const(c) for cid, c in g.consts.items()}

    def fn(xflat):
        vals = dict(consts)
        o = 0
        for v, s in zip(g.inputs, sizes):
            vals[v.id] = xflat[o : o + s].reshape(tuple(v.shape))
            o += s
        got = [None] * len(conds)
        for i, node in enumerate(g.nodes):
            ins = [vals[v.id] if isinstance(v, Var) else (v.value if isinstance(v, Lit) else None) for v in node.inputs]
            for j, cond in by_node.get(i, ()):
                acc = None
                for pos, e, coef in cond:
                    term = be.flat(_as(be, ins[pos]))[int(e)] * float(coef)
                    acc = term if acc is None else acc + term
                got[j] = acc
            outs = be.eval(node, ins)
            plan = plans.get(i)
            if plan is not None:
                outs = list(outs)
                if plan[0] == "unary":
                    _, mask, u0, v0, slope, curv = plan
                    du = ins[0] - be.asarray(u0)
                    piece = be.asarray(v0) + be.asarray(slope) * du + 0.5 * be.asarray(curv) * du * du
                    outs[0] = be.where(mask, piece, outs[0])
                else:
                    _, pa, pb = plan
                    shape = node.outputs[0].shape
                    a = be.broadcast(_as(be, ins[0]), shape)
                    b = be.broadcast(_as(be, ins[1]), shape)
                    outs[0] = be.where(pa, a, be.where(pb, b, outs[0]))
            for ov, val in zip(node.outputs, outs):
                vals[ov.id] = val
        return be.concat([c.reshape(1) for c in got])

    return fn, None


def _as(be, v):
    if isinstance(v, (int, float, np.ndarray, np.generic)):
        return be.asarray(np.asarray(v, dtype=np.float64))
    return v
