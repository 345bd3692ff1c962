"""Implicit differentiation of torch fixed points, and the torch layers built on it.

The differentiable solution is ``z = S(f(z*, args))``: ``z*`` is solved without a graph, one
more evaluation of ``f`` at ``z*`` carries the graph to ``args`` and to every parameter ``f``
uses (closures and module parameters included), and ``S`` (``_ImplicitSolution``) is the
identity whose backward applies ``(I - J^T)^-1`` and whose forward-mode rule applies
``(I - J)^-1`` (``J = df/dz`` at ``z*``): reverse and forward mode both get the implicit
function theorem's derivative.  Second derivatives are refused (``_FirstOrderOnly``), never
approximated silently.
"""
from __future__ import annotations

import dataclasses

import torch

from nonsmooth import _layer_hook

from ._info import ImplicitStats, handle_failure
from ._options import SolverOptions, check_backward, check_correction, check_state_shape, check_trajectory
from ._torch_solve import _VMAP, StatePacking, _is_vmapped, check_state, gmres, no_forward_ad, solve, solve_flat

_SECOND_ORDER = (
    "the implicit backward gives first-order gradients only: a second derivative through an "
    "implicit layer (double backward, torch.func.grad of grad, forward-over-reverse) would miss how "
    "z* moves with the parameters. Use backward='unroll' for higher-order derivatives of the "
    "unrolled solver, or the jax layer (nonsmooth.implicit.deq), whose second derivatives are exact.")


def fixed_point(f, z0, opts: SolverOptions, *, batched=None, trajectory=None):
    check_state(z0, batched=batched)
    steps = check_trajectory(trajectory, opts.max_iter)
    with torch.no_grad(), no_forward_ad():
        z, info = solve(f, _detach(z0), opts, batched=batched, trajectory=steps)
    handle_failure(info, opts.on_failure, "fixed_point")
    return z, info


def root(F, z0, opts: SolverOptions, *, batched=None, trajectory=None):
    pk = check_state(z0, batched=batched)
    steps = check_trajectory(trajectory, opts.max_iter)

    def f(z):
        Fz = F(z)
        if pk.is_tuple and isinstance(Fz, (tuple, list)) and len(Fz) == len(z):
            return type(z)(a - b for a, b in zip(z, Fz))
        return z - Fz

    with torch.no_grad(), no_forward_ad():
        z, info = solve(f, _detach(z0), opts, batched=batched, what="root", trajectory=steps)
    handle_failure(info, opts.on_failure, "root")
    return z, info


