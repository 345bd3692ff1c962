"""Batched fixed-point solvers for jax, written with ``lax`` loops so they run under ``jit``/``vmap``.

Same algorithms as the torch solvers (Picard, Anderson with a residual-scaled regularizer,
limited-memory Broyden), with fixed-size ring buffers for the histories.  ``unroll=True``
runs all ``max_iter`` steps in a ``lax.scan`` (converged samples frozen) so reverse mode can
differentiate through the iterations.

States may be any pytree of arrays (``StatePacking``); the solvers work on one ``(batch, n)``
array in a working dtype (the widest of the leaves', at least float32: bfloat16/float16
states are iterated in float32 while ``f`` still computes in the state's own dtype).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ._info import SolveInfo, handle_failure
from ._options import SolverOptions

jax.tree_util.register_dataclass(
    SolveInfo,
    data_fields=["converged", "steps", "residual", "rel_residual", "abs_residual", "history", "best_returned",
                 "nonfinite", "abs_history", "rel_history", "trajectory"],
    meta_fields=["method", "stop", "tol", "trajectory_steps", "state_dtype"],
)

_LOW = (jnp.bfloat16, jnp.float16)


def _check_leaf(z0, name):
    if not isinstance(z0, jax.Array):
        raise TypeError(f"{name} must be a jax.Array (or a pytree of them); got {type(z0).__name__}")
    if not jnp.issubdtype(z0.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype; got {z0.dtype}")
    if z0.size == 0:
        raise ValueError(f"{name} is empty (shape {z0.shape}); a fixed point needs at least one entry")
    # NumPy on concrete values: a jnp op here would be staged (and unreadable) inside a jit trace
    if not isinstance(z0, jax.core.Tracer) and not bool(np.isfinite(np.asarray(z0, dtype=np.float64)).all()):
        raise ValueError(f"{name} contains NaN/inf; start the solve from finite values")


class StatePacking:
    """A pytree of arrays <-> one ``(batch, n)`` array in the working dtype.

    Batched (``batched=None``: every leaf has ``ndim >= 2``): the leading axis indexes samples
    and must agree across leaves.  Unbatched: one row in all.
    """

    def __init__(self, z0, batched=None, name: str = "z0"):
        leaves, self.treedef = jax.tree_util.tree_flatten(z0)
        if not leaves:
            raise ValueError(f"{name} holds no arrays; give an array or a pytree of arrays")
        single = self.treedef.num_leaves == 1 and isinstance(z0, jax.Array)
        for i, leaf in enumerate(leaves):
            _check_leaf(leaf, name if single else f"{name} leaf {i}")
        if batched is None:
            batched = all(leaf.ndim >= 2 for leaf in leaves)
        if batched:
            if any(leaf.ndim < 1 for leaf in leaves) or len({leaf.shape[0] for leaf in leaves}) > 1:
                raise ValueError(f"{name}: batched states need one leading batch axis shared by every leaf; got "
                                 f"shapes {[leaf.shape for leaf in leaves]}")
        self.batched = bool(batched)
        self.batch = leaves[0].shape[0] if self.batched else 1
        self.shapes = [leaf.shape for leaf in leaves]
        self.dtypes = [leaf.dtype for leaf in leaves]
        self.sizes = [leaf.size // self.batch for leaf in leaves]
        work = jnp.result_type(*self.dtypes)
        self.dtype = jnp.dtype(jnp.float32) if work in _LOW else jnp.dtype(work)
        self.state_dtype = ",".join(sorted({jnp.dtype(d).name for d in self.dtypes}))
        self.name = name

    @property
    def n(self) -> int:
        return sum(self.sizes)

    def pack(self, z, what: str = "f"):
        leaves, treedef = jax.tree_util.tree_flatten(z)
        if treedef != self.treedef:
            raise TypeError(f"{what} must return the structure of {self.name} ({self.treedef}); got {treedef}")
        flat = []
        for leaf, shape in zip(leaves, self.shapes):
            if not hasattr(leaf, "shape") or tuple(leaf.shape) != tuple(shape):
                raise ValueError(f"{what} must return the shape of {self.name} {tuple(shape)}; got "
                                 f"{getattr(leaf, 'shape', type(leaf).__name__)}")
            flat.append(jnp.reshape(leaf, (self.batch, -1)).astype(self.dtype))
        return flat[0] if len(flat) == 1 else jnp.concatenate(flat, 1)

    def unpack(self, flat):
        cuts = np.cumsum(self.sizes)[:-1].tolist()
        parts = jnp.split(flat, cuts, axis=-1) if cuts else [flat]
        leaves = [p.reshape(shape).astype(dt) for p, shape, dt in zip(parts, self.shapes, self.dtypes)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def wrap(self, f):
        return lambda flat: self.pack(f(self.unpack(flat)))


def check_state(z0, name: str = "z0", batched=None) -> StatePacking:
    return StatePacking(z0, batched, name)


def solve(f, z0, opts: SolverOptions, *, batched=None, unroll: bool = False, trajectory: tuple = ()):
    """``z = f(z)`` on a pytree state; returns ``(z, SolveInfo)`` in the state's structure."""
    pk = StatePacking(z0, batched)
    z, info = solve_flat(pk.wrap(f), pk.pack(z0, "z0"), opts, unroll=unroll, trajectory=trajectory,
                         state_dtype=pk.state_dtype)
    if trajectory:
        info = dataclasses.replace(info, trajectory=tuple(pk.unpack(t) for t in info.trajectory))
    return pk.unpack(z), info


