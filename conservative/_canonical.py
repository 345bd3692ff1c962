"""Kink arguments as linear forms over *atoms*, to tell an identity from a coincidence.

Two kink arguments can have the same first-order row for two different reasons: they
are the same function (``relu(g)`` and ``relu(-g)``: ``-g`` is ``g`` negated), or they
merely agree to first order (``y - x**2`` and ``y - 2*x**2``, whose sign regions leave a
thin piece between them).  First-order sign patterns are exact in the first case and
can miss pieces in the second.  This module writes each kink argument along a branch
path as a linear combination of atoms — the inputs, and the outputs of nonlinear nodes —
by following the linear and piecewise-affine nodes (with the slopes the path chose),
so a dependency ``sum(lam_c * row_c) = 0`` between rows can be checked to be an identity
``sum(lam_c * g_c) = 0`` (its nonlinear atoms cancel exactly).

Contract: ``forms_cancel`` returning True proves the dependency is an identity near x
(given the path's branch choices).  False means "not proved": a node it does not see
through is an atom of its own, which only makes it more cautious.
"""
from __future__ import annotations

import numpy as np

from ._ir import Lit, Var
from ._rules import RULES
from . import _rule_impls as R

MAX_LOCAL = 1 << 16  # entries of a linear node's local Jacobian the canonicalizer will form


class Canonicalizer:
    """Linear forms of (var, element) over atoms, along one branch path."""

    def __init__(self, P, choices):
        self.P = P
        self.g = P.graph
        self.producer = getattr(self.g, "_producer", None)
        if self.producer is None:
            self.producer = self.g._producer = {o.id: i for i, n in enumerate(self.g.nodes) for o in n.outputs}
        self.input_ids = {v.id for v in self.g.inputs}
        self.live = P.interp.live
        self.chosen = {(s.node, s.key): o for s, o in choices}
        self.memo: dict = {}
        self._vals = None

    # values at x through the framework's own program (for non-live operands)
    def _values(self):
        if self._vals is None:
            g, be = self.g, self.P.be
            vals = {v.id: be.input(x) for v, x in zip(g.inputs, self.P.xs64)}
            for cid, c in g.consts.items():
                vals[cid] = be.const(c)
            for node in g.nodes:
                ins = [vals[v.id] if isinstance(v, Var) else (v.value if isinstance(v, Lit) else None) for v in node.inputs]
                for o, val in zip(node.outputs, be.eval(node, ins)):
                    vals[o.id] = val
            self._vals = vals
        return self._vals

    def form(self, var: Var, elem: int) -> dict:
        """{atom: coefficient}; constants dropped."""
        key = (var.id, elem)
        if key in self.memo:
            return self.memo[key]
        self.memo[key] = {("atom", var.id, elem): 1.0}  # a cycle guard; replaced below
        out = self._form(var, elem)
        self.memo[key] = out
        return out

    def _atom(self, var, elem, tag="n"):
        return {(tag, var.id, elem): 1.0}

    def _form(self, var: Var, elem: int) -> dict:
        if var.id in self.input_ids:
            return {("x", var.id, elem): 1.0}
        if var.id not in self.live:
            return {}
        ni = self.producer.get(var.id)
        if ni is None:
            return self._atom(var, elem)
        node = self.g.nodes[ni]
        out_pos = [o.id for o in node.outputs].index(var.id)
        if node.rule is None:
            return self._linear(ni, node, out_pos, var, elem)
        rule = RULES[node.rule]
        if rule.impl == "unary" and rule.piecewise_affine and out_pos == 0:
            src = node.inputs[0]
            if not isinstance(src, Var):
                return {}
            slope = self._unary_slope(ni, node, elem)
            if slope is None:
                return self._atom(var, elem, "piece")
            return _scale(self.form(src, elem), slope)
        if rule.impl == "pick" and out_pos == 0:
            return self._pick(ni, node, var, elem)
        return self._atom(var, elem)

    def _unary_slope(self, ni, node, elem):
        for (n, key), opt in self.chosen.items():
            if n == ni and key[0] == "e" and key[1] == elem:
                data = opt.data
                return None if data is None or data[1] is not None else float(data[0])
        vals = self._values()
        x = vals[node.inputs[0].id]
        try:
            t = self.P.be.jvp(node, [x], [self.P.be.asarray(np.ones((1, *np.shape(self.P.be.asnumpy(x)))))])[0]
        except Exception:
            return None
        return float(np.asarray(self.P.be.asnumpy(t), dtype=np.float64).reshape(-1)[elem])

    def _pick(self, ni, node, var, elem):
        a, b = node.inputs[:2]
        vals = self._values()
        av = np.asarray(self.P.be.asnumpy(vals[a.id]) if isinstance(a, Var) else a.value, dtype=np.float64)
        bv = np.asarray(self.P.be.asnumpy(vals[b.id]) if isinstance(b, Var) else b.value, dtype=np.float64)
        ia = R._broadcast_index(av.shape, var.shape)
        ib = R._broadcast_index(bv.shape, var.shape)
        opt = self.chosen.get((ni, ("e", elem)))
        if opt is not None:
            if not isinstance(opt.data, int):
                return self._atom(var, elem)
            first = opt.data == 0
        else:
            va, vb = av.reshape(-1)[ia[elem]], bv.reshape(-1)[ib[elem]]
            if va == vb:
                return self._atom(var, elem)
            first = (va > vb) == (RULES[node.rule].selection == "max")
        src, idx = (a, ia[elem]) if first else (b, ib[elem])
        return self.form(src, int(idx)) if isinstance(src, Var) else {}

    def _linear(self, ni, node, out_pos, var, elem):
        live = [isinstance(v, Var) and v.id in self.live for v in node.inputs]
        if node.prim in ("stop_gradient", "aten.detach.default", "aten.detach_copy.default"):
            return self._atom(var, elem)
        if not self.P.be.is_linear(node, live):
            return self._atom(var, elem)
        jacs = self._local_jacobians(ni, node, out_pos)
        if jacs is None:
            return self._atom(var, elem)
        out: dict = {}
        for pos, J in jacs.items():
            col = J[:, elem]
            for j in np.nonzero(col)[0]:
                _add(out, self.form(node.inputs[pos], int(j)), float(col[j]))
        return out

    def _local_jacobians(self, ni, node, out_pos):
        cache = getattr(self.g, "_local_jac", None)
        if cache is None:
            cache = self.g._local_jac = {}
        key = (ni, out_pos)
        if key in cache:
            return cache[key]
        vals = self._values()
        be = self.P.be
        in_vals = [vals[v.id] if isinstance(v, Var) else (v.value if isinstance(v, Lit) else None) for v in node.inputs]
        res = {}
        for pos, v in enumerate(node.inputs):
            if not (isinstance(v, Var) and v.id in self.live and v.is_float):
                continue
            if v.size * node.outputs[out_pos].size > MAX_LOCAL:
                cache[key] = None
                return None
            tans = [None] * len(in_vals)
            eye = np.eye(v.size).reshape((v.size, *v.shape))
            tans[pos] = be.asarray(eye)
            try:
                t = be.jvp(node, in_vals, tans)[out_pos]
            except Exception:
                cache[key] = None
                return None
            if t is None:
                continue
            res[pos] = np.asarray(be.asnumpy(t), dtype=np.float64).reshape(v.size, -1)
        cache[key] = res
        return res


