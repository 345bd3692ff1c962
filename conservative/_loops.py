"""Loop nodes: a ``scan`` or ``while`` loop held in the IR as its body graph once, which the
interpreter runs iteration by iteration at the traced point.

A tracer unrolls a short loop into plain IR nodes (every analysis then sees ordinary
primitives).  A long loop, and every ``while`` loop (its trip count is decided by the
point, so an unrolled copy would be wrong elsewhere), becomes one :class:`LoopNode`
whose :class:`LoopSpec` holds the body (and the predicate of a ``while``) as a
:class:`SubGraph`, so the IR stays O(body) whatever the number of iterations.

Contract, for the pieces of the engine that meet a loop node:

* **values**: ``node.payload`` evaluates the whole loop with the framework's own loop
  (``graph_function``, ``values_at``, the frozen program, the shadow values);
* **the walk** (:func:`advance`, called by ``Interpreter._advance`` for a loop node): runs
  the realised iterations in float64 with tangents, and treats every body node exactly as
  a top-level node is treated -- sites, options, conditions, policies.  A site inside the
  body is keyed by a *virtual node id* unique to (loop, iteration, body node), so the
  enumeration, LD derivatives and selections work per iteration; the walk resumes inside
  the loop after the walker has branched there.  A ``while`` predicate is evaluated
  through its own sub-graph, so a comparison sitting at its threshold is a compare site:
  the branch that stops and the branch that runs one more iteration are both followed,
  each with the number of iterations it realises;
* **``graph.nodes[vid]``** (:class:`NodeList`) answers a virtual id with a copy of the body
  node whose description names the iteration and whose inputs are renamed to fresh
  variables (so an identity between kink arguments is never inferred from two
  iterations sharing a body variable);
* **affinity and liveness** (:func:`propagate`): a body variable is live / piecewise
  affine in x when it is so in every iteration (a fixed point over the carries);
* **what the analyses do not do inside a loop node**: the second-order analysis (kinks
  inside a loop node cannot be frozen; patterns it would decide stay undecided, so
  ``exact`` can only come from first-order arguments), and the user-dtype shadow values
  (kinks that only float32 rounding puts exactly on a kink inside a long loop are missed).

Sites are found with the same rules as at top level; an iteration with no active site
runs through the framework's compiled body in one call when the adapter provides it
(``LoopSpec.fast``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from ._ir import Lit, Node, Var
from ._rules import RULES

LOOP = "loop"
VIRTUAL_BASE = 1 << 40
MAX_ITERATIONS = 200_000  # per loop node and run: beyond it the audit is UNDECIDED (TooLarge)
MAX_TIE_CHAIN = 64  # consecutive iterations whose predicate sits at its threshold, along one branch


@dataclasses.dataclass
class SubGraph:
    invars: list  # Var
    outvars: list  # Var | Lit
    nodes: list  # Node (LoopNode for a nested loop)

    def has_loops(self) -> bool:
        return any(isinstance(n, LoopNode) for n in self.nodes)


@dataclasses.dataclass
class LoopSpec:
    """``scan``: inputs are consts, init carry, xs; outputs carry then stacked ys; the body
    maps (consts, carry, x_t) to (carry, y_t).  ``while``: inputs are the predicate's consts,
    the body's consts, init carry; outputs the final carry; ``cond`` maps (its consts,
    carry) to a boolean scalar, the body (its consts, carry) to the carry."""

    kind: str  # "scan" | "while"
    body: SubGraph
    cond: SubGraph | None = None
    n_consts: int = 0  # scan: consts; while: the body's consts
    n_cond_consts: int = 0
    n_carry: int = 0
    length: int = 0  # scan only
    reverse: bool = False
    fast: Any = None  # adapter hook: compiled iterations (see _jax_control.FastBody)
    label: str = ""


@dataclasses.dataclass
class LoopNode(Node):
    spec: LoopSpec = None


class NodeList(list):
    """``graph.nodes`` of a graph with loop nodes: a plain list of the top-level nodes that
    also answers a virtual node id (a site inside a loop body) with the body node it
    stands for, described with its iteration."""

    def __init__(self, *args):
        super().__init__(*args)
        self.virtual: dict[int, Node] = {}
        self.by_path: dict[tuple, int] = {}
        self._fresh = 0

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= VIRTUAL_BASE:
            return self.virtual[int(i)]
        return super().__getitem__(i)

    def intern(self, path: tuple, node: Node, where: str, live: set) -> int:
        vid = self.by_path.get(path)
        if vid is not None:
            return vid
        vid = VIRTUAL_BASE + len(self.by_path)
        self.by_path[path] = vid
        ins = []
        for v in node.inputs:
            if isinstance(v, Var):
                self._fresh -= 1
                nv = Var(self._fresh, v.shape, v.dtype)
                if v.id in live:
                    live.add(nv.id)
                ins.append(nv)
            else:
                ins.append(v)
        self.virtual[vid] = dataclasses.replace(node, inputs=tuple(ins), location=f"{node.describe()}  ({where})")
        return vid


def is_virtual(node_id) -> bool:
    return isinstance(node_id, (int, np.integer)) and node_id >= VIRTUAL_BASE


def ensure_node_list(graph) -> NodeList:
    if not isinstance(graph.nodes, NodeList):
        graph.nodes = NodeList(graph.nodes)
    return graph.nodes


def loop_nodes(nodes) -> list:
    return [n for n in nodes if isinstance(n, LoopNode)]


def all_subgraphs(node: LoopNode):
    """The node's sub-graphs and those of loops nested in them."""
    spec = node.spec
    subs = [spec.body] + ([spec.cond] if spec.cond is not None else [])
    out = []
    for s in subs:
        out.append(s)
        for n in loop_nodes(s.nodes):
            out.extend(all_subgraphs(n))
    return out


