"""Soft sort/rank for torch tensors: the ``nonsmooth::soft_sort_rank`` custom op.

The forward runs the host kernel (the fused C sort + PAV, or the NumPy pipeline
without the build) and returns, next to the values, the integer ``perm`` and ``block``
it found. Plain contiguous CPU float32/float64 tensors in eager mode take a lean path
(:class:`_SoftSortRankCPU`, or no autograd at all when there is nothing to
differentiate): one C call per forward and one per backward on the tensors' memory.
Two further backward paths use the integers and the saved input:

* a first-order backward on CPU (``create_graph=False``, the training case) is a second
  op, ``nonsmooth::soft_sort_rank_backward``, run on the host in O(n) per row;
* on other devices, or when the graph of the backward is needed (double backward,
  ``torch.func``), the backward is written in torch index ops (gather / scatter_add), so
  it runs on the device and is itself differentiable (for KL the block softmax is
  recomputed from ``x``, so second derivatives are exact too).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.autograd.forward_ad as _forward_ad

from nonsmooth import _layer_hook

from . import _soft_sort_core as _core

_OP = "nonsmooth::soft_sort_rank"
_OP_BACKWARD = "nonsmooth::soft_sort_rank_backward"


def _host_rows(t: torch.Tensor):
    host = t.detach()
    if host.device.type != "cpu":
        host = host.cpu()
    return host.contiguous().numpy().reshape(-1, t.shape[-1])


def _to_device(array, like: torch.Tensor) -> torch.Tensor:
    t = torch.from_numpy(array)
    if t.shape != like.shape:
        t = t.reshape(like.shape)
    return t.to(like.device) if like.device.type != "cpu" else t


def _forward_host(x, strength, regularization, rank, descending):
    """The host forward; returns (out, perm, block) tensors on ``x``'s device."""
    if x.device.type == "cuda":  # issue 16: L2 stays on the device (Triton PAV)
        from ._fused import device_soft_forward

        res = device_soft_forward(x, strength, regularization, rank, descending)
        if res is not NotImplemented:
            return res
    x2 = _host_rows(x)
    op = "rank" if rank else "sort"
    if x.device.type == "cpu" and _core._fusable(x2):
        # The C kernel writes straight into the tensors' memory: no copies.
        out = torch.empty(x.shape, dtype=x.dtype)
        perm = torch.empty(x.shape, dtype=torch.int64)
        block = torch.empty(x.shape, dtype=torch.int64)
        _core.forward_checked(x2, op=op, regularization=regularization, strength=strength,
                              descending=descending, out=out.numpy().reshape(x2.shape),
                              perm=perm.numpy().reshape(x2.shape),
                              block=block.numpy().reshape(x2.shape))
        return out, perm, block
    out, perm, block = _core.forward_checked(x2, op=op, regularization=regularization,
                                             strength=strength, descending=descending)
    return _to_device(out, x), _to_device(perm, x), _to_device(block, x)


@torch.library.custom_op(_OP, mutates_args=())
def _soft_sort_rank(x: torch.Tensor, strength: float, regularization: str, rank: bool,
                    descending: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_host(x, strength, regularization, rank, descending)


@_soft_sort_rank.register_fake
def _(x, strength, regularization, rank, descending):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape, dtype=torch.int64),
            x.new_empty(x.shape, dtype=torch.int64))


def _backward_host(x, perm, block, grad, strength, regularization, rank, descending):
    g = _core.vjp_rows(_host_rows(x), _host_rows(perm), _host_rows(block), _host_rows(grad),
                       op="rank" if rank else "sort", regularization=regularization,
                       strength=strength, descending=descending)
    return _to_device(g, x)


@torch.library.custom_op(_OP_BACKWARD, mutates_args=())
def _soft_sort_rank_backward(x: torch.Tensor, perm: torch.Tensor, block: torch.Tensor,
                             grad: torch.Tensor, strength: float, regularization: str,
                             rank: bool, descending: bool) -> torch.Tensor:
    return _backward_host(x, perm, block, grad, strength, regularization, rank, descending)


