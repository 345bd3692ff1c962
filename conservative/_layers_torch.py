"""torch side of the engine's layers: the ``nonsmooth_engine::layer`` operator and the
tracer's reading of it (see :mod:`._layers`).

The operator takes the layer's tensors and an integer handle of its spec; its kernel runs
the spec's float64 NumPy forward and returns the outputs in the inputs' float dtype (so the
engine's float64 evaluation gets float64).  It has a fake kernel (shapes) and no autograd:
only the engine's trace ever contains it.  The tracer also reads a direct call of the soft
sort operator ``nonsmooth::soft_sort_rank`` (the path ``torch.compile`` takes) as a layer.
"""
from __future__ import annotations

from typing import List

import numpy as np
import torch
import torch.utils._pytree as pytree

from nonsmooth import _layer_hook as hook

from . import _layers as L
from ._ir import Node

OP = "nonsmooth_engine.layer.default"
SOFT_SORT_OP = "nonsmooth.soft_sort_rank.default"
SOLVE_OP = "nonsmooth.solve.default"
OPS = (OP, SOFT_SORT_OP, SOLVE_OP)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _float_dtype(inputs):
    for t in inputs:
        if t.dtype in _FLOATS:
            return t.dtype
    return torch.float64


def _torch_dtype(name: str, inputs):
    return _float_dtype(inputs) if name == "float" else getattr(torch, name)


def _metas(inputs) -> list:
    return [(tuple(int(s) for s in t.shape), "float" if t.dtype in _FLOATS else str(t.dtype).replace("torch.", ""))
            for t in inputs]


@torch.library.custom_op("nonsmooth_engine::layer", mutates_args=())
def _layer(inputs: List[torch.Tensor], handle: int) -> List[torch.Tensor]:
    spec = L.lookup(handle)
    xs = [t.detach().cpu().to(torch.float64).numpy() if t.dtype in _FLOATS else t.detach().cpu().numpy()
          for t in inputs]
    with hook.suspended():
        outs = spec.forward(xs)
        metas = spec.out_meta(_metas(inputs))
    dev = inputs[0].device if inputs else torch.device("cpu")
    res = []
    for o, (_, dt) in zip(outs, metas):
        res.append(torch.from_numpy(np.array(o, copy=True)).to(device=dev, dtype=_torch_dtype(dt, inputs)))
    return res


@_layer.register_fake
def _(inputs, handle):
    spec = L.lookup(handle)
    dev = inputs[0].device if inputs else torch.device("cpu")
    with hook.suspended():  # a spec may call its solver for shapes: that call must not route
        metas = spec.out_meta(_metas(inputs))
    return [torch.empty(shape, dtype=_torch_dtype(dt, inputs), device=dev) for shape, dt in metas]


def _setup(ctx, inputs, output):
    ins, handle = inputs
    ctx.handle = handle
    ctx.save_for_backward(*ins)


def _backward(ctx, grads):
    """The engine differentiates its own float64 trace at smooth points (``smooth_jacobian``):
    the layer's Jacobian on the piece its own code takes."""
    ins = ctx.saved_tensors
    spec = L.lookup(ctx.handle)
    xs = [t.detach().cpu().to(torch.float64).numpy() if t.dtype in _FLOATS else t.detach().cpu().numpy() for t in ins]
    with hook.suspended():
        blocks = spec.jacobians(xs)
    out = []
    for i, t in enumerate(ins):
        if t.dtype not in _FLOATS:
            out.append(None)
            continue
        acc = torch.zeros(t.numel(), dtype=torch.float64)
        for g, row in zip(grads, blocks):
            if g is None or row is None or row[i] is None:
                continue
            acc = acc + torch.from_numpy(row[i]).T @ g.reshape(-1).to(torch.float64).cpu()
        out.append(acc.reshape(t.shape).to(dtype=t.dtype, device=t.device))
    return out, None


_layer.register_autograd(_backward, setup_context=_setup)


def _refuse_transforms(tensors):
    from torch._C._functorch import is_functorch_wrapped_tensor

    if any(isinstance(t, torch.Tensor) and is_functorch_wrapped_tensor(t) for t in tensors):
        # torch.func would differentiate the operator as zero (forward mode) or fail: the
        # engine's own tangents (_layers.apply) differentiate layer nodes instead
        raise RuntimeError("layer nodes are differentiated by the engine's tangent rules, not by torch.func")


def _eval_layer(inputs, handle):
    _refuse_transforms(inputs)
    return torch.ops.nonsmooth_engine.layer(inputs, handle)


def _eval_soft_sort(x, *args):
    _refuse_transforms([x])
    return torch.ops.nonsmooth.soft_sort_rank(x, *args)


def _eval_solve(x, *args):
    _refuse_transforms([x])
    return torch.ops.nonsmooth.solve(x, *args)


def bind(spec, handle: int, inputs: list) -> list:
    return list(torch.ops.nonsmooth_engine.layer(list(inputs), handle))


def _var_for(meta, next_id):
    from ._trace_torch import _var_for as var_for

    return var_for(meta, next_id)


def add_node(graph, n, env, next_id) -> None:
    """The fx node ``n`` (the layer operator, or the soft sort operator) as a layer node."""
    target = str(n.target)
    if target == OP:
        spec = L.lookup(n.args[1])
        ins = [env[a] for a in n.args[0]]
    elif target == SOLVE_OP:  # nonsmooth::solve(x, spec_id): a solver behind an operator (SPO+, compile)
        from nonsmooth.solvers import _torch_ops

        from ._layer_combinatorial import SolverSpec

        spec = SolverSpec(_torch_ops.lookup(n.args[1]).solver)
        spec.framework = "torch"
        ins = [env[n.args[0]]]
    else:  # nonsmooth::soft_sort_rank(x, strength, regularization, rank, descending)
        from ._layer_sort import SoftSortSpec

        x, strength, regularization, rank, descending = n.args[:5]
        spec = SoftSortSpec("rank" if rank else "sort", regularization, float(strength), bool(descending),
                            indices=True)
        ins = [env[x]]
    flat, tspec = pytree.tree_flatten((n.args, n.kwargs))
    slots = [i for i, a in enumerate(flat) if isinstance(a, torch.fx.Node)]
    metas = n.meta["val"]
    single = not isinstance(metas, (tuple, list))
    outs = tuple(_var_for(m, next_id) for m in ([metas] if single else metas))
    env[n] = outs[0] if single else outs
    node = Node(prim=f"layer:{spec.name}", inputs=tuple(ins), outputs=outs, params={"layer": spec},
                payload=({OP: _eval_layer, SOLVE_OP: _eval_solve}.get(target, _eval_soft_sort), flat, tspec, slots),
                rule=spec.rule,
                location=f"{n.name} = {spec.describe()}", origin=spec.name)
    graph.nodes.append(node)
    if spec.unsupported:
        graph.unsupported.append(spec.unsupported)