def _scale(form: dict, c: float) -> dict:
    return {k: c * v for k, v in form.items()} if c else {}


def _add(acc: dict, form: dict, c: float) -> None:
    for k, v in form.items():
        acc[k] = acc.get(k, 0.0) + c * v


def condition_form(canon: Canonicalizer, P, meta) -> dict:
    """The linear form of one condition row ``sum(coef * input_pos[elem])`` of a node."""
    node = P.graph.nodes[meta.node]
    out: dict = {}
    for pos, elem, coef in meta.cond:
        if pos < len(node.inputs) and isinstance(node.inputs[pos], Var):
            _add(out, canon.form(node.inputs[pos], int(elem)), float(coef))
    return out


def dependencies_are_identities(P, rows: list, metas: list, choices) -> tuple[bool, str]:
    """Whether every linear dependency among the rows is an identity among the kink
    arguments (their nonlinear atoms cancel).  Rows from piecewise-affine arguments are
    always fine; so are linearly independent rows (a linear-independence kink
    qualification, LIKQ)."""
    if not rows:
        return True, ""
    Rm = np.asarray(rows, dtype=np.float64)
    Rm = Rm / np.linalg.norm(Rm, axis=1, keepdims=True)
    u, s, vt = np.linalg.svd(Rm.T, full_matrices=True)
    tol = max(Rm.shape) * np.finfo(np.float64).eps * (s[0] if len(s) else 1.0) * 64
    rank = int(np.sum(s > tol))
    if rank == Rm.shape[0]:
        return True, "independent"
    N = vt[rank:].T  # (m, q): left null space of the rows
    nonaffine = [i for i, m in enumerate(metas) if not m.affine]
    if not nonaffine:
        return True, "affine"
    if np.max(np.abs(N[nonaffine, :])) <= 1e-9:
        return True, "affine"  # the dependencies involve affine arguments only
    canon = Canonicalizer(P, choices)
    forms = [condition_form(canon, P, m) for m in metas]
    atoms = sorted({a for f in forms for a in f if a[0] != "x"}, key=str)
    if not atoms:
        return True, "identity"
    C = np.zeros((len(forms), len(atoms)))
    index = {a: j for j, a in enumerate(atoms)}
    for i, f in enumerate(forms):
        for a, v in f.items():
            if a[0] != "x":
                C[i, index[a]] = v
    C = C / np.linalg.norm(np.asarray(rows), axis=1, keepdims=True)  # rows were normalized
    scale = float(np.max(np.abs(C))) or 1.0
    resid = np.abs(N.T @ C)
    if float(np.max(resid)) <= 1e-9 * scale:
        return True, "identity"
    return False, "dependent"
