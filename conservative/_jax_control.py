"""jax control flow in the engine's IR: ``cond``/``switch``, ``scan``/``fori_loop``, ``while_loop``.

Called by the jax tracer (``_trace_jax._Tracer.walk``) for the primitives ``cond``, ``scan``
and ``while``:

* ``cond``/``switch``: every branch is inlined and the outputs are combined with
  ``select_n`` driven by the branch index, exactly as the ``jnp.where`` spelling does.  The
  comparison that makes the predicate is then a compare site (or the ties of an ``argmax``
  index are selection sites), so at a point where the predicate sits at its threshold both
  branches are there and the engine decides continuity and the Clarke Jacobian as for
  ``jnp.where``.  The branch not taken may be NaN/inf at x (``log`` of a negative):
  ``select_n`` copies values and tangents from the selected case only, so nothing leaks.
* ``scan`` (``fori_loop`` with static bounds lowers to it): unrolled into plain IR nodes
  when the unrolled program stays under :data:`MAX_UNROLLED_NODES` nodes, otherwise one
  loop node (:mod:`._loops`) holding the body once.
* ``while`` (``fori_loop`` with traced bounds lowers to it): always a loop node, since its
  trip count is decided at the point; the predicate is evaluated through its own
  sub-graph so its comparison is a compare site (a possible jump in the count).

The loop node's value is jax's own loop: the original primitive on the original body in
the user's dtypes, or a ``lax.scan``/``lax.while_loop`` over the IR body in float64.
:class:`FastBody` compiles one iteration (values, tangents, the inputs of its nonsmooth
nodes) so iterations without an active kink cost one call.

jax cannot reverse-differentiate ``while_loop``; :func:`forward_jacobian` gives what its
forward mode returns, which the audit uses (and says so) when reverse mode fails there.
"""
from __future__ import annotations

import itertools

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax

from ._ir import Lit, Var
from ._loops import LOOP, LoopNode, LoopSpec, NodeList, SubGraph

MAX_UNROLLED_NODES = 2048  # a scan whose unrolled body would exceed this becomes a loop node
_serial = itertools.count()


def lower(tr, eqn, ins: list, depth: int) -> list:
    """The outputs (Var/Lit) of a control-flow equation, its nodes appended to ``tr``."""
    if not isinstance(tr.graph.nodes, NodeList) and not getattr(tr, "_in_subgraph", 0):
        tr.graph.nodes = NodeList(tr.graph.nodes)  # virtual ids of sites inside loop bodies
    name = eqn.primitive.name
    if name == "cond":
        return _cond(tr, eqn, ins, depth)
    if name == "scan":
        return _scan(tr, eqn, ins, depth)
    if name == "while":
        return _while(tr, eqn, ins, depth)
    raise AssertionError(name)


# --------------------------------------------------------------------------- cond / switch


def _cond(tr, eqn, ins, depth):
    branches = eqn.params["branches"]
    index, ops = ins[0], list(ins[1:])
    if isinstance(index, Lit):
        b = branches[int(np.clip(int(np.asarray(index.value)), 0, len(branches) - 1))]
        return tr.walk(b.jaxpr, b.consts, ops, depth + 1)
    outs = [tr.walk(b.jaxpr, b.consts, list(ops), depth + 1) for b in branches]
    which = index
    if len(branches) == 2:
        # cond(pred, ...) passes convert_element_type(pred): select on the boolean itself, so
        # the comparison that makes it feeds the select directly (as jnp.where does)
        prod = tr.producer.get(index.id)
        if prod is not None and prod.prim == "convert_element_type" and isinstance(prod.inputs[0], Var) \
                and prod.inputs[0].dtype == "bool":
            which = prod.inputs[0]
    kind = "cond" if len(branches) == 2 else f"switch over {len(branches)} branches"
    res = []
    for j, ov in enumerate(eqn.outvars):
        cands = [o[j] for o in outs]
        if all(c is cands[0] or (isinstance(c, Var) and isinstance(cands[0], Var) and c.id == cands[0].id)
               for c in cands):
            res.append(cands[0])  # every branch passes the same value through
            continue
        node = tr._node("select_n", lax.select_n_p, [which, *cands], [ov.aval], {}, rule="where", eqn_params={})
        node.location += f"  (lax.{kind}: every branch evaluated, the index selects)"
        res.append(node.outputs[0])
    return res


