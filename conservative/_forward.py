"""Stage 2, forward tangents: evaluate the IR in float64 with a tangent matrix, branching
at kinks.

One pass evaluates every node in float64, pushes a tangent matrix (k columns: identity
directions give the full Jacobian, a direction matrix M gives f'(x; M)) and, at each
nonsmooth primitive, finds the *sites* that sit at a kink and asks a *policy* which
branch (option) to take there:

* :class:`LexPolicy`: Khan & Barton's lexicographic rule (first nonzero tangent column);
* :class:`AssignPolicy`: a given vertex choice per site (AD-selection Jacobians);
* :class:`ConventionPolicy`: one derivative convention per primitive, shared by all of
  its sites (relu'(0) = s everywhere), as a framework setting would choose it;
* :class:`EnumPolicy`: every option whose first-order region stays nonempty (LP), giving
  a depth-first enumeration of the essentially active pieces.

Contract: every leaf records the strict linear conditions on the directions ``d`` under
which its branches are in force (``conds``), with, for each row, where it came from
(``meta``: node, condition, whether its argument is piecewise affine), so the piece
stage can check each leaf and each *pruned* partial pattern (``Interpreter.pruned``)
against the exactness contract.  The walk is iterative (no recursion per kink), except
for a nested walk at a comparison that ties to first order, whose branches are compared.
Smooth primitives are evaluated and differentiated by the framework (``backend``);
``detach``/``stop_gradient`` pass no tangent, as in AD.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from . import _rule_impls as R
from ._ir import Graph, Lit, Node, Var
from ._lp import strictly_feasible
from ._rules import RULES

ZERO_ROW = 1e-13
STOP = {"stop_gradient", "aten.detach.default", "aten.detach_copy.default", "aten.detach_.default"}


def _rmax(r) -> float:
    return float(np.max(np.abs(r))) if r.size else 0.0


class BudgetExceeded(Exception):
    pass


class NotEnumerable(Exception):
    """A site has no finite list of branches (2-norm at 0): enumeration cannot be exact."""


@dataclasses.dataclass(frozen=True)
class CondMeta:
    """Where a condition row came from: the node, the functional on its inputs, and
    whether the node's inputs are piecewise affine in x (then the row is exact)."""

    node: int
    cond: tuple  # ((input_pos, flat_elem, coef), ...)
    affine: bool
    choices: tuple  # the path's choices before this node: ((site, option), ...)


@dataclasses.dataclass
class Leaf:
    out: np.ndarray  # flat float64 outputs
    jac: np.ndarray  # (n_out, k): the outputs' tangents
    choices: list  # [(Site, Option)]
    conds: list  # rows (k,) with row . d > 0 on this piece
    meta: list  # CondMeta per row
    certified: bool  # no branch was taken on a tie that persists to first order at a jump
    degenerate: bool  # some kink argument had a zero first-order tangent
    nonaffine_kink: bool  # some active kink's argument is not piecewise affine in x
    witness: Any = None
    degenerate_nonaffine: bool = False  # a zero-row kink whose argument is not piecewise affine


@dataclasses.dataclass
class Pruned:
    """A partial pattern the LP found infeasible at first order."""

    conds: list
    meta: list
    choices: list
    after_degenerate_nonaffine: bool


class LexPolicy:
    branching = False

    def options(self, site, rowfn, node):
        if site.kind in ("nonlipschitz", "unsupported"):
            return site.options[:1]
        if site.kind == "layer":  # a layer's pieces (_layers.LayerSite)
            return [site.lex(rowfn)]
        if site.kind == "norm":
            return [R.norm_lex(site, rowfn, node._norm_slices[site.key[1]])]
        if site.kind == "norminf":
            return [R.norminf_lex(site, rowfn)]
        if site.kind in ("kink", "jump"):
            return [R.unary_lex(site, rowfn)]
        if site.kind in ("tie", "compare"):
            return [R.binary_lex(site, rowfn)]
        if site.kind == "group":
            return [R.select_lex(site, rowfn)]
        return site.options[:1]


class AssignPolicy:
    """Choose option ``assign(site)``; ``assign`` maps a site to an option index."""

    branching = False

    def __init__(self, assign):
        self.assign = assign

    def options(self, site, rowfn, node):
        if len(site.options) <= 1:
            return site.options[:1]
        return [site.options[self.assign(site) % len(site.options)]]