def _detach(z):
    return type(z)(t.detach() for t in z) if isinstance(z, (tuple, list)) else z.detach()


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on ``u`` that raises if anything differentiates through it.

    Its other inputs anchor it in the graph: whatever ``u`` really depends on (the incoming
    gradient, the parameters through ``f(z*)``) reaches this node, so a second derivative
    raises instead of silently dropping the terms the adjoint solve does not carry."""

    @staticmethod
    def forward(u, *anchors):
        return u.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.n = len(inputs)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_SECOND_ORDER)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(_SECOND_ORDER)


def _functorch_wrapped(t) -> bool:
    if torch.compiler.is_compiling():
        return False
    try:
        from torch._C._functorch import is_functorch_wrapped_tensor
    except ImportError:  # pragma: no cover
        return False
    return bool(is_functorch_wrapped_tensor(t))


class _Problem:
    """What the implicit rules need: the flat map at ``z*``, the backward options, the stats."""

    def __init__(self, fmap, bopts, backward_solver, stats):
        self.fmap = fmap
        self.bopts = bopts
        self.backward_solver = backward_solver
        self.stats = stats

    def vjp_z(self, z_star):
        """``v -> J^T v`` at ``z*``.  Plain autograd on one retained graph when no ``torch.func``
        transform is active (cheapest per call); ``torch.func.vjp`` under one (its wrapped
        tensors cannot take ``requires_grad_``)."""
        if _functorch_wrapped(z_star):
            _, vjp = torch.func.vjp(self.fmap, z_star)
            return lambda v: vjp(v)[0]
        with torch.enable_grad():
            z_in = z_star.detach().requires_grad_(True)
            fz = self.fmap(z_in)
        if not fz.requires_grad:  # f does not depend on z: J = 0
            return lambda v: torch.zeros_like(v)

        def vjp(v):
            (out,) = torch.autograd.grad(fz, z_in, v, retain_graph=True, allow_unused=True)
            return torch.zeros_like(v) if out is None else out

        return vjp

    def linear_solve(self, z_star, b, op, what):
        """``x = b + op(x)`` per row (``op`` is ``J`` or ``J^T``), by the backward solver."""
        if not bool((b != 0).any()):  # also gradcheck's zero / undefined incoming gradients
            return torch.zeros_like(b)
        if self.backward_solver == "gmres":
            x, info = gmres(lambda v: v - op(v), b, tol=self.bopts.tol, max_iter=self.bopts.max_iter,
                            stop=self.bopts.stop)
        else:
            x, info = solve_flat(lambda v: b + op(v), b, self.bopts, what=what)
        self.stats._record_backward(info)
        handle_failure(info, self.bopts.on_failure, what)
        return x


class _ImplicitSolution(torch.autograd.Function):
    """Identity on ``y = f(z*, args)``; backward ``g -> (I - J^T)^-1 g``, forward mode
    ``t -> (I - J)^-1 t`` with ``J = df/dz`` at ``z*`` (flat ``(batch, n)`` tensors)."""

    @staticmethod
    def forward(y, z_star, problem):
        return y.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        y, z_star, problem = inputs
        ctx.problem = problem
        ctx.save_for_backward(z_star, y)
        ctx.save_for_forward(z_star, y)

    @staticmethod
    def backward(ctx, g):
        z_star, y = ctx.saved_tensors
        problem = ctx.problem
        if g is None:
            return None, None, None
        if _is_vmapped(g):  # torch.func.jacrev / vmap over the cotangents
            raise RuntimeError(_VMAP.format(name="the incoming gradient"))
        with torch.no_grad(), no_forward_ad():
            u = problem.linear_solve(z_star, g.detach(), problem.vjp_z(z_star), "implicit backward")
        # Differentiating u again needs dz*/dtheta, which this graph does not hold: refuse.
        return _FirstOrderOnly.apply(u, y, g), None, None

    @staticmethod
    def vmap(info, in_dims, y, z_star, problem):  # torch.func.jacfwd / vmap over tangents
        raise RuntimeError(_VMAP.format(name="the implicit layer's input"))

    @staticmethod
    def jvp(ctx, y_t, z_t, _):
        z_star, y = ctx.saved_tensors
        problem = ctx.problem
        if _is_vmapped(y_t):  # torch.func.jacfwd / hessian: vmap over the tangents
            raise RuntimeError(_VMAP.format(name="the tangent"))
        with torch.no_grad():
            # J v as the vjp of the linear map w -> J^T w (nested forward mode is unavailable here)
            fz, vjp_z = torch.func.vjp(problem.fmap, z_star)
            _, vjp_lin = torch.func.vjp(lambda w: vjp_z(w)[0], torch.zeros_like(fz))
            import torch.autograd.forward_ad as fwAD

            def jv(v):
                return fwAD.unpack_dual(vjp_lin(v)[0]).primal

            with no_forward_ad():
                t = problem.linear_solve(z_star, fwAD.unpack_dual(y_t).primal.detach(), jv,
                                         "implicit tangent solve")
        if torch.is_grad_enabled():
            t = _FirstOrderOnly.apply(t, y, y_t)
        return t


def implicit_fixed_point(f, z0, args, opts: SolverOptions, *, backward="implicit", backward_solver=None,
                         backward_tol=None, backward_max_iter=None, phantom_steps=5, phantom_damping=0.5,
                         batched=None, what="implicit_fixed_point", trajectory=None, correction_steps=1,
                         correction_damping=1.0):
    """The one place every torch implicit layer solves: ``DEQ``, ``ImplicitModel`` and the
    public ``implicit_fixed_point``/``implicit_root`` all call this function once per forward,
    with the cell ``f`` (called as ``f(z, *args)``), the start ``z0`` and the parameters
    ``args``; it returns the solution and its ``ImplicitStats``.  The audit engine relies on
    this: it intercepts this function to recognise an implicit layer inside a traced program
    (keep the signature; extend it with keyword options only).
    """
    backward_solver = opts.method if backward_solver is None else backward_solver
    check_backward(backward, backward_solver, phantom_steps, phantom_damping)
    check_correction(correction_steps, correction_damping)
    steps = check_trajectory(trajectory, opts.max_iter)
    if _layer_hook.active():  # the audit engine is tracing: the layer is one node it understands
        return _layer_hook.route("implicit", f=f, z0=z0, args=tuple(args), opts=opts, backward=backward,
                                 batched=batched, backward_tol=backward_tol, framework="torch")
    pk = StatePacking(z0, batched, "z0")
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and _is_vmapped(a):
            raise ValueError(_VMAP.format(name=f"args[{i}]"))
        if isinstance(a, torch.Tensor) and torch.is_floating_point(a) and not bool(torch.isfinite(a.detach()).all()):
            raise ValueError(f"args[{i}] contains NaN/inf; the fixed point is undefined there")

    def fmap(zf):
        return pk.pack(f(pk.unpack(zf), *args))

    def corrected(states):
        if not (torch.is_grad_enabled() and steps):
            return tuple(pk.unpack(s) for s in states)
        out = []
        for s in states:
            for _ in range(correction_steps):
                s = (1 - correction_damping) * s + correction_damping * fmap(s)
            out.append(pk.unpack(s))
        return tuple(out)

    z0f = pk.pack(z0, "z0")
    if backward == "unroll":
        zf, info = solve_flat(fmap, z0f, opts, what=what, trajectory=steps, state_dtype=pk.state_dtype)
        handle_failure(info, opts.on_failure, what)
        info = dataclasses.replace(info, trajectory=corrected(info.trajectory))
        return pk.unpack(zf), ImplicitStats(info, backward)

    with torch.no_grad(), no_forward_ad():
        z_star, info = solve_flat(fmap, z0f.detach(), opts, what=what, trajectory=steps,
                                  state_dtype=pk.state_dtype)
    z_star = z_star.detach()  # also drops tangents of forward-mode AD
    handle_failure(info, opts.on_failure, what)
    info = dataclasses.replace(info, trajectory=corrected(info.trajectory))
    stats = ImplicitStats(info, backward)
    import torch.autograd.forward_ad as fwAD

    if not torch.is_grad_enabled() and getattr(fwAD, "_current_level", 0) < 0:
        return pk.unpack(z_star), stats  # inference: no graph, no tangents

    if backward == "jfb":
        return pk.unpack(fmap(z_star)), stats
    if backward == "phantom":
        z = z_star
        for _ in range(phantom_steps):
            z = (1 - phantom_damping) * z + phantom_damping * fmap(z)
        return pk.unpack(z), stats

    y = fmap(z_star)
    bopts = SolverOptions(
        method=backward_solver if backward_solver != "gmres" else "anderson",
        tol=opts.tol if backward_tol is None else backward_tol,
        max_iter=opts.max_iter if backward_max_iter is None else backward_max_iter,
        m=opts.m, beta=opts.beta, stop=opts.stop, atol=opts.atol, memory=opts.memory, lam=opts.lam,
        on_failure=opts.on_failure,
    )
    problem = _Problem(fmap, bopts, backward_solver, stats)
    return pk.unpack(_ImplicitSolution.apply(y, z_star, problem)), stats


def jacobian_regularization(f, z, args, *, n_samples=1, generator=None, normalize=True, batched=None):
    """Hutchinson estimate of ``|df/dz|_F^2`` at ``z`` (see the public wrapper)."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1; got {n_samples!r}")
    pk = StatePacking(z, batched, "z")
    zf = pk.pack(z, "z").detach()

    def fmap(v):
        return pk.pack(f(pk.unpack(v), *args))

    fz, vjp_z = torch.func.vjp(fmap, zf)
    total = 0.0
    for _ in range(n_samples):
        eps = torch.randn(fz.shape, generator=generator, dtype=fz.dtype, device="cpu" if generator is None
                          else generator.device).to(fz.device)
        (v,) = vjp_z(eps)
        total = total + (v * v).sum(1)
    est = total / n_samples
    if normalize:
        est = est / pk.n
    return est.mean()


