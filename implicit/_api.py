"""Public solver entry points; they dispatch on the array type of ``z0`` (torch or jax)."""
from __future__ import annotations

from ._options import SolverOptions, framework_of


def _adapter(z0):
    if framework_of(z0) == "torch":
        from . import _torch_implicit as mod
    else:
        from . import _jax_implicit as mod
    return mod


def fixed_point(f, z0, *, method: str = "anderson", tol: float = 1e-6, max_iter: int = 100, m: int = 5,
                beta: float = 1.0, stop: str = "rel", atol: float = 0.0, memory=None, lam: float = 1e-8,
                on_failure: str = "warn", batched=None, trajectory=None):
    """Solve ``z = f(z)`` from ``z0`` (a torch tensor or a jax array); returns ``(z, SolveInfo)``.

    ``z0`` may also be a tuple of tensors (torch) or any pytree of arrays (jax); ``f`` then
    returns the same structure.  Batched: when ``z0.ndim >= 2`` (every leaf's, for tuples; or
    ``batched=True``) the leading axis indexes samples and each sample stops on its own
    residual (``f`` must treat samples independently).
    ``method``: ``"picard"`` (``z <- (1-beta) z + beta f(z)``), ``"anderson"`` (history ``m``,
    regularizer ``lam`` scaled to the residuals) or ``"broyden"`` (limited memory ``memory``,
    default ``max_iter``).  ``stop="rel"`` stops when ``|f(z) - z| <= tol |f(z)|``; ``"abs"`` when
    ``|f(z) - z| <= tol``; ``atol`` is an absolute floor for either.  Failure to converge is
    reported by ``on_failure`` ("warn", "raise" or "ignore") and the smallest-residual iterate
    is returned; NaN/inf iterates raise ``FloatingPointError``.  ``info`` holds per-iteration
    residuals (``history``, ``abs_history``, ``rel_history``) and, with ``trajectory=`` (iteration
    numbers, or an int for that many evenly spaced), the states at those iterations
    (``info.trajectory``).  Not differentiable: use
    ``implicit_fixed_point`` for gradients.  With jax it runs under ``jit``/``vmap``; there the
    failure policy runs in a host callback, so ``"raise"`` and NaN/inf surface as a runtime error
    of that callback (eager calls raise directly).

    Example:
        >>> import torch
        >>> from nonsmooth.implicit import fixed_point
        >>> z, info = fixed_point(torch.cos, torch.zeros(1, dtype=torch.float64), tol=1e-10)
        >>> round(float(z), 6), info.all_converged
        (0.739085, True)
    """
    opts = SolverOptions(method=method, tol=tol, max_iter=max_iter, m=m, beta=beta, stop=stop, atol=atol,
                         memory=memory, lam=lam, on_failure=on_failure)
    _check_callable(f, "f")
    return _adapter(z0).fixed_point(f, z0, opts, batched=batched, trajectory=trajectory)


def root(F, z0, *, method: str = "anderson", tol: float = 1e-6, max_iter: int = 100, m: int = 5,
         beta: float = 1.0, stop: str = "rel", atol: float = 0.0, memory=None, lam: float = 1e-8,
         on_failure: str = "warn", batched=None, trajectory=None):
    """Solve ``F(z) = 0`` from ``z0``; returns ``(z, SolveInfo)``.

    Runs the fixed-point solvers on ``z <- z - F(z)``, so it suits ``F`` whose Jacobian is
    near the identity (``F(z) = z - f(z)``); scale ``F`` or lower ``beta`` otherwise.  The
    residual is ``|F(z)|`` (relative: ``|F(z)| / |z - F(z)|``).  Options as in ``fixed_point``.

    Example:
        >>> import torch
        >>> from nonsmooth.implicit import root
        >>> z, info = root(lambda z: z - torch.cos(z), torch.zeros(1, dtype=torch.float64), tol=1e-10)
        >>> round(float(z), 6)
        0.739085
    """
    opts = SolverOptions(method=method, tol=tol, max_iter=max_iter, m=m, beta=beta, stop=stop, atol=atol,
                         memory=memory, lam=lam, on_failure=on_failure)
    _check_callable(F, "F")
    return _adapter(z0).root(F, z0, opts, batched=batched, trajectory=trajectory)