# --------------------------------------------------------------------------- affinity and liveness


def _flow(nodes, live: set, affine: set, backend) -> None:
    """``_forward._affine_vars`` over a sub-graph's nodes (same rules), adding to the sets."""
    from ._forward import mark_affine

    for node in nodes:
        if isinstance(node, LoopNode):
            propagate(node, live, affine, backend)
            continue
        mark_affine(node, live, affine, backend)


def _sub_ids(sub: SubGraph) -> set:
    ids = {v.id for v in sub.invars}
    for n in sub.nodes:
        ids.update(o.id for o in n.outputs)
        if isinstance(n, LoopNode):
            for s in all_subgraphs(n):
                ids |= _sub_ids(s)
    return ids


def _status(v, live, affine):
    if not isinstance(v, Var):
        return False, True
    return v.id in live, v.id in affine or v.id not in live


def propagate(node: LoopNode, live: set, affine: set, backend) -> None:
    """Live / piecewise-affine status of a loop node's outputs and of every variable of its
    sub-graphs, valid in every iteration: a fixed point over the carries (liveness only
    grows, affinity only shrinks, so it ends within 2 * n_carry + 2 passes)."""
    spec = node.spec
    ins = list(node.inputs)
    subs = [spec.body] + ([spec.cond] if spec.cond is not None else [])
    ids = set().union(*[_sub_ids(s) for s in subs])
    if spec.kind == "scan":
        consts, init, xs = ins[:spec.n_consts], ins[spec.n_consts:spec.n_consts + spec.n_carry], \
            ins[spec.n_consts + spec.n_carry:]
        cconsts = []
    else:
        cconsts = ins[:spec.n_cond_consts]
        consts = ins[spec.n_cond_consts:spec.n_cond_consts + spec.n_consts]
        init = ins[spec.n_cond_consts + spec.n_consts:]
        xs = []
    carry = [_status(v, live, affine) for v in init]
    for _ in range(2 * len(carry) + 3):
        live.difference_update(ids)
        affine.difference_update(ids)

        def bind(invars, srcs):
            for iv, st in zip(invars, srcs):
                if st[0]:
                    live.add(iv.id)
                if st[1]:
                    affine.add(iv.id)

        bind(spec.body.invars, [_status(v, live, affine) for v in consts] + carry
             + [_status(v, live, affine) for v in xs])
        if spec.cond is not None:
            bind(spec.cond.invars, [_status(v, live, affine) for v in cconsts] + carry)
            _flow(spec.cond.nodes, live, affine, backend)
        _flow(spec.body.nodes, live, affine, backend)
        outs = [_status(v, live, affine) for v in spec.body.outvars[:spec.n_carry]]
        new = [(a[0] or b[0], a[1] and b[1]) for a, b in zip(carry, outs)]
        if new == carry:
            break
        carry = new
    else:  # the passes are monotone, so this is not reached; stay conservative if it were
        carry = [(True, False)] * len(carry)
    outs = list(carry)
    if spec.kind == "scan":
        outs += [_status(v, live, affine) for v in spec.body.outvars[spec.n_carry:]]
    for o, (lv, af) in zip(node.outputs, outs):
        if lv:
            live.add(o.id)
        if af:
            affine.add(o.id)


