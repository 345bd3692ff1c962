"""Implicit differentiation of jax fixed points and the functional ``deq``.

The implicit solution is a ``jax.custom_jvp`` function whose tangent rule is the implicit
function theorem, ``dz = (I - J)^-1 (df/dparams) dparams`` with ``J = df/dz`` at ``z*``, solved by
``lax.custom_linear_solve`` (forward: the tangent solve; reverse mode transposes it into the
adjoint solve ``(I - J^T) u = g``).  The rule recomputes ``z*`` by calling the layer itself, so
every further derivative goes through the same rule: ``jacfwd``, ``jacrev``, ``hessian`` and any
mix of them are exact up to the solver tolerances (implicit differentiation applied again).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from nonsmooth import _layer_hook

from ._info import SolveInfo
from ._jax_solve import StatePacking, check_state, finish, solve, solve_flat
from ._options import SolverOptions, check_backward, check_correction, check_state_shape, check_trajectory


def fixed_point(f, z0, opts: SolverOptions, *, batched=None, trajectory=None):
    check_state(z0, batched=batched)
    steps = check_trajectory(trajectory, opts.max_iter)
    z, info = solve(f, jax.lax.stop_gradient(z0), opts, batched=batched, trajectory=steps)
    finish(info, opts.on_failure, "fixed_point")
    return jax.lax.stop_gradient(z), jax.lax.stop_gradient(info)


def root(F, z0, opts: SolverOptions, *, batched=None, trajectory=None):
    check_state(z0, batched=batched)
    steps = check_trajectory(trajectory, opts.max_iter)

    def f(z):
        return jax.tree_util.tree_map(lambda a, b: a - b, z, F(z))

    z, info = solve(f, jax.lax.stop_gradient(z0), opts, batched=batched, trajectory=steps)
    finish(info, opts.on_failure, "root")
    return jax.lax.stop_gradient(z), jax.lax.stop_gradient(info)


def _backward_options(opts, backward_solver, backward_tol, backward_max_iter):
    return SolverOptions(
        method=backward_solver if backward_solver not in (None, "gmres") else opts.method,
        tol=opts.tol if backward_tol is None else backward_tol,
        max_iter=opts.max_iter if backward_max_iter is None else backward_max_iter,
        m=opts.m, beta=opts.beta, stop=opts.stop, atol=opts.atol, memory=opts.memory, lam=opts.lam,
        on_failure=opts.on_failure)


def _zero_tangent(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


def implicit_fixed_point(f, z0, args, opts: SolverOptions, *, backward="implicit", backward_solver=None,
                         backward_tol=None, backward_max_iter=None, phantom_steps=5, phantom_damping=0.5,
                         batched=None, on_backward=None, what="implicit_fixed_point", trajectory=None,
                         correction_steps=1, correction_damping=1.0):
    """The one place every jax implicit layer solves: ``deq``, ``implicit_model`` and the public
    ``implicit_fixed_point``/``implicit_root`` call this function once per forward, with the
    cell ``f`` (called as ``f(z, *args)``), the start ``z0`` and the parameters ``args``; it
    returns the solution and the forward ``SolveInfo``.  The audit engine relies on this: it
    intercepts this function to recognise an implicit layer inside a traced program (keep the
    signature; extend it with keyword options only).
    """
    backward_solver = opts.method if backward_solver is None else backward_solver
    check_backward(backward, backward_solver, phantom_steps, phantom_damping)
    check_correction(correction_steps, correction_damping)
    steps = check_trajectory(trajectory, opts.max_iter)
    if _layer_hook.active():  # the audit engine is tracing: the layer is one node it understands
        return _layer_hook.route("implicit", f=f, z0=z0, args=tuple(args), opts=opts, backward=backward,
                                 batched=batched, backward_tol=backward_tol, framework="jax")
    pk = StatePacking(z0, batched)
    args = tuple(args)
    z0f = jax.lax.stop_gradient(pk.pack(z0, "z0"))

    def fmap(zf, *a):
        return pk.pack(f(pk.unpack(zf), *a))

    def corrected(info, call):
        if not steps:
            return info
        out = []
        for t in info.trajectory:
            s = jax.lax.stop_gradient(t)
            for _ in range(correction_steps):
                s = (1 - correction_damping) * s + correction_damping * call(s)
            out.append(pk.unpack(s))
        return dataclasses.replace(info, trajectory=tuple(out))

    if backward == "unroll":
        z, info = solve_flat(lambda z: fmap(z, *args), z0f, opts, unroll=True, trajectory=steps,
                             state_dtype=pk.state_dtype)
        finish(info, opts.on_failure, what)
        return pk.unpack(z), corrected(info, lambda s: fmap(s, *args))

    # Hoist arrays f closes over into explicit arguments so the custom rule can differentiate them.
    f_conv, consts = jax.closure_convert(fmap, z0f, *args)
    params = (tuple(consts), args)

    def call(z, prm):
        return f_conv(z, *prm[1], *prm[0])  # closure_convert appends the hoisted constants

    def forward_solve(prm, start):
        z, info = solve_flat(lambda z: call(z, prm), start, opts, trajectory=steps, state_dtype=pk.state_dtype)
        return jax.lax.stop_gradient(z), jax.lax.stop_gradient(info)

    if backward in ("jfb", "phantom"):
        z_star, info = forward_solve(jax.lax.stop_gradient(params), z0f)
        finish(info, opts.on_failure, what)
        info = corrected(info, lambda s: call(s, params))
        if backward == "jfb":
            return pk.unpack(call(z_star, params)), info
        z = z_star
        for _ in range(phantom_steps):
            z = (1 - phantom_damping) * z + phantom_damping * call(z, params)
        return pk.unpack(z), info

    bopts = _backward_options(opts, backward_solver, backward_tol, backward_max_iter)

    def linear_solve(J, b, what_solve, report):
        """``x = b + J x``, i.e. ``(I - J) x = b``, with ``J`` applied directly: iterating on
        ``x - (I - J) x`` instead would cancel to a floor of ``eps |x|`` in the residual."""
        if backward_solver == "gmres":
            x, binfo = _gmres(lambda v: v - J(v), b, bopts)
        else:
            x, binfo = solve_flat(lambda v: b + J(v), b, bopts)
        finish(binfo, bopts.on_failure, what_solve)
        if report and on_backward is not None:
            jax.debug.callback(lambda i: on_backward(i), binfo)
        return x

    # z0 is an explicit argument: under jit it is a tracer, which custom_jvp must not close over
    @jax.custom_jvp
    def layer(prm, start):
        return forward_solve(prm, start)

    @layer.defjvp
    def layer_jvp(primals, tangents):
        prm, start = primals
        dprm, _ = tangents
        z, info = layer(prm, start)  # through the layer again: outer derivatives use this rule too
        _, rhs = jax.jvp(lambda p: call(z, p), (prm,), (dprm,))
        # An exact 1 (tangent an exact 0) that carries every outer tangent: custom_linear_solve's
        # jvp rule binds a symbolic-zero right-hand side (and fails) when neither it nor the
        # matvec moves, which happens in second derivatives of maps affine in z; through the
        # matvec it now always moves.
        one = 1 + _exact_zero((z, prm))

        def matvec(v):  # (I - J) v
            return one * v - jax.jvp(lambda zz: call(zz, prm), (z,), (v,))[1]

        def tangent_solve(_, b):  # jax's own matvec is (I - J): its cancellation is avoided
            return linear_solve(lambda v: jax.jvp(lambda zz: call(zz, prm), (z,), (v,))[1], b,
                                "implicit tangent solve", False)

        def adjoint_solve(_, b):
            _, vjp_z = jax.vjp(lambda zz: call(zz, prm), z)
            return linear_solve(lambda v: vjp_z(v)[0], b, "implicit backward", True)

        dz = jax.lax.custom_linear_solve(matvec, rhs, solve=tangent_solve, transpose_solve=adjoint_solve)
        return (z, info), (dz, jax.tree_util.tree_map(_zero_tangent, info))

    z, info = layer(params, z0f)
    finish(info, opts.on_failure, what)
    return pk.unpack(z), corrected(info, lambda s: call(s, params))


def _exact_zero(tree):
    """0 in value and 0 in tangent, but a tangent that is an array rather than jax's symbolic
    zero whenever any float leaf of ``tree`` carries one."""
    total = 0.0
    for leaf in jax.tree_util.tree_leaves(tree):
        leaf = jnp.asarray(leaf)
        if jnp.issubdtype(leaf.dtype, jnp.inexact) and leaf.size:
            e = jnp.real(leaf.reshape(-1)[0])
            total = total + 0.0 * jnp.where(jnp.isfinite(e), e, 0.0)
    return total


def _gmres(matvec, b, bopts):
    """GMRES on the whole (flattened) system ``matvec(u) = b``; one residual for the batch."""
    rel = bopts.stop == "rel"
    u, _ = jax.scipy.sparse.linalg.gmres(matvec, b, x0=b, tol=bopts.tol if rel else 0.0,
                                         atol=0.0 if rel else bopts.tol,
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


def jacobian_regularization(f, z, args, *, key, n_samples=1, normalize=True, batched=None):
    """Hutchinson estimate of ``|df/dz|_F^2`` at ``z`` (see the public wrapper)."""
    if key is None:
        raise TypeError("jacobian_regularization with jax needs key=jax.random.key(seed) for its noise")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1; got {n_samples!r}")
    pk = StatePacking(z, batched, "z")
    zf = jax.lax.stop_gradient(pk.pack(z, "z"))
    fz, vjp_z = jax.vjp(lambda v: pk.pack(f(pk.unpack(v), *args)), zf)
    total = 0.0
    for k in jax.random.split(key, n_samples):
        eps = jax.random.normal(k, fz.shape, fz.dtype)
        (v,) = vjp_z(eps)
        total = total + jnp.sum(v * v, 1)
    est = total / n_samples
    if normalize:
        est = est / pk.n
    return jnp.mean(est)


def deq(f, *, state_shape=None, with_info: bool = False, method: str = "anderson", tol: float = 1e-6,
        max_iter: int = 100, m: int = 5, beta: float = 1.0, stop: str = "rel", atol: float = 0.0, memory=None,
        lam: float = 1e-8, on_failure: str = "warn", backward: str = "implicit", backward_solver=None,
        backward_tol=None, backward_max_iter=None, phantom_steps: int = 5, phantom_damping: float = 0.5,
        on_backward=None, solver=None, trajectory=None, correction_steps: int = 1, correction_damping: float = 1.0):
    """A deep equilibrium layer for jax: ``layer(params, x, z0=None)`` returns ``z*`` with ``z* = f(params, z*, x)``.

    ``x`` and ``z`` carry a leading batch dimension; each sample converges on its own
    residual.  ``z`` may be a pytree (``state_shape`` then a tuple of per-sample shapes, or pass
    ``z0``).  The layer is a pure function: it composes with ``jax.jit``, ``jax.vmap``,
    ``jax.grad``, ``jax.jacfwd`` and ``jax.hessian`` -- derivatives of every order follow the
    implicit function theorem (``backward="implicit"``).  With ``with_info=True`` it returns
    ``(z, SolveInfo)``: per-iteration residuals and, with ``trajectory=`` (iteration numbers or
    a count), the states at those iterations, each differentiable through ``correction_steps``
    damped steps of ``f`` (fixed-point correction).  ``on_backward`` is called (from the host)
    with the backward solve's ``SolveInfo``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from nonsmooth.implicit import deq
        >>> f = lambda p, z, x: jnp.tanh(z @ p["W"].T + x)
        >>> layer = deq(f, tol=1e-6)
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
    check_correction(correction_steps, correction_damping)
    check_trajectory(trajectory, max_iter)
    state_shape = check_state_shape(state_shape)
    if not callable(f):
        raise TypeError(f"f must be a callable (params, z, x) -> z; got {type(f).__name__}")

    @functools.wraps(f)
    def layer(params, x, z0=None):
        if not hasattr(x, "ndim") or x.ndim < 1 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty array with a leading batch dimension; got {getattr(x, 'shape', x)!r}")
        if z0 is None:
            dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
            if state_shape is None:
                z0 = jnp.zeros(x.shape, dtype)
            elif isinstance(state_shape[0], tuple):
                z0 = tuple(jnp.zeros((x.shape[0], *s), dtype) for s in state_shape)
            else:
                z0 = jnp.zeros((x.shape[0], *state_shape), dtype)
        # through the module attribute, so that the audit engine's interception sees layers too
        from . import _jax_implicit

        z, info = _jax_implicit.implicit_fixed_point(
            lambda z, p, xx: f(p, z, xx), z0, (params, x), opts, backward=backward,
            backward_solver=backward_solver, backward_tol=backward_tol, backward_max_iter=backward_max_iter,
            phantom_steps=phantom_steps, phantom_damping=phantom_damping, batched=True, on_backward=on_backward,
            what="deq", trajectory=trajectory, correction_steps=correction_steps,
            correction_damping=correction_damping)
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
