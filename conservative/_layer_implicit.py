"""Implicit layers (torch ``DEQ``/``ImplicitModel``/``implicit_fixed_point``/``implicit_root``,
jax ``deq``/``implicit_model``/``implicit_fixed_point``) as engine primitives, through the
nonsmooth implicit function theorem (Bolte, Le, Pauwels, Silveti-Falls, 2021).

Every implicit layer of the package solves once through ``implicit_fixed_point`` (torch
``_torch_implicit``, jax ``_jax_implicit``); while the engine traces, that call routes here.
The layer's inputs are the start ``z0`` (its tangent is ignored: the solution does not move
with it) and the array arguments ``a`` of the cell ``f(z, *a)``; its output is ``z*``.

At the engine's float64 evaluation the cell is itself traced and analysed with the engine
(a nested :class:`~._problem.Problem` at ``(z*, a)``): ``z*`` is solved in float64 through
that trace, then the cell's essentially active pieces ``sigma`` are enumerated with their
Jacobians ``[J_z, J_a]_sigma`` and their kink conditions (rows in ``(dz, da)``).  With
``F(z, a) = z - f(z, a)`` the theorem needs every element of ``d_z F`` invertible; that is
checked on the hull of the ``I - J_z,sigma`` (``implicit._invertibility``'s hull test), and
the audit is UNDECIDED with the theorem's failure otherwise.  Then the layer has one site
whose options are the patterns ``sigma``, each with the tangent map
``T_sigma = (I - J_z)^-1 J_a`` and the conditions ``r_z T_sigma + r_a`` (the cell's rows
along the solution map, linear in ``da``), so the outer enumeration decides which patterns
are essentially active for the composite.  Closed form: ``z = relu(z/2 + x)`` at ``x = 0``
has the pieces ``T = 0`` (``dx < 0``) and ``T = 2`` (``dx > 0``): Clarke Jacobian ``[0, 2]``.
"""
from __future__ import annotations

import numpy as np

from nonsmooth import _layer_hook as hook

from . import _forward as F
from . import _layers as L
from ._rule_impls import Option

MAX_ITER = 5000
SOLVE_TOL = 1e-13  # relative residual of the engine's float64 solve
KINK_SLACK = 1e-11  # a cell kink this close (relative) to the float64 z* is active


def route_implicit(*, f, z0, args, opts, backward, batched, framework, backward_tol=None):
    spec = ImplicitSpec(f, z0, tuple(args), opts, backward, batched, framework)
    spec.backward_tol = backward_tol
    inputs = spec.leaves(z0, tuple(args))
    # the trace's values are inputs of the node now: keep no tracer in the spec
    spec.template = [None if i in spec.arg_slots else a for i, a in enumerate(spec.template)]
    spec.consts = []
    return spec, inputs, spec.finish


class ImplicitSite(L.LayerSite):
    def convention(self, s):
        T = self.options[0].data[1] if self.options else None
        conv = getattr(self, "conventions", None)
        if conv is not None:
            T = conv(s)
        return Option(f"s={s:g}", [], ("T", T))