@_soft_sort_rank_backward.register_fake
def _(x, perm, block, grad, strength, regularization, rank, descending):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_soft_sort_rank_backward.register_vmap
def _(info, in_dims, x, perm, block, grad, strength, regularization, rank, descending):
    args = [t.movedim(d, 0) if d is not None else t.unsqueeze(0)
            for t, d in zip((x, perm, block, grad), in_dims[:4])]
    shape = torch.broadcast_shapes(*(t.shape for t in args))
    shape = (info.batch_size, *shape[1:])
    args = [t.expand(shape).contiguous() for t in args]
    return _soft_sort_rank_backward(*args, strength, regularization, rank, descending), 0


# --------------------------------------------------------------------------- torch-op backward


def _segsum_bcast(values: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    sums = torch.zeros_like(values).scatter_add(-1, block, values)
    return sums.gather(-1, block)


def _block_weights(x, perm, block, *, rank, regularization, strength, descending, dtype):
    if regularization == "l2":
        ones = torch.ones(block.shape, dtype=dtype, device=block.device)
        return 1.0 / _segsum_bcast(ones, block)
    xs = x.gather(-1, perm)
    # u_j - u_first = alpha (x_j - x_first) <= 0 (u is sorted descending), formed from the
    # difference so that ties give exactly 0 and a huge 1/eps gives -inf, never NaN.
    d = xs - xs.gather(-1, block)
    if rank:
        d = d / strength
    if _core.alpha("rank" if rank else "sort", strength, descending) < 0:
        d = -d
    e = torch.exp(d)
    return e / _segsum_bcast(e, block)


def _rank_kl_scale(block, dtype):
    """``S_B = sum_B rho`` per element (sorted coordinates): KL rank's Jacobian factor."""
    n = block.shape[-1]
    rho = torch.arange(n, 0, -1, dtype=dtype, device=block.device).expand(block.shape)
    return _segsum_bcast(rho.contiguous(), block)


def _vjp_torch(x, perm, block, g, *, strength, regularization, rank, descending):
    p = _block_weights(x, perm, block, rank=rank, regularization=regularization,
                       strength=strength, descending=descending, dtype=g.dtype)
    if rank:
        gs = g.gather(-1, perm)
        a = _core.alpha("rank", strength, descending)
        if regularization == "l2":
            r = (gs - p * _segsum_bcast(gs, block)) * a
        else:  # J = a S_B (diag p - p p^T), symmetric
            r = (gs - _segsum_bcast(p * gs, block)) * p * _rank_kl_scale(block, g.dtype) * a
    else:
        r = p * _segsum_bcast(g, block)
    return torch.zeros_like(r).scatter(-1, perm, r)


def _jvp_torch(x, perm, block, t, *, strength, regularization, rank, descending):
    p = _block_weights(x, perm, block, rank=rank, regularization=regularization,
                       strength=strength, descending=descending, dtype=t.dtype)
    ts = t.gather(-1, perm)
    if not rank:
        return _segsum_bcast(p * ts, block)
    a = _core.alpha("rank", strength, descending)
    r = ts - _segsum_bcast(p * ts, block)
    if regularization == "kl":
        r = r * p * _rank_kl_scale(block, t.dtype)
    r = r * a
    return torch.zeros_like(r).scatter(-1, perm, r)


def _plain(t: torch.Tensor) -> bool:
    """A real tensor, not a fake/functional/functorch one: NumPy may read it directly."""
    return type(t) is torch.Tensor and not torch._C._functorch.is_functorch_wrapped_tensor(t)


def _vjp(x, perm, block, g, **options):
    if torch.is_grad_enabled() or x.device.type != "cpu":
        return _vjp_torch(x, perm, block, g, **options)
    if _plain(x) and _plain(g):  # eager: skip the dispatcher's per-call overhead
        return _backward_host(x, perm, block, g, **options)
    return _soft_sort_rank_backward(x, perm, block, g, options["strength"],
                                    options["regularization"], options["rank"],
                                    options["descending"])


def _save(ctx, inputs, output):
    x, strength, regularization, rank, descending = inputs
    _, perm, block = output
    ctx.save_for_backward(x, perm, block)
    ctx.options = dict(strength=strength, regularization=regularization, rank=rank,
                       descending=descending)
    ctx.mark_non_differentiable(perm, block)
    # perm/block never receive gradients; don't let autograd build zero tensors for them.
    ctx.set_materialize_grads(False)
    return x, perm, block


def _backward(ctx, grad_out, grad_perm, grad_block):
    x, perm, block = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0] and grad_out is not None:
        grad_x = _vjp(x, perm, block, grad_out, **ctx.options)
    return grad_x, None, None, None, None