def _activation(name):
    table = {
        "relu": torch.relu,
        "abs": torch.abs,
        "hardtanh": lambda t: torch.clamp(t, -1.0, 1.0),
        "tanh": torch.tanh,
        "identity": lambda t: t,
    }
    if isinstance(name, str) and name.startswith("leaky_relu"):
        slope = float(name.split(":")[1]) if ":" in name else 0.01
        return lambda t: torch.nn.functional.leaky_relu(t, slope)
    if name not in table:
        raise ValueError(f"activation must be one of relu, leaky_relu[:slope], abs, hardtanh, tanh, identity; got {name!r}")
    return table[name]


class EquilibriumCell(torch.nn.Module):
    """The map ``f(z, x) = act(z W^T + x U^T + b)`` whose fixed point a DEQ computes.

    ``structure()`` hands its weights to ``check_invertibility`` for the exact check over
    the kinks of ``act``.  ``W`` starts with spectral norm ``init_scale`` (< 1: a contraction for
    1-Lipschitz activations).

    Example:
        >>> import torch
        >>> from nonsmooth.implicit import DEQ, EquilibriumCell
        >>> layer = DEQ(EquilibriumCell(4, 8), state_shape=(8,))
        >>> layer(torch.randn(2, 4)).shape
        torch.Size([2, 8])
    """

    def __init__(self, in_features: int, width: int, *, activation: str = "relu", init_scale: float = 0.5,
                 dtype=None):
        super().__init__()
        self.activation = activation
        self._act = _activation(activation)
        W = torch.randn(width, width, dtype=dtype)
        W = W * (init_scale / torch.linalg.matrix_norm(W, ord=2))
        self.W = torch.nn.Parameter(W)
        self.U = torch.nn.Parameter(torch.randn(width, in_features, dtype=dtype) / in_features ** 0.5)
        self.b = torch.nn.Parameter(torch.zeros(width, dtype=dtype))

    def preactivation(self, z, x):
        return z @ self.W.T + x @ self.U.T + self.b

    def forward(self, z, x):
        return self._act(self.preactivation(z, x))

    @torch.no_grad()
    def project_(self, max_norm: float = 0.95):
        """Rescale ``W`` in place so that ``|W|_2 <= max_norm`` (a contraction for 1-Lipschitz
        activations, hence a unique fixed point); call after each optimizer step.  Returns ``self``."""
        if not (0 < max_norm < 1):
            raise ValueError(f"max_norm must be in (0, 1); got {max_norm!r}")
        norm = float(torch.linalg.matrix_norm(self.W, ord=2))
        if norm > max_norm:
            self.W.mul_(max_norm / norm)
        return self

    def structure(self):
        from ._invertibility import ElementwiseLayer

        return ElementwiseLayer(self.W.detach().cpu().double().numpy(), U=self.U.detach().cpu().double().numpy(),
                                b=self.b.detach().cpu().double().numpy(), activation=self.activation)


