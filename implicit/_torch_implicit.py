"""Implicit differentiation of torch fixed points, and the torch layers built on it."""
from __future__ import annotations

import torch

from ._info import ImplicitStats, handle_failure
from ._options import SolverOptions, check_backward
from ._torch_solve import check_state, gmres, solve


def fixed_point(f, z0, opts: SolverOptions, *, batched=None):
    check_state(z0)
    with torch.no_grad():
        z, info = solve(f, z0.detach(), opts, batched=batched)
    handle_failure(info, opts.on_failure, "fixed_point")
    return z, info


def root(F, z0, opts: SolverOptions, *, batched=None):
    check_state(z0)
    with torch.no_grad():
        z, info = solve(lambda z: z - F(z), z0.detach(), opts, batched=batched, what="root")
    handle_failure(info, opts.on_failure, "root")
    return z, info


def implicit_fixed_point(f, z0, args, opts: SolverOptions, *, backward="implicit", backward_solver=None,
                         backward_tol=None, backward_max_iter=None, phantom_steps=5, phantom_damping=0.5,
                         batched=None, what="implicit_fixed_point"):
    backward_solver = opts.method if backward_solver is None else backward_solver
    check_backward(backward, backward_solver, phantom_steps, phantom_damping)
    check_state(z0)
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and torch.is_floating_point(a) and not bool(torch.isfinite(a).all()):
            raise ValueError(f"args[{i}] contains NaN/inf; the fixed point is undefined there")

    def bound(z):
        return f(z, *args)

    if backward == "unroll":
        z, info = solve(bound, z0, opts, batched=batched, what=what)
        handle_failure(info, opts.on_failure, what)
        return z, ImplicitStats(info, backward)

    with torch.no_grad():
        z_star, info = solve(bound, z0.detach(), opts, batched=batched, what=what)
    handle_failure(info, opts.on_failure, what)
    stats = ImplicitStats(info, backward)
    if not torch.is_grad_enabled():
        return z_star, stats

    if backward == "jfb":
        return bound(z_star), stats
    if backward == "phantom":
        z = z_star
        for _ in range(phantom_steps):
            z = (1 - phantom_damping) * z + phantom_damping * bound(z)
        return z, stats

    z = bound(z_star)
    if not z.requires_grad:
        return z, stats
    z_in = z_star.detach().requires_grad_(True)
    with torch.enable_grad():
        fz_in = bound(z_in)
    bopts = SolverOptions(
        method=backward_solver if backward_solver != "gmres" else "anderson",
        tol=opts.tol if backward_tol is None else backward_tol,
        max_iter=opts.max_iter if backward_max_iter is None else backward_max_iter,
        m=opts.m, beta=opts.beta, stop=opts.stop, atol=opts.atol, memory=opts.memory, lam=opts.lam,
        on_failure=opts.on_failure,
    )

    def vjp(u):
        return torch.autograd.grad(fz_in, z_in, u, retain_graph=True)[0]

    def hook(grad):
        # Adjoint system u^T (I - df/dz) = g^T at z*; the graph of z = f(z*, theta) then
        # carries u to the parameters, so memory does not grow with the forward steps.
        if torch.is_grad_enabled():  # backward(create_graph=True): the adjoint solve is not differentiable
            raise RuntimeError("implicit backward gives first-order gradients only; for higher-order "
                               "derivatives use backward='unroll' (or 'phantom')")
        if backward_solver == "gmres":
            u, binfo = gmres(lambda v: v - vjp(v), grad, tol=bopts.tol, max_iter=bopts.max_iter,
                             stop=bopts.stop, batched=batched)
        else:
            u, binfo = solve(lambda v: grad + vjp(v), grad, bopts, batched=batched, what="implicit backward",
                             state_name="the incoming gradient")
        stats._record_backward(binfo)
        handle_failure(binfo, bopts.on_failure, "implicit backward")
        return u

    z.register_hook(hook)
    return z, stats


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


class _SolverConfig:
    def _configure(self, *, method, tol, max_iter, m, beta, stop, atol, memory, lam, on_failure, backward,
                   backward_solver, backward_tol, backward_max_iter, phantom_steps, phantom_damping):
        self.options = SolverOptions(method=method, tol=tol, max_iter=max_iter, m=m, beta=beta, stop=stop,
                                     atol=atol, memory=memory, lam=lam, on_failure=on_failure)
        check_backward(backward, method if backward_solver is None else backward_solver, phantom_steps,
                       phantom_damping)
        self.backward = backward
        self._backward_kw = dict(backward_solver=backward_solver, backward_tol=backward_tol,
                                 backward_max_iter=backward_max_iter, phantom_steps=phantom_steps,
                                 phantom_damping=phantom_damping)
        self.last_stats = None

    def _solve(self, f, z0, args, backward=None):
        z, stats = implicit_fixed_point(f, z0, args, self.options, backward=backward or self.backward,
                                        batched=True, **self._backward_kw)
        self.last_stats = stats
        return z


class DEQ(torch.nn.Module, _SolverConfig):
    """Deep equilibrium layer: returns ``z*`` with ``z* = f(z*, x)``, differentiated implicitly.

    ``f`` is an ``nn.Module`` (or callable) taking ``(z, x)`` with a leading batch dimension.
    ``state_shape`` is the per-sample shape of ``z`` (default: the shape of ``x``).  Statistics
    of the last call are in ``last_stats`` (forward and, after ``backward()``, backward solve).
    ``solver`` is another name for ``method`` (``"anderson"``, ``"broyden"``, ``"picard"``).
    ``forward(x, z0=None, *, backward=None)``: ``z0`` warm-starts the solve; ``backward``
    overrides the backward mode for one call (e.g. ``"unroll"`` to compare).

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
                 solver=None):
        super().__init__()
        method = _solver_alias(solver, method)
        if not callable(f):
            raise TypeError(f"f must be a callable (z, x) -> z, e.g. an nn.Module; got {type(f).__name__}")
        self.f = f
        self.state_shape = None if state_shape is None else tuple(int(s) for s in state_shape)
        self._configure(method=method, tol=tol, max_iter=max_iter, m=m, beta=beta, stop=stop, atol=atol,
                        memory=memory, lam=lam, on_failure=on_failure, backward=backward,
                        backward_solver=backward_solver, backward_tol=backward_tol,
                        backward_max_iter=backward_max_iter, phantom_steps=phantom_steps,
                        phantom_damping=phantom_damping)

    def forward(self, x, z0=None, *, backward=None):
        if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty tensor with a leading batch dimension; got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if z0 is None:
            shape = x.shape if self.state_shape is None else (x.shape[0], *self.state_shape)
            z0 = torch.zeros(shape, dtype=x.dtype, device=x.device)
        return self._solve(self.f, z0, (x,), backward)


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