_soft_sort_rank.register_autograd(_backward, setup_context=_save)


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
    """The eager entry: the op's forward and backward as an ``autograd.Function``.

    ``register_autograd`` alone does not reach ``torch.func.grad``/``jacrev`` in torch
    2.13 (the generated Function lacks ``setup_context``, pytorch issues #168393 and
    #179652); this class gives functorch the staticmethods it needs, a forward-mode
    rule, and an automatic vmap rule that defers to the op's own. Plain tensors skip
    the dispatcher and call the NumPy forward directly (per-call overhead).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, strength, regularization, rank, descending):
        if _plain(x):
            return _forward_host(x, strength, regularization, rank, descending)
        return _soft_sort_rank(x, strength, regularization, rank, descending)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(*_save(ctx, inputs, output))

    backward = staticmethod(_backward)

    @staticmethod
    def jvp(ctx, x_t, *_):
        x, perm, block = ctx.saved_tensors
        return _jvp_torch(x, perm, block, x_t, **ctx.options), None, None


class _SoftSortRankEager(torch.autograd.Function):
    """Same as :class:`_SoftSortRank` for plain tensors outside torch.func transforms.

    The ``ctx``-style forward spares ``Function.apply`` the per-call
    ``inspect.signature`` binding that ``setup_context`` Functions pay (tens of
    microseconds, which matters at (1, 1000)).
    """

    @staticmethod
    def forward(ctx, x, strength, regularization, rank, descending):
        output = _forward_host(x, strength, regularization, rank, descending)
        ctx.save_for_forward(*_save(ctx, (x, strength, regularization, rank, descending),
                                    output))
        return output

    backward = staticmethod(_backward)
    jvp = _SoftSortRank.jvp


def _forward_cpu(x, strength, kl, rank, descending, want_weights=False):
    """C forward on a contiguous CPU float32/float64 tensor.

    Returns ``(out, x2, ints, weights)``: the result tensor, ``x`` as a 2-D NumPy view,
    the int64 ``(2, rows, n)`` array of ``perm`` and ``block``, and (KL with
    ``want_weights``, else None) the float64 block softmax weights for the backward.
    """
    shape = x.shape
    x2 = x.detach().numpy()
    if x2.ndim != 2:
        x2 = x2.reshape(-1, shape[-1])
    rows_shape = x2.shape
    out = np.empty(rows_shape, dtype=x2.dtype)
    ints = np.empty((2, *rows_shape), dtype=np.int64)
    # KL: the forward hands over the block softmax it built from its merges' own exps
    # (in float64 for either dtype), so the backward needs no exp at all.
    weights = np.empty(rows_shape) if want_weights and kl else None
    if _core._ext.soft_forward(x2, out, ints[0], ints[1], rank, kl, strength, descending,
                               weights):
        # NaN/inf or overflow: nothing was written; this raises the detailed error.
        _core.forward_checked(x2, op="rank" if rank else "sort",
                              regularization="kl" if kl else "l2", strength=strength,
                              descending=descending)
    out = torch.from_numpy(out)
    return (out if len(shape) == 2 else out.view(shape)), x2, ints, weights


class _SoftSortRankCPU(torch.autograd.Function):
    """The lean eager path: plain CPU float32/float64 tensors outside torch.func/compile.

    One C call per forward and one per backward on views of the tensors' memory (no
    copies of contiguous input, no dispatcher, one output): at (1, 1000) the per-call
    Python overhead is what remains, so the hot path keeps to plain attribute reads and
    the options travel as one tuple (``kl`` as a bool, no string compares). ``perm``
    and ``block`` are kept on ``ctx`` as NumPy views. A backward that must be
    differentiable itself (``create_graph``) falls back to the torch-op backward. Calls
    that need neither a graph nor a tangent skip this Function and call
    :func:`_forward_cpu` directly.
    """

    @staticmethod
    def forward(ctx, x, strength, kl, rank, descending):
        out, x2, ints, weights = _forward_cpu(x, strength, kl, rank, descending,
                                              want_weights=True)
        # The NumPy views are kept for the backward; saved_tensors still guards x
        # against in-place changes between forward and backward.
        ctx.state = (x2, ints, weights, strength, kl, rank, descending)
        ctx.save_for_backward(x)
        if _forward_ad._current_level >= 0:
            ctx.save_for_forward(x)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        x2, ints, weights, strength, kl, rank, descending = ctx.state
        if (torch.is_grad_enabled() or grad.dtype != x.dtype or type(grad) is not torch.Tensor
                or not _plain(grad)):
            return _SoftSortRankCPU._torch_vjp(ctx, x, grad), None, None, None, None
        g2 = grad.contiguous().numpy()
        if g2.ndim != 2:
            g2 = g2.reshape(x2.shape)
        dx = np.empty(x2.shape, dtype=x2.dtype)
        _core._ext.soft_backward(x2, ints[0], ints[1], g2, dx, rank, kl, strength,
                                 descending, weights)
        dx = torch.from_numpy(dx)
        return (dx if x.ndim == 2 else dx.view(x.shape)), None, None, None, None

    @staticmethod
    def _torch_vjp(ctx, x, grad):
        _, ints, _, strength, kl, rank, descending = ctx.state
        ints = torch.from_numpy(ints)
        return _vjp_torch(x, ints[0].view(x.shape), ints[1].view(x.shape), grad,
                          strength=strength, regularization="kl" if kl else "l2",
                          rank=rank, descending=descending)

    @staticmethod
    def jvp(ctx, x_t, *_):
        x, = ctx.saved_tensors
        _, ints, _, strength, kl, rank, descending = ctx.state
        ints = torch.from_numpy(ints)
        return _jvp_torch(x, ints[0].view(x.shape), ints[1].view(x.shape), x_t,
                          strength=strength, regularization="kl" if kl else "l2",
                          rank=rank, descending=descending)


_FAST_DTYPES = (torch.float32, torch.float64)
_COMPUTE = {torch.float32: torch.float32, torch.float64: torch.float64,
            torch.float16: torch.float32, torch.bfloat16: torch.float32}


def soft_sort_rank_torch(x: torch.Tensor, *, op: str, fn: str, regularization: str,
                         strength: float, descending: bool) -> torch.Tensor:
    """Validated entry point behind :func:`nonsmooth.solvers.soft_sort` for tensors."""
    rank = op == "rank"
    # The common case first, in cheap attribute reads (per-call overhead at small n).
    if (type(x) is torch.Tensor and x.dtype in _FAST_DTYPES and x.ndim and x.shape[-1]
            and _core._FUSED and x.is_contiguous()
            and x.device.type == "cpu" and not torch.compiler.is_compiling()
            and _plain(x)):
        kl = regularization == "kl"
        if ((x.requires_grad and torch.is_grad_enabled())
                or _forward_ad._current_level >= 0):  # a graph or a tangent to carry
            return _SoftSortRankCPU.apply(x, strength, kl, rank, descending)
        return _forward_cpu(x, strength, kl, rank, descending)[0]
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
    if _layer_hook.active():  # the audit engine is tracing f: one node it understands
        return _layer_hook.route("soft_sort", x, op=op, regularization=regularization, strength=strength,
                                 descending=descending)
    xw = x.to(work) if work != x.dtype else x
    if torch.compiler.is_compiling():
        # Dynamo traces the op with its registered autograd; it rejects Functions
        # that define a forward-mode rule.
        out, _, _ = _soft_sort_rank(xw, strength, regularization, rank, descending)
    elif _plain(xw):
        out, _, _ = _SoftSortRankEager.apply(xw, strength, regularization, rank, descending)
    else:
        out, _, _ = _SoftSortRank.apply(xw, strength, regularization, rank, descending)
    return out.to(x.dtype) if work != x.dtype else out


__all__ = ["soft_sort_rank_torch"]