def _solver_alias(solver, method):
    """``solver=`` is accepted as another name for ``method=`` (the forward solver)."""
    if solver is None:
        return method
    if method != "anderson" and method != solver:
        raise ValueError(f"pass either solver= or method=, not both ({solver!r} vs {method!r})")
    return solver


def _zeros_state(state_shape, x):
    if state_shape is None:
        return torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    if state_shape and isinstance(state_shape[0], tuple):
        return tuple(torch.zeros((x.shape[0], *s), dtype=x.dtype, device=x.device) for s in state_shape)
    return torch.zeros((x.shape[0], *state_shape), dtype=x.dtype, device=x.device)


class _SolverConfig:
    def _configure(self, *, method, tol, max_iter, m, beta, stop, atol, memory, lam, on_failure, backward,
                   backward_solver, backward_tol, backward_max_iter, phantom_steps, phantom_damping,
                   trajectory=None, correction_steps=1, correction_damping=1.0):
        self.options = SolverOptions(method=method, tol=tol, max_iter=max_iter, m=m, beta=beta, stop=stop,
                                     atol=atol, memory=memory, lam=lam, on_failure=on_failure)
        check_backward(backward, method if backward_solver is None else backward_solver, phantom_steps,
                       phantom_damping)
        check_correction(correction_steps, correction_damping)
        check_trajectory(trajectory, max_iter)
        self.backward = backward
        self._backward_kw = dict(backward_solver=backward_solver, backward_tol=backward_tol,
                                 backward_max_iter=backward_max_iter, phantom_steps=phantom_steps,
                                 phantom_damping=phantom_damping, trajectory=trajectory,
                                 correction_steps=correction_steps, correction_damping=correction_damping)
        self.last_stats = None

    def _solve(self, f, z0, args, backward=None):
        # through the module attribute, so that the audit engine's interception sees layers too
        from . import _torch_implicit

        z, stats = _torch_implicit.implicit_fixed_point(f, z0, args, self.options,
                                                        backward=backward or self.backward, batched=True,
                                                        **self._backward_kw)
        self.last_stats = stats
        return z