def convention_key(site, node) -> str:
    """Sites that one framework-wide derivative convention governs together."""
    return f"{node.origin or node.rule}:{site.kind}"


class ConventionPolicy:
    """One convention ``s`` in [0, 1] per primitive (``weights[convention_key]``): unary
    kinks take the slope ``(1 - s) left + s right``, ties the tangent ``(1 - s) da + s db``;
    discrete choices (jumps, comparisons, tie orders) take the first option for s < 1/2,
    the last otherwise.  A 2-norm at 0 takes the zero subgradient."""

    branching = False

    def __init__(self, weights: dict, default: float = 0.0):
        self.weights = weights
        self.default = default

    def options(self, site, rowfn, node):
        s = float(self.weights.get(convention_key(site, node), self.default))
        opts = site.options
        if site.kind == "layer":  # a layer's pieces (_layers.LayerSite)
            return [site.convention(s)]
        if site.kind == "norm":
            return [R.Option("zero", [], ("u", np.zeros(len(node._norm_slices[site.key[1]]))))]
        if len(opts) <= 1:
            return opts[:1]
        if site.kind == "kink" and len(opts) == 2:
            (l, lv), (r, rv) = opts[0].data, opts[1].data
            if l == "l1":  # a 1-norm's zero element: (tag, slope)
                return [R.Option(f"s={s:g}", [], ("l1", (1.0 - s) * lv + s * rv))]
            return [R.Option(f"s={s:g}", [], ((1.0 - s) * l + s * r, None))]
        if site.kind == "tie" and len(opts) == 2:
            return [R.Option(f"s={s:g}", [], ("mix", s))]
        return [opts[0] if s < 0.5 else opts[-1]]


class EnumPolicy:
    branching = True

    def options(self, site, rowfn, node):
        if site.kind == "norm":
            raise NotEnumerable(site.text)
        return site.options


def _affine_vars(graph: Graph, backend) -> tuple[set, set]:
    """Variables that depend on the inputs (live), and those that are piecewise affine in them."""
    live = {v.id for v in graph.inputs}
    affine = set(live) | set(graph.consts)
    for node in graph.nodes:
        if getattr(node, "spec", None) is not None:  # a loop node (_loops): its body decides
            from . import _loops

            _loops.propagate(node, live, affine, backend)
            continue
        mark_affine(node, live, affine, backend)
    return live, affine


def mark_affine(node, live: set, affine: set, backend) -> None:
    """Add ``node``'s outputs to ``live`` if an input is live, and to ``affine`` if they
    are piecewise affine in the inputs (shared by the graph and by loop bodies)."""
    ins = [v for v in node.inputs if isinstance(v, Var)]
    is_live = any(v.id in live for v in ins)
    if is_live:
        for o in node.outputs:
            live.add(o.id)
    if not is_live:
        ok = True
    elif node.rule is not None:
        ok = RULES[node.rule].piecewise_affine and all(v.id in affine for v in ins)
    elif node.prim in STOP:
        ok = True  # no tangent passes: constant as far as the pieces go
    else:
        ok = backend.is_linear(node, [isinstance(v, Var) and v.id in live for v in node.inputs]) and all(
            v.id in affine for v in ins if v.id in live)
    if ok:
        for o in node.outputs:
            affine.add(o.id)


@dataclasses.dataclass
class _State:
    vals: dict
    tans: dict
    conds: list
    meta: list
    choices: list
    certified: bool
    degenerate: bool
    nonaffine: bool
    witness: Any
    n_sites: int
    degenerate_nonaffine: bool = False

    def copy(self):
        return _State(dict(self.vals), dict(self.tans), self.conds, self.meta, self.choices, self.certified,
                      self.degenerate, self.nonaffine, self.witness, self.n_sites, self.degenerate_nonaffine)

    def copy_conds(self):
        return _State(self.vals, self.tans, list(self.conds), list(self.meta), list(self.choices), self.certified,
                      self.degenerate, self.nonaffine, self.witness, self.n_sites, self.degenerate_nonaffine)


@dataclasses.dataclass
class _SiteFrame:
    i: int
    node: Node
    ctx: Any
    sites: list
    rowfn: Any
    in_vals: list
    in_tans: list
    affine: bool
    chosen_before: tuple
    resume: int | None = None  # a site inside a loop node (_loops): the walk resumes at that node