# --------------------------------------------------------------------------- per-interpreter setup


def _prepare(interp) -> None:
    """Body variables' users (discrete outputs) and tangent relevance, once per interpreter."""
    if getattr(interp, "_loops_ready", False):
        return
    interp._loops_ready = True
    g = interp.g
    for top in loop_nodes(g.nodes):
        for sub in all_subgraphs(top):
            for n in sub.nodes:
                for v in n.inputs:
                    if isinstance(v, Var):
                        interp.users[v.id] = interp.users.get(v.id, 0) + 1
            for v in sub.outvars:
                if isinstance(v, Var):
                    interp.users[v.id] = interp.users.get(v.id, 0) + 1
    if not getattr(g, "_loops_relevant", False):
        for top in loop_nodes(g.nodes):
            _relevance(top, interp.relevant)
        g._loops_relevant = True


def _relevance(node: LoopNode, rel: set) -> None:
    """Body float variables whose tangent can reach a relevant loop output (fixed point)."""
    from ._forward import STOP

    spec = node.spec
    body = spec.body
    nk = spec.n_carry
    want = [o.id in rel for o in node.outputs]
    carry_rel = want[:nk]
    ys_rel = want[nk:] if spec.kind == "scan" else []
    for _ in range(nk + 2):
        R = {v.id for v, w in zip(body.outvars, carry_rel + ys_rel) if w and isinstance(v, Var) and v.is_float}
        _backward(body.nodes, R, STOP)
        off = spec.n_consts if spec.kind == "scan" else spec.n_consts
        new = [a or (body.invars[off + j].id in R) for j, a in enumerate(carry_rel)]
        if new == carry_rel:
            break
        carry_rel = new
    rel |= R
    # the predicate's inputs carry no tangent: its nodes are never relevant
    # (comparisons are never inert anyway)


def _backward(nodes, R: set, STOP) -> None:
    for n in reversed(nodes):
        if not any(o.id in R for o in n.outputs):
            continue
        if n.prim in STOP:
            continue
        if isinstance(n, LoopNode):
            _relevance(n, R)
        for v in n.inputs:
            if isinstance(v, Var) and v.is_float:
                R.add(v.id)


def has_live_stop(P) -> bool:
    """Whether a loop body applies stop_gradient to a value that depends on x."""
    live = P.interp.live
    from ._forward import STOP

    for top in loop_nodes(P.graph.nodes):
        for sub in all_subgraphs(top):
            for n in sub.nodes:
                if n.prim in STOP and any(isinstance(v, Var) and v.id in live for v in n.inputs):
                    return True
    return False


# --------------------------------------------------------------------------- the walk


class _Cursor(NamedTuple):
    phase: str  # "cond" | "body"
    t: int  # iterations completed
    m: int  # next node of the phase's sub-graph (0: the phase's inputs are not bound yet)
    carry: tuple  # values
    carry_t: tuple  # tangents (None: zero)
    ys: Any  # scan outputs so far: a linked list (j, values, tangents, rest) or None
    xs: Any  # scan: per xs input (NumPy values, NumPy tangents (k, n, ...) or None)
    slow: int = -1  # an iteration the compiled chunk found a site in: walked node by node
    cond_site: bool = False  # this iteration's predicate had an active site (a tie)
    ties: int = 0  # consecutive iterations continued at a tie of the predicate
    fp: Any = None  # the carry (values, tangents) when the last such iteration continued


def _skip(interp, node) -> bool:
    """``Interpreter._advance``'s test for a node with no kink of f."""
    if node.rule is None:
        return True
    impl = RULES[node.rule].impl
    if impl == "mask":
        return True
    if not any(isinstance(v, Var) and v.id in interp.live for v in node.inputs):
        return True
    if len(node.inputs) == 2 and node.inputs[0] is node.inputs[1] and impl in ("pick", "compare"):
        return True
    return interp._inert(node)


