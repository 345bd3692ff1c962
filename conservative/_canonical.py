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
        """A nonlinear value as an atom.  Two nodes computing the same primitive on the same
        linear forms are the same atom (``u * u`` written twice is one function)."""
        ni = self.producer.get(var.id)
        if tag == "n" and ni is not None:
            key = self._structural_key(ni, var)
            if key is not None:
                return {("s", key, elem): 1.0}
        return {(tag, var.id, elem): 1.0}

    def _structural_key(self, ni, var):
        node = self.g.nodes[ni]
        if node.rule is not None and tag_for(node) == "piece":
            return None
        parts = []
        for v in node.inputs:
            if isinstance(v, Var):
                if v.size > 64:
                    return None
                parts.append(("v", tuple(_freeze(self.form(v, e)) for e in range(v.size)), v.shape))
            elif isinstance(v, Lit):
                parts.append(("l", repr(np.asarray(v.value).tolist())))
            else:
                parts.append(("n",))
        try:
            params = repr(sorted((k, repr(val)) for k, val in node.params.items()))
        except Exception:
            return None
        consts = []
        payload = node.payload
        if isinstance(payload, tuple) and len(payload) == 4:  # torch: (op, flat args, spec, slots)
            consts = [repr(a) for i, a in enumerate(payload[1]) if i not in payload[3]]
        elif isinstance(payload, tuple) and len(payload) == 2:  # jax: (primitive, params)
            consts = [repr(sorted((k, repr(val)) for k, val in payload[1].items()))]
        out_pos = [o.id for o in node.outputs].index(var.id)
        return (node.prim, params, tuple(consts), tuple(parts), out_pos)

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
        if rule.impl == "mask" and out_pos == 0:
            return self._mask(node, var, elem)
        return self._atom(var, elem)

    def _mask(self, node, var, elem):
        """where(cond, a, b) (torch) / select_n(pred, a, b) (jax): the branch the path's
        boolean picks at this element, when that boolean comes straight from a comparison."""
        cond = node.inputs[0]
        if not isinstance(cond, Var) or len(node.inputs) != 3:
            return self._atom(var, elem)
        ci = self.producer.get(cond.id)
        value = None
        if ci is not None and RULES.get(self.g.nodes[ci].rule or "", None) is not None \
                and RULES[self.g.nodes[ci].rule].impl == "compare":
            ic = R._broadcast_index(cond.shape, var.shape)[elem]
            opt = self.chosen.get((ci, ("e", int(ic))))
            if opt is not None:
                value = bool(opt.data)
            else:
                value = bool(np.asarray(self.P.be.asnumpy(self._values()[cond.id])).reshape(-1)[ic])
        if value is None:
            return self._atom(var, elem)
        torch_where = node.prim.startswith("aten.where")
        pos = (1 if value else 2) if torch_where else (2 if value else 1)
        src = node.inputs[pos]
        if not isinstance(src, Var):
            return {}
        return self.form(src, int(R._broadcast_index(src.shape, var.shape)[elem]))

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


def tag_for(node) -> str:
    return "piece" if node.rule is not None else "n"


def _freeze(form: dict) -> tuple:
    return tuple(sorted((str(k), round(v, 15)) for k, v in form.items() if v != 0.0))


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


def _is_square(atom) -> bool:
    """An atom that is a square (``z * z``, ``z ** 2``, ``square(z)``, any even integer power)."""
    if atom[0] != "s":
        return False
    prim, _params, consts, parts, _ = atom[1]
    name = prim.split(".")[-2] if prim.startswith("aten.") else prim
    if name == "mul" and len(parts) == 2 and parts[0] == parts[1] and parts[0][0] == "v":
        return True
    if name == "square":
        return True
    if name == "pow" and any(c in ("2", "2.0", "4", "4.0", "6", "6.0") for c in consts):
        return True
    if name == "integer_pow":
        return any("('y', '2')" in c or "('y', '4')" in c or "('y', '6')" in c for c in consts)
    return False


def farkas_identity(P, rows: list, metas: list, choices) -> bool:
    """Whether some ``lam >= 0`` (not all zero) makes ``sum lam_c g_c`` identically zero, or
    a nonpositive sum of squares, near x: then the conditions ``g_c > 0`` cannot all hold,
    whatever the first-order picture says.  Checked on the linear forms over atoms (an LP)."""
    from scipy.optimize import linprog

    if not rows:
        return False
    Rm = np.asarray(rows, dtype=np.float64)
    m = Rm.shape[0]
    canon = Canonicalizer(P, choices)
    forms = [condition_form(canon, P, meta) for meta in metas]
    atoms = sorted({a for f in forms for a in f if a[0] != "x"}, key=str)
    index = {a: j for j, a in enumerate(atoms)}
    C = np.zeros((m, len(atoms)))
    for i, f in enumerate(forms):
        for a, v in f.items():
            if a[0] != "x":
                C[i, index[a]] = v
    square = np.array([_is_square(a) for a in atoms], dtype=bool)
    # rows are gradients: normalise each condition (row and atoms together) for the LP
    norm = np.maximum(np.maximum(np.abs(Rm).max(axis=1), np.abs(C).max(axis=1) if C.size else 0.0), 1e-300)
    Rn, Cn = Rm / norm[:, None], C / norm[:, None]
    A_eq = np.vstack([Rn.T, Cn[:, ~square].T, np.ones((1, m))])
    b_eq = np.r_[np.zeros(Rn.shape[1] + int((~square).sum())), 1.0]
    A_ub = Cn[:, square].T if square.any() else None
    b_ub = np.zeros(int(square.sum())) if square.any() else None
    res = linprog(np.zeros(m), A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=[(0, None)] * m, method="highs")
    if res.status != 0:
        return False
    lam = res.x
    # the LP is feasible up to its tolerances: accept only a combination that cancels well
    resid = np.abs(Rn.T @ lam).max() if Rn.size else 0.0
    resid = max(resid, np.abs(Cn[:, ~square].T @ lam).max() if (~square).any() else 0.0)
    return bool(resid <= 1e-9)


def pruning_is_exact(P, rows: list, metas: list, choices) -> tuple[bool, str]:
    """Whether a first-order infeasible partial pattern is truly empty near x: its affine
    conditions alone are infeasible (their cone is the region), or a nonnegative
    combination of its conditions is an identity (:func:`farkas_identity`)."""
    from scipy.optimize import linprog

    if not rows:
        return True, "affine"
    Rm = np.asarray(rows, dtype=np.float64)
    Rm = Rm / np.linalg.norm(Rm, axis=1, keepdims=True)
    affine = np.array([m.affine for m in metas], dtype=bool)
    if affine.all():
        return True, "affine"
    if affine.any():
        Ra = Rm[affine]
        res = linprog(np.zeros(len(Ra)), A_eq=np.vstack([Ra.T, np.ones((1, len(Ra)))]),
                      b_eq=np.r_[np.zeros(Ra.shape[1]), 1.0], bounds=[(0, None)] * len(Ra), method="highs")
        if res.status == 0 and np.abs(Ra.T @ res.x).max() <= 1e-9:
            return True, "affine"
    if farkas_identity(P, rows, metas, choices):
        return True, "identity"
    return False, "dependent"