# --------------------------------------------------------------------------- sub-graphs


def _subgraph(tr, closed, depth):
    """Trace a closed jaxpr into a SubGraph of its own (fresh input variables)."""
    invars = [tr.new_var(v.aval) for v in closed.jaxpr.invars]
    saved, before = tr.graph.nodes, set(tr.graph.consts)
    tr.graph.nodes = []
    tr._in_subgraph = getattr(tr, "_in_subgraph", 0) + 1
    try:
        outs = tr.walk(closed.jaxpr, closed.consts, invars, depth + 1)
        nodes = tr.graph.nodes
    finally:
        tr.graph.nodes = saved
        tr._in_subgraph -= 1
    consts = {cid: tr.graph.consts[cid] for cid in set(tr.graph.consts) - before}
    return SubGraph(invars, list(outs), list(nodes)), consts


def _shaped(shape, dtype):
    return jax.core.ShapedArray(tuple(shape), np.dtype(dtype))


class _Take:
    """``a[j]`` along the leading axis (a scan's slice of xs)."""

    def __init__(self, j):
        self.j = j

    def __call__(self, a):
        return a[self.j]

    def __repr__(self):
        return f"take[{self.j}]"


def _stack0(*ts):
    return jnp.stack(ts)


def _index(tr, x, j):
    if isinstance(x, Lit):
        return Lit(np.asarray(x.value)[j])
    node = tr._node("slice", _Take(j), [x], [_shaped(x.shape[1:], x.dtype)], {"index": j})
    node.location += f"  (scan: xs[{j}])"
    return node.outputs[0]


# --------------------------------------------------------------------------- scan


def _scan(tr, eqn, ins, depth):
    p = eqn.params
    nc, nk, n, rev = int(p["num_consts"]), int(p["num_carry"]), int(p["length"]), bool(p["reverse"])
    body = p["jaxpr"]
    consts, carry, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
    sub, sub_consts = _subgraph(tr, body, depth)
    if len(sub.nodes) * n <= MAX_UNROLLED_NODES:
        return _unroll_scan(tr, eqn, body, consts, carry, xs, n, nk, rev, depth)
    spec = LoopSpec("scan", sub, None, n_consts=nc, n_carry=nk, length=n, reverse=rev,
                    label=f"a scan of {n} iterations")
    return _loop_node(tr, eqn, ins, spec, sub_consts, f"scan[length={n}{', reverse' if rev else ''}]")


def _unroll_scan(tr, eqn, body, consts, carry, xs, n, nk, rev, depth):
    ys = [[None] * n for _ in eqn.outvars[nk:]]
    for t in range(n):
        j = n - 1 - t if rev else t
        x_t = [_index(tr, x, j) for x in xs]
        outs = tr.walk(body.jaxpr, body.consts, [*consts, *carry, *x_t], depth + 1)
        carry = list(outs[:nk])
        for q, y in enumerate(outs[nk:]):
            ys[q][j] = y
    res = list(carry)
    for q, ov in enumerate(eqn.outvars[nk:]):
        if n == 0:
            res.append(Lit(np.zeros(ov.aval.shape, dtype=ov.aval.dtype)))
            continue
        node = tr._node("stack", _stack0, ys[q], [ov.aval], {})
        node.location += f"  (scan: the {n} per-iteration outputs stacked)"
        res.append(node.outputs[0])
    return res


# --------------------------------------------------------------------------- while


def _while(tr, eqn, ins, depth):
    p = eqn.params
    cond, cc = _subgraph(tr, p["cond_jaxpr"], depth)
    body, bc = _subgraph(tr, p["body_jaxpr"], depth)
    spec = LoopSpec("while", body, cond, n_consts=int(p["body_nconsts"]), n_cond_consts=int(p["cond_nconsts"]),
                    n_carry=len(eqn.outvars), label="a while_loop")
    return _loop_node(tr, eqn, ins, spec, {**cc, **bc}, "while")


# --------------------------------------------------------------------------- the loop node