def solve_flat(fmap, z, opts: SolverOptions, *, unroll: bool = False, trajectory: tuple = (),
               state_dtype: str = ""):
    """Iterate ``z <- fmap(z)`` on ``(batch, n)`` arrays; returns ``(z, SolveInfo)``, never raises
    on failure (see ``finish``).  ``trajectory``: iteration numbers whose iterates are recorded."""
    dtype = z.dtype
    batch, n = z.shape
    tiny = jnp.finfo(dtype).tiny
    eps = float(jnp.finfo(dtype).eps)
    lam = max(opts.lam, 100 * eps)
    m = opts.m
    mem = opts.broyden_memory
    beta = opts.beta

    nan = jnp.full((batch,), jnp.nan, dtype)
    want = jnp.asarray(trajectory if trajectory else (0,), jnp.int32)
    method_state = {}
    if opts.method == "anderson":
        method_state = dict(dG=jnp.zeros((batch, m, n), dtype), dX=jnp.zeros((batch, m, n), dtype),
                            filled=jnp.zeros((m,), bool), zp=z, gp=z)
    elif opts.method == "broyden":
        method_state = dict(U=jnp.zeros((batch, mem, n), dtype), V=jnp.zeros((batch, mem, n), dtype),
                            zp=z, gp=z)
    state = dict(k=jnp.asarray(0, jnp.int32), z=z, active=jnp.ones((batch,), bool),
                 steps=jnp.zeros((batch,), jnp.int32), best_res=jnp.full((batch,), jnp.inf, dtype), best_z=z,
                 fin_res=nan, fin_abs=nan, fin_rel=nan, history=jnp.full((opts.max_iter, batch), jnp.nan, dtype),
                 abs_history=jnp.full((opts.max_iter, batch), jnp.nan, dtype),
                 rel_history=jnp.full((opts.max_iter, batch), jnp.nan, dtype),
                 traj=jnp.zeros((want.shape[0], batch, n), dtype), traj_set=jnp.zeros((want.shape[0],), bool),
                 nonfinite=jnp.asarray(False), ms=method_state)

    def apply_h(U, V, x):
        return -beta * x + jnp.einsum("bjn,bj->bn", U, jnp.einsum("bjn,bn->bj", V, x))

    def apply_ht(U, V, x):
        return -beta * x + jnp.einsum("bjn,bj->bn", V, jnp.einsum("bjn,bn->bj", U, x))

    def step(st):
        k, z, active = st["k"], st["z"], st["active"]
        fz = fmap(z)
        if getattr(fz, "shape", None) != z.shape:
            raise ValueError(f"f must return the shape of the state {z.shape}; got {getattr(fz, 'shape', fz)}")
        fz = fz.astype(dtype)
        finite_now = jnp.all(jnp.isfinite(fz))
        fz = jnp.where(jnp.isfinite(fz), fz, z)  # keep the arithmetic finite; the flag stops the loop
        g = fz - z
        absr = jnp.sqrt(jnp.sum(g * g, 1))
        rel = absr / (jnp.sqrt(jnp.sum(fz * fz, 1)) + tiny)
        res = rel if opts.stop == "rel" else absr
        fin_res = jnp.where(active, res, st["fin_res"])
        fin_abs = jnp.where(active, absr, st["fin_abs"])
        fin_rel = jnp.where(active, rel, st["fin_rel"])
        history = st["history"].at[k].set(fin_res)
        abs_history = st["abs_history"].at[k].set(fin_abs)
        rel_history = st["rel_history"].at[k].set(fin_rel)
        improved = active & (res < st["best_res"])
        best_res = jnp.where(improved, res, st["best_res"])
        best_z = jnp.where(improved[:, None], fz, st["best_z"])
        done = active & ((res <= opts.tol) | (absr <= opts.atol))
        steps = jnp.where(active, k + 1, st["steps"])
        new_active = active & ~done
        ms = dict(st["ms"])
        if opts.method == "picard":
            z_next = z + beta * g
        elif opts.method == "anderson":
            first = k == 0
            slot = jnp.mod(k - 1, m)
            dg_new = jnp.where(first, 0.0, g - ms["gp"])
            dx_new = jnp.where(first, 0.0, z - ms["zp"])
            dG = jnp.where(first, ms["dG"], ms["dG"].at[:, slot].set(dg_new))
            dX = jnp.where(first, ms["dX"], ms["dX"].at[:, slot].set(dx_new))
            filled = jnp.where(first, ms["filled"], ms["filled"].at[slot].set(True))
            gram = jnp.einsum("bin,bjn->bij", dG, dG)
            rhs = jnp.einsum("bin,bn->bi", dG, g)
            count = jnp.maximum(jnp.sum(filled), 1)
            scale = jnp.trace(gram, axis1=1, axis2=2) / count
            eye = jnp.eye(m, dtype=dtype)
            use = (active & (scale > 0))[:, None, None]
            # unused ring slots and frozen samples get an identity system (gamma = 0), which also
            # keeps reverse mode free of 0 * inf when unrolled
            gram = gram + (lam * scale + tiny)[:, None, None] * eye + jnp.diag(jnp.where(filled, 0.0, 1.0)).astype(dtype)
            gram = jnp.where(use, gram, eye)
            rhs = jnp.where(use[:, :, 0] & filled[None, :], rhs, 0.0)
            gamma = jnp.linalg.solve(gram, rhs[..., None])[..., 0]
            z_next = z + beta * g - jnp.einsum("bin,bi->bn", dX + beta * dG, gamma)
            ok = jnp.all(jnp.isfinite(z_next), 1, keepdims=True)
            z_next = jnp.where(ok, z_next, z + beta * g)
            ms.update(dG=dG, dX=dX, filled=filled, zp=z, gp=g)
        else:  # broyden
            first = k == 0
            s = z - ms["zp"]
            y = g - ms["gp"]
            U, V = ms["U"], ms["V"]
            hy = apply_h(U, V, y)
            denom = jnp.sum(s * hy, 1, keepdims=True)
            scale = jnp.sqrt(jnp.sum(s * s, 1, keepdims=True) * jnp.sum(hy * hy, 1, keepdims=True))
            ok = (jnp.abs(denom) > 1e-12 * scale + tiny) & ~first & active[:, None]
            u = jnp.where(ok, (s - hy) / jnp.where(ok, denom, 1.0), 0.0)
            v = jnp.where(ok, apply_ht(U, V, s), 0.0)
            slot = jnp.mod(jnp.maximum(k - 1, 0), mem)
            U = jnp.where(first, U, U.at[:, slot].set(u))
            V = jnp.where(first, V, V.at[:, slot].set(v))
            z_next = z - apply_h(U, V, g)
            okz = jnp.all(jnp.isfinite(z_next), 1, keepdims=True)
            z_next = jnp.where(okz, z_next, z + beta * g)
            ms.update(U=U, V=V, zp=z, gp=g)
        z_new = jnp.where(new_active[:, None], z_next, jnp.where(done[:, None], fz, z))
        stop_now = ~finite_now
        z_out = jnp.where(stop_now, z, z_new)
        hit = (want == k + 1) & ~stop_now & bool(trajectory)
        traj = jnp.where(hit[:, None, None], z_out[None], st["traj"])
        return dict(k=k + 1, z=z_out, active=jnp.where(stop_now, active, new_active),
                    steps=steps, best_res=best_res, best_z=best_z, fin_res=fin_res, fin_abs=fin_abs,
                    fin_rel=fin_rel, history=history, abs_history=abs_history, rel_history=rel_history,
                    traj=traj, traj_set=st["traj_set"] | hit, nonfinite=st["nonfinite"] | stop_now, ms=ms)

    if unroll:
        def body(st, _):
            go = jnp.any(st["active"]) & ~st["nonfinite"]
            new = step(st)
            return jax.tree_util.tree_map(lambda a, b: jnp.where(go, a, b), new, st), None

        state, _ = jax.lax.scan(body, state, None, length=opts.max_iter)
    else:
        state = jax.lax.while_loop(
            lambda st: (st["k"] < opts.max_iter) & jnp.any(st["active"]) & ~st["nonfinite"], step, state)
    active = state["active"]
    zf = jnp.where(active[:, None] & ~state["nonfinite"], state["best_z"], state["z"])
    traj = ()
    if trajectory:
        # iterations the solve never reached hold its final state
        full = jnp.where(state["traj_set"][:, None, None], state["traj"], zf[None])
        traj = tuple(full[i] for i in range(len(trajectory)))
    info = SolveInfo(method=opts.method, stop=opts.stop, tol=float(opts.tol), converged=~active,
                     steps=state["steps"], residual=state["fin_res"], rel_residual=state["fin_rel"],
                     abs_residual=state["fin_abs"], history=state["history"],
                     best_returned=active & ~state["nonfinite"], nonfinite=state["nonfinite"],
                     abs_history=state["abs_history"], rel_history=state["rel_history"], trajectory=traj,
                     trajectory_steps=tuple(trajectory), state_dtype=state_dtype)
    return zf, info