def implicit_fixed_point(f, z0, *args, backward: str = "implicit", backward_solver=None, backward_tol=None,
                         backward_max_iter=None, phantom_steps: int = 5, phantom_damping: float = 0.5,
                         method: str = "anderson", tol: float = 1e-6, max_iter: int = 100, m: int = 5,
                         beta: float = 1.0, stop: str = "rel", atol: float = 0.0, memory=None, lam: float = 1e-8,
                         on_failure: str = "warn", batched=None, on_backward=None, trajectory=None,
                         correction_steps: int = 1, correction_damping: float = 1.0):
    """Differentiable ``z*(args)`` with ``z* = f(z*, *args)``; returns ``(z*, stats)``.

    ``z0`` is a tensor or a tuple of tensors (torch), or a pytree of arrays (jax).

    Backward modes:
      - ``"implicit"``: solves the adjoint system ``u^T (I - df/dz) = g^T`` at ``z*`` with
        ``backward_solver`` (the forward method by default, or ``"gmres"``) to ``backward_tol``;
        memory does not depend on the forward steps.
      - ``"phantom"``: backprop through ``phantom_steps`` damped steps
        ``z <- (1-lam) z + lam f(z)`` started at ``z*`` (``lam = phantom_damping``).
      - ``"jfb"``: Jacobian-free backprop, one step ``f(z*)`` (drops ``(I - df/dz)^-1``).
      - ``"unroll"``: backprop through the forward iterations themselves (memory grows with steps).

    Forward mode gets the implicit tangent ``(I - df/dz)^-1 (df/dargs) dargs`` in both
    frameworks.  Second derivatives: jax ``"implicit"`` is exact to any order (the tangent rule
    is itself differentiated implicitly); torch ``"implicit"`` raises on a second derivative.

    torch: gradients reach ``args`` and any parameters ``f`` uses; ``stats`` is an
    ``ImplicitStats`` whose ``backward`` is filled in when the backward pass runs.
    jax: gradients reach ``args`` and arrays ``f`` closes over; ``stats`` is the forward
    ``SolveInfo``, and ``on_backward(info)`` is called with the backward ``SolveInfo``.

    ``trajectory=`` (iteration numbers, or an int for that many evenly spaced) returns the
    states at those iterations in ``stats.trajectory`` (jax: ``info.trajectory``), each made
    differentiable by ``correction_steps`` damped steps
    ``z <- (1 - correction_damping) z + correction_damping f(z)`` from the detached iterate
    (fixed-point correction, Bai et al. 2022; torchdeq's ``indexing``/``grad``/``tau``).

    Example:
        >>> import torch
        >>> from nonsmooth.implicit import implicit_fixed_point
        >>> x = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
        >>> z, _ = implicit_fixed_point(lambda z, x: 0.5 * torch.sin(z) + x, torch.zeros(1, dtype=torch.float64), x, tol=1e-12)
        >>> z.backward(); dz = 1 / (1 - 0.5 * torch.cos(z.detach()))   # implicit function theorem
        >>> bool(torch.allclose(x.grad, dz))
        True
    """
    opts = SolverOptions(method=method, tol=tol, max_iter=max_iter, m=m, beta=beta, stop=stop, atol=atol,
                         memory=memory, lam=lam, on_failure=on_failure)
    _check_callable(f, "f")
    kw = dict(backward=backward, backward_solver=backward_solver, backward_tol=backward_tol,
              backward_max_iter=backward_max_iter, phantom_steps=phantom_steps, phantom_damping=phantom_damping,
              batched=batched, trajectory=trajectory, correction_steps=correction_steps,
              correction_damping=correction_damping)
    mod = _adapter(z0)
    if mod.__name__.endswith("_jax_implicit"):
        kw["on_backward"] = on_backward
    elif on_backward is not None:
        raise TypeError("on_backward is for jax; with torch read stats.backward after the backward pass")
    return mod.implicit_fixed_point(f, z0, args, opts, **kw)