def _loop_node(tr, eqn, ins, spec, consts, what):
    outs = tuple(tr.new_var(o.aval) for o in eqn.outvars)
    serial = next(_serial)
    prim = _LoopPrimitive(eqn.primitive, dict(eqn.params), [v.aval for v in eqn.invars], spec, consts)
    spec.fast = FastBody(consts)
    n_body = len(spec.body.nodes) + (len(spec.cond.nodes) if spec.cond is not None else 0)
    loc = (f"{', '.join(f'v{o.id}' for o in outs)} = {what}"
           f"({', '.join(f'v{a.id}' if isinstance(a, Var) else repr(getattr(a, 'value', a)) for a in ins)})"
           f"  (a loop node: {n_body} body primitives, run once per iteration)")
    node = LoopNode(LOOP, tuple(ins), outs, {"loop": serial, "kind": spec.kind}, payload=(prim, {}),
                    location=loc, spec=spec)
    tr.graph.nodes.append(node)
    for o in outs:
        tr.producer[o.id] = node
    return list(outs)


def _backend():
    from ._trace_jax import Backend

    return Backend()


def _v64(v):
    from ._trace_jax import _v64 as v64

    return v64(v)


def _eval_sub(be, sub: SubGraph, consts: dict, args) -> list:
    env = dict(consts)
    for v, a in zip(sub.invars, args):
        env[v.id] = a
    for node in sub.nodes:
        ins = [env[v.id] if isinstance(v, Var) else (v.value if isinstance(v, Lit) else None) for v in node.inputs]
        for o, val in zip(node.outputs, be._call(node, ins)):
            env[o.id] = val
    return [env[v.id] if isinstance(v, Var) else _v64(v.value) for v in sub.outvars]


class _LoopPrimitive:
    """The loop node's payload: jax's own loop.  In the user's dtypes the original primitive
    runs the original body; in float64 a ``lax.scan``/``lax.while_loop`` runs the IR body
    (whose literals the engine promotes like every other node's)."""

    multiple_results = True

    def __init__(self, prim, params, in_avals, spec, consts):
        self.prim, self.params, self.in_avals, self.spec, self.consts = prim, params, in_avals, spec, consts
        self.name = prim.name

    def _original(self, vals):
        out = []
        for v, aval in zip(vals, self.in_avals):
            dt = np.dtype(aval.dtype)
            vdt = np.dtype(getattr(v, "dtype", np.asarray(v).dtype))
            if np.issubdtype(dt, np.floating) or np.issubdtype(vdt, np.floating):
                if vdt != dt:
                    return None
                out.append(v)
            else:
                out.append(jnp.asarray(v, dtype=dt))
        return out

    def bind(self, *vals, **_):
        orig = self._original(vals)
        if orig is not None:
            return list(self.prim.bind(*orig, **self.params))
        return self.run_ir(vals)

    def run_ir(self, vals):
        be = _backend()
        spec = self.spec
        consts = {cid: _v64(c) for cid, c in self.consts.items()}
        vals = [_v64(v) for v in vals]
        if spec.kind == "scan":
            nc, nk = spec.n_consts, spec.n_carry
            cs, init, xs = vals[:nc], vals[nc:nc + nk], vals[nc + nk:]

            def step(carry, x):
                out = _eval_sub(be, spec.body, consts, [*cs, *carry, *x])
                return list(out[:nk]), list(out[nk:])

            carry, ys = lax.scan(step, list(init), list(xs), length=spec.length, reverse=spec.reverse)
            return list(carry) + list(ys)
        ncc, nbc = spec.n_cond_consts, spec.n_consts
        ccs, bcs, init = vals[:ncc], vals[ncc:ncc + nbc], vals[ncc + nbc:]

        def cond_fun(carry):
            return _eval_sub(be, spec.cond, consts, [*ccs, *carry])[0]

        def body_fun(carry):
            return list(_eval_sub(be, spec.body, consts, [*bcs, *carry]))

        return list(lax.while_loop(cond_fun, body_fun, list(init)))