def advance(interp, i: int, node: LoopNode, st):
    """Run top-level loop node ``i`` from the cursor in ``st``: returns a site frame (the
    walker resumes at ``i`` once it has branched) or None after storing the outputs."""
    _prepare(interp)
    return _run(interp, node, st, (i,), i)


def _inputs(node, st):
    vals = [st.vals[v.id] if isinstance(v, Var) else (v.value if isinstance(v, Lit) else None) for v in node.inputs]
    tans = [st.tans.get(v.id) if isinstance(v, Var) else None for v in node.inputs]
    return vals, tans


def _start(interp, node, st) -> _Cursor:
    spec = node.spec
    vals, tans = _inputs(node, st)
    be = interp.be
    if spec.kind == "scan":
        a, b = spec.n_consts, spec.n_consts + spec.n_carry
        xs = []
        for v, t in zip(vals[b:], tans[b:]):
            xv = np.asarray(be.asnumpy(v))
            xt = None if t is None else np.asarray(be.asnumpy(t), dtype=np.float64)
            xs.append((xv, xt))
        return _Cursor("body", 0, 0, tuple(vals[a:b]), tuple(tans[a:b]), None, tuple(xs))
    a = spec.n_cond_consts + spec.n_consts
    return _Cursor("cond", 0, 0, tuple(vals[a:]), tuple(tans[a:]), None, ())


def _xs_index(spec, t: int) -> int:
    return spec.length - 1 - t if spec.reverse else t


def _bind(interp, node, cur: _Cursor, st) -> None:
    """Bind the phase's sub-graph inputs for iteration ``cur.t``."""
    spec = node.spec
    vals, tans = _inputs(node, st)
    be = interp.be
    if spec.kind == "scan":
        j = _xs_index(spec, cur.t)
        xv = [be.asarray(np.asarray(x[j])) for x, _ in cur.xs]
        xt = [None if t is None else be.asarray(np.ascontiguousarray(t[:, j])) for _, t in cur.xs]
        srcv = list(vals[:spec.n_consts]) + list(cur.carry) + xv
        srct = list(tans[:spec.n_consts]) + list(cur.carry_t) + xt
        sub = spec.body
    elif cur.phase == "cond":
        srcv = list(vals[:spec.n_cond_consts]) + list(cur.carry)
        srct = list(tans[:spec.n_cond_consts]) + list(cur.carry_t)
        sub = spec.cond
    else:
        a = spec.n_cond_consts
        srcv = list(vals[a:a + spec.n_consts]) + list(cur.carry)
        srct = list(tans[a:a + spec.n_consts]) + list(cur.carry_t)
        sub = spec.body
    for iv, v, t in zip(sub.invars, srcv, srct):
        st.vals[iv.id] = v
        if t is None:
            st.tans.pop(iv.id, None)
        else:
            st.tans[iv.id] = t


def _read(sub: SubGraph, st):
    vals = tuple(st.vals[v.id] if isinstance(v, Var) else v.value for v in sub.outvars)
    tans = tuple(st.tans.get(v.id) if isinstance(v, Var) else None for v in sub.outvars)
    return vals, tans


def _where(node, cur) -> str:
    spec = node.spec
    if spec.kind == "scan":
        it = f"iteration {cur.t}" + (f" (xs index {_xs_index(spec, cur.t)})" if spec.reverse else "")
    else:
        it = f"iteration {cur.t}" + (", loop predicate" if cur.phase == "cond" else "")
    return f"{it} of {spec.label or node.describe()}"


