"""A traced program with every active kink frozen on one branch, as a smooth function.

For a full pattern (one option per active site) the program near x coincides, on that
pattern's region, with the *frozen* program: each active site replaced by the smooth
piece its option names (relu's right branch by the identity, max's tie by the operand
it picks, a comparison by the boolean it gives, a tie of a sort by the order it gives,
elu's left branch by its exponential piece up to second order).  The frozen program is
built from the framework's own primitives, so the framework's autodiff gives the
Jacobian and the Hessians of every kink argument along the pattern, which the
second-order analysis needs.  The pattern enters as arrays (slopes, masks, positions),
so jax compiles the derivatives once per program, not once per pattern.

Contract: :class:`FrozenProgram` raises :class:`NotFrozen` for sites it cannot freeze
(norms, jumps); otherwise ``jacobian_hessian(pattern)`` returns the derivatives, exact up
to second order at x, of the values every site's conditions are made of (``atoms``).
"""
from __future__ import annotations

import numpy as np

from ._ir import Lit, Var
from ._rules import RULES


class NotFrozen(Exception):
    pass


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
    """Every variable's float64 value at x (framework arrays), through the framework's program."""
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


def _np(be, v):
    return np.asarray(be.asnumpy(v), dtype=np.float64)


class FrozenProgram:
    """The program of ``P`` with the given active ``sites`` frozen by a pattern."""

    def __init__(self, P, sites: list):
        self.P = P
        g, be = P.graph, P.be
        vals0 = base_values(P)
        self.sites = sites
        if any(s.node >= len(g.nodes) for s in sites):  # a virtual id: a kink inside a loop node (_loops)
            raise NotFrozen("a kink inside a loop node is not frozen by the second-order analysis")
        self.by_node: dict = {}
        for s in sites:
            self.by_node.setdefault(s.node, []).append(s)
        self.atoms = sorted({(s.node, pos, int(e)) for s in sites for o in s.options for c in o.conds for pos, e, _ in c})
        self.atom_index = {a: j for j, a in enumerate(self.atoms)}
        self.static: dict = {}
        self.ctx: dict = {}
        for ni, ss in self.by_node.items():
            node = g.nodes[ni]
            rule = RULES[node.rule]
            shape = node.outputs[0].shape
            size = int(np.prod(shape)) if len(shape) else 1
            if rule.impl == "unary":
                for s in ss:
                    if s.kind != "kink":
                        raise NotFrozen(f"{node.describe()}: a {s.kind} cannot be frozen")
                    ki = s.key[2] if len(s.key) > 2 else 0
                    if _curvatures(rule, node.params, ki) is None:
                        raise NotFrozen(f"{rule.name}: the curvature of its pieces is unknown")
                mask = np.zeros(size, dtype=bool)
                mask[[s.key[1] for s in ss]] = True
                self.static[ni] = ("unary", mask.reshape(shape), _np(be, vals0[node.inputs[0].id]).reshape(shape),
                                   _np(be, vals0[node.outputs[0].id]).reshape(shape))
            elif rule.impl == "pick":
                mask = np.zeros(size, dtype=bool)
                mask[[s.key[1] for s in ss]] = True
                self.static[ni] = ("pick", mask.reshape(shape))
            elif rule.impl == "compare":
                mask = np.zeros(size, dtype=bool)
                mask[[s.key[1] for s in ss]] = True
                self.static[ni] = ("compare", mask.reshape(shape))
            elif rule.impl == "select":
                in_vals0 = [vals0[v.id] if isinstance(v, Var) else (v.value if isinstance(v, Lit) else None)
                            for v in node.inputs]
                read, shadow = P.interp._np_inputs(ni, node, in_vals0)
                alt = None if shadow is None else shadow[0]
                found, ctx = P.interp._select_sites(ni, node, rule, in_vals0, read(0), alt)
                keys = {s.key for s in found}
                if any(s.key not in keys for s in ss):
                    raise NotFrozen(f"{node.describe()}: a tie the enumeration saw is not a tie here")
                self.ctx[ni] = (ctx, in_vals0, {s.key: s for s in found})
                self.static[ni] = ("select",)
            else:
                raise NotFrozen(f"{rule.name} ({rule.impl}) sites are not frozen by the second-order analysis")
        self._jh = None

    # ------------------------------------------------------------------ pattern -> arrays

    def arrays(self, pattern: dict) -> list:
        """The pattern as a fixed-layout list of NumPy arrays (the frozen program's extra arguments)."""
        g = self.P.graph
        out = []
        for ni in sorted(self.by_node):
            node = g.nodes[ni]
            kind = self.static[ni][0]
            shape = node.outputs[0].shape
            size = int(np.prod(shape)) if len(shape) else 1
            ss = self.by_node[ni]
            if kind == "unary":
                rule = RULES[node.rule]
                slope, curv = np.zeros(size), np.zeros(size)
                for s in ss:
                    opt = pattern[(s.node, s.key)]
                    ki = s.key[2] if len(s.key) > 2 else 0
                    c = _curvatures(rule, node.params, ki)
                    slope[s.key[1]] = float(opt.data[0])
                    curv[s.key[1]] = c[0] if opt.label == "left" else c[1]
                out += [slope.reshape(shape), curv.reshape(shape)]
            elif kind == "pick":
                pa = np.zeros(size)
                for s in ss:
                    pa[s.key[1]] = 1.0 if pattern[(s.node, s.key)].data == 0 else 0.0
                out.append(pa.reshape(shape))
            elif kind == "compare":
                val = np.zeros(size)
                for s in ss:
                    val[s.key[1]] = 1.0 if pattern[(s.node, s.key)].data else 0.0
                out.append(val.reshape(shape))
            else:
                ctx, in_vals0, found = self.ctx[ni]
                chosen = [(found[s.key], pattern[(s.node, s.key)]) for s in ss]
                for item in self.P.interp.select_plan(node, ctx, chosen, in_vals0):
                    out.append(np.asarray(item[1] if item[0] == "const" else item[2]))
        return out

    # ------------------------------------------------------------------ the frozen program

    def function(self):
        P = self.P
        g, be = P.graph, P.be
        sizes = [int(np.prod(x.shape)) if len(x.shape) else 1 for x in P.xs64]
        consts = {cid: be.const(c) for cid, c in g.consts.items()}
        atoms_by_node: dict = {}
        for j, (ni, pos, e) in enumerate(self.atoms):
            atoms_by_node.setdefault(ni, []).append((j, pos, e))
        order = sorted(self.by_node)
        static = self.static
        n_atoms = len(self.atoms)

        def fn(xflat, *arrs):
            vals = dict(consts)
            o = 0
            for v, s in zip(g.inputs, sizes):
                vals[v.id] = xflat[o : o + s].reshape(tuple(v.shape))
                o += s
            got = [None] * n_atoms
            a = 0
            for i, node in enumerate(g.nodes):
                ins = [vals[v.id] if isinstance(v, Var) else (v.value if isinstance(v, Lit) else None) for v in node.inputs]
                for j, pos, e in atoms_by_node.get(i, ()):
                    # a Python scalar operand (torch ge.Scalar's ``other``) is not an input
                    operand = ins[pos] if pos < len(ins) else float(node.params.get("other"))
                    got[j] = be.flat(_as(be, operand))[e]
                outs = list(be.eval(node, ins))
                if i in static:
                    plan = static[i]
                    if plan[0] == "unary":
                        _, mask, u0, v0 = plan
                        slope, curv = arrs[a], arrs[a + 1]
                        a += 2
                        du = ins[0] - be.asarray(u0)
                        piece = be.asarray(v0) + slope * du + 0.5 * curv * du * du
                        outs[0] = be.where(mask, piece, outs[0])
                    elif plan[0] == "pick":
                        pa = arrs[a]
                        a += 1
                        shape = node.outputs[0].shape
                        x0 = be.broadcast(_as(be, ins[0]), shape)
                        x1 = be.broadcast(_as(be, ins[1]), shape)
                        outs[0] = be.where(plan[1], pa * x0 + (1.0 - pa) * x1, outs[0])
                    elif plan[0] == "compare":
                        val = arrs[a]
                        a += 1
                        outs[0] = be.where(plan[1], val > 0.5, outs[0])
                    else:
                        ctx, in_vals0, _ = self.ctx[i]
                        for oi, ov in enumerate(node.outputs):
                            item = arrs[a]
                            a += 1
                            if ov.is_float:
                                src = _select_source(node, oi, ctx["x"].shape)
                                outs[oi] = be.take(_as(be, ins[src]), item).reshape(tuple(ov.shape))
                            else:
                                outs[oi] = item.reshape(tuple(ov.shape))
                for ov, val in zip(node.outputs, outs):
                    vals[ov.id] = val
            return be.concat([c.reshape(1) for c in got])

        return fn

    def jacobian_hessian(self, pattern: dict):
        """(J, H): derivatives of the atoms at x, shapes (A, n) and (A, n, n)."""
        if self._jh is None:
            self._jh = self.P.be.compile_jacobian_hessian(self.function())
        return self._jh(self.P.x_flat(), self.arrays(pattern))

    def conditions(self, pattern: dict):
        """Rows and Hessians of the pattern's conditions ``sum(coef * atom) > 0``."""
        J, H = self.jacobian_hessian(pattern)
        rows, hess = [], []
        for s in self.sites:
            opt = pattern[(s.node, s.key)]
            for cond in opt.conds:
                r = np.zeros(J.shape[1])
                h = np.zeros(H.shape[1:])
                for pos, e, coef in cond:
                    j = self.atom_index[(s.node, pos, int(e))]
                    r = r + coef * J[j]
                    h = h + coef * H[j]
                rows.append(r)
                hess.append(h)
        n = J.shape[1]
        return (np.asarray(rows).reshape(-1, n), np.asarray(hess).reshape(-1, n, n))


def _select_source(node, oi, shape) -> int:
    srcs = [j for j, v in enumerate(node.inputs)
            if j == 0 or (isinstance(v, Var) and v.is_float and tuple(v.shape) == tuple(shape))]
    return srcs[oi] if (len(srcs) > 1 and oi < len(srcs)) else 0


def _as(be, v):
    if isinstance(v, (int, float, np.ndarray, np.generic)):
        return be.asarray(np.asarray(v, dtype=np.float64))
    return v