class DEQ(torch.nn.Module, _SolverConfig):
    """Deep equilibrium layer: returns ``z*`` with ``z* = f(z*, x)``, differentiated implicitly.

    ``f`` is an ``nn.Module`` (or callable) taking ``(z, x)`` with a leading batch dimension;
    ``z`` may be a tensor or a tuple of tensors (``f`` then returns a tuple alike).
    ``state_shape`` is the per-sample shape of ``z`` (default: the shape of ``x``), or a tuple of
    shapes for a tuple state.  Statistics of the last call are in ``last_stats`` (forward solve
    with per-iteration residuals, trajectory, and after ``backward()`` the backward solve).
    ``solver`` is another name for ``method`` (``"anderson"``, ``"broyden"``, ``"picard"``).
    ``forward(x, z0=None, *, backward=None)``: ``z0`` warm-starts the solve; ``backward``
    overrides the backward mode for one call (e.g. ``"unroll"`` to compare).

    ``trajectory`` (iteration numbers, or an int for that many evenly spaced ones) records the
    states at those iterations in ``last_stats.trajectory``, each differentiable through
    ``correction_steps`` damped steps ``z <- (1 - correction_damping) z + correction_damping f(z)``
    from the (detached) iterate: the fixed-point-correction loss of Bai et al. 2022.

    bfloat16/float16 layers (``layer.to(torch.bfloat16)``): ``f`` runs in that dtype, the solver
    iterates and mixes in float32; the residual cannot fall below the dtype's resolution, so use
    ``tol`` around ``3e-2`` (bfloat16) or ``4e-3`` (float16).  Forward mode
    (``torch.func.jvp``, ``torch.autograd.forward_ad``) applies ``(I - df/dz)^-1`` to the tangent;
    second derivatives raise (use the jax ``deq`` for those).

    Example:
        >>> import torch
        >>> from nonsmooth.implicit import DEQ, EquilibriumCell
        >>> _ = torch.manual_seed(0); layer = DEQ(EquilibriumCell(3, 5), state_shape=(5,), tol=1e-8)
        >>> x = torch.randn(4, 3)
        >>> z = layer(x)
        >>> bool(torch.allclose(z, layer.f(z, x), atol=1e-5)), layer.last_stats.forward.all_converged
        (True, True)
    """

    def __init__(self, f, *, method: str = "anderson", tol: float = 1e-6, max_iter: int = 100, m: int = 5,
                 beta: float = 1.0, stop: str = "rel", atol: float = 0.0, memory=None, lam: float = 1e-8,
                 on_failure: str = "warn", backward: str = "implicit", backward_solver=None, backward_tol=None,
                 backward_max_iter=None, phantom_steps: int = 5, phantom_damping: float = 0.5, state_shape=None,
                 solver=None, trajectory=None, correction_steps: int = 1, correction_damping: float = 1.0):
        super().__init__()
        method = _solver_alias(solver, method)
        if not callable(f):
            raise TypeError(f"f must be a callable (z, x) -> z, e.g. an nn.Module; got {type(f).__name__}")
        self.f = f
        self.state_shape = check_state_shape(state_shape)
        self._configure(method=method, tol=tol, max_iter=max_iter, m=m, beta=beta, stop=stop, atol=atol,
                        memory=memory, lam=lam, on_failure=on_failure, backward=backward,
                        backward_solver=backward_solver, backward_tol=backward_tol,
                        backward_max_iter=backward_max_iter, phantom_steps=phantom_steps,
                        phantom_damping=phantom_damping, trajectory=trajectory,
                        correction_steps=correction_steps, correction_damping=correction_damping)

    def forward(self, x, z0=None, *, backward=None):
        if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty tensor with a leading batch dimension; got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if z0 is None:
            z0 = _zeros_state(self.state_shape, x)
        return self._solve(self.f, z0, (x,), backward)

    def jacobian_regularization(self, z, x, *, n_samples: int = 1, generator=None, normalize: bool = True):
        """Hutchinson estimate of ``|df/dz|_F^2`` at ``z`` (usually this layer's output), averaged over
        the batch (and divided by the state size when ``normalize``); differentiable with respect to
        ``f``'s parameters and ``x`` (Bai et al. 2021).  Add ``gamma * loss`` to the training loss."""
        return jacobian_regularization(self.f, z, (x,), n_samples=n_samples, generator=generator,
                                       normalize=normalize, batched=True)


def project_rows_l1(A, kappa: float):
    """Project each row of ``A`` onto the l1 ball of radius ``kappa`` (so ``|A|_inf <= kappa``).

    Euclidean projection by sorting (Duchi et al. 2008); rows already inside are unchanged.
    """
    absA = A.abs()
    inside = absA.sum(1) <= kappa
    srt, _ = torch.sort(absA, dim=1, descending=True)
    cums = torch.cumsum(srt, 1) - kappa
    idx = torch.arange(1, A.shape[1] + 1, dtype=A.dtype, device=A.device)
    cond = srt - cums / idx > 0
    rho = cond.to(torch.long).cumsum(1).argmax(1)  # last index where cond holds
    theta = cums.gather(1, rho[:, None]) / (rho[:, None] + 1).to(A.dtype)
    proj = torch.sign(A) * torch.clamp(absA - theta, min=0)
    return torch.where(inside[:, None], A, proj)


