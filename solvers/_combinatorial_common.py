"""Framework detection, input checks and solver metadata shared by every solver layer.

Contract: nothing here imports torch or jax (a framework is recognised only when its
module is already loaded, which it must be if the user handed us one of its arrays), and
nothing here imports another module of ``nonsmooth.solvers``: the solvers, the perturbed,
surrogate and SPO+ layers and their framework adapters all depend on this module, never
on each other's dispatchers.
"""
from __future__ import annotations

import contextlib
import sys
import threading

import numpy as np

from nonsmooth import _layer_hook
from nonsmooth._frameworks import array_framework

_STATE = threading.local()


@contextlib.contextmanager
def validated_inputs():
    """Within this block solvers skip the finiteness scan of their input.

    The perturbed layers use it around their stacked solver call: theta was checked
    once, and theta + sigma Z is finite by construction, so scanning the N-times larger
    array again would only cost time.
    """
    previous = getattr(_STATE, "trusted", False)
    _STATE.trusted = True
    try:
        yield
    finally:
        _STATE.trusted = previous

@contextlib.contextmanager
def running_eagerly():
    """Marks code that runs on concrete tensors although torch.compile may be tracing
    around it: the bodies of the custom operators (and the probes of their fake kernels).
    Built-in solvers called there must not route themselves through an operator again."""
    previous = getattr(_STATE, "eager", False)
    _STATE.eager = True
    try:
        yield
    finally:
        _STATE.eager = previous


def torch_compiling() -> bool:
    """torch.compile is tracing this code (False inside ``running_eagerly``)."""
    torch = sys.modules.get("torch")
    if torch is None or getattr(_STATE, "eager", False):
        return False
    return torch.compiler.is_compiling()


SENSES = ("max", "min")

# The 8 king moves on a grid, as (row offset, column offset) of the neighbour; shared by
# the numpy/torch and the jax vertex-cost shortest path.
GRID_SHIFTS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def framework_of(x) -> str:
    """"torch", "jax" or "numpy" for an array; TypeError for anything else."""
    framework = array_framework(x)
    if framework in ("torch", "jax") or isinstance(x, np.ndarray):
        return framework
    raise TypeError(
        f"expected a torch tensor, a jax array or a numpy array, got {type(x).__name__}; "
        "convert the input with torch.as_tensor / jnp.asarray / np.asarray first"
    )


def is_tracer(x) -> bool:
    """True for a jax value under jit/vmap/grad (its contents are not known yet)."""
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(x, jax.core.Tracer)


def is_symbolic(x) -> bool:
    """True when x's values cannot be read here: a jax tracer, a tensor being traced by
    torch.compile, or a tensor batched by torch.func.vmap (a data-dependent ``bool`` on
    those raises, so checks on values are skipped or done later by the caller)."""
    if is_tracer(x):
        return True
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(x, torch.Tensor):
        return False
    if _layer_hook.active():  # the audit engine's trace (its own float64 run checks values)
        return True
    if torch_compiling():
        return True
    functorch = getattr(torch._C, "_functorch", None)
    if functorch is None:
        return False
    # A vmapped tensor can sit under grad wrappers; unwrap to see whether any level batches.
    try:
        level_tensor = x
        while functorch.is_functorch_wrapped_tensor(level_tensor):
            if functorch.is_batchedtensor(level_tensor):
                return True
            level_tensor = functorch.get_unwrapped(level_tensor)
    except (AttributeError, RuntimeError):
        return False
    return False


def check_array(x, name: str, *, event_ndim: int, floating: bool = True,
                finite: bool = True) -> str:
    """Validate dtype, rank and (when concrete and ``finite``) finiteness; return the
    framework name."""
    fw = framework_of(x)
    if x.ndim < event_ndim:
        raise ValueError(
            f"{name} must have at least {event_ndim} dimension(s) (leading batch axes then "
            f"{event_ndim} event axes), got shape {tuple(x.shape)}"
        )
    event_shape = tuple(x.shape[x.ndim - event_ndim:])
    if any(s == 0 for s in event_shape):
        raise ValueError(f"{name} has an empty event shape {event_shape} (shape {tuple(x.shape)})")
    if floating and not _is_floating(x, fw):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if finite and _size(x) > 0 and not getattr(_STATE, "trusted", False) \
            and not is_symbolic(x):
        finite = _all_finite(x, fw)
        if not finite:
            bad = _first_bad(x, fw)
            raise ValueError(
                f"{name} contains a non-finite value ({bad}); the solvers need finite inputs"
            )
    return fw


def check_sense(sense) -> str:
    if sense not in SENSES:
        raise ValueError(f"sense must be 'max' or 'min', got {sense!r}")
    return sense


def _size(x) -> int:
    n = 1
    for s in x.shape:
        n *= int(s)
    return n


def _is_floating(x, fw) -> bool:
    if fw == "torch":
        return x.is_floating_point()
    if fw == "jax":
        import jax.numpy as jnp

        return bool(jnp.issubdtype(x.dtype, jnp.floating))
    return np.issubdtype(x.dtype, np.floating)


def _all_finite(x, fw) -> bool:
    if fw == "torch":
        import torch

        if not x.is_floating_point():
            return True
        return bool(torch.isfinite(x).all())
    if fw == "jax":
        import jax
        import jax.numpy as jnp

        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return True
        # A concrete array closed over by a jitted function: evaluate now, not in the trace.
        with jax.ensure_compile_time_eval():
            return bool(jnp.isfinite(x).all())
    if not np.issubdtype(x.dtype, np.inexact):
        return True
    return bool(np.isfinite(x).all())


def _first_bad(x, fw):
    a = np.asarray(x.detach().cpu() if fw == "torch" else x, dtype=np.float64).reshape(-1)
    idx = int(np.flatnonzero(~np.isfinite(a))[0])
    return f"{a[idx]!r} at flat index {idx}"


def check_batched(batched):
    if batched is not None and not isinstance(batched, bool):
        raise TypeError(f"batched must be None (detect), True or False, got {batched!r}")
    return batched


def solver_name(solver) -> str:
    return getattr(solver, "__name__", None) or type(solver).__name__


def solver_info(solver, *, event_ndim=None, sense=None) -> tuple[int, str]:
    """Event rank of a solver's input and whether it maximizes or minimizes.

    Solvers from this package carry ``event_ndim`` and ``sense`` attributes; for any
    other callable the defaults are one event axis and maximization.
    """
    if not callable(solver):
        raise TypeError(f"solver must be callable, got {type(solver).__name__}")
    nd = event_ndim if event_ndim is not None else getattr(solver, "event_ndim", 1)
    if not isinstance(nd, int) or isinstance(nd, bool) or nd < 1:
        raise ValueError(f"event_ndim must be an int >= 1, got {nd!r}")
    s = sense if sense is not None else getattr(solver, "sense", "max")
    return nd, check_sense(s)


def decide_batched_outputs(stacked, each) -> bool:
    """Is a user solver batched, judged from its outputs on a few stacked instances and on
    each instance alone (NumPy arrays, or None where the call raised)?

    A batched solver maps (k, *event) to (k, *out) row by row.  jaxopt's documented
    ``lambda x: one_hot(argmax(x), x.shape[0])`` does not: on a stack it takes the argmax
    of the flattened stack, which once made a silent scalar.
    """
    if any(e is None for e in each):
        return True        # cannot solve a lone instance: it must want the batch axis
    if stacked is None:
        return False       # only lone instances work
    if stacked.shape != (len(each),) + each[0].shape:
        return False
    return all(np.allclose(stacked[j], e, equal_nan=True) for j, e in enumerate(each))