class FastBody:
    """Chunks of whole iterations compiled (one ``lax.scan`` per call): float64 values,
    tangents (k columns), the inputs of every nonsmooth node per iteration (to look for
    active kinks) and the largest finite magnitude computed (the continuity check's
    rounding budget).  Iterations past ``n_run`` (or after a while loop stops) leave the
    carry unchanged, so one compiled chunk serves every count."""

    def __init__(self, consts: dict):
        self.consts = consts
        self.cache: dict = {}

    def chunk(self, spec, C, n_run, cvals, ctans, carry, carry_t, xs, xs_t, k, stop_identity, mask):
        from ._trace_jax import _x64

        key = (id(spec), C, k, bool(stop_identity), mask)
        fn = self.cache.get(key)
        if fn is None:
            fn = self.cache[key] = self._build(spec, C, k, stop_identity, mask)
        body = spec.body
        if spec.kind == "scan":
            cc, bc, bct = [], list(cvals), list(ctans)
        else:
            ncc = spec.n_cond_consts
            cc, bc, bct = list(cvals[:ncc]), list(cvals[ncc:]), list(ctans[ncc:])
        nb = len(bc)
        with _x64():
            def tan(t, v, on):
                if not on or k == 0:
                    return None
                return jnp.zeros((k, *v.shape), dtype=jnp.float64) if t is None else t

            bct = [tan(t, v, mask[j]) for j, (t, v) in enumerate(zip(bct, body.invars[:nb]))]
            ct = [tan(t, v, mask[nb + j]) for j, (t, v) in enumerate(zip(carry_t, body.invars[nb:nb + spec.n_carry]))]
            off = nb + spec.n_carry
            xs_j = [jnp.asarray(x) for x in xs]
            xst = []
            for j, (t, v) in enumerate(zip(xs_t, body.invars[off:])):
                if not mask[off + j] or k == 0:
                    xst.append(None)
                else:
                    arr = np.zeros((k, C, *v.shape)) if t is None else t
                    xst.append(jnp.asarray(np.ascontiguousarray(np.moveaxis(arr, 1, 0))))  # (C, k, ...)
            valid = jnp.asarray(np.arange(C) < n_run)
            out = fn([_v64(v) for v in cc], [_v64(v) for v in bc], bct, [_v64(v) for v in carry], ct, xs_j, xst,
                     valid)
        carry_o, ct_o, host = out
        host = jax.device_get(host)
        nk = spec.n_carry
        return {
            "carry": list(carry_o), "carry_t": list(ct_o) if ct_o is not None else [None] * nk,
            "n_body": int(np.sum(host["go"])), "stopped": bool(host["stopped"]),
            "ys": host["ys"], "ys_t": host["ys_t"],
            "checks_cond": _unstack_checks(spec.cond, host["cchecks"]) if spec.cond is not None else [],
            "checks_body": _unstack_checks(body, host["bchecks"]),
            "cond_valid": host["cvalid"], "body_valid": host["go"], "mag": float(np.max(host["mag"], initial=0.0)),
        }

    def _runner(self, sub: SubGraph, stop_identity):
        from ._forward import STOP

        be = _backend()
        consts = {cid: _v64(c) for cid, c in self.consts.items()}

        def run(args):
            env = dict(consts)
            for v, a in zip(sub.invars, args):
                env[v.id] = a
            checks, mags = [], [jnp.zeros((), dtype=jnp.float64)]
            for node in sub.nodes:
                ins = [env[v.id] if isinstance(v, Var) else (v.value if isinstance(v, Lit) else None)
                       for v in node.inputs]
                if node.rule is not None:
                    checks += [env[v.id] for v in node.inputs if isinstance(v, Var)]
                if node.prim in STOP and stop_identity:
                    outs = [ins[0]]
                else:
                    outs = be._call(node, ins)
                for o, val in zip(node.outputs, outs):
                    env[o.id] = val
                    if o.is_float:
                        a = jnp.abs(jnp.asarray(val, dtype=jnp.float64))
                        mags.append(jnp.max(jnp.where(jnp.isfinite(a), a, 0.0), initial=0.0))
            outs = [env[v.id] if isinstance(v, Var) else _v64(v.value) for v in sub.outvars]
            return outs, checks, jnp.max(jnp.stack(mags))

        return run

    def _build(self, spec, C, k, stop_identity, mask):
        body = spec.body
        run_body = self._runner(body, stop_identity)
        run_cond = self._runner(spec.cond, stop_identity) if spec.cond is not None else None
        nk = spec.n_carry
        fidx = [j for j, m in enumerate(mask) if m] if k else []
        float_out = [j for j, v in enumerate(body.outvars) if _is_float(v)]
        carry_float = [j for j in range(nk) if j in float_out]
        is_while = spec.kind == "while"

        def chunk(cc, bc, bct, carry, ct, xs, xst, valid):
            nb = len(bc)

            def step(state, inp):
                carry, ct, running = state
                x, xt, ok = inp
                if is_while:
                    pred_out, cchecks, _ = run_cond([*cc, *carry])
                    pred = jnp.reshape(pred_out[0], ()).astype(bool)
                    cvalid = running & ok
                    go = cvalid & pred
                    running = running & ~(cvalid & ~pred)
                else:
                    cchecks, cvalid, go = [], ok, ok
                args = [*bc, *carry, *x]
                outs, bchecks, mag = run_body(args)
                new_carry = [jnp.where(go, o, c) for o, c in zip(outs[:nk], carry)]
                ys = outs[nk:]
                ys_t = [None] * len(ys)
                new_ct = ct
                if fidx and float_out:
                    tin = [*bct, *ct, *xt]

                    def f(*fl):
                        a = list(args)
                        for j, v in zip(fidx, fl):
                            a[j] = v
                        o = run_body(a)[0]
                        return tuple(o[j] for j in float_out)

                    prim = tuple(args[j] for j in fidx)
                    otans = jax.vmap(lambda *t: jax.jvp(f, prim, t)[1])(*[tin[j] for j in fidx])
                    by_out = dict(zip(float_out, otans))
                    new_ct = [None if c is None else jnp.where(go, by_out[j], c) if j in by_out else c
                              for j, c in enumerate(ct)]
                    ys_t = [by_out.get(nk + q) for q in range(len(ys))]
                mag = jnp.where(go, mag, 0.0)
                return (new_carry, new_ct, running), {"ys": ys, "ys_t": ys_t, "cchecks": cchecks,
                                                      "bchecks": bchecks, "cvalid": cvalid, "go": go, "mag": mag}

            init = (list(carry), list(ct), jnp.asarray(True))
            (carry_o, ct_o, running), per = lax.scan(step, init, (list(xs), list(xst), valid), length=C)
            per["ys_t"] = [None if t is None else jnp.moveaxis(t, 0, 1) for t in per["ys_t"]]  # (k, C, ...)
            per["stopped"] = ~running
            return carry_o, ct_o if fidx else None, per

        del carry_float
        return jax.jit(chunk)