def pf_eigenvalue(A) -> float:
    """Perron-Frobenius eigenvalue of ``|A|`` (its spectral radius), in float64."""
    import numpy as np

    M = np.abs(A.detach().cpu().double().numpy()) if isinstance(A, torch.Tensor) else np.abs(np.asarray(A, float))
    return float(np.max(np.abs(np.linalg.eigvals(M)))) if M.size else 0.0


class ImplicitModel(torch.nn.Module, _SolverConfig):
    """Implicit model of El Ghaoui et al.: ``x = act(A x + B u)``, ``y = C x + D u``.

    Well-posedness: for a 1-Lipschitz componentwise ``act``, ``pf_eigenvalue(|A|) < 1`` gives a
    unique state ``x``; ``project_()`` (call after each optimizer step) keeps ``|A|_inf <= kappa``,
    a convex sufficient condition.

    Example:
        >>> import torch
        >>> from nonsmooth.implicit import ImplicitModel
        >>> _ = torch.manual_seed(0); model = ImplicitModel(4, 16, 3)
        >>> model(torch.randn(5, 4)).shape, model.pf_eigenvalue() < 1
        (torch.Size([5, 3]), True)
    """

    def __init__(self, in_features: int, state: int, out_features: int, *, kappa: float = 0.95,
                 activation: str = "relu", method: str = "anderson", tol: float = 1e-6, max_iter: int = 100,
                 m: int = 5, beta: float = 1.0, stop: str = "rel", atol: float = 0.0, memory=None,
                 lam: float = 1e-8, on_failure: str = "warn", backward: str = "implicit", backward_solver=None,
                 backward_tol=None, backward_max_iter=None, phantom_steps: int = 5, phantom_damping: float = 0.5,
                 dtype=None):
        super().__init__()
        if not (0 < kappa < 1):
            raise ValueError(f"kappa must be in (0, 1) for well-posedness; got {kappa!r}")
        self.kappa = float(kappa)
        self.activation = activation
        self._act = _activation(activation)
        self.A = torch.nn.Parameter(torch.randn(state, state, dtype=dtype) / state)
        self.B = torch.nn.Parameter(torch.randn(state, in_features, dtype=dtype) / in_features ** 0.5)
        self.C = torch.nn.Parameter(torch.randn(out_features, state, dtype=dtype) / state ** 0.5)
        self.D = torch.nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype))
        self.project_()
        self._configure(method=method, tol=tol, max_iter=max_iter, m=m, beta=beta, stop=stop, atol=atol,
                        memory=memory, lam=lam, on_failure=on_failure, backward=backward,
                        backward_solver=backward_solver, backward_tol=backward_tol,
                        backward_max_iter=backward_max_iter, phantom_steps=phantom_steps,
                        phantom_damping=phantom_damping)

    def cell(self, x, u):
        return self._act(x @ self.A.T + u @ self.B.T)

    def state(self, u, *, backward=None):
        """The equilibrium state ``x`` for inputs ``u`` (batch first)."""
        if not isinstance(u, torch.Tensor) or u.ndim != 2 or u.shape[0] == 0:
            raise ValueError(f"u must be a non-empty (batch, in_features) tensor; got {getattr(u, 'shape', u)!r}")
        x0 = torch.zeros(u.shape[0], self.A.shape[0], dtype=u.dtype, device=u.device)
        return self._solve(self.cell, x0, (u,), backward)

    def forward(self, u, *, backward=None):
        return self.state(u, backward=backward) @ self.C.T + u @ self.D.T

    @torch.no_grad()
    def project_(self):
        """Project ``A`` onto ``{|A|_inf <= kappa}`` in place; returns ``self``."""
        self.A.copy_(project_rows_l1(self.A, self.kappa))
        return self

    def pf_eigenvalue(self) -> float:
        return pf_eigenvalue(self.A)

    def structure(self):
        from ._invertibility import ElementwiseLayer

        return ElementwiseLayer(self.A.detach().cpu().double().numpy(), U=self.B.detach().cpu().double().numpy(),
                                b=None, activation=self.activation)