def _run(interp, node: LoopNode, st, path: tuple, resume: int):
    spec = node.spec
    key = ("loop", path)
    cur = st.vals.get(key)
    if cur is None:
        cur = _start(interp, node, st)
    first = "body" if spec.kind == "scan" else "cond"
    fast = spec.fast is not None and not any(s.has_loops() for s in all_subgraphs(node)[:2])
    while True:
        if spec.kind == "scan" and cur.t >= spec.length:
            break
        if cur.t > MAX_ITERATIONS:
            from ._problem import TooLarge

            raise TooLarge(f"{spec.label or 'a while_loop'} runs more than {MAX_ITERATIONS} iterations at this point; "
                           "the engine follows at most that many")
        if fast and cur.m == 0 and cur.phase == first and cur.slow != cur.t:
            cur, done = _chunk(interp, node, cur, st)
            if done:
                break
            if cur.slow != cur.t:
                continue
        sub = spec.cond if cur.phase == "cond" else spec.body
        m = cur.m
        if m == 0:
            _bind(interp, node, cur, st)
        while m < len(sub.nodes):
            bn = sub.nodes[m]
            here = path + (cur.t, cur.phase, m)
            if isinstance(bn, LoopNode):
                fr = _run(interp, bn, st, here, resume)
                if fr is not None:
                    st.vals[key] = cur._replace(m=m)
                    return fr
                m += 1
                continue
            fr = _node_step(interp, bn, st, here, resume, lambda: _where(node, cur))
            if fr is not None:
                st.vals[key] = cur._replace(m=m + 1, cond_site=cur.cond_site or cur.phase == "cond")
                return fr
            m += 1
        vals, tans = _read(sub, st)
        if cur.phase == "cond":
            go = bool(np.asarray(interp.be.asnumpy(vals[0])).reshape(-1)[0])
            if go and cur.cond_site:
                # continuing at a tie of the predicate.  If the last such iteration left
                # the carry exactly as it was (values and tangents), the loop sits at a
                # fixed point that would repeat forever: there the predicate is false
                # (f(x) itself returned), and stopping changes neither value nor tangent.
                fp = _fingerprint(interp, cur.carry, cur.carry_t)
                if fp == cur.fp:
                    break
                if cur.ties >= MAX_TIE_CHAIN:
                    from ._problem import TooLarge

                    raise TooLarge(f"the predicate of {spec.label} sits at its threshold in more than {MAX_TIE_CHAIN} "
                                   "consecutive iterations along one branch: the engine cannot follow the count")
                cur = cur._replace(ties=cur.ties + 1, fp=fp)
            elif go:
                cur = cur._replace(ties=0, fp=None)
            if not go:
                break
            cur = cur._replace(phase="body", m=0, cond_site=False)
            continue
        nk = spec.n_carry
        ys = cur.ys
        if spec.kind == "scan" and len(vals) > nk:
            ys = (_xs_index(spec, cur.t), vals[nk:], tans[nk:], ys)
        cur = cur._replace(phase=first, t=cur.t + 1, m=0, carry=vals[:nk], carry_t=tans[:nk], ys=ys)
    st.vals.pop(key, None)
    outs, otans = list(cur.carry), list(cur.carry_t)
    if spec.kind == "scan":
        ys_v, ys_t = _stack(interp, node, cur.ys)
        outs += ys_v
        otans += ys_t
    prev = getattr(interp, "_loop_rounding", (0.0, 0))
    nfloat = sum(1 for s in all_subgraphs(node) for n in s.nodes for o in n.outputs if o.is_float)
    interp._loop_rounding = (prev[0], max(prev[1], cur.t * nfloat))
    _note_magnitudes(interp, outs)
    interp._store(st, node, outs, otans)
    return None


def _fingerprint(interp, vals, tans) -> tuple:
    be = interp.be
    return tuple((np.asarray(be.asnumpy(v)).tobytes(), None if t is None else np.asarray(be.asnumpy(t)).tobytes())
                 for v, t in zip(vals, tans))