def _unstack_checks(sub: SubGraph, flat: list) -> list:
    """Per nonsmooth node of ``sub``: (node index, [stacked (C, ...) input or the literal])."""
    out, c = [], 0
    for m, node in enumerate(sub.nodes):
        if node.rule is None:
            continue
        full = []
        for v in node.inputs:
            if isinstance(v, Var):
                full.append(np.asarray(flat[c]))
                c += 1
            else:
                full.append(v.value if isinstance(v, Lit) else None)
        out.append((m, full))
    return out


def _is_float(v) -> bool:
    if isinstance(v, Var):
        return v.is_float
    return isinstance(v, Lit) and np.issubdtype(np.asarray(v.value).dtype, np.floating)


# --------------------------------------------------------------------------- AD where reverse mode fails


def forward_jacobian(f, xs: tuple):
    """What jax's forward mode (``jax.jacfwd``) returns for f at xs, and f(x), as float64."""
    from ._trace_jax import _user_context

    def flat_f(*args):
        out = f(*args) if len(xs) > 1 else f(args[0])
        y = jnp.concatenate([jnp.ravel(o) for o in jax.tree_util.tree_leaves(out)])
        return y, y

    with _user_context(xs):
        jac, y = jax.jacfwd(flat_f, argnums=tuple(range(len(xs))), has_aux=True)(*xs)
    n = int(np.size(y))
    cols = [np.asarray(j, dtype=np.float64).reshape(n, -1) for j in jac]
    return np.concatenate(cols, axis=1), np.asarray(y, dtype=np.float64).reshape(-1)