class ImplicitSpec(L.LayerSpec):
    kind = "implicit"

    def __init__(self, f, z0, args, opts, backward, batched, framework):
        self.f, self.opts, self.backward, self.batched, self.framework = f, opts, backward, batched, framework
        self.name = "implicit_layer"
        self.surrogate = {"jfb": "backward='jfb' differentiates one step f(z*) (Jacobian-free backprop), not the "
                                 "fixed point",
                          "phantom": "backward='phantom' differentiates a few damped steps from z* (phantom "
                                     "gradients), not the fixed point"}.get(backward, "")
        self._cache: dict = {}
        self._zcache: dict = {}
        self._cell_fn = None
        self.backward_tol = None
        if framework == "torch":
            import torch

            self.z_tuple = isinstance(z0, (tuple, list))
            zl = list(z0) if self.z_tuple else [z0]
            self.n_z = len(zl)
            self.arg_slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
            self.template = list(args)
            self.dtypes = [t.dtype for t in zl] + [args[i].dtype for i in self.arg_slots]
        else:
            import jax

            zl, self.z_def = jax.tree_util.tree_flatten(z0)
            al, self.a_def = jax.tree_util.tree_flatten(args)
            self.n_z = len(zl)
            self.n_al = len(al)

            def flat_cell(*leaves):
                z = jax.tree_util.tree_unflatten(self.z_def, list(leaves[:self.n_z]))
                a = jax.tree_util.tree_unflatten(self.a_def, list(leaves[self.n_z:]))
                return tuple(jax.tree_util.tree_leaves(f(z, *a)))

            # arrays the cell closes over (traced values of f's inputs among them) become
            # explicit inputs of the layer, as jax's own implicit rule does
            self.f_conv, consts = jax.closure_convert(flat_cell, *zl, *al)
            self.consts = list(consts)
            self.arg_slots = [i for i, a in enumerate(al) if hasattr(a, "dtype") and np.issubdtype(np.dtype(a.dtype), np.floating)]
            self.template = list(al)
            self.dtypes = ([np.dtype(t.dtype) for t in zl] + [np.dtype(al[i].dtype) for i in self.arg_slots]
                           + [np.dtype(c.dtype) for c in self.consts])
        self.piecewise_affine = False  # decided from the cell at the first analysis
        self.rule = L.layer_rule("layer:implicit", piecewise_affine=False,
                                 description="an implicit layer: the fixed point of a cell, by the nonsmooth IFT")

    # ------------------------------------------------------------------ structure

    def leaves(self, z0, args):
        if self.framework == "torch":
            zl = list(z0) if self.z_tuple else [z0]
            return zl + [args[i] for i in self.arg_slots]
        import jax

        zl = jax.tree_util.tree_leaves(z0)
        al = jax.tree_util.tree_leaves(args)
        return zl + [al[i] for i in self.arg_slots] + self.consts

    def finish(self, outs):
        if self.framework == "torch":
            z = tuple(outs) if self.z_tuple else outs[0]
            return z, None
        import jax

        return jax.tree_util.tree_unflatten(self.z_def, list(outs)), None

    def describe(self):
        name = getattr(self.f, "__qualname__", None) or type(self.f).__name__
        return f"implicit fixed point z* = f(z*, ...) of {name} (backward={self.backward!r})"

    def out_meta(self, metas):
        return [metas[i] for i in range(self.n_z)]

    def tolerance(self):
        return 10.0 * max(float(self.opts.tol), float(self.backward_tol or self.opts.tol))

    def _call_cell(self, zs, avals):
        """f(z, *args) on framework arrays; returns the flat tuple of output leaves."""
        if self.framework == "torch":
            args = list(self.template)
            for i, a in zip(self.arg_slots, avals):
                args[i] = a
            z = tuple(zs) if self.z_tuple else zs[0]
            out = self.f(z, *args)
            return tuple(out) if self.z_tuple else (out,)
        al = list(self.template)
        k = len(self.arg_slots)
        for i, a in zip(self.arg_slots, avals[:k]):
            al[i] = a
        return tuple(self.f_conv(*zs, *al, *avals[k:]))

    def cell_fn(self):
        """The cell as a function of the flat leaves (z leaves, then float arguments): a stable
        object, so the engine's trace cache keeps its trace."""
        if self._cell_fn is None:
            n_z = self.n_z

            def cell(*leaves):
                return self._call_cell(list(leaves[:n_z]), list(leaves[n_z:]))

            self._cell_fn = cell
        return self._cell_fn

    def _user_arrays(self, xs):
        """Framework arrays in the user's dtypes (what the cell is traced with)."""
        if self.framework == "torch":
            import torch

            return tuple(torch.as_tensor(np.asarray(x)).to(dt) for x, dt in zip(xs, self.dtypes))
        import jax.numpy as jnp

        return tuple(jnp.asarray(np.asarray(x).astype(dt)) for x, dt in zip(xs, self.dtypes))

    # ------------------------------------------------------------------ forward

    def forward(self, xs):
        if hook.tracing_now() and self.framework == "torch":
            return self._forward_user(xs)
        z = self._z(xs)
        out, o = [], 0
        for x in xs[:self.n_z]:
            out.append(z[o:o + int(np.size(x))].reshape(np.shape(x)))
            o += int(np.size(x))
        return out

    def _z(self, xs):
        key = tuple((np.shape(x), np.asarray(x).tobytes()) for x in xs)
        z = self._zcache.get(key)
        if z is None:
            z = self._solve64(xs)
            if len(self._zcache) > 256:
                self._zcache.clear()
            self._zcache[key] = z
        return z

    def _forward_user(self, xs):
        """During the engine's make_fx trace (the operator's kernel runs on real tensors): the
        user's own solver on the user's cell, in the user's dtype."""
        import torch

        from nonsmooth.implicit import _torch_implicit as T

        arrs = self._user_arrays(xs)
        zs, avals = list(arrs[:self.n_z]), list(arrs[self.n_z:])

        def g(z):
            if self.z_tuple:
                return tuple(self._call_cell(list(z), avals))
            return self._call_cell([z], avals)[0]

        with torch.no_grad():
            z, _ = T.fixed_point(g, tuple(zs) if self.z_tuple else zs[0], self.opts, batched=self.batched)
        zl = list(z) if self.z_tuple else [z]
        return [t.detach().to(torch.float64).numpy() for t in zl]

    def _problem(self, leaves64, kink_tol):
        """The cell as a nested engine problem at float64 ``leaves64`` (traced in the user's
        dtypes, evaluated in float64)."""
        from ._problem import Problem

        P = Problem(self.cell_fn(), self._user_arrays(leaves64), kink_tol=kink_tol)
        if P.graph is None:
            raise L.LayerUndecided(f"the implicit layer's cell could not be traced: {P.trace_error}")
        if P.graph.unsupported:
            raise L.LayerUndecided("the implicit layer's cell uses primitive(s) the engine does not support: "
                                   + ", ".join(sorted(set(P.graph.unsupported))))
        P.xs64 = [P.be.asarray(np.asarray(x, dtype=np.float64)) for x in leaves64]
        P.shadow = {}
        P.interp = F.Interpreter(P.graph, P.be, P.xs64, kink_tol=kink_tol, shadow={}, flush=False)
        return P

    def _solve64(self, xs):
        """z* in float64 through the traced cell (Anderson acceleration, then checked)."""
        P = self._problem(xs, 0.0)
        fn = P.interp.graph_function()
        be = P.be
        sizes = [int(np.size(x)) for x in xs[:self.n_z]]
        shapes = [np.shape(x) for x in xs[:self.n_z]]
        a64 = [be.asarray(np.asarray(x, dtype=np.float64)) for x in xs[self.n_z:]]

        def g(v):
            parts, o = [], 0
            for s, shp in zip(sizes, shapes):
                parts.append(be.asarray(np.ascontiguousarray(v[o:o + s].reshape(shp))))
                o += s
            outs = fn(*parts, *a64)
            return np.concatenate([np.asarray(be.asnumpy(t), dtype=np.float64).reshape(-1) for t in outs])

        z0 = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1) for x in xs[:self.n_z]])
        z, res = _anderson(g, z0)
        if not res <= 1e-10 * (1.0 + float(np.max(np.abs(z)))):
            raise L.LayerUndecided(f"the implicit layer's fixed point could not be solved to float64 accuracy from "
                                   f"its start (residual {res:.3g} after {MAX_ITER} iterations): the engine cannot "
                                   "evaluate the layer")
        return z

    # ------------------------------------------------------------------ the nonsmooth IFT

    def _analysis(self, xs, tol=0.0):
        key = (tuple((np.shape(x), np.asarray(x).tobytes()) for x in xs), tol)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        from nonsmooth.implicit._invertibility import _hull_verdict

        z = self._z(xs)
        sizes = [int(np.size(x)) for x in xs[:self.n_z]]
        parts, o = [], 0
        for s in sizes:
            parts.append(z[o:o + s])
            o += s
        leaves = [p.reshape(np.shape(x)) for p, x in zip(parts, xs)] + [np.asarray(x, np.float64) for x in xs[self.n_z:]]
        # z* is known to the solve's accuracy only: a kink of the cell within it is active
        scale = 1.0 + max(float(np.max(np.abs(v))) if np.size(v) else 0.0 for v in leaves)
        P = self._problem(leaves, max(tol, KINK_SLACK * scale))
        n_z = z.size
        n_a = P.n_in - n_z
        from ._pieces import enumerate_pieces

        P.run(F.LexPolicy(), None)
        sites = dict(P.interp.sites_seen)
        if sites:
            ps = enumerate_pieces(P, budget=32, seed=0)
            leaves_ = [lf for lf in ps.leaves if lf.certified]
            exact, basis = ps.exact, ps.basis
            jacs = [lf.jac for lf in leaves_] + list(ps.extra)
            conds = [lf.conds for lf in leaves_] + [None] * len(ps.extra)
            if not jacs:
                raise L.LayerUndecided(f"the implicit layer's cell has no certified piece at (z*, a): {basis}")
        else:
            jacs, conds, exact, basis = [P.run(F.LexPolicy())[0].jac], [[]], True, "the cell is smooth at (z*, a)"
        A = [np.eye(n_z) - J[:, :n_z] for J in jacs]
        inv = _hull_verdict(np.stack(A), exact, "cell pieces (conservative engine)", None, "")
        if inv.invertible is not True:
            raise L.LayerUndecided(
                "the nonsmooth implicit function theorem does not apply at this point: every element of "
                f"d_z F (F = z - f(z, a)) must be invertible, but {inv.reason}; the solution map may not be "
                "Lipschitz here, so the engine makes no claim")
        Ts = [np.linalg.solve(Ai, J[:, n_z:]) for Ai, J in zip(A, jacs)]
        hit = {"z": z, "z_parts": parts, "T": Ts, "conds": conds, "exact": exact, "basis": basis, "n_a": n_a,
               "n_sites": sum(s.weight for s in sites.values()), "P": P, "sites": sites}
        if len(self._cache) > 32:
            self._cache.clear()
        self._cache[key] = hit
        return hit

    def sites(self, node_i, xs, tol, int_used):
        an = self._analysis(xs, tol)
        if len(an["T"]) < 2:
            return [], an
        n_z = an["z"].size
        # the outer conditions: the cell's rows along the solution map, over the layer's inputs
        offsets, o = [], 0
        for x in xs[self.n_z:]:
            offsets.append(o)
            o += int(np.size(x))
        opts = []
        for j, (T, rows) in enumerate(zip(an["T"], an["conds"])):
            if rows is None:  # a piece found at second order: its conditions are not first-order rows
                continue
            conds = []
            for r in rows:
                r = np.asarray(r, dtype=np.float64)
                full = r[:n_z] @ T + r[n_z:]
                cond = []
                for q, (off, x) in enumerate(zip(offsets, xs[self.n_z:])):
                    seg = full[off:off + int(np.size(x))]
                    cond += [(self.n_z + q, int(e), float(seg[e])) for e in np.nonzero(seg)[0]]
                conds.append(cond)
            opts.append(Option(f"cell piece {j}", conds, ("T", T)))
        P = an["P"]

        def conventions(s):
            leaf = P.run(F.ConventionPolicy({}, default=float(s)))[0]
            A = np.eye(n_z) - leaf.jac[:, :n_z]
            try:
                return np.linalg.solve(A, leaf.jac[:, n_z:])
            except np.linalg.LinAlgError:
                return opts[0].data[1]

        kinks = "; ".join(s.text for s in list(an["sites"].values())[:3])
        site = ImplicitSite(node_i, ("fixed_point",), "layer", opts,
                            f"implicit layer: the cell has active kink(s) at (z*, a) ({kinks}); "
                            f"{len(opts)} piece(s) of the cell",
                            clarke="{(I - J_z)^-1 J_a} over the cell's pieces (nonsmooth implicit function theorem)",
                            discrete=False, complete=bool(an["exact"]), weight=max(1, an["n_sites"]), members=None)
        site.conventions = conventions
        if not an["exact"]:
            site.incomplete_reason = f"the implicit layer's cell: {an['basis']}"
        return [site], an

    def apply(self, xs, tans, chosen, ctx, k):
        an = ctx if ctx is not None else self._analysis(xs)
        vals = [p.reshape(np.shape(x)) for p, x in zip(an["z_parts"], xs)]
        T = an["T"][0]
        for _, opt in chosen:
            if opt.data is not None and opt.data[1] is not None:
                T = opt.data[1]
        if k == 0:
            return vals, [None] * len(vals)
        ta = [np.zeros((k, int(np.size(x)))) if t is None else t for t, x in zip(tans[self.n_z:], xs[self.n_z:])]
        t_a = np.concatenate(ta, axis=1) if ta else np.zeros((k, 0))
        t_z = t_a @ T.T
        out, o = [], 0
        for v in vals:
            s = int(np.size(v))
            out.append(t_z[:, o:o + s])
            o += s
        return vals, out


