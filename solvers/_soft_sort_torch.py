"""Soft sort/rank for torch tensors: the ``nonsmooth::soft_sort_rank`` custom op.

The forward runs the NumPy kernel (one argsort + PAV) on the host and returns, next
to the values, the integer ``perm`` and ``block`` it found. The backward is written in
torch index ops (gather / scatter_add) from those integers and the saved input, so it
runs on the tensor's device and is itself differentiable (double backward; for KL the
block softmax is recomputed from ``x`` so second derivatives are exact too).
"""
from __future__ import annotations

import torch

from . import _soft_sort_core as _core

_OP = "nonsmooth::soft_sort_rank"


@torch.library.custom_op(_OP, mutates_args=())
def _soft_sort_rank(x: torch.Tensor, strength: float, regularization: str, rank: bool,
                    descending: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    host = x.detach()
    if host.device.type != "cpu":
        host = host.cpu()
    x2 = host.contiguous().numpy().reshape(-1, n)
    _core.check_scale(_core.check_finite_rows(x2), n, x2.dtype, op="rank" if rank else "sort",
                      strength=strength)
    out, perm, block = _core.forward_rows(
        x2, op="rank" if rank else "sort", regularization=regularization,
        strength=strength, descending=descending)
    results = []
    for a in (out, perm, block):
        t = torch.from_numpy(a).reshape(x.shape)
        results.append(t.to(x.device) if x.device.type != "cpu" else t)
    return tuple(results)


@_soft_sort_rank.register_fake
def _(x, strength, regularization, rank, descending):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape, dtype=torch.int64),
            x.new_empty(x.shape, dtype=torch.int64))


def _segsum_bcast(values: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    sums = torch.zeros_like(values).scatter_add(-1, block, values)
    return sums.gather(-1, block)


def _block_weights(x, perm, block, *, rank, regularization, strength, descending, dtype):
    if regularization == "l2":
        ones = torch.ones(block.shape, dtype=dtype, device=block.device)
        return 1.0 / _segsum_bcast(ones, block)
    a = _core.alpha("rank" if rank else "sort", strength, descending)
    u = x.gather(-1, perm) * a
    # u is sorted descending: each block's first entry is its max, so exp cannot overflow.
    e = torch.exp(u - u.gather(-1, block))
    return e / _segsum_bcast(e, block)


def _vjp(x, perm, block, g, *, strength, regularization, rank, descending):
    p = _block_weights(x, perm, block, rank=rank, regularization=regularization,
                       strength=strength, descending=descending, dtype=g.dtype)
    if rank:
        gs = g.gather(-1, perm)
        r = (gs - p * _segsum_bcast(gs, block)) * _core.alpha("rank", strength, descending)
    else:
        r = p * _segsum_bcast(g, block)
    return torch.zeros_like(r).scatter(-1, perm, r)


def _jvp(x, perm, block, t, *, strength, regularization, rank, descending):
    p = _block_weights(x, perm, block, rank=rank, regularization=regularization,
                       strength=strength, descending=descending, dtype=t.dtype)
    ts = t.gather(-1, perm)
    if not rank:
        return _segsum_bcast(p * ts, block)
    r = (ts - _segsum_bcast(p * ts, block)) * _core.alpha("rank", strength, descending)
    return torch.zeros_like(r).scatter(-1, perm, r)


def _setup_context(ctx, inputs, output):
    x, strength, regularization, rank, descending = inputs
    _, perm, block = output
    ctx.save_for_backward(x, perm, block)
    ctx.options = dict(strength=strength, regularization=regularization, rank=rank,
                       descending=descending)
    ctx.mark_non_differentiable(perm, block)


def _backward(ctx, grad_out, grad_perm, grad_block):
    x, perm, block = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0] and grad_out is not None:
        grad_x = _vjp(x, perm, block, grad_out, **ctx.options)
    return grad_x, None, None, None, None


_soft_sort_rank.register_autograd(_backward, setup_context=_setup_context)


@_soft_sort_rank.register_vmap
def _(info, in_dims, x, strength, regularization, rank, descending):
    # The op already works on any number of leading axes: put vmap's axis first.
    bdim = in_dims[0]
    if bdim is not None:
        x = x.movedim(bdim, 0)
    out = _soft_sort_rank(x, strength, regularization, rank, descending)
    dim = 0 if bdim is not None else None
    return out, (dim, dim, dim)


class _SoftSortRank(torch.autograd.Function):
    """The public entry: the op plus the same backward, as an ``autograd.Function``.

    ``register_autograd`` alone does not reach ``torch.func.grad``/``jacrev`` in torch
    2.13 (the generated Function lacks ``setup_context``, pytorch issues #168393 and
    #179652); this wrapper gives functorch the staticmethods it needs, a forward-mode
    rule, and an automatic vmap rule that defers to the op's own.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, strength, regularization, rank, descending):
        return _soft_sort_rank(x, strength, regularization, rank, descending)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, strength, regularization, rank, descending = inputs
        _, perm, block = output
        ctx.save_for_backward(x, perm, block)
        ctx.save_for_forward(x, perm, block)
        ctx.options = dict(strength=strength, regularization=regularization, rank=rank,
                           descending=descending)
        ctx.mark_non_differentiable(perm, block)

    @staticmethod
    def backward(ctx, grad_out, grad_perm, grad_block):
        x, perm, block = ctx.saved_tensors
        return _vjp(x, perm, block, grad_out, **ctx.options), None, None, None, None

    @staticmethod
    def jvp(ctx, x_t, *_):
        x, perm, block = ctx.saved_tensors
        return _jvp(x, perm, block, x_t, **ctx.options), None, None


_COMPUTE = {torch.float32: torch.float32, torch.float64: torch.float64,
            torch.float16: torch.float32, torch.bfloat16: torch.float32}


def soft_sort_rank_torch(x: torch.Tensor, *, op: str, fn: str, regularization: str,
                         strength: float, descending: bool) -> torch.Tensor:
    """Validated entry point behind :func:`nonsmooth.solvers.soft_sort` for tensors."""
    work = _COMPUTE.get(x.dtype)
    if work is None:
        raise TypeError(
            f"{fn} needs floating-point values, got a tensor of dtype {x.dtype}; convert "
            "first, e.g. values.to(torch.float32)")
    if x.ndim == 0:
        raise ValueError(f"{fn}: values must have at least one axis, got a 0-d tensor")
    if x.shape[-1] == 0:
        raise ValueError(f"{fn}: values must not be empty along the last axis, got shape "
                         f"{tuple(x.shape)}")
    xw = x.to(work) if work != x.dtype else x
    if torch.compiler.is_compiling():
        # Dynamo traces the op with its registered autograd; it rejects Functions
        # that define a forward-mode rule.
        out, _, _ = _soft_sort_rank(xw, strength, regularization, op == "rank", descending)
    else:
        out, _, _ = _SoftSortRank.apply(xw, strength, regularization, op == "rank",
                                        descending)
    return out.to(x.dtype) if work != x.dtype else out


__all__ = ["soft_sort_rank_torch"]