def _host_policy(on_failure, what, method, stop, tol, state_dtype=""):
    def callback(converged, steps, residual, rel, absr, nonfinite):
        info = SolveInfo(method=method, stop=stop, tol=tol, converged=np.asarray(converged),
                         steps=np.asarray(steps), residual=np.asarray(residual), rel_residual=np.asarray(rel),
                         abs_residual=np.asarray(absr), history=np.zeros((0,) + np.shape(converged)),
                         best_returned=~np.asarray(converged), nonfinite=bool(np.asarray(nonfinite).any()),
                         state_dtype=state_dtype)
        finish_concrete(info, on_failure, what)

    return callback


def finish_concrete(info: SolveInfo, on_failure: str, what: str) -> None:
    if bool(np.asarray(info.nonfinite).any()):
        raise FloatingPointError(
            f"{what}: f returned NaN/inf; the solve stopped at the last finite iterate. The iteration is "
            "diverging or f is undefined there: lower beta (damping), use method='picard', or check that "
            f"the map is a contraction.\n{info.explain()}")
    handle_failure(info, on_failure, what)


def finish(info: SolveInfo, on_failure: str, what: str) -> None:
    """Apply the failure policy now (concrete values) or from a host callback (under jit/vmap,
    and under eager ``jax.grad``, where the statistics are tracers too)."""
    fields = (info.converged, info.steps, info.residual, info.rel_residual, info.abs_residual, info.nonfinite)
    if any(isinstance(a, jax.core.Tracer) for a in fields):
        cb = _host_policy(on_failure, what, info.method, info.stop, info.tol, info.state_dtype)
        jax.debug.callback(cb, *(jax.lax.stop_gradient(a) for a in fields))
    else:
        finish_concrete(info, on_failure, what)
