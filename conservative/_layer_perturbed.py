"""Perturbed layers and Fenchel-Young losses (``perturbed``, ``perturbed_max``,
``fenchel_young_loss``) as engine primitives, and the verdict for programs that use them.

Such a layer is smooth (``y_sigma(theta) = E[y*(theta + sigma Z)]`` and
``F_sigma(theta) = E[max_y <y, theta + sigma Z>]`` are C-infinity in theta), but what it
returns, and what AD returns through it, are Monte Carlo estimates.  The engine's node
evaluates a *reference*: the exact value and Jacobian where a closed form exists (Gumbel
noise on ``argmax_onehot``: ``y_sigma = softmax(theta / sigma)`` with Jacobian
``(diag p - p p^T) / sigma``, ``F_sigma = sigma logsumexp(theta / sigma) + sigma euler_gamma``),
otherwise the layer's own estimator with ``REFERENCE_FACTOR`` times more samples, drawn once
per evaluation point (a frozen likelihood-ratio estimator in between, so the forward is
smooth).

**Verdict rule** (:func:`monte_carlo_audit`).  The analysis runs on the reference program
(f with every perturbed layer replaced by its reference).  The sampling spread of what AD
returns through f is measured by simulation: the layer's estimator is drawn ``M`` times
with the layer's own ``num_samples`` (the user's noise is not observable, its law is) and
pushed through the program, giving a standard error per Jacobian entry; a sampled reference
adds its own, smaller one.  AD's Jacobian is then compared with the reference set (the
reference Jacobian, or the hull of the reference B-subdifferential at a kink elsewhere in f)
in units of the combined standard error, against the two-sided Bonferroni threshold
``k = Phi^-1(1 - alpha / (2 m))`` over the ``m`` entries with ``alpha = 1e-3``:

* within ``k``: ``SMOOTH`` (or ``CLARKE`` at a kink of the rest of f), with a note that AD's
  output is a Monte Carlo estimate consistent with the exact derivative;
* beyond ``k``: ``UNDECIDED`` with the numbers (a biased estimator or a bug are likely, but
  a statistical test is not a certificate, so the engine does not say ``SPURIOUS``);
* f(x) itself is checked the same way (its sampling spread from the same simulation).

``Audit.monte_carlo`` holds the reference Jacobian of f, the standard errors, the largest
z-score, the threshold, the sample sizes and how the reference was obtained.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from nonsmooth import _layer_hook as hook

from . import _forward as F
from . import _layers as L

ALPHA = 1e-3
REFERENCE_FACTOR = 20
MIN_REFERENCE = 20_000
WORK = 4_000_000  # solver input floats per batch of draws (reference and simulation)
M_RUNS = (16, 64)
EULER_GAMMA = 0.5772156649015329


def route_perturbed(theta, *, spec):
    from nonsmooth._frameworks import array_framework

    mc = MonteCarloSpec(spec, array_framework(theta))
    return mc, [theta], lambda outs: outs[0]


class MonteCarloSpec(L.LayerSpec):
    kind = "monte_carlo"
    batchable = True  # acts on trailing axes: a vmapped axis is one more leading axis

    def __init__(self, pspec, framework):
        from nonsmooth.solvers._combinatorial import argmax_onehot
        from nonsmooth.solvers._combinatorial_common import solver_name

        self.p, self.framework = pspec, framework
        self.name = "perturbed_max" if pspec.output == "value" else "perturbed"
        self.rule = L.layer_rule("layer:perturbed", piecewise_affine=False,
                                 description="a perturbed (Monte Carlo) layer: smooth in expectation")
        self.closed = pspec.noise.kind == "gumbel" and pspec.solver is argmax_onehot
        self.solver_name = solver_name(pspec.solver)
        if pspec.noise.kind == "custom":
            self.unsupported = (f"{self.name}({self.solver_name}) with a custom noise distribution (the engine has "
                                "no reference for it)")
        self.override = None  # (value, jacobian) of one simulated estimator, set by the verdict stage
        self._anchor = None
        self._out_event: dict = {}

    def key(self):
        return ("perturbed", self.p)

    def describe(self):
        p = self.p
        return (f"{self.name}({self.solver_name}, noise={p.noise.name!r}, sigma={p.sigma:g}, "
                f"num_samples={p.num_samples})")

    def reference_text(self) -> str:
        if self.closed:
            return ("closed form: softmax(theta / sigma)" if self.p.output == "mean"
                    else "closed form: sigma logsumexp(theta / sigma) + sigma euler_gamma")
        return f"{self.n_ref} samples of the layer's own estimator"

    # ------------------------------------------------------------------ shapes

    def _split(self, shape):
        nb = len(shape) - self.p.event_ndim
        return tuple(shape[:nb]), tuple(shape[nb:])

    def out_event(self, event):
        event = tuple(int(s) for s in event)
        if event not in self._out_event:
            if self.closed:
                self._out_event[event] = event
            else:
                y = self._solve(np.zeros((1,) + event))
                self._out_event[event] = tuple(y.shape[1:])
        return self._out_event[event]

    def out_meta(self, metas):
        shape, dt = metas[0]
        batch, event = self._split(tuple(shape))
        if self.p.output == "value":
            return [(batch, dt)]
        return [(batch + self.out_event(event), dt)]

    # ------------------------------------------------------------------ sampling

    def _solve(self, P):
        """The solver on the stacked float64 problems ``P`` (rows, *batch, *event)."""
        from nonsmooth.solvers._combinatorial_common import validated_inputs

        from ._layer_combinatorial import known

        with hook.suspended():  # also called while the engine traces (output shapes)
            return self._solve_now(P)

    def _solve_now(self, P):
        from nonsmooth.solvers._combinatorial_common import validated_inputs

        from ._layer_combinatorial import known

        s = self.p.solver
        if known(s):
            with validated_inputs():
                return np.asarray(s(P), dtype=np.float64)
        nlead = P.ndim - self.p.event_ndim
        if self.framework == "torch":
            import torch

            from nonsmooth.solvers import _torch_ops

            t = torch.from_numpy(np.ascontiguousarray(P))
            batched = _torch_ops.resolve(_torch_ops.SolveSpec(s, self.p.event_ndim, self.p.batched), t)
            with validated_inputs():
                y = _torch_ops.call_solver(s, t, self.p.event_ndim, batched)
            return y.detach().to(torch.float64).cpu().numpy()
        import jax
        import jax.numpy as jnp

        from nonsmooth.solvers._jax_solve import call_solver, resolve_batched

        with jax.enable_x64(True):
            x = jnp.asarray(P)
            batched = resolve_batched(s, self.p.batched, self.p.cache, x, nlead)
            return np.asarray(call_solver(s, x, nlead=nlead, batched=batched), dtype=np.float64)

    def _draw(self, theta, n, seed):
        """(Z, score grad nu(Z), Y) for n samples at theta, from a NumPy generator."""
        rng = np.random.default_rng(seed)
        shape = (n,) + theta.shape
        if self.p.noise.kind == "gumbel":
            E = rng.standard_exponential(shape)
            E = np.maximum(E, np.finfo(np.float64).tiny)
            Z = -np.log(E)
            score = 1.0 - E  # grad nu(z) = 1 - exp(-z)
        else:
            Z = rng.standard_normal(shape)
            score = Z
        Y = self._solve(theta[None] + self.p.sigma * Z)
        return Z, score, Y

    def _estimate(self, theta, Z, score, Y, base):
        """The layer's estimator from samples: (value, layer Jacobian (out size, in size))."""
        p = self.p
        N = Z.shape[0]
        batch, event = self._split(theta.shape)
        B = int(np.prod(batch)) if batch else 1
        D = int(np.prod(event))
        Yf = Y.reshape(N, B, -1)
        if p.output == "value":
            P = theta[None] + p.sigma * Z
            value = (Yf * P.reshape(N, B, D)).sum(-1).mean(0)
            grad = Yf.mean(0)  # (B, D): the gradient estimator of the layer (sample mean of y_i)
            J = np.zeros((B, B * D))
            for b in range(B):
                J[b, b * D:(b + 1) * D] = grad[b]
            return value.reshape(batch), J
        O = Yf.shape[-1]
        bvec = base.reshape(B, O) if (base is not None and p.control_variate) else np.zeros((B, O))
        value = Yf.mean(0)
        G = score.reshape(N, B, D)
        J = np.zeros((B * O, B * D))
        for b in range(B):
            J[b * O:(b + 1) * O, b * D:(b + 1) * D] = ((Yf[:, b] - bvec[b]).T @ G[:, b]) / (N * p.sigma)
        return value.reshape(batch + self.out_event(event)), J

    @property
    def n_ref(self) -> int:
        return max(REFERENCE_FACTOR * self.p.num_samples, MIN_REFERENCE)

    def _reference(self, theta):
        """(value, Jacobian) of the reference at theta."""
        p = self.p
        batch, event = self._split(theta.shape)
        B = int(np.prod(batch)) if batch else 1
        D = int(np.prod(event))
        if self.closed:
            t = theta.reshape(B, D) / p.sigma
            m = t.max(-1, keepdims=True)
            e = np.exp(t - m)
            prob = e / e.sum(-1, keepdims=True)
            if p.output == "value":
                value = p.sigma * (m[:, 0] + np.log(e.sum(-1))) + p.sigma * EULER_GAMMA
                J = np.zeros((B, B * D))
                for b in range(B):
                    J[b, b * D:(b + 1) * D] = prob[b]
                return value.reshape(batch), J
            J = np.zeros((B * D, B * D))
            for b in range(B):
                q = prob[b]
                J[b * D:(b + 1) * D, b * D:(b + 1) * D] = (np.diag(q) - np.outer(q, q)) / p.sigma
            return prob.reshape(theta.shape), J
        a = self._anchor
        if a is None or a[0].shape != theta.shape or np.max(np.abs(a[0] - theta)) > 1e-3 * p.sigma:
            Z, score, Y = self._draw(theta, self.n_ref, seed=12345)
            base = self._solve(theta[None])[0] if p.control_variate else None
            self._anchor = a = (theta.copy(), Z, score, Y, base, self._estimate(theta, Z, score, Y, base))
        theta0, Z, score, Y, base, (v0, J0) = a
        if np.array_equal(theta0, theta) or p.output == "value":
            return v0, J0
        # frozen likelihood-ratio estimator between anchors: smooth in theta
        d = (theta - theta0) / p.sigma
        N = Z.shape[0]
        if p.noise.kind == "gumbel":
            E = 1.0 - score
            logw = (d[None] - E * np.expm1(d)[None]).reshape(N, B, D).sum(-1)
        else:
            logw = (Z * d[None] - 0.5 * d[None] ** 2).reshape(N, B, D).sum(-1)
        w = np.exp(logw)
        Yf = Y.reshape(N, B, -1)
        bvec = base.reshape(B, -1) if base is not None else np.zeros((B, Yf.shape[-1]))
        value = (w[:, :, None] * (Yf - bvec[None])).mean(0) + bvec
        return value.reshape(v0.shape), J0

    # ------------------------------------------------------------------ the node

    def forward(self, xs):
        theta = np.asarray(xs[0], dtype=np.float64)
        if self.override is not None:
            return [self.override[0]]
        return [self._reference(theta)[0]]

    def sites(self, node_i, xs, tol, int_used):
        return [], None

    def apply(self, xs, tans, chosen, ctx, k):
        theta = np.asarray(xs[0], dtype=np.float64)
        value, J = self.override if self.override is not None else self._reference(theta)
        t = tans[0] if tans else None
        if t is None or k == 0:
            return [value], [None]
        return [value], [t @ J.T]

    def simulate(self, theta, runs: int, seed: int):
        """``runs`` independent draws of the layer's own estimator at theta."""
        base = self._solve(theta[None])[0] if self.p.control_variate else None
        out = []
        for r in range(runs):
            Z, score, Y = self._draw(theta, self.p.num_samples, seed=seed + 7919 * (r + 1))
            out.append(self._estimate(theta, Z, score, Y, base))
        return out


