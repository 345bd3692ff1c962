"""torch custom operators that run user and built-in solvers out of sight of torch.compile
and torch.func.

A solver is arbitrary Python: NumPy and SciPy calls, data-dependent loops, host round
trips.  Dynamo cannot trace that (``fullgraph=True`` fails) and functorch cannot batch it,
so every layer calls its solver through an opaque operator registered here:

- ``nonsmooth::solve(x, id) -> y`` with y of x's shape (identity/blackbox backward, SPO+);
- the perturbed layers register their own sampling operator in ``_perturbed_torch``.

Contract: a layer's framework-free spec is registered under an integer id (the operators
take the id, since an operator cannot take a Python callable); the id lives as long as the
spec.  Operators come with fake kernels (shapes for torch.compile) and vmap rules (the
solvers take leading batch axes, so a vmapped call is one call on a larger batch).
Depends on ``_combinatorial_common`` only.
"""
from __future__ import annotations

import itertools
import threading
import weakref

import numpy as np
import torch

from ._combinatorial_common import (decide_batched_outputs, running_eagerly, solver_name,
                                    validated_inputs)

_LOCK = threading.Lock()
_IDS = itertools.count(1)
_ID_OF: "weakref.WeakKeyDictionary[object, int]" = weakref.WeakKeyDictionary()
_OBJECT_OF: dict[int, "weakref.ref"] = {}


def _forget(i: int) -> None:
    _OBJECT_OF.pop(i, None)


@torch.compiler.assume_constant_result
def id_of(obj) -> int:
    """The operator id of a layer spec (assigned on first use, dropped with the spec).

    Under torch.compile the id is a constant of the graph, so a compiled function that
    closes over a layer is specialised to it, as it would be to any other module.
    """
    with _LOCK:
        i = _ID_OF.get(obj)
        if i is None:
            i = next(_IDS)
            _ID_OF[obj] = i
            _OBJECT_OF[i] = weakref.ref(obj)
            weakref.finalize(obj, _forget, i)
        return i


def lookup(i: int):
    ref = _OBJECT_OF.get(i)
    obj = ref() if ref is not None else None
    if obj is None:
        raise RuntimeError(f"nonsmooth layer #{i} no longer exists (it was garbage-collected "
                           "while a compiled graph still refers to it); keep the layer alive")
    return obj


def to_numpy(t) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def probe_batched(solver, event_shape: tuple, dtype, device) -> bool:
    """Decide once whether a user solver takes leading batch axes (see decide_batched)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((3,) + tuple(event_shape), generator=gen, dtype=torch.float64)
    x = x.to(dtype=dtype, device=device)

    def attempt(arg):
        try:
            with validated_inputs(), running_eagerly():
                out = solver(arg)
            return to_numpy(out) if isinstance(out, torch.Tensor) else None
        except Exception:  # noqa: BLE001 - any failure means "not this calling convention"
            return None

    return decide_batched_outputs(attempt(x), [attempt(x[j]) for j in range(3)])


def call_solver(solver, x: torch.Tensor, event_ndim: int, batched: bool):
    """solver on x with leading batch axes; a per-instance solver is batched with
    torch.func.vmap, or, when vmap cannot trace it (NumPy, SciPy, a MIP solver, Python
    branches on values), called once per instance in a Python loop."""
    if batched:
        return solver(x)
    lead = x.shape[: x.ndim - event_ndim]
    flat = x.reshape((-1,) + tuple(x.shape[x.ndim - event_ndim:]))
    try:
        out = torch.func.vmap(solver)(flat)
    except Exception:  # noqa: BLE001 - not vmappable: loop (a real solver error re-raises)
        rows = [solver(row) for row in flat]
        if not all(isinstance(r, torch.Tensor) for r in rows):
            raise TypeError(f"{solver_name(solver)} must return torch tensors") from None
        out = torch.stack(rows) if rows else flat.new_empty((0,) + tuple(flat.shape[1:]))
    return out.reshape(tuple(lead) + tuple(out.shape[1:]))


# ----------------------------------------------------------------------------- solve(x) -> y


class SolveSpec:
    """What ``nonsmooth::solve`` needs: the solver, its event rank and calling convention
    (the surrogate and SPO+ specs have the same attributes)."""

    def __init__(self, solver, event_ndim: int, batched):
        self.solver, self.event_ndim, self.batched = solver, event_ndim, batched
        self.cache: dict = {}


_BUILTIN: dict = {}


@torch.compiler.assume_constant_result
def builtin_id(solver) -> int:
    """The operator id of a built-in solver (its SolveSpec lives as long as the process),
    for calls under torch.compile: evaluated at trace time, a constant of the graph."""
    spec = _BUILTIN.get(solver)
    if spec is None:
        spec = _BUILTIN[solver] = SolveSpec(solver, solver.event_ndim, True)
    return id_of(spec)


def resolve(spec, x) -> bool:
    """spec.batched, or probed once per (event shape, dtype, device type)."""
    if spec.batched is not None:
        return spec.batched
    event = tuple(x.shape[x.ndim - spec.event_ndim:])
    key = ("torch", event, x.dtype, x.device.type)
    if key not in spec.cache:
        spec.cache[key] = probe_batched(spec.solver, event, x.dtype, x.device)
    return spec.cache[key]


def solve_compiled(solver, x: torch.Tensor) -> torch.Tensor:
    """A built-in solver as an opaque operator (used when torch.compile traces it)."""
    return torch.ops.nonsmooth.solve(x, builtin_id(solver))


@torch.library.custom_op("nonsmooth::solve", mutates_args=())
def solve(x: torch.Tensor, spec_id: int) -> torch.Tensor:
    """y = solver(x), same shape as x, in x's dtype (the solver sees no autograd history)."""
    spec = lookup(spec_id)
    check_finite(x, "the solver's input")
    with validated_inputs(), running_eagerly():
        y = call_solver(spec.solver, x, spec.event_ndim, resolve(spec, x))
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"the solver returned {type(y).__name__} for a torch input; "
                        "it must return a torch tensor")
    if tuple(y.shape) != tuple(x.shape):
        raise ValueError(f"the solver returned shape {tuple(y.shape)}, but its output must have "
                         f"its input's shape {tuple(x.shape)} here (costs and solutions live "
                         f"in the same space)")
    return y.to(x.dtype).contiguous().clone() if y.data_ptr() == x.data_ptr() else \
        y.to(x.dtype).contiguous()


@solve.register_fake
def _solve_fake(x, spec_id):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _solve_vmap(info, in_dims, x, spec_id):
    # The solvers take leading batch axes: a vmapped call is one larger batched call.
    if in_dims[0] is None:
        return solve(x, spec_id), None
    return solve(x.movedim(in_dims[0], 0).contiguous(), spec_id), 0


torch.library.register_vmap("nonsmooth::solve", _solve_vmap)


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise on NaN/inf (called inside operators, where values are always concrete)."""
    if x.numel() and not bool(torch.isfinite(x).all()):
        a = to_numpy(x).reshape(-1)
        idx = int(np.flatnonzero(~np.isfinite(a))[0])
        raise ValueError(f"{name} contains a non-finite value ({a[idx]!r} at flat index {idx}); "
                         "the solvers need finite inputs")