def _anderson(g, z0, m=5, lam=1e-12):
    """Anderson-accelerated fixed-point iteration in float64; returns (z, residual)."""
    z = np.asarray(z0, dtype=np.float64)
    X, G = [], []
    best, best_res = z, np.inf
    for _ in range(MAX_ITER):
        gz = g(z)
        r = gz - z
        res = float(np.linalg.norm(r))
        if not np.isfinite(res):
            break
        if res < best_res:
            best, best_res = z, res
        if res <= SOLVE_TOL * (1.0 + float(np.linalg.norm(gz))):
            return gz, float(np.linalg.norm(g(gz) - gz))
        X.append(z)
        G.append(gz)
        if len(X) > m:
            X.pop(0)
            G.pop(0)
        if len(X) == 1:
            z = gz
            continue
        R = np.stack([gg - xx for gg, xx in zip(G, X)], axis=1)
        dR = R[:, 1:] - R[:, :-1]
        try:
            gamma = np.linalg.lstsq(dR.T @ dR + lam * np.eye(dR.shape[1]), dR.T @ R[:, -1], rcond=None)[0]
        except np.linalg.LinAlgError:
            z = gz
            continue
        dG = np.stack(G, axis=1)
        z = G[-1] - (dG[:, 1:] - dG[:, :-1]) @ gamma
    return best, best_res