# --------------------------------------------------------------------------- the verdict


def _mc_nodes(P):
    return [(i, n) for i, n in enumerate(P.graph.nodes)
            if isinstance(n.params.get("layer"), MonteCarloSpec)]


def _node_inputs(P, leaf_vals, node):
    return [np.asarray(P.be.asnumpy(leaf_vals[v.id]), dtype=np.float64) for v in node.inputs]


def threshold(m: int) -> float:
    """Two-sided Bonferroni threshold over m standard normal z-scores at level ALPHA."""
    from scipy.stats import norm

    return float(norm.isf(ALPHA / (2.0 * max(m, 1))))


def monte_carlo_audit(P, A, ad, y_user, ad_tol, rng, seed):
    """The audit of a program with perturbed layers (see the module docstring)."""
    from ._certificate import min_norm_element
    from ._elements import distinct
    from ._lp import hull_residual
    from ._problem import versions
    from ._result import Audit, Verdict
    from ._verdict import active_kinks, undecided

    nodes = _mc_nodes(P)
    specs = [n.params["layer"] for _, n in nodes]
    if P.graph.unsupported:
        return undecided(P, f"unsupported primitive(s) in the trace: {', '.join(sorted(set(P.graph.unsupported)))}",
                         ad)
    # the layers' inputs at x, through the reference program
    vals = _values_at_x(P)
    thetas = [_node_inputs(P, vals, n)[0] for _, n in nodes]
    sizes = [int(t.size) * max(1, s.p.num_samples) for t, s in zip(thetas, specs)]
    runs = int(np.clip(WORK // max(sizes), *M_RUNS))
    sims = [s.simulate(t, runs, seed) for s, t in zip(specs, thetas)]
    outs, jacs = [], []
    try:
        for r in range(runs):
            for s, sim in zip(specs, sims):
                s.override = sim[r]
            leaf = P.run(F.LexPolicy())[0]
            outs.append(leaf.out)
            jacs.append(leaf.jac)
    finally:
        for s in specs:
            s.override = None
    outs, jacs = np.stack(outs), np.stack(jacs)
    se_ad = jacs.std(axis=0, ddof=1)
    se_val = outs.std(axis=0, ddof=1)
    ratio = max([0.0 if s.closed else math.sqrt(s.p.num_samples / s.n_ref) for s in specs])
    se_ref, se_val_ref = ratio * se_ad, ratio * se_val
    floor = ad_tol * (1.0 + float(np.max(np.abs(jacs)))) if jacs.size else ad_tol
    se = np.sqrt(se_ad ** 2 + se_ref ** 2) + floor
    m = int(np.count_nonzero(se_ad > 0))
    k = threshold(m)
    N = max(s.p.num_samples for s in specs)
    leaf0 = P.run(F.LexPolicy())[0]
    J_ref = leaf0.jac
    ref_text = "; ".join(f"{s.describe()}: reference by {s.reference_text()}" for s in specs)
    info = {"layers": [s.describe() for s in specs], "reference": ref_text, "reference_jacobian": J_ref,
            "standard_error": np.sqrt(se_ad ** 2 + se_ref ** 2), "standard_error_ad": se_ad,
            "standard_error_reference": se_ref, "num_samples": N, "simulated_runs": runs,
            "reference_samples": None if all(s.closed for s in specs) else max(s.n_ref for s in specs),
            "threshold": k, "alpha": ALPHA}
    # f(x) itself: the user's value is one draw of the estimator
    val_scale = np.sqrt(se_val ** 2 + se_val_ref ** 2) + ad_tol * (1.0 + np.abs(A.out0))
    z_val = float(np.max(np.abs(y_user - A.out0) / val_scale)) if y_user.size else 0.0
    info["value_z_score"] = z_val
    kinks = active_kinks(P, A.sites)
    common = dict(selection_jacobians=np.zeros((0, P.n_out, P.n_in)), bifurcation=False, active_kinks=kinks,
                  framework=P.framework, versions=versions(P), dtype=P.dtype, engine_jacobian=J_ref)
    if z_val > threshold(int(np.size(y_user))):
        info["z_score"] = None
        return Audit(Verdict.UNDECIDED, ad, b_subdifferential=np.zeros((0, P.n_out, P.n_in)), exact=False,
                     min_norm=None, monte_carlo=info, **common,
                     reason=(f"the traced program does not reproduce f(x) within Monte Carlo error (f(x) lies "
                             f"{z_val:.1f} standard errors from the reference value), so the analysis of the "
                             "trace would not be about f"))
    kinds = {s_.kind for s_ in A.sites.values()}
    if A.discontinuous or kinds & {"nonlipschitz", "unsupported"} or A.continuity == "unsure":
        # the rest of f is not Lipschitz (or that is not settled): the usual verdict says so
        from ._verdict import verdict

        return dataclasses.replace(verdict(P, A, ad, ad_tol, rng, seed), monte_carlo=info)
    if A.sites:
        B = [b for b in distinct(A.b_elems) if np.all(np.isfinite(b))]
        exact = A.exact
    else:
        B, exact = [J_ref], True
    if not B:
        return undecided(P, "no B-subdifferential element of the reference program could be certified. "
                         + A.exact_basis, ad)
    Barr = np.stack(B) + 0.0
    if not np.all(np.isfinite(ad)):
        z = math.inf
    else:
        res, _ = hull_residual((Barr / se[None]).reshape(len(Barr), -1), (ad / se).reshape(-1))
        z = float(res)
    info["z_score"] = z
    mn = min_norm_element(Barr)
    where = "the exact Jacobian" if all(s.closed for s in specs) else "the large-sample reference Jacobian"
    if len(B) > 1:
        where = "the hull of the reference B-subdifferential"
    if z <= k:
        note = (f"AD's output through {', '.join(info['layers'])} is a Monte Carlo estimate ({N} samples); it lies "
                f"{z:.2f} standard errors from {where} (two-sided Bonferroni threshold {k:.2f} at level {ALPHA:g} "
                f"over {m} entries), so it is consistent with the derivative of the expectation.")
        v = Verdict.CLARKE if A.sites else Verdict.SMOOTH
        return Audit(v, ad, b_subdifferential=Barr, exact=exact, min_norm=mn, hull_distance=z, notes=(note,),
                     monte_carlo=info, reason="" if exact else A.exact_basis, exact_basis=A.exact_basis
                     if A.sites else "", **common)
    return Audit(Verdict.UNDECIDED, ad, b_subdifferential=Barr, exact=exact, min_norm=mn, hull_distance=z,
                 monte_carlo=info, **common,
                 reason=(f"AD's Monte Carlo estimate through {', '.join(info['layers'])} lies {z:.1f} standard errors "
                         f"from {where} (threshold {k:.2f}, alpha {ALPHA:g}, {N} samples): a biased estimator or a "
                         "bug are likely, but a statistical test is not a certificate"))


def _values_at_x(P):
    """Every variable's float64 value at x through the reference program."""
    from ._frozen import base_values

    return base_values(P)
