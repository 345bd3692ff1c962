"""Batched tangent rules for common aten ops, so a tangent matrix of k columns moves
through a node with one tensor op instead of ``vmap(jvp(op))``.

Contract: :func:`fast_jvp` returns the same tangents as ``vmap(jvp(op))`` (exact
arithmetic on the same values; float64 rounding may differ in the last bits), or
``None`` when it has no rule for the node, and the caller falls back to functorch.
Tangents have shape ``(k, *shape)``; ``None`` means zero.
"""
from __future__ import annotations

import torch

# elementwise ops of one tensor whose derivative is elementwise: t_out = t * f'(x)
ELEMENTWISE = {
    "exp", "exp2", "log", "log2", "log10", "log1p", "expm1", "sin", "cos", "tan", "tanh", "sinh", "cosh",
    "asinh", "atan", "asin", "acos", "atanh", "acosh", "sigmoid", "erf", "erfc", "erfinv", "reciprocal",
    "square", "rsqrt", "gelu", "silu", "softplus", "mish", "sqrt",
}
# nonsmooth elementwise ops: away from their kinks the same rule holds (at a kink the
# interpreter overrides the elements that sit on it)
ELEMENTWISE |= {
    "relu", "leaky_relu", "abs", "hardtanh", "clamp", "clamp_min", "clamp_max", "hardsigmoid", "hardswish",
    "elu", "celu", "softshrink", "hardshrink", "threshold", "sign", "sgn", "floor", "ceil", "round", "trunc",
}
IDENTITY = {"clone", "alias", "lift_fresh_copy", "lift_fresh", "contiguous"}


def _base(op) -> str:
    name = op._schema.name.split("::")[-1]
    if name.endswith("_copy") and name not in ("_to_copy", "lift_fresh_copy"):
        name = name[: -len("_copy")]
    return name


def _align(t, in_shape, out_nd):
    """(k, *in_shape) -> (k, 1, ..., *in_shape) so it broadcasts against out_nd dims."""
    return t.reshape(t.shape[0], *([1] * (out_nd - len(in_shape))), *in_shape)


def _dim(d, nd):
    return d + nd if d < 0 else d