def _stack(interp, node, ys):
    """The scan's stacked outputs (values, tangents) in xs order.  ``ys`` links single
    iterations ``(j, values, tangents, rest)`` and compiled blocks ``("block", js, values
    (c, ...), tangents (k, c, ...), rest)``."""
    spec = node.spec
    be = interp.be
    k = interp._k
    n_y = len(node.outputs) - spec.n_carry
    idx, vparts, tparts = [], [[] for _ in range(n_y)], [[] for _ in range(n_y)]
    while ys is not None:
        if ys[0] == "block":
            _, js, bv, bt, ys = ys
            idx.extend(js)
            for q in range(n_y):
                vparts[q].append(np.asarray(bv[q]))
                tparts[q].append(None if bt[q] is None else np.moveaxis(np.asarray(bt[q], dtype=np.float64), 1, 0))
            continue
        j, v, t, ys = ys
        idx.append(j)
        for q in range(n_y):
            vparts[q].append(np.asarray(be.asnumpy(v[q]))[None])
            tparts[q].append(None if t[q] is None else
                             np.asarray(be.asnumpy(t[q]), dtype=np.float64).reshape((1, k, *node.outputs[spec.n_carry + q].shape[1:])))
    order = np.argsort(np.asarray(idx, dtype=np.int64), kind="stable")
    vals, tans = [], []
    for q in range(n_y):
        ov = node.outputs[spec.n_carry + q]
        dt = np.float64 if ov.is_float else np.dtype(ov.dtype)
        if not idx:
            vals.append(be.asarray(np.zeros(ov.shape, dtype=dt)))
            tans.append(None)
            continue
        arr = np.concatenate(vparts[q])[order]
        vals.append(be.asarray(arr.astype(dt)))
        if not ov.is_float or k == 0 or all(t is None for t in tparts[q]):
            tans.append(None)
            continue
        full = np.concatenate([np.zeros((len(v), k, *ov.shape[1:])) if t is None else t
                               for v, t in zip(vparts[q], tparts[q])])[order]  # (n, k, ...)
        tans.append(be.asarray(np.ascontiguousarray(np.moveaxis(full, 0, 1))))
    return vals, tans


def _note_magnitudes(interp, arrays) -> None:
    M = 0.0
    for a in arrays:
        try:
            x = np.asarray(interp.be.asnumpy(a), dtype=np.float64)
        except (TypeError, ValueError):
            continue
        fin = x[np.isfinite(x)]
        if fin.size:
            M = max(M, float(np.max(np.abs(fin))))
    prev = getattr(interp, "_loop_rounding", (0.0, 0))
    interp._loop_rounding = (max(prev[0], M), prev[1])


def _node_step(interp, node, st, path, resume, where):
    """One body node, treated as ``Interpreter._advance`` treats a top-level node."""
    from . import _forward as F

    be = interp.be
    in_vals, in_tans = _inputs(node, st)
    if node.prim in F.STOP:
        outs = be.eval(node, in_vals)
        passed = [in_tans[0]] if interp.stop_identity and in_tans else [None] * len(outs)
        interp._store(st, node, outs, passed)
        return None
    if _skip(interp, node):
        outs = be.eval(node, in_vals)
        otans = be.jvp(node, in_vals, in_tans)
        interp._store(st, node, outs, otans)
        _note_magnitudes(interp, [o for o, v in zip(outs, node.outputs) if v.is_float])
        return None
    probe, ctx = interp._sites(-1, node, in_vals, in_tans)
    if not probe:
        outs, otans = interp._apply(node, ctx, [], in_vals, in_tans)
        interp._store(st, node, outs, otans)
        return None
    vid = interp.g.nodes.intern(path, node, where(), interp.live)
    sites, ctx = interp._sites(vid, node, in_vals, in_tans)
    st.n_sites += sum(s.weight for s in sites)
    if interp._max_sites is not None and st.n_sites > interp._max_sites:
        raise F.BudgetExceeded(f"more than {interp._max_sites} active kinks")
    for s in sites:
        interp.sites_seen.setdefault((s.node, s.key), s)
    k = interp._k
    np_tans = [None if t is None else be.asnumpy(t).reshape(k, -1) for t in in_tans]

    def rowfn(cond, np_tans=np_tans):
        row = np.zeros(k)
        for pos, e, c in cond:
            t = np_tans[pos] if pos < len(np_tans) else None
            if t is not None:
                row = row + c * t[:, e]
        return row

    affine = not any(isinstance(v, Var) and v.is_float and v.id in interp.live and v.id not in interp.affine
                     for v in node.inputs)
    return F._SiteFrame(vid, node, ctx, sites, rowfn, in_vals, in_tans, affine, tuple(st.choices), resume=resume)


# --------------------------------------------------------------------------- compiled chunks of iterations

CHUNK = 256  # iterations per compiled call (a while loop's chunk is CHUNK // 4)


def _zeros_t(k, shape):
    return np.zeros((k, *shape))