class Interpreter:
    def __init__(self, graph: Graph, backend, xs64: list, *, kink_tol: float = 0.0, shadow: dict | None = None,
                 flush: bool = False):
        self.g = graph
        self.be = backend
        self.xs64 = xs64
        self.tol = float(kink_tol)
        self.shadow = shadow or {}
        self.flush = bool(flush)
        cached = getattr(graph, "_affine", None)
        if cached is None:
            cached = graph._affine = _affine_vars(graph, backend)
        self.live, self.affine = cached
        self.n_in = sum(v.size for v in graph.inputs)
        users: dict[int, int] = {}
        for node in graph.nodes:
            for v in node.inputs:
                if isinstance(v, Var):
                    users[v.id] = users.get(v.id, 0) + 1
        for v in graph.outputs:
            users[v.id] = users.get(v.id, 0) + 1
        self.users = users
        rel = getattr(graph, "_relevant", None)
        if rel is None:
            rel = graph._relevant = self._tangent_relevant()
        self.relevant = rel
        self.sites_seen: dict = {}
        self.pruned: list[Pruned] = []
        self.collapsed: set = set()  # (site, choices before it) whose options gave the same first-order result
        self.stop_identity = False  # True: detach/stop_gradient pass tangents (f's own derivative)
        self._seeds: dict = {}
        self.log_rows = False
        self.rows: dict = {}

    def _tangent_relevant(self) -> set:
        """Float variables whose tangent can reach an output (stop_gradient/detach cut it)."""
        rel = {v.id for v in self.g.outputs if v.is_float}
        for node in reversed(self.g.nodes):
            if not any(o.id in rel for o in node.outputs):
                continue
            if node.prim in STOP:
                continue
            for v in node.inputs:
                if isinstance(v, Var) and v.is_float:
                    rel.add(v.id)
        return rel

    def _inert(self, node) -> bool:
        """A continuous nonsmooth primitive whose outputs reach the result only through
        stop_gradient (softmax's max shift) and whose indices are unused: no kink of f."""
        impl = RULES[node.rule].impl
        if impl in ("jump", "compare", "layer"):
            return False
        if any(o.id in self.relevant for o in node.outputs):
            return False
        return not any((not o.is_float) and self.users.get(o.id, 0) > 0 for o in node.outputs)

    # ------------------------------------------------------------------ public

    def run(self, policy, tangents: list, *, max_leaves: int = 1, max_sites: int | None = None,
            seeds: dict | None = None, k: int | None = None, log_rows: bool = False) -> list[Leaf]:
        """All leaves of the branch tree under ``policy`` (one leaf unless it branches).

        ``seeds`` ({var id: (k, *shape) tangent}) adds tangents where those variables are
        made, so a pass can start inside the program (with ``k`` columns and ``tangents``
        all None); ``log_rows`` records each site's condition rows in ``self.rows``."""
        self._seeds = seeds or {}
        self.log_rows = log_rows
        self.rows = {}
        vals = {v.id: self.be.input(x) for v, x in zip(self.g.inputs, self.xs64)}
        for cid, c in self.g.consts.items():
            vals[cid] = self.be.const(c)
        tans = {v.id: t for v, t in zip(self.g.inputs, tangents)}
        if k is None:
            k = int(tangents[0].shape[0]) if tangents and tangents[0] is not None else 0
        self._k = k
        self._policy = policy
        self._max_leaves = max_leaves
        self._max_sites = max_sites
        self._leaves: list[Leaf] = []
        self.sites_seen = {}
        self.pruned = []
        self.collapsed = set()
        self._drive([("node", 0, _State(vals, tans, [], [], [], True, False, False, None, 0))])
        return self._leaves

    def graph_function(self):
        """The traced program as a plain function of the float64 inputs (framework ops only),
        for the framework's own transforms at points where no kink is active."""
        if getattr(self, "_graph_fn", None) is not None:
            return self._graph_fn
        g, be = self.g, self.be
        consts = {cid: be.const(c) for cid, c in g.consts.items()}

        def fn(*xs):
            vals = dict(consts)
            for v, x in zip(g.inputs, xs):
                vals[v.id] = x
            for node in g.nodes:
                ins = [vals[v.id] if isinstance(v, Var) else (v.value if isinstance(v, Lit) else None) for v in node.inputs]
                for o, val in zip(node.outputs, be.eval(node, ins)):
                    vals[o.id] = val
            return tuple(vals[v.id] for v in g.outputs)

        self._graph_fn = fn
        return fn

    # ------------------------------------------------------------------ the walk

    def _drive(self, stack: list) -> None:
        """Depth-first walk with an explicit stack of ("node", i, state) and
        ("site", frame, j, chosen, state) items."""
        nodes = self.g.nodes
        while stack:
            item = stack.pop()
            if item[0] == "node":
                _, i, st = item
                frame = self._advance(i, st)
                if frame is None:
                    self._leaf(st)
                elif not self._policy.branching:
                    nxt = frame.i + 1 if frame.resume is None else frame.resume  # a loop node resumes itself
                    stack.append(("node", nxt, self._single_path(frame, st)))
                else:
                    stack.append(("site", frame, 0, [], st))
                continue
            _, fr, j, chosen, st = item
            if j == len(fr.sites):
                outs, otans = self._apply(fr.node, fr.ctx, chosen, fr.in_vals, fr.in_tans)
                st2 = st.copy()
                st2.choices = st.choices + chosen
                self._store(st2, fr.node, outs, otans)
                stack.append(("node", fr.i + 1 if fr.resume is None else fr.resume, st2))
                continue
            if len(self._leaves) >= self._max_leaves:
                raise BudgetExceeded(f"more than {self._max_leaves} pieces")
            children = self._branch_site(fr, j, chosen, st)
            for child in reversed(children):
                stack.append(child)
        del nodes

    def _advance(self, i: int, st: _State):
        """Evaluate nodes from ``i`` until one has active sites; return its frame (or None
        at the end of the graph)."""
        nodes = self.g.nodes
        while i < len(nodes):
            node = nodes[i]
            in_vals = [st.vals[v.id] if isinstance(v, Var) else (v.value if isinstance(v, Lit) else None) for v in node.inputs]
            in_tans = [st.tans.get(v.id) if isinstance(v, Var) else None for v in node.inputs]
            if node.prim in STOP:
                outs = self.be.eval(node, in_vals)
                passed = [in_tans[0]] if self.stop_identity and in_tans else [None] * len(outs)
                self._store(st, node, outs, passed)
                i += 1
                continue
            if getattr(node, "spec", None) is not None:  # a loop node: _loops runs its iterations
                from . import _loops

                frame = _loops.advance(self, i, node, st)
                if frame is not None:
                    return frame
                i += 1
                continue
            const = not any(isinstance(v, Var) and v.id in self.live for v in node.inputs)
            same = len(node.inputs) == 2 and node.inputs[0] is node.inputs[1] and RULES.get(node.rule or "", None) is not None \
                and RULES[node.rule].impl in ("pick", "compare")
            if node.rule is None or RULES[node.rule].impl == "mask" or const or same or self._inert(node):
                # smooth, or constant in x, or max(a, a)/a == a: no kink of f here
                outs = self.be.eval(node, in_vals)
                otans = self.be.jvp(node, in_vals, in_tans)
                self._store(st, node, outs, otans)
                i += 1
                continue
            sites, ctx = self._sites(i, node, in_vals, in_tans)
            if not sites:
                outs, otans = self._apply(node, ctx, [], in_vals, in_tans)
                self._store(st, node, outs, otans)
                i += 1
                continue
            st.n_sites += sum(s.weight for s in sites)
            if self._max_sites is not None and st.n_sites > self._max_sites:
                raise BudgetExceeded(f"more than {self._max_sites} active kinks")
            for s in sites:
                self.sites_seen.setdefault((s.node, s.key), s)
            np_tans = [None if t is None else self.be.asnumpy(t).reshape(self._k, -1) for t in in_tans]

            def rowfn(cond, np_tans=np_tans):
                row = np.zeros(self._k)
                for pos, e, c in cond:
                    t = np_tans[pos] if pos < len(np_tans) else None
                    if t is not None:
                        row = row + c * t[:, e]
                return row

            affine = not any(
                isinstance(v, Var) and v.is_float and v.id in self.live and v.id not in self.affine for v in node.inputs
            )
            return _SiteFrame(i, node, ctx, sites, rowfn, in_vals, in_tans, affine, tuple(st.choices))
        return None

    def _single_path(self, fr: _SiteFrame, st: _State) -> _State:
        """A policy that takes one option per site: walk the node's sites in place (no copies
        of the state per site, so thousands of sites at one node cost linear time)."""
        chosen = []
        for site in fr.sites:
            if self.log_rows:
                self.rows[(site.node, site.key)] = [[fr.rowfn(c) for c in o.conds] for o in site.options]
            opt = self._policy.options(site, fr.rowfn, fr.node)[0]
            rows = [fr.rowfn(c) for c in opt.conds]
            zero = [r for r in rows if _rmax(r) <= ZERO_ROW]
            live_conds = [(r, c) for r, c in zip(rows, opt.conds) if _rmax(r) > ZERO_ROW]
            if zero or (not rows and len(site.options) > 1):
                st.degenerate = True
                if site.discrete:
                    st.certified = False
                if not fr.affine:
                    st.degenerate_nonaffine = True
            if not fr.affine and live_conds:
                st.nonaffine = True
            for r, c in live_conds:
                st.conds.append(r)
                st.meta.append(CondMeta(fr.i, tuple(c), fr.affine, fr.chosen_before))
            chosen.append((site, opt))
        outs, otans = self._apply(fr.node, fr.ctx, chosen, fr.in_vals, fr.in_tans)
        st.choices = st.choices + chosen
        self._store(st, fr.node, outs, otans)
        return st

    def _branch_site(self, fr: _SiteFrame, j: int, chosen: list, st: _State) -> list:
        """The children of the branch tree at site ``j`` of a node."""
        site = fr.sites[j]
        if self.log_rows:
            self.rows[(site.node, site.key)] = [[fr.rowfn(c) for c in o.conds] for o in site.options]
        opts = self._policy.options(site, fr.rowfn, fr.node)
        rows_per_opt = [[fr.rowfn(c) for c in o.conds] for o in opts]
        all_zero = all(_rmax(r) <= ZERO_ROW for rs in rows_per_opt for r in rs) if any(rows_per_opt) else True
        if self._policy.branching and all_zero and len(opts) > 1:
            if site.discrete:
                # The tie persists to first order and the branches give different values
                # (a comparison, a jump, indices): first order cannot say which branch
                # holds near x.  If every branch ends in the same pieces the choice does
                # not matter; otherwise the pieces are uncertified.
                self._degenerate_discrete(fr, j, chosen, st, site, opts)
                return []
            # every branch gives the same tangents and values: take one.  Recorded with the
            # choices before it: the same site may split in another branch (its argument's
            # gradient vanishes under one choice of an earlier kink, not under the other)
            before = fr.chosen_before + tuple(chosen)
            self.collapsed.add((site.node, site.key, tuple((s.node, s.key, o.label) for s, o in before)))
            opts, rows_per_opt = opts[:1], rows_per_opt[:1]
        children = []
        for opt, rows in zip(opts, rows_per_opt):
            st2 = st.copy_conds()
            zero = [r for r in rows if _rmax(r) <= ZERO_ROW]
            live_conds = [(r, c) for r, c in zip(rows, opt.conds) if _rmax(r) > ZERO_ROW]
            if zero or (all_zero and len(site.options) > 1):
                st2.degenerate = True
                if site.discrete:
                    st2.certified = False
                if not fr.affine:
                    st2.degenerate_nonaffine = True
            if not fr.affine and live_conds:
                st2.nonaffine = True
            st2.conds = st2.conds + [r for r, _ in live_conds]
            st2.meta = st2.meta + [CondMeta(fr.i, tuple(c), fr.affine, fr.chosen_before + tuple(chosen))
                                   for _, c in live_conds]
            if self._policy.branching and live_conds:
                ok, w = strictly_feasible(st2.conds, st2.witness)
                if not ok:
                    self.pruned.append(Pruned(list(st2.conds), list(st2.meta), list(st.choices) + chosen + [(site, opt)],
                                              st.degenerate_nonaffine))
                    continue
                st2.witness = w
            children.append(("site", fr, j + 1, chosen + [(site, opt)], st2))
        return children

    def _degenerate_discrete(self, fr, j, chosen, st, site, opts):
        saved, saved_pruned = self._leaves, self.pruned
        groups = []
        for opt in opts:
            self._leaves, self.pruned = [], []
            st2 = st.copy_conds()
            st2.degenerate = True
            if not fr.affine:
                st2.degenerate_nonaffine = True
            self._drive([("site", fr, j + 1, chosen + [(site, opt)], st2)])
            groups.append((self._leaves, self.pruned))
        self._leaves, self.pruned = saved, saved_pruned

        def same(a, b):
            return (a.out.shape == b.out.shape and np.allclose(a.out, b.out, rtol=1e-12, atol=1e-12, equal_nan=True)
                    and np.allclose(a.jac, b.jac, rtol=1e-12, atol=1e-12, equal_nan=True)
                    and len(a.conds) == len(b.conds))

        ref = groups[0][0]
        if all(len(g) == len(ref) and all(same(a, b) for a, b in zip(g, ref)) for g, _ in groups[1:]):
            self._leaves.extend(ref)
            self.pruned.extend(groups[0][1])
        else:
            for g, pr in groups:
                for lf in g:
                    lf.certified = False
                self._leaves.extend(g)
                self.pruned.extend(pr)
        if len(self._leaves) > self._max_leaves:
            raise BudgetExceeded(f"more than {self._max_leaves} pieces")

    def _leaf(self, st: _State) -> None:
        outs, jac = [], []
        for v in self.g.outputs:
            outs.append(np.asarray(self.be.asnumpy(st.vals[v.id]), dtype=np.float64).reshape(-1))
            t = st.tans.get(v.id)
            if t is None or self._k == 0:
                jac.append(np.zeros((v.size, self._k)))
            else:
                jac.append(np.asarray(self.be.asnumpy(t), dtype=np.float64).reshape(self._k, -1).T)
        self._leaves.append(
            Leaf(np.concatenate(outs), np.concatenate(jac, axis=0), list(st.choices), list(st.conds), list(st.meta),
                 st.certified, st.degenerate, st.nonaffine, st.witness, st.degenerate_nonaffine)
        )

    def _store(self, st, node, outs, otans):
        for o, v, t in zip(node.outputs, outs, otans):
            st.vals[o.id] = v
            seed = self._seeds.get(o.id) if self._seeds else None
            if seed is not None:
                t = seed if t is None else t + seed
            st.tans[o.id] = t

    # ------------------------------------------------------------------ per-impl

    def _np_inputs(self, i, node, in_vals):
        """The node's inputs as float64 NumPy arrays, read as the framework reads them
        (subnormals flushed to zero where it flushes), with the user-dtype shadow values."""
        def read(j):
            if j >= len(in_vals):  # a Python scalar operand (torch ge.Scalar's ``other``)
                return np.asarray(float(node.params.get("other")), dtype=np.float64)
            a = np.asarray(self.be.asnumpy(in_vals[j]), dtype=np.float64)
            if self.flush:
                a = np.where(np.abs(a) < np.finfo(np.float64).tiny, np.copysign(0.0, a), a)
            return a

        return read, self.shadow.get(i)

    def _sites(self, i, node: Node, in_vals, in_tans):
        rule = RULES[node.rule]
        impl = rule.impl
        tol = self.tol
        np_in, shadow = self._np_inputs(i, node, in_vals)

        def union(sites, more):
            keys = {s.key for s in sites}
            return sites + [s for s in more if s.key not in keys]

        def alt(j):
            return None if shadow is None or j >= len(shadow) else shadow[j]

        if impl in ("unary", "jump", "nonlipschitz"):
            sites = R.unary_sites(i, node, rule, np_in(0), tol)
            if alt(0) is not None and alt(0).shape == np_in(0).shape:
                sites = union(sites, R.unary_sites(i, node, rule, alt(0), tol))
            return sites, None
        if impl in ("pick", "compare"):
            fl = any((isinstance(v, Var) and v.is_float) or (isinstance(v, Lit) and np.issubdtype(np.asarray(v.value).dtype, np.floating))
                     for v in node.inputs) or (len(node.inputs) < 2 and isinstance(node.params.get("other"), float))
            sites = R.binary_sites(i, node, rule, np_in(0), np_in(1), node.outputs[0].shape, tol, fl)
            if alt(0) is not None and alt(1) is not None:
                sites = union(sites, R.binary_sites(i, node, rule, alt(0), alt(1), node.outputs[0].shape, tol, fl))
            return sites, None
        if impl == "norm":
            x = np_in(0)
            slices, _ = R.norm_slices(x.shape, node.params.get("dim"))
            node._norm_slices = slices
            sites = R.norm_sites(i, node, x, tol)
            if alt(0) is not None and alt(0).shape == x.shape:
                sites = union(sites, R.norm_sites(i, node, alt(0), tol))
            return sites, slices
        if impl == "select":
            return self._select_sites(i, node, rule, in_vals, np_in(0), alt(0))
        if impl == "layer":  # the package's own layers (_layers.py)
            from . import _layers

            return _layers.sites(self, i, node, in_vals)
        raise AssertionError(impl)

    def _select_outcome(self, node, in_vals, x, order):
        ranks = R.ranks_from_order(order).reshape(x.shape)
        vals2 = list(in_vals)
        vals2[0] = self.be.asarray(ranks)
        for j, v in enumerate(node.inputs[1:], start=1):
            if isinstance(v, Var) and v.is_float and tuple(v.shape) == tuple(x.shape):
                vals2[j] = self.be.asarray(np.arange(x.size, dtype=np.float64).reshape(x.shape))
        outs = [np.asarray(self.be.asnumpy(o)) for o in self.be.eval(node, vals2)]
        # float outputs copied from operand 0 hold ranks: turn them into positions
        n_srcs = 1 + sum(1 for v in node.inputs[1:] if isinstance(v, Var) and v.is_float and tuple(v.shape) == tuple(x.shape))
        res = []
        for oi, (o, r) in enumerate(zip(node.outputs, outs)):
            from_key = o.is_float and (n_srcs == 1 or oi == 0)
            res.append(order[r.astype(np.int64)] if from_key else r)
        return res

    def _select_sites(self, i, node, rule, in_vals, x, x_alt=None):
        v = x.reshape(-1)
        order0 = R.base_order(v)
        ctx = {"x": x, "order0": order0}
        groups = R.tie_groups(v, self.tol)
        if x_alt is not None and x_alt.shape == x.shape:
            # ties the framework's own arithmetic sees: merge overlapping groups
            groups = _merge_groups(groups + R.tie_groups(x_alt.reshape(-1), self.tol))
        if not groups:
            return [], ctx
        if node.params.get("num_keys", 1) != 1:
            return [R.Site(i, ("g", tuple(int(q) for q in groups[0])), "unsupported", [R.Option("framework", [], None)],
                           f"{node.prim} with several sort keys at a tie", complete=False)], ctx
        base = self._select_outcome(node, in_vals, x, order0)
        sites = []
        for g in groups:
            g = np.sort(g)
            # the members must be contiguous in the base order for reorder(); put them so
            order0 = _make_contiguous(order0, g)
            ctx["order0"] = order0
            changed = False
            for alt in (g[::-1], np.roll(g, 1)):
                out = self._select_outcome(node, in_vals, x, R.reorder(order0, g, alt))
                if any(not np.array_equal(a, b) for a, b in zip(out, base)):
                    changed = True
                    break
            if not changed:
                continue
            opts, complete = R.permutation_options(g, np.random.default_rng(len(sites)))
            int_used = any((not o.is_float) and self.users.get(o.id, 0) > 0 for o in node.outputs)
            site = R.Site(i, ("g", tuple(int(q) for q in g)), "group", opts,
                          f"{rule.name} tie among input elements {g.tolist()} = {R._fmt(v[g[0]])}",
                          clarke="conv of the tied elements' tangents", discrete=int_used,
                          complete=complete, weight=len(g) - 1, members=g)
            sites.append(site)
        return sites, ctx

    def _apply(self, node, ctx, chosen, in_vals, in_tans):
        rule = RULES[node.rule]
        impl = rule.impl
        k = self._k
        if impl == "select":
            return self._select_apply(node, ctx, chosen, in_vals, in_tans)
        if impl == "layer":  # the package's own layers (_layers.py)
            from . import _layers

            return _layers.apply(self, node, ctx, chosen, in_vals, in_tans)
        outs = self.be.eval(node, in_vals)
        if not chosen:
            return outs, self.be.jvp(node, in_vals, in_tans)
        np_outs = [np.asarray(self.be.asnumpy(o)) for o in outs]
        np_tans = [None if t is None else np.asarray(self.be.asnumpy(t), dtype=np.float64).reshape(k, -1) for t in in_tans]
        base_tans = self.be.jvp(node, in_vals, in_tans)
        np_btans = [None if t is None else np.asarray(self.be.asnumpy(t), dtype=np.float64) for t in base_tans]
        chosen = [(s, o) for s, o in chosen if o.data is not None]
        if impl in ("unary", "jump", "nonlipschitz"):
            vals, tans = R.unary_apply(chosen, None, np_tans, np_outs, np_btans, k)
        elif impl == "pick":
            xs = [np.asarray(self.be.asnumpy(v), dtype=np.float64) if not isinstance(v, (int, float)) else np.float64(v) for v in in_vals[:2]]
            vals, tans = R.pick_apply(chosen, xs, np_tans, np_outs, np_btans, k, node.outputs[0].shape)
        elif impl == "compare":
            vals, tans = R.compare_apply(chosen, np_outs)
        elif impl == "norm":
            vals, tans = R.norm_apply(chosen, None, np_tans, np_outs, np_btans, k, ctx)
        else:
            raise AssertionError(impl)
        return self._back(node, vals, tans)

    def _back(self, node, vals, tans):
        k = self._k
        out_v, out_t = [], []
        for o, v, t in zip(node.outputs, vals, tans):
            arr = np.asarray(v).reshape(o.shape)
            if o.is_float:
                arr = arr.astype(np.float64)
            else:
                arr = arr.astype(np.dtype(o.dtype))
            out_v.append(self.be.asarray(arr))
            out_t.append(None if t is None or not o.is_float or k == 0 else self.be.asarray(np.asarray(t).reshape((k, *o.shape))))
        return out_v, out_t

    def select_plan(self, node, ctx, chosen, in_vals):
        """How each output of a selection with the given tie orders is made: ("take", input
        position, flat positions) for values copied from an input, ("const", array) else."""
        x = ctx["x"]
        order = ctx["order0"]
        for site, opt in chosen:
            if opt.data is not None:
                order = R.reorder(order, site.members, opt.data)
        outs = self._select_outcome(node, in_vals, x, order)
        srcs = []
        for j, v in enumerate(node.inputs):
            if j == 0 or (isinstance(v, Var) and v.is_float and tuple(v.shape) == tuple(x.shape)):
                srcs.append(j)
        plan = []
        for oi, (o, r) in enumerate(zip(node.outputs, outs)):
            if not o.is_float:
                plan.append(("const", r))
                continue
            src = srcs[oi] if (len(srcs) > 1 and oi < len(srcs)) else 0
            plan.append(("take", src, np.asarray(r).reshape(-1).astype(np.int64)))
        return plan

    def _select_apply(self, node, ctx, chosen, in_vals, in_tans):
        k = self._k
        vals, tans = [], []
        for item in self.select_plan(node, ctx, chosen, in_vals):
            if item[0] == "const":
                vals.append(item[1])
                tans.append(None)
                continue
            _, src, pos = item
            xv = np.asarray(self.be.asnumpy(in_vals[src]), dtype=np.float64).reshape(-1)
            vals.append(xv[pos])
            t = in_tans[src]
            if t is None:
                tans.append(None)
            else:
                tans.append(np.asarray(self.be.asnumpy(t), dtype=np.float64).reshape(k, -1)[:, pos])
        return self._back(node, vals, tans)


def _merge_groups(groups: list) -> list:
    merged: list[set] = []
    for g in groups:
        s = set(int(q) for q in g)
        for m in [m for m in merged if m & s]:
            s |= m
            merged.remove(m)
        merged.append(s)
    return [np.array(sorted(m)) for m in merged if len(m) > 1]


def _make_contiguous(order: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Move the members of ``group`` next to each other in ``order`` (at the first
    member's slot): needed only when the framework's arithmetic ties elements that
    float64 orders apart."""
    pos = np.nonzero(np.isin(order, group))[0]
    if len(pos) == 0 or pos[-1] - pos[0] == len(pos) - 1:
        return order
    rest = [q for q in order.tolist() if q not in set(group.tolist())]
    at = int(pos[0])
    before = [q for q in order[:at].tolist() if q not in set(group.tolist())]
    after = [q for q in rest if q not in set(before)]
    return np.array(before + sorted(group.tolist()) + after, dtype=order.dtype)