def fast_jvp(node, args, kwargs, vals, tans, call):
    """Tangents of the node's outputs, or None (no rule).  ``args``/``kwargs`` are the
    op's arguments at the point, ``vals`` its tensor inputs, ``call(vals)`` evaluates it."""
    op = node.payload[0]
    if not hasattr(op, "_schema"):
        return None
    name = _base(op)
    overload = op._overloadname
    outs = node.outputs
    if len(outs) != 1 or not outs[0].is_float:
        return None
    out_shape = tuple(outs[0].shape)
    out_nd = len(out_shape)
    live = [i for i, t in enumerate(tans) if t is not None]
    if not live:
        return [None]
    k = tans[live[0]].shape[0]
    in_shapes = [tuple(v.shape) if hasattr(v, "shape") else () for v in node.inputs]

    def tan(i):
        return tans[i] if i < len(tans) else None

    if name in IDENTITY or (name == "_to_copy" and kwargs.get("dtype", None) in (None, torch.float64)):
        return [tan(0)]
    if name in ELEMENTWISE and len(node.inputs) == 1 and len(live) == 1:
        x = vals[0]
        d = torch.func.jvp(lambda z: call([z]), (x,), (torch.ones_like(x),))[1]
        return [tan(0) * d]
    if name == "pow" and overload == "Tensor_Scalar" and live == [0]:
        x, c = vals[0], args[1]
        return [tan(0) * (c * x ** (c - 1))]
    if name == "neg":
        return [-tan(0)]
    if name in ("add", "sub", "rsub") and overload in ("Tensor", "Scalar"):
        alpha = kwargs.get("alpha", 1)
        ta = tan(0)
        tb = tan(1) if overload == "Tensor" else None
        parts = []
        sa, sb = (1.0, float(alpha)) if name == "add" else (1.0, -float(alpha)) if name == "sub" else (-float(alpha), 1.0)
        if ta is not None:
            parts.append(sa * _align(ta, in_shapes[0], out_nd))
        if tb is not None:
            parts.append(sb * _align(tb, in_shapes[1], out_nd))
        return [_sum_to(parts, k, out_shape)]
    if name == "mul" and overload in ("Tensor", "Scalar"):
        parts = []
        if overload == "Scalar":
            return [tan(0) * args[1]]
        a, b = vals[0], vals[1]
        if tan(0) is not None:
            parts.append(_align(tan(0), in_shapes[0], out_nd) * b)
        if tan(1) is not None:
            parts.append(a * _align(tan(1), in_shapes[1], out_nd))
        return [_sum_to(parts, k, out_shape)]
    if name == "div" and overload in ("Tensor", "Scalar") and kwargs.get("rounding_mode") is None:
        if overload == "Scalar":
            return [tan(0) / args[1]]
        a, b = vals[0], vals[1]
        parts = []
        if tan(0) is not None:
            parts.append(_align(tan(0), in_shapes[0], out_nd) / b)
        if tan(1) is not None:
            parts.append(-a * _align(tan(1), in_shapes[1], out_nd) / (b * b))
        return [_sum_to(parts, k, out_shape)]
    if name == "where" and overload == "self":
        cond = vals[0]
        ta = tan(1)
        tb = tan(2)
        if ta is None and tb is None:
            return [None]
        za = _align(ta, in_shapes[1], out_nd) if ta is not None else torch.zeros((), dtype=torch.float64)
        zb = _align(tb, in_shapes[2], out_nd) if tb is not None else torch.zeros((), dtype=torch.float64)
        return [torch.where(cond, za, zb).expand(k, *out_shape)]
    if name in ("view", "reshape", "_unsafe_view", "_reshape_alias", "squeeze", "unsqueeze", "expand_as",
                "view_as", "reshape_as", "flatten"):
        t = tan(0)
        return [t.reshape(k, *out_shape)]
    if name == "expand":
        t = tan(0)
        return [_align(t, in_shapes[0], out_nd).expand(k, *out_shape)]
    if name == "permute":
        dims = [_dim(d, len(in_shapes[0])) + 1 for d in args[1]]
        return [tan(0).permute(0, *dims)]
    if name == "transpose" and overload == "int":
        nd = len(in_shapes[0])
        return [tan(0).transpose(_dim(args[1], nd) + 1, _dim(args[2], nd) + 1)]
    if name == "t":
        return [tan(0).transpose(1, 2) if len(in_shapes[0]) == 2 else tan(0)]
    if name == "select" and overload == "int":
        nd = len(in_shapes[0])
        return [tan(0).select(_dim(args[1], nd) + 1, args[2])]
    if name == "slice" and overload == "Tensor":
        nd = len(in_shapes[0])
        dim = _dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), nd)
        start = args[2] if len(args) > 2 else kwargs.get("start", None)
        end = args[3] if len(args) > 3 else kwargs.get("end", None)
        step = args[4] if len(args) > 4 else kwargs.get("step", 1)
        return [torch.ops.aten.slice.Tensor(tan(0), dim + 1, start, end, step)]
    if name == "index_select":
        nd = len(in_shapes[0])
        if tan(0) is None:
            return [None]
        return [tan(0).index_select(_dim(args[1], nd) + 1, args[2])]
    if name in ("sum", "mean") and overload in ("default", "dim_IntList") and kwargs.get("dtype") is None:
        t = tan(0)
        nd = len(in_shapes[0])
        if overload == "default" or (len(args) > 1 and (args[1] is None or len(args[1]) == 0)):
            red = t.reshape(k, -1)
            r = red.sum(1) if name == "sum" else red.mean(1)
            return [r.reshape(k, *out_shape)]
        dims = [_dim(d, nd) + 1 for d in args[1]]
        keep = bool(args[2]) if len(args) > 2 else bool(kwargs.get("keepdim", False))
        r = t.sum(dims, keepdim=keep) if name == "sum" else t.mean(dims, keepdim=keep)
        return [r]
    if name in ("cat", "stack"):
        tensors = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if len(tans) != len(tensors):
            return None
        ts = [t if t is not None else torch.zeros((k, *s), dtype=torch.float64) for t, s in zip(tans, in_shapes)]
        nd = len(in_shapes[0]) + (1 if name == "stack" else 0)
        return [(torch.cat if name == "cat" else torch.stack)(ts, _dim(dim, nd) + 1)]
    if name == "mv" and len(node.inputs) == 2:
        A, v = vals
        parts = []
        if tan(0) is not None:
            parts.append(tan(0) @ v)
        if tan(1) is not None:
            parts.append(tan(1) @ A.T)
        return [_sum_to(parts, k, out_shape)]
    if name == "mm" and len(node.inputs) == 2:
        A, B = vals
        parts = []
        if tan(0) is not None:
            parts.append(tan(0) @ B)
        if tan(1) is not None:
            parts.append(A @ tan(1))
        return [_sum_to(parts, k, out_shape)]
    if name == "addmm" and len(node.inputs) == 3 and not kwargs:
        bias, A, B = vals
        parts = []
        if tan(0) is not None:
            parts.append(_align(tan(0), in_shapes[0], out_nd))
        if tan(1) is not None:
            parts.append(tan(1) @ B)
        if tan(2) is not None:
            parts.append(A @ tan(2))
        return [_sum_to(parts, k, out_shape)]
    if name == "dot" and len(node.inputs) == 2:
        a, b = vals
        parts = []
        if tan(0) is not None:
            parts.append(tan(0) @ b)
        if tan(1) is not None:
            parts.append(tan(1) @ a)
        return [_sum_to(parts, k, out_shape)]
    return None


def _sum_to(parts, k, out_shape):
    if not parts:
        return torch.zeros((k, *out_shape), dtype=torch.float64)
    acc = parts[0]
    for p in parts[1:]:
        acc = acc + p
    return acc.expand(k, *out_shape) if tuple(acc.shape) != (k, *out_shape) else acc