def _chunk(interp, node, cur: _Cursor, st):
    """Run whole iterations from ``cur`` through the adapter's compiled chunk until the end
    of the loop or an iteration with an active site (which the walk then takes node by
    node).  Returns (cursor, loop finished?)."""
    spec = node.spec
    be = interp.be
    k = interp._k
    vals, tans = _inputs(node, st)
    live = interp.live
    body = spec.body
    if spec.kind == "scan":
        nc = spec.n_consts
        cvals, ctans = vals[:nc], tans[:nc]
        C = max(1, min(CHUNK, spec.length))
        remaining = spec.length - cur.t
        n_run = min(C, remaining)
        js = [_xs_index(spec, cur.t + r) for r in range(C)]
        js_clip = [min(max(j, 0), spec.length - 1) for j in js]
        xs = [x[js_clip] for x, _ in cur.xs]
        xs_t = [None if t is None else t[:, js_clip] for _, t in cur.xs]
    else:
        ncc = spec.n_cond_consts
        cvals, ctans = vals[:ncc + spec.n_consts], tans[:ncc + spec.n_consts]
        C = max(1, CHUNK // 4)
        n_run = C
        xs, xs_t, js = [], [], []
    mask = tuple(bool(v.is_float and v.id in live) for v in body.invars)
    first = None
    for attempt in range(2):
        res = spec.fast.chunk(spec, C, n_run, cvals, ctans, cur.carry, cur.carry_t, xs, xs_t, k,
                              interp.stop_identity, mask)
        if res is None:
            return cur._replace(slow=cur.t), False
        if attempt == 1:
            break
        first = _first_site(interp, spec, res, n_run)
        if first is None:
            break
        if first == 0:
            return cur._replace(slow=cur.t), False
        n_run = first  # run the iterations before the site again, and stop there
    done_iters = res["n_body"]
    prev = getattr(interp, "_loop_rounding", (0.0, 0))
    interp._loop_rounding = (max(prev[0], res["mag"]), prev[1])
    ys = cur.ys
    if spec.kind == "scan" and len(node.outputs) > spec.n_carry and done_iters:
        bv = [np.asarray(v)[:done_iters] for v in res["ys"]]
        bt = [None if t is None else np.asarray(t)[:, :done_iters] for t in res["ys_t"]]
        ys = ("block", js[:done_iters], bv, bt, ys)
    carry_t = tuple(t if m_ else None for t, m_ in zip(res["carry_t"], _carry_mask(spec, mask)))
    cur = cur._replace(t=cur.t + done_iters, m=0, carry=tuple(res["carry"]), carry_t=carry_t, ys=ys)
    if done_iters:
        cur = cur._replace(ties=0, fp=None)
    if first is not None:
        return cur._replace(slow=cur.t), False
    if spec.kind == "while":
        return cur, bool(res["stopped"])
    return cur, cur.t >= spec.length


def _carry_mask(spec, mask):
    off = spec.n_consts
    return mask[off:off + spec.n_carry]


def _first_site(interp, spec, res, n_run):
    """The first iteration (relative to the chunk) where a nonsmooth node of the body or of
    the predicate has an active site, or None.  A vectorised filter finds candidates, and
    ``Interpreter._sites`` confirms each (so the test is the walk's own)."""
    cands = []
    for phase, sub in (("cond", spec.cond), ("body", spec.body)):
        if sub is None:
            continue
        valid = np.asarray(res["cond_valid" if phase == "cond" else "body_valid"], dtype=bool)[:n_run]
        for m, stacked in res["checks_" + phase]:
            node = sub.nodes[m]
            if _skip(interp, node):
                continue
            flags = _candidates(interp, node, stacked, len(valid)) & valid
            for r in np.nonzero(flags)[0]:
                cands.append((int(r), 0 if phase == "cond" else 1, m, node, stacked))
    be = interp.be
    for r, _, m, node, stacked in sorted(cands, key=lambda c: (c[0], c[1], c[2])):
        ins = [be.asarray(np.asarray(a[r])) if isinstance(a, np.ndarray) and not isinstance(v, Lit) else a
               for a, v in zip(stacked, node.inputs)]
        sites, _ = interp._sites(-1, node, ins, [None] * len(ins))
        if sites:
            return r
    return None


def _read_flushed(interp, a):
    a = np.asarray(a, dtype=np.float64)
    if interp.flush:
        a = np.where(np.abs(a) < np.finfo(np.float64).tiny, np.copysign(0.0, a), a)
    return a


def _candidates(interp, node, stacked, C) -> np.ndarray:
    """Iterations (bool, (C,)) where ``node`` may sit at a kink: a superset of where
    ``Interpreter._sites`` finds a site."""
    from . import _rule_impls as R

    rule = RULES[node.rule]
    impl = rule.impl
    tol = interp.tol
    everywhere = np.ones(C, dtype=bool)
    try:
        if impl in ("unary", "jump", "nonlipschitz"):
            x = _read_flushed(interp, stacked[0]).reshape(C, -1)
            flags = np.zeros(C, dtype=bool)
            for s in R.unary_sites(-1, node, rule, x.reshape(-1), tol):
                flags[s.key[1] // max(1, x.shape[1])] = True
            return flags
        if impl in ("pick", "compare"):
            if len(node.inputs) < 2:
                return everywhere
            out = tuple(node.outputs[0].shape)
            parts = []
            for a, v in zip(stacked[:2], node.inputs[:2]):
                if isinstance(v, Var):
                    a = _read_flushed(interp, a)
                    a = a.reshape((C,) + (1,) * (len(out) - (a.ndim - 1)) + a.shape[1:])
                else:
                    a = _read_flushed(interp, a)
                    a = a.reshape((1,) + (1,) * (len(out) - a.ndim) + a.shape)
                parts.append(np.broadcast_to(a, (C, *out)).reshape(C, -1))
            A, B = parts
            return np.any((np.abs(A - B) <= tol) & np.isfinite(A), axis=1)
        if impl in ("select", "norm"):
            x = _read_flushed(interp, stacked[0]).reshape(C, -1)
            if impl == "norm":
                x = np.abs(x)
                near0 = np.any(x <= tol, axis=1)
            else:
                near0 = np.zeros(C, dtype=bool)
            srt = np.sort(x, axis=1)
            d = np.diff(srt, axis=1)
            ties = np.any((d <= tol) & np.isfinite(srt[:, 1:]) & np.isfinite(srt[:, :-1]), axis=1) if d.size else \
                np.zeros(C, dtype=bool)
            return ties | near0
    except (ValueError, IndexError):
        return everywhere
    return everywhere


# --------------------------------------------------------------------------- continuity


def rounding_terms(P) -> tuple[float, int]:
    """(largest magnitude, number of float operations) the loops contributed to the runs so
    far: the rounding budget of a program with loops counts every iteration."""
    return getattr(P.interp, "_loop_rounding", (0.0, 0))


# --------------------------------------------------------------------------- AD where reverse mode fails


def _has_while(nodes) -> bool:
    for n in loop_nodes(nodes):
        if n.spec.kind == "while" or any(_has_while(s.nodes) for s in all_subgraphs(n)):
            return True
    return False


def reverse_mode_fallback(P, err: str):
    """((jacobian, f(x)), mode, note) from the framework's forward mode when its reverse mode
    failed on a program with a while loop, else (None, "", "")."""
    if P.framework != "jax" or not _has_while(P.graph.nodes):
        return None, "", ""
    from ._jax_control import forward_jacobian

    try:
        got = forward_jacobian(P.f, P.xs)
    except Exception as e:  # forward mode fails too: the audit reports reverse mode's error
        return None, "", f"forward mode failed as well ({type(e).__name__}: {e})"
    short = " ".join(err.split())
    short = short if len(short) <= 200 else short[:197] + "..."
    note = (f"jax cannot reverse-differentiate f: it contains a while_loop (lax.while_loop, or fori_loop with traced "
            f"bounds), and jax.jacrev/jax.grad raise ({short}). Forward mode (jax.jacfwd) works: the AD Jacobian "
            "audited here is forward mode's. The Clarke Jacobian and the verdict on f's regularity do not depend "
            "on the mode.")
    return got, "forward", note


def with_ad_mode(res, mode: str, note: str):
    if not mode:  # no fallback: the audit says why reverse mode failed, and forward mode's error
        return dataclasses.replace(res, reason=f"{res.reason}; {note}") if note else res
    return dataclasses.replace(res, ad_mode=mode, notes=(note,) + tuple(res.notes))
