"""Fused perturbed kernels for the built-in solvers: NumPy, torch and jax entry points.

Contract.  For a :class:`~nonsmooth.solvers._perturbed.PerturbedLayer` whose solver is
one of ``argmax_onehot``, ``topk_mask(k)``, ``hard_rank`` or ``sort_permutation`` (one
event axis), :func:`fused_call` returns what the general stacked path would return --
the same estimator, the same tie rules -- computed without ever materialising the
(N, *theta.shape) noise: the C kernel (``_perturb_c``, CPU) or the Triton kernels
(``_triton_perturb``, CUDA) regenerate every sample from a counter-based generator
keyed by (key, sample, row, column), in the forward and again in the backward.  Extra
memory is O(B d) (O(B d^2) for ``sort_permutation``, whose output is that large)
whatever ``num_samples``.  Any other case returns ``NotImplemented`` and the caller
takes the stacked path.

Keys.  Every kernel takes a 64-bit Philox key; the same key gives the same samples in
NumPy, torch and jax, on CPU (C) and on GPU (Triton), bit for bit in the generator's
integers and -- with the same float operations -- in the samples.  Layers derive the key
as follows: NumPy, the layer's ``seed``; jax, the two 32-bit words of the PRNG key
(``jax.random.PRNGKey(seed)`` gives ``seed`` itself, so NumPy and jax agree); torch, one
62-bit draw from the layer's or the caller's ``torch.Generator`` per call, so each call
draws fresh noise and a generator in the same state replays it.

:func:`noise` returns the samples a key gives, as arrays, so that tests can feed the
general stacked path exactly the fused kernel's samples.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import threading

import numpy as np

try:  # the compiled kernel; without it every layer keeps the stacked path
    from nonsmooth.solvers import _perturb_c as _ext
except ImportError:  # pragma: no cover - installs without a compiler
    _ext = None

NOISE_CODE = {"gumbel": 0, "normal": 1}
SOLVER_CODE = {"argmax": 0, "topk": 1, "rank": 2, "sortperm": 3}
_MODE_FWD, _MODE_VJP, _MODE_JVP = 0, 1, 2
_KEY_MASK = (1 << 64) - 1
_state = threading.local()


def available() -> bool:
    """True when the compiled fused kernel is loaded."""
    return _ext is not None


@contextlib.contextmanager
def disabled():
    """Within this block layers take the general stacked path (benchmarks compare both).

    Example:
        >>> with disabled():
        ...     pass
    """
    previous = getattr(_state, "off", False)
    _state.off = True
    try:
        yield
    finally:
        _state.off = previous


@dataclasses.dataclass(frozen=True)
class Spec:
    """What the kernels need to know about a layer (hashable: it keys jax's rule caches)."""

    solver: str
    k: int
    num_samples: int
    sigma: float
    noise: str
    control_variate: bool
    output: str

    def out_event(self, d: int) -> tuple:
        return (d, d) if self.solver == "sortperm" else (d,)


def solver_spec(solver):
    """("argmax" | "topk" | "rank" | "sortperm", k) for a built-in solver, else None."""
    from ._combinatorial import TopK, argmax_onehot, hard_rank, sort_permutation

    if solver is argmax_onehot:
        return "argmax", 1
    if solver is hard_rank:
        return "rank", 0
    if solver is sort_permutation:
        return "sortperm", 0
    if type(solver) is TopK:
        return "topk", solver.k
    return None


def layer_spec(layer, d: int):
    """The :class:`Spec` of a layer when a fused kernel applies to it, else None."""
    if _ext is None or getattr(_state, "off", False) or layer.event_ndim != 1:
        return None
    if not isinstance(layer.noise, str) or layer.noise not in NOISE_CODE:
        return None  # a noise object: the general path samples it
    found = solver_spec(layer.solver)
    if found is None:
        return None
    name, k = found
    if name == "topk" and k > d:
        return None  # the solver itself raises the clear error
    if name == "sortperm" and layer.output == "value":
        return None  # the general path explains why this is not defined
    return Spec(name, k, layer.num_samples, layer.sigma, layer.noise, layer.control_variate,
                layer.output)


# ----------------------------------------------------------------------------- NumPy core


def _threads(requested: int | None, work: float) -> int:
    if requested is None:
        try:
            requested = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            requested = os.cpu_count() or 1
    # a thread for less than ~2^18 element-samples costs more than it saves
    return int(max(1, min(requested, work // (1 << 18))))


def _raise_status(status: int, theta2: np.ndarray, sigma: float) -> None:
    if status == 1:
        flat = theta2.reshape(-1)
        idx = int(np.flatnonzero(~np.isfinite(flat))[0])
        raise ValueError(f"theta contains a non-finite value ({float(flat[idx])!r} at flat index "
                         f"{idx}); the solvers need finite inputs")
    if status == 2:
        raise ValueError(
            f"theta + sigma * Z overflows {theta2.dtype} (max |theta| = "
            f"{float(np.abs(theta2).max())!r}, sigma = {sigma!r}, |Z| up to 24); rescale "
            "theta or sigma")
    raise RuntimeError(f"fused kernel status {status}")  # pragma: no cover


def _call(mode, theta2, aux, out, value, key, spec: Spec, n_threads):
    work = theta2.shape[0] * theta2.shape[1] * spec.num_samples * (
        1 if aux is None else aux.shape[0])
    status = _ext.run(mode, theta2, aux, out, value, int(key) & _KEY_MASK, spec.num_samples,
                      spec.sigma, NOISE_CODE[spec.noise], SOLVER_CODE[spec.solver], spec.k,
                      spec.control_variate, _threads(n_threads, work))
    if status:
        _raise_status(status, theta2, spec.sigma)


def _rows(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1, a.shape[-1])


def forward_numpy(theta: np.ndarray, key: int, spec: Spec, *, want_mean=True, want_value=True,
                  n_threads=None):
    """(mean, value) of the perturbed solver on theta (*batch, d); either may be None."""
    theta2 = _rows(theta)
    B, d = theta2.shape
    batch = theta.shape[:-1]
    event = spec.out_event(d)
    mean = np.empty((B, math.prod(event)), theta2.dtype) if want_mean else None
    value = np.empty((B,), theta2.dtype) if want_value and spec.solver != "sortperm" else None
    _call(_MODE_FWD, theta2, None, mean, value, key, spec, n_threads)
    return (None if mean is None else mean.reshape(batch + event),
            None if value is None else value.reshape(batch))


def vjp_numpy(theta: np.ndarray, g: np.ndarray, key: int, spec: Spec, *, n_threads=None):
    """J^T g for cotangents g of shape (*M, *batch, *out_event); result (*M, *batch, d)."""
    theta2 = _rows(theta)
    B, d = theta2.shape
    L = math.prod(spec.out_event(d))
    lead = g.shape[: g.ndim - theta.ndim - (1 if spec.solver == "sortperm" else 0)]
    # explicit sizes, not -1: an empty batch must reshape too
    g3 = np.ascontiguousarray(g, dtype=theta2.dtype).reshape(math.prod(lead), B, L)
    out = np.empty((g3.shape[0], B, d), theta2.dtype)
    _call(_MODE_VJP, theta2, g3, out, None, key, spec, n_threads)
    return out.reshape(lead + theta.shape)


def jvp_numpy(theta: np.ndarray, v: np.ndarray, key: int, spec: Spec, *, n_threads=None):
    """J v for tangents v of shape (*M, *batch, d); result (*M, *batch, *out_event)."""
    theta2 = _rows(theta)
    B, d = theta2.shape
    event = spec.out_event(d)
    lead = v.shape[: v.ndim - theta.ndim]
    v3 = np.ascontiguousarray(v, dtype=theta2.dtype).reshape(math.prod(lead), B, d)
    out = np.empty((v3.shape[0], B, math.prod(event)), theta2.dtype)
    _call(_MODE_JVP, theta2, v3, out, None, key, spec, n_threads)
    return out.reshape(lead + theta.shape[:-1] + event)


def noise(key: int, num_samples: int, shape, *, noise: str = "gumbel", dtype=np.float64):
    """The samples the fused kernels draw for ``key``: ``(Z, E)`` of shape
    (num_samples, *shape), rows = the flattened leading axes of ``shape``; ``E = -log U``
    for Gumbel noise (``Z = -log E``, score ``1 - E``), ``None`` for normal noise.

    Example:
        >>> Z, E = noise(0, 3, (2, 5))
        >>> Z.shape, bool(np.allclose(Z, -np.log(E)))
        ((3, 2, 5), True)
    """
    if _ext is None:
        raise RuntimeError("the fused C kernel is not built")
    shape = tuple(int(s) for s in shape)
    d = shape[-1] if shape else 1
    rows = math.prod(shape[:-1])
    Z = np.empty((num_samples, rows, d), dtype)
    E = np.empty_like(Z) if noise == "gumbel" else None
    _ext.noise(Z, E, int(key) & _KEY_MASK, NOISE_CODE[noise])
    out_shape = (num_samples,) + shape
    return Z.reshape(out_shape), None if E is None else E.reshape(out_shape)


# ----------------------------------------------------------------------------- dispatch


def triton_ready(device_type: str) -> bool:
    """True when the Triton kernels can run on this device type (CUDA with triton
    installed, or any device under ``TRITON_INTERPRET=1``); imports nothing."""
    import importlib.util

    if getattr(_state, "off", False) or importlib.util.find_spec("triton") is None:
        return False
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def device_soft_forward(x, strength: float, regularization: str, rank: bool,
                        descending: bool):
    """Soft sort/rank of a CUDA tensor on its device: ``(out, perm, block)``, or
    ``NotImplemented`` (KL, or no triton: the host path)."""
    if regularization != "l2" or not triton_ready(x.device.type):
        return NotImplemented
    from ._triton_pav import soft_forward_l2

    return soft_forward_l2(x, rank=rank, strength=strength, descending=descending)


def fused_call(layer, theta, fw: str, *, key=None, generator=None):
    """The layer's output through a fused kernel, or ``NotImplemented``.

    ``fw`` is theta's framework ("numpy", "torch" or "jax"), already validated by the
    layer (finite values, floating dtype, event rank).
    """
    if _ext is None or getattr(_state, "off", False) or theta.ndim < 1:
        return NotImplemented
    spec = layer_spec(layer, int(theta.shape[-1]))
    if spec is None:
        return NotImplemented
    if fw == "numpy":
        if theta.dtype not in (np.float32, np.float64) or not theta.dtype.isnative:
            return NotImplemented
        mean, value = forward_numpy(theta, layer.seed, spec, want_mean=spec.output == "mean",
                                    want_value=spec.output == "value")
        return mean if spec.output == "mean" else value
    if fw == "torch":
        from ._fused_torch import fused_torch

        if generator is None:
            return NotImplemented  # the layer passes a generator for its own stream
        return fused_torch(spec, theta, generator)
    if fw == "jax":
        from ._fused_jax import fused_jax

        return fused_jax(spec, theta, key, layer.seed)
    return NotImplemented


__all__ = ["available", "device_soft_forward", "disabled", "forward_numpy", "fused_call",
           "jvp_numpy", "noise", "solver_spec", "triton_ready", "vjp_numpy"]