def implicit_root(F, z0, *args, **options):
    """Differentiable root ``z*(args)`` with ``F(z*, *args) = 0``; the root-form twin of
    ``implicit_fixed_point`` (same options; solved as ``z = z - F(z, *args)``).

    Example:
        >>> import torch
        >>> from nonsmooth.implicit import implicit_root
        >>> a = torch.tensor([4.0], dtype=torch.float64, requires_grad=True)
        >>> z, _ = implicit_root(lambda z, a: z - 0.25 * a, torch.zeros(1, dtype=torch.float64), a)
        >>> z.backward(); float(a.grad)
        0.25
    """
    _check_callable(F, "F")

    def f(z, *a):
        Fz = F(z, *a)
        if isinstance(z, (tuple, list)) and isinstance(Fz, (tuple, list)) and len(Fz) == len(z):
            return type(z)(zi - Fi for zi, Fi in zip(z, Fz))
        if isinstance(z, dict) and isinstance(Fz, dict):
            return {k: z[k] - Fz[k] for k in z}
        return z - Fz

    return implicit_fixed_point(f, z0, *args, **options)


def _check_callable(f, name):
    if not callable(f):
        raise TypeError(f"{name} must be callable; got {type(f).__name__}")


def jacobian_regularization(f, z, *args, n_samples: int = 1, generator=None, key=None, normalize: bool = True,
                            batched=None):
    """Jacobian regularisation loss of Bai et al. (2021): a Hutchinson estimate of
    ``|df/dz|_F^2`` at ``z`` (usually the equilibrium a layer returned), differentiable with
    respect to ``args`` and the parameters ``f`` uses.

    ``E_eps |eps^T J|^2 = |J|_F^2`` for ``eps ~ N(0, I)``; ``n_samples`` draws are averaged, the
    estimate is averaged over the batch (leading axis when batched) and divided by the state
    size when ``normalize`` (torchdeq's ``jac_loss``).  Noise: ``generator`` (torch) or ``key``
    (jax, required).  ``z`` may be a tuple (torch) or a pytree (jax).

    Example:
        >>> import torch
        >>> from nonsmooth.implicit import jacobian_regularization
        >>> A = torch.tensor([[0.5, 0.0], [0.0, 0.25]], dtype=torch.float64)
        >>> est = jacobian_regularization(lambda z: z @ A.T, torch.zeros(20000, 2, dtype=torch.float64),
        ...                               generator=torch.Generator().manual_seed(0), normalize=False)
        >>> abs(float(est) - 0.3125) < 0.02     # |A|_F^2 = 0.3125
        True
    """
    _check_callable(f, "f")
    mod = _adapter(z)
    if mod.__name__.endswith("_jax_implicit"):
        if generator is not None:
            raise TypeError("generator= is for torch; pass key=jax.random.key(...) with jax")
        return mod.jacobian_regularization(f, z, args, key=key, n_samples=n_samples, normalize=normalize,
                                           batched=batched)
    if key is not None:
        raise TypeError("key= is for jax; pass generator=torch.Generator() with torch")
    return mod.jacobian_regularization(f, z, args, n_samples=n_samples, generator=generator, normalize=normalize,
                                       batched=batched)


def project_rows_l1(A, kappa: float):
    """Project each row of ``A`` (torch or jax) onto the l1 ball of radius ``kappa``, so that
    ``|A|_inf <= kappa``: the convex well-posedness constraint of implicit models.

    Example:
        >>> import torch
        >>> from nonsmooth.implicit import project_rows_l1
        >>> project_rows_l1(torch.tensor([[3.0, -1.0]]), 1.0).abs().sum().item()
        1.0
    """
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not kappa > 0:
        raise ValueError(f"kappa must be a number > 0; got {kappa!r}")
    if getattr(A, "ndim", None) != 2:
        raise ValueError(f"A must be a matrix; got shape {getattr(A, 'shape', type(A).__name__)}")
    return _adapter(A).project_rows_l1(A, float(kappa))
