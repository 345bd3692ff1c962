"""Implicit differentiation of jax fixed points (``custom_vjp``) and the functional ``deq``."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ._info import SolveInfo
from ._jax_solve import check_state, finish, solve
from ._options import SolverOptions, check_backward


def fixed_point(f, z0, opts: SolverOptions, *, batched=None):
    check_state(z0)
    z, info = solve(f, jax.lax.stop_gradient(z0), opts, batched=batched)
    finish(info, opts.on_failure, "fixed_point")
    return jax.lax.stop_gradient(z), info


def root(F, z0, opts: SolverOptions, *, batched=None):
    check_state(z0)
    z, info = solve(lambda z: z - F(z), jax.lax.stop_gradient(z0), opts, batched=batched)
    finish(info, opts.on_failure, "root")
    return jax.lax.stop_gradient(z), info


def _backward_options(opts, backward_solver, backward_tol, backward_max_iter):
    return SolverOptions(
        method=backward_solver if backward_solver not in (None, "gmres") else opts.method,
        tol=opts.tol if backward_tol is None else backward_tol,
        max_iter=opts.max_iter if backward_max_iter is None else backward_max_iter,
        m=opts.m, beta=opts.beta, stop=opts.stop, atol=opts.atol, memory=opts.memory, lam=opts.lam,
        on_failure=opts.on_failure)


def implicit_fixed_point(f, z0, args, opts: SolverOptions, *, backward="implicit", backward_solver=None,
                         backward_tol=None, backward_max_iter=None, phantom_steps=5, phantom_damping=0.5,
                         batched=None, on_backward=None, what="implicit_fixed_point"):
    backward_solver = opts.method if backward_solver is None else backward_solver
    check_backward(backward, backward_solver, phantom_steps, phantom_damping)
    check_state(z0)
    args = tuple(args)
    z0 = jax.lax.stop_gradient(z0)

    if backward == "unroll":
        z, info = solve(lambda z: f(z, *args), z0, opts, batched=batched, unroll=True)
        finish(info, opts.on_failure, what)
        return z, info

    # Hoist arrays f closes over into explicit arguments so custom_vjp can differentiate them.
    f_conv, consts = jax.closure_convert(lambda z, *a: f(z, *a), z0, *args)
    params = (tuple(consts), args)

    def call(z, prm):
        return f_conv(z, *prm[1], *prm[0])  # closure_convert appends the hoisted constants

    def forward_solve(prm, start=z0):
        z, info = solve(lambda z: call(z, prm), start, opts, batched=batched)
        return jax.lax.stop_gradient(z), info

    if backward in ("jfb", "phantom"):
        z_star, info = forward_solve(jax.lax.stop_gradient(params))
        finish(info, opts.on_failure, what)
        if backward == "jfb":
            return call(z_star, params), info
        z = z_star
        for _ in range(phantom_steps):
            z = (1 - phantom_damping) * z + phantom_damping * call(z, params)
        return z, info

    bopts = _backward_options(opts, backward_solver, backward_tol, backward_max_iter)

    # z0 is an explicit argument: under jit it is a tracer, which custom_vjp must not close over
    @jax.custom_vjp
    def layer(prm, start):
        return forward_solve(prm, start)

    def layer_fwd(prm, start):
        z, info = forward_solve(prm, start)
        return (z, info), (z, prm, start)

    def layer_bwd(res, cot):
        z, prm, start = res
        g = cot[0]
        _, vjp_z = jax.vjp(lambda zz: call(zz, prm), z)
        if backward_solver == "gmres":
            u, binfo = _gmres(lambda v: v - vjp_z(v)[0], g, bopts)
        else:
            u, binfo = solve(lambda v: g + vjp_z(v)[0], g, bopts, batched=batched)
        finish(binfo, bopts.on_failure, "implicit backward")
        if on_backward is not None:
            jax.debug.callback(lambda i: on_backward(i), binfo)
        _, vjp_p = jax.vjp(lambda p: call(z, p), prm)
        return vjp_p(u)[0], jnp.zeros_like(start)

    layer.defvjp(layer_fwd, layer_bwd)
    z, info = layer(params, z0)
    finish(info, opts.on_failure, what)
    return z, info


def _gmres(matvec, b, bopts):
    """GMRES on the whole (flattened) adjoint system; one residual for the batch."""
    u, _ = jax.scipy.sparse.linalg.gmres(matvec, b, x0=b, tol=bopts.tol, atol=0.0,
                                         restart=min(bopts.max_iter, 50), maxiter=max(1, bopts.max_iter // 50))
    r = b - matvec(u)
    absr = jnp.sqrt(jnp.sum(r * r))
    rel = absr / (jnp.sqrt(jnp.sum(b * b)) + jnp.finfo(b.dtype).tiny)
    res = rel if bopts.stop == "rel" else absr
    one = lambda x: jnp.reshape(x, (1,))  # noqa: E731
    info = SolveInfo(method="gmres", stop=bopts.stop, tol=float(bopts.tol), converged=one(res <= bopts.tol),
                     steps=one(jnp.asarray(bopts.max_iter, jnp.int32)), residual=one(res), rel_residual=one(rel),
                     abs_residual=one(absr), history=jnp.reshape(res, (1, 1)),
                     best_returned=one(jnp.asarray(False)), nonfinite=~jnp.isfinite(res))
    return u, info


def deq(f, *, state_shape=None, with_info: bool = False, method: str = "anderson", tol: float = 1e-6,
        max_iter: int = 100, m: int = 5, beta: float = 1.0, stop: str = "rel", atol: float = 0.0, memory=None,
        lam: float = 1e-8, on_failure: str = "warn", backward: str = "implicit", backward_solver=None,
        backward_tol=None, backward_max_iter=None, phantom_steps: int = 5, phantom_damping: float = 0.5,
        on_backward=None, solver=None):
    """A deep equilibrium layer for jax: ``layer(params, x, z0=None)`` returns ``z*`` with ``z* = f(params, z*, x)``.

    ``x`` and ``z`` carry a leading batch dimension; each sample converges on its own
    residual.  The layer is a pure function: it composes with ``jax.jit``, ``jax.grad`` and
    ``jax.vmap``.  With ``with_info=True`` it returns ``(z, SolveInfo)``.  ``on_backward`` is
    called (from the host) with the backward solve's ``SolveInfo``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from nonsmooth.implicit import deq
        >>> f = lambda p, z, x: jnp.tanh(z @ p["W"].T + x)
        >>> layer = deq(f, tol=1e-8)
        >>> p = {"W": 0.5 * jnp.eye(3)}
        >>> g = jax.grad(lambda p: layer(p, jnp.ones((2, 3))).sum())(p)
        >>> g["W"].shape
        (3, 3)
    """
    if solver is not None:  # another name for method, as in the torch DEQ
        if method != "anderson" and method != solver:
            raise ValueError(f"pass either solver= or method=, not both ({solver!r} vs {method!r})")
        method = solver
    opts = SolverOptions(method=method, tol=tol, max_iter=max_iter, m=m, beta=beta, stop=stop, atol=atol,
                         memory=memory, lam=lam, on_failure=on_failure)
    check_backward(backward, method if backward_solver is None else backward_solver, phantom_steps,
                   phantom_damping)
    if not callable(f):
        raise TypeError(f"f must be a callable (params, z, x) -> z; got {type(f).__name__}")

    @functools.wraps(f)
    def layer(params, x, z0=None):
        if not hasattr(x, "ndim") or x.ndim < 1 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty array with a leading batch dimension; got {getattr(x, 'shape', x)!r}")
        if z0 is None:
            shape = x.shape if state_shape is None else (x.shape[0], *state_shape)
            z0 = jnp.zeros(shape, dtype=x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32)
        z, info = implicit_fixed_point(lambda z, p, xx: f(p, z, xx), z0, (params, x), opts, backward=backward,
                                       backward_solver=backward_solver, backward_tol=backward_tol,
                                       backward_max_iter=backward_max_iter, phantom_steps=phantom_steps,
                                       phantom_damping=phantom_damping, batched=None, on_backward=on_backward,
                                       what="deq")
        return (z, info) if with_info else z

    return layer


def _activation(name):
    if isinstance(name, str) and name.startswith("leaky_relu"):
        slope = float(name.split(":")[1]) if ":" in name else 0.01
        return lambda t: jax.nn.leaky_relu(t, slope)
    table = {"relu": jax.nn.relu, "abs": jnp.abs, "hardtanh": lambda t: jnp.clip(t, -1.0, 1.0), "tanh": jnp.tanh,
             "identity": lambda t: t}
    if name not in table:
        raise ValueError(f"activation must be one of relu, leaky_relu[:slope], abs, hardtanh, tanh, identity; got {name!r}")
    return table[name]


def implicit_model(params, u, *, activation: str = "relu", with_info: bool = False, **options):
    """El Ghaoui implicit model for jax: ``x = act(A x + B u)``, ``y = C x + D u``.

    ``params`` is a dict with ``A`` (n, n), ``B`` (n, p), ``C`` (q, n), ``D`` (q, p); ``u`` is
    ``(batch, p)``.  Differentiated implicitly (``options`` as in ``deq``); keep it well posed
    with ``project_rows_l1(params["A"], kappa)`` after each step (``pf_eigenvalue(A) < 1``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from nonsmooth.implicit import implicit_model
        >>> p = {"A": 0.3 * jnp.eye(2), "B": jnp.ones((2, 1)), "C": jnp.ones((1, 2)), "D": jnp.zeros((1, 1))}
        >>> y = implicit_model(p, jnp.ones((1, 1)), tol=1e-8)   # x = relu(0.3 x + 1) = 1/0.7 per unit
        >>> round(float(y[0, 0]), 4)
        2.8571
    """
    for key in ("A", "B", "C", "D"):
        if key not in params:
            raise ValueError(f"params must hold A, B, C and D; missing {key!r}")
    act = _activation(activation)
    if not hasattr(u, "ndim") or u.ndim != 2 or u.shape[0] == 0:
        raise ValueError(f"u must be a non-empty (batch, in_features) array; got {getattr(u, 'shape', u)!r}")
    layer = deq(lambda p, x, uu: act(x @ p["A"].T + uu @ p["B"].T), state_shape=(params["A"].shape[0],),
                with_info=True, **options)
    x, info = layer(params, u)
    y = x @ params["C"].T + u @ params["D"].T
    return (y, info) if with_info else y


def project_rows_l1(A, kappa: float):
    """Euclidean projection of each row of ``A`` onto the l1 ball of radius ``kappa`` (jax)."""
    absA = jnp.abs(A)
    srt = -jnp.sort(-absA, axis=1)
    cums = jnp.cumsum(srt, 1) - kappa
    idx = jnp.arange(1, A.shape[1] + 1, dtype=A.dtype)
    cond = srt - cums / idx > 0
    rho = jnp.argmax(jnp.cumsum(cond.astype(jnp.int32), 1), axis=1)
    theta = jnp.take_along_axis(cums, rho[:, None], 1) / (rho[:, None] + 1).astype(A.dtype)
    proj = jnp.sign(A) * jnp.maximum(absA - theta, 0.0)
    return jnp.where((absA.sum(1) <= kappa)[:, None], A, proj)
