"""torch adapter: trace ``f`` to aten ops with ``make_fx`` and evaluate/differentiate them.

Imported only when the user's arrays are torch tensors.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch.fx.experimental.proxy_tensor import make_fx

from ._ir import Graph, Lit, Node, Var
from ._rules import RULES, rule_for_torch_op
from ._torch_tangents import fast_jvp

FRAMEWORK = "torch"

# aten ops (base names; overload and a trailing "_copy" stripped) that are smooth where
# they are finite, or linear, or only move data.  Anything else that takes a float
# tensor is "unsupported" and makes the audit UNDECIDED: never guess it is smooth.
_SMOOTH = {
    "add", "sub", "rsub", "mul", "div", "neg", "exp", "exp2", "log", "log2", "log10",
    "log1p", "expm1", "sin", "cos", "tan", "tanh", "sinh", "cosh", "asinh", "atan",
    "asin", "acos", "atanh", "acosh", "sigmoid", "erf", "erfc", "erfinv", "reciprocal",
    "square", "rsqrt", "pow", "mm", "mv", "bmm", "addmm", "addmv", "addbmm", "baddbmm",
    "matmul", "dot", "vdot", "einsum", "t", "transpose", "permute", "view", "_unsafe_view",
    "reshape", "expand", "squeeze", "unsqueeze", "cat", "stack", "slice", "select",
    "index_select", "index", "gather", "scatter", "scatter_add", "index_add", "index_put",
    "sum", "mean", "prod", "cumsum", "cumprod", "clone", "_to_copy", "copy", "alias",
    "detach", "lift_fresh_copy", "lift_fresh", "zeros_like", "ones_like", "full_like",
    "empty_like", "zeros", "ones", "full", "scalar_tensor", "arange", "empty",
    "empty_strided", "new_zeros", "new_ones", "new_empty", "new_full", "new_empty_strided",
    "fill", "_softmax", "softmax", "_log_softmax", "log_softmax", "logsumexp", "gelu",
    "silu", "softplus", "mish", "log_sigmoid_forward", "convolution", "conv1d", "conv2d",
    "native_layer_norm", "_native_batch_norm_legit_no_training", "native_batch_norm",
    "constant_pad_nd", "pad", "flip", "roll", "repeat", "split", "split_with_sizes",
    "chunk", "unbind", "narrow", "diagonal", "diag_embed", "tril", "triu", "where",
    "masked_fill", "linear", "addcmul", "addcdiv", "lerp", "trace", "outer", "ger",
    "logical_and", "logical_or", "logical_not", "logical_xor", "bitwise_and",
    "bitwise_or", "bitwise_not", "bitwise_xor", "isnan", "isinf", "isfinite", "sym_size",
    "sym_numel", "sym_stride", "as_strided", "unfold", "im2col", "col2im", "upsample_nearest2d",
    "_unsafe_index", "xlogy", "special_xlog1py", "one_hot", "linalg_solve",
    "linalg_inv", "linalg_cholesky", "linalg_solve_ex", "linalg_inv_ex", "_linalg_solve_ex",
    "linalg_cholesky_ex", "triangular_solve", "linalg_solve_triangular", "cholesky_solve",
    "linalg_lu_solve", "var", "var_mean", "nan_to_num", "mse_loss", "nll_loss_forward",
    "nll_loss2d_forward", "binary_cross_entropy", "binary_cross_entropy_with_logits",
    "_reshape_alias", "expand_as", "view_as", "reshape_as", "movedim", "swapaxes",
}
_LINEAR = {
    "add", "sub", "rsub", "neg", "t", "transpose", "permute", "view", "_unsafe_view", "reshape",
    "expand", "squeeze", "unsqueeze", "cat", "stack", "slice", "select", "index_select", "index",
    "gather", "sum", "mean", "cumsum", "clone", "_to_copy", "copy", "alias", "detach",
    "lift_fresh_copy", "lift_fresh", "constant_pad_nd", "pad", "flip", "roll", "repeat", "split",
    "split_with_sizes", "chunk", "unbind", "narrow", "diagonal", "diag_embed", "tril", "triu",
    "where", "masked_fill", "trace", "as_strided", "unfold", "_reshape_alias", "expand_as",
    "view_as", "reshape_as", "movedim", "swapaxes", "zeros_like", "ones_like", "full_like",
    "empty_like", "scatter_add", "index_add", "_unsafe_index", "im2col", "col2im",
}
_BILINEAR = {"mul", "mm", "mv", "bmm", "addmm", "addmv", "addbmm", "baddbmm", "matmul", "dot",
             "vdot", "einsum", "linear", "convolution", "conv1d", "conv2d", "outer", "ger"}
# Left out on purpose: atan2 (jumps across the negative x axis), LU factors (pivoting),
# std (sqrt of a variance that can vanish), losses with kinks (l1, smooth_l1, huber).
# Some "smooth" ops are only smooth where their arguments stay away from a bad set;
# those points show up as non-finite values, which the engine reports.

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _base_name(op) -> str:
    name = op._schema.name.split("::")[-1]
    if name.endswith("_copy") and name not in ("_to_copy", "lift_fresh_copy"):  # functionalized views
        name = name[: -len("_copy")]
    return name


def _np_dtype(dt) -> str:
    return str(dt).replace("torch.", "")


def _var_for(meta, next_id):
    if isinstance(meta, torch.Tensor):
        return Var(next_id(), tuple(int(s) for s in meta.shape), _np_dtype(meta.dtype))
    if isinstance(meta, (int, float, bool)):
        return Var(next_id(), (), "float64" if isinstance(meta, float) else "int64")
    return None


class TraceError(Exception):
    """``f`` could not be traced (data-dependent control flow, non-tensor output, ...)."""


def trace(f: Callable, xs: tuple) -> Graph:
    """Trace ``f(*xs)`` to a :class:`Graph` of aten ops (functionalized, no in-place ops)."""
    from ._layers import tracing  # the package's own layers: one node each (_layers.py)

    with tracing(FRAMEWORK):
        return _trace(f, xs)


def _trace(f: Callable, xs: tuple) -> Graph:
    try:
        gm = make_fx(torch.func.functionalize(_positional(f, len(xs)), remove="mutations_and_views"))(*xs)
    except Exception as e:  # the message names the failing op or the control flow
        raise TraceError(f"torch could not trace f with make_fx: {type(e).__name__}: {e}") from e
    if any(n.op == "call_function" and n.target in _higher_order_ops() for n in gm.graph.nodes):
        gm = _inline_higher_order(gm, xs)

    counter = iter(range(1 << 62))
    next_id = lambda: next(counter)  # noqa: E731
    env: dict[Any, Any] = {}  # fx node -> Var or tuple of Var
    graph = Graph(FRAMEWORK, [], [], [], {})
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            v = _var_for(n.meta["val"], next_id)
            env[n] = v
            graph.inputs.append(v)
        elif n.op == "get_attr":
            t = getattr(gm, n.target)
            v = Var(next_id(), tuple(t.shape), _np_dtype(t.dtype))
            env[n] = v
            graph.consts[v.id] = t
        elif n.op == "call_function":
            if n.target is operator.getitem:
                env[n] = env[n.args[0]][n.args[1]]
                continue
            if str(n.target) in ("nonsmooth_engine.layer.default", "nonsmooth.soft_sort_rank.default",
                                 "nonsmooth.solve.default"):
                from ._layers_torch import add_node  # a layer of the package (_layers.py)

                add_node(graph, n, env, next_id)
                continue
            if str(n.target) == "aten.clamp.Tensor":
                _add_clamp_tensor(graph, n, env, next_id)
                continue
            if str(n.target) == "aten.sqrt.default" and _sum_of_squares(n) is not None:
                _add_norm(graph, n, env, next_id)
                continue
            if str(n.target) == "aten.sqrt.default" and _square_terms(n.args[0]):
                _add_pointwise_norm(graph, n, env, next_id)
                continue
            _add_call(graph, n, env, next_id, gm)
        elif n.op == "output":
            outs = pytree.tree_leaves(n.args[0])
            for o in outs:
                v = env.get(o) if isinstance(o, torch.fx.Node) else None
                if not isinstance(v, Var):
                    raise TraceError(f"f must return a tensor (or tuple of tensors); got {o!r}")
                graph.outputs.append(v)
    return graph


def _higher_order_ops() -> tuple:
    ho = getattr(torch.ops, "higher_order", None)
    return tuple(op for op in (getattr(ho, "cond", None), getattr(ho, "while_loop", None)) if op is not None)


class _Inliner(torch.fx.Interpreter):
    """Runs a traced graph, spelling ``torch.cond(pred, t, f, ops)`` as
    ``torch.where(pred, t(ops), f(ops))``: both branches become part of the program, the
    predicate's comparison is a kink (or a jump) like any other, and the untaken branch's
    values never reach the output (``where`` selects; its tangents are selected too)."""

    def call_function(self, target, args, kwargs):
        ho = torch.ops.higher_order
        if target is getattr(ho, "cond", None):
            pred, true_gm, false_gm, ops = args[:4]
            a = _Inliner(true_gm).run(*ops)
            b = _Inliner(false_gm).run(*ops)
            if not isinstance(pred, torch.Tensor):  # a Python bool: the branch is fixed
                return a if pred else b
            return type(a)(torch.where(pred, u, v) for u, v in zip(a, b))
        if target is getattr(ho, "while_loop", None):
            raise TraceError("torch.while_loop is not analysed: its iteration count depends on the data and the "
                             "engine follows data-dependent loops in jax (jax.lax.while_loop) only; spell the "
                             "loop with a Python loop (unrolled by the trace) or audit the jax version")
        return super().call_function(target, args, kwargs)


def _inline_higher_order(gm, xs: tuple):
    try:
        return make_fx(lambda *a: _Inliner(gm).run(*a))(*xs)
    except TraceError:
        raise
    except Exception as e:
        raise TraceError(f"torch could not inline the control flow of f: {type(e).__name__}: {e}") from e


def _positional(f, n):
    def g(*args):
        out = f(*args) if n > 1 else f(args[0])
        return out

    return g


def _sum_of_squares(n):
    """``n = sqrt(sum(z * z))`` or ``sqrt(sum(z ** 2))`` (over some dims): (z, dims, keepdim)."""
    a = n.args[0]
    if not isinstance(a, torch.fx.Node) or str(a.target) not in ("aten.sum.default", "aten.sum.dim_IntList"):
        return None
    if a.kwargs.get("dtype") is not None:
        return None
    b = a.args[0]
    if not isinstance(b, torch.fx.Node):
        return None
    if str(b.target) == "aten.pow.Tensor_Scalar" and b.args[1] == 2:
        z = b.args[0]
    elif str(b.target) == "aten.mul.Tensor" and _same_value(b.args[0], b.args[1]):
        z = b.args[0]
    else:
        return None
    if str(a.target) == "aten.sum.default":
        return z, None, False
    dims = list(a.args[1]) if len(a.args) > 1 and a.args[1] is not None else None
    keep = bool(a.args[2]) if len(a.args) > 2 else bool(a.kwargs.get("keepdim", False))
    return z, dims, keep


def _square_base(b):
    """``z`` when fx node ``b`` is ``z ** 2``, ``z * z`` or ``square(z)``."""
    if not isinstance(b, torch.fx.Node):
        return None
    t = str(b.target)
    if t == "aten.pow.Tensor_Scalar" and b.args[1] == 2:
        return b.args[0]
    if t == "aten.mul.Tensor" and _same_value(b.args[0], b.args[1]):
        return b.args[0]
    if t == "aten.square.default":
        return b.args[0]
    return None


def _same_value(a, b, depth=0) -> bool:
    """Whether two fx arguments compute the same value: the same node, or the same pure op
    on the same arguments (``v[0] * v[0]`` selects ``v[0]`` twice)."""
    if a is b:
        return True
    if depth > 8 or not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
        return isinstance(a, (int, float, bool, str)) and type(a) is type(b) and a == b
    if a.op != "call_function" or a.target is not b.target or len(a.args) != len(b.args) or a.kwargs != b.kwargs:
        return False
    if getattr(a.target, "_schema", None) is not None and a.target._schema.is_mutable:
        return False
    for x, y in zip(a.args, b.args):
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            if len(x) != len(y) or not all(_same_value(p, q, depth + 1) for p, q in zip(x, y)):
                return False
        elif not _same_value(x, y, depth + 1):
            return False
    return True


def _square_terms(a, depth=0):
    """The ``z_i`` of ``a = z_1**2 + z_2**2 + ...`` (at least two terms), else None."""
    if not isinstance(a, torch.fx.Node) or depth > 64:
        return None
    if str(a.target) == "aten.add.Tensor" and a.kwargs.get("alpha", 1) == 1 and len(a.args) == 2:
        left = _square_terms(a.args[0], depth + 1) if _square_base(a.args[0]) is None else [_square_base(a.args[0])]
        right = _square_terms(a.args[1], depth + 1) if _square_base(a.args[1]) is None else [_square_base(a.args[1])]
        if left and right:
            return left + right
    return None


def _stack_last(*ts):
    return torch.stack(torch.broadcast_tensors(*ts), dim=-1)


_stack_last._nonsmooth_linear = True


def _add_pointwise_norm(graph: Graph, n, env, next_id) -> None:
    """``sqrt(a**2 + b**2 + ...)`` elementwise is the 2-norm of the stacked (a, b, ...): read
    it so, so its kink where all terms vanish (Lipschitz, Clarke set the unit ball) is
    analysed instead of sqrt's infinite slope."""
    terms = _square_terms(n.args[0])
    shape = tuple(int(s) for s in n.meta["val"].shape)
    stacked = Var(next_id(), (*shape, len(terms)), _np_dtype(n.meta["val"].dtype))
    flat, spec = pytree.tree_flatten((tuple(terms), {}))
    graph.nodes.append(Node(prim="nonsmooth.stack_last", inputs=tuple(env[t] for t in terms), outputs=(stacked,),
                            params={}, payload=(_stack_last, flat, spec, list(range(len(terms)))),
                            location=f"{n.name}: the {len(terms)} squared terms stacked"))
    op = torch.ops.aten.linalg_vector_norm.default
    out = _var_for(n.meta["val"], next_id)
    flat, spec = pytree.tree_flatten(((torch.empty(0), 2.0, [-1], False), {}))
    graph.nodes.append(Node(prim=str(op), inputs=(stacked,), outputs=(out,),
                            params={"ord": 2.0, "dim": [-1], "keepdim": False}, payload=(op, flat, spec, [0]),
                            rule="norm", location=f"{n.name} = aten.sqrt(sum of {len(terms)} squares), read as a 2-norm"))
    env[n] = out


def _add_norm(graph: Graph, n, env, next_id) -> None:
    """Read sqrt(sum of squares) as the 2-norm it is, so its kink at 0 (Lipschitz, Clarke
    set the unit ball) is analysed instead of sqrt's infinite slope."""
    z, dims, keep = _sum_of_squares(n)
    op = torch.ops.aten.linalg_vector_norm.default
    out = _var_for(n.meta["val"], next_id)
    flat, spec = pytree.tree_flatten(((z, 2.0, dims, keep), {}))
    graph.nodes.append(Node(prim=str(op), inputs=(env[z],), outputs=(out,),
                            params={"ord": 2.0, "dim": dims, "keepdim": keep}, payload=(op, flat, spec, [0]),
                            rule="norm", location=f"{n.name} = aten.sqrt(sum of squares), read as a 2-norm"))
    env[n] = out


def _add_clamp_tensor(graph: Graph, n, env, next_id) -> None:
    """clamp(x, lo, hi) with tensor bounds = minimum(maximum(x, lo), hi)."""
    x = n.args[0]
    lo = n.args[1] if len(n.args) > 1 else n.kwargs.get("min")
    hi = n.args[2] if len(n.args) > 2 else n.kwargs.get("max")
    meta = n.meta["val"]
    cur = env[x]
    for bound, op, rule in ((lo, torch.ops.aten.maximum.default, "maximum"), (hi, torch.ops.aten.minimum.default, "minimum")):
        if bound is None:
            continue
        out = _var_for(meta, next_id)
        flat, spec = pytree.tree_flatten(((x, bound), {}))
        graph.nodes.append(Node(prim=str(op), inputs=(cur, env[bound]), outputs=(out,), params={},
                                payload=(op, flat, spec, [0, 1]), rule=rule,
                                location=f"{n.name} = aten.clamp.Tensor(...) [{rule} part]", origin="clamp"))
        cur = out
    env[n] = cur


def _add_call(graph: Graph, n, env, next_id, gm=None) -> None:
    op = n.target
    if hasattr(op, "_schema") and op._schema.is_mutable and op._schema.name.endswith("_"):
        # an in-place op functionalization left on a fresh tensor: use its out-of-place
        # twin, unless the mutated tensor is read again afterwards
        base = op._schema.name.split("::")[-1][:-1]
        twin = getattr(getattr(torch.ops.aten, base, None), op._overloadname, None)
        src = n.args[0] if n.args else None
        later = [u for u in getattr(src, "users", {}) if u is not n and _after(u, n)]
        if twin is None or later:
            graph.unsupported.append(f"{op} (in-place on a tensor read again)")
        else:
            op = twin
    flat, spec = pytree.tree_flatten((n.args, n.kwargs))
    inputs = []
    slots = []  # positions in flat that are fx nodes
    for i, a in enumerate(flat):
        if isinstance(a, torch.fx.Node):
            inputs.append(env[a])
            slots.append(i)
    meta = n.meta.get("val")
    metas = meta if isinstance(meta, (tuple, list)) else (meta,)
    outs = tuple(_var_for(m, next_id) for m in metas)
    if any(o is None for o in outs):
        outs = tuple(o if o is not None else Var(next_id(), (), "object") for o in outs)
    env[n] = outs if isinstance(meta, (tuple, list)) else outs[0]
    name = str(op)
    rule = rule_for_torch_op(name)
    params = {}
    if hasattr(op, "_schema"):
        args, kwargs = n.args, n.kwargs
        for j, arg in enumerate(op._schema.arguments):
            val = args[j] if j < len(args) else kwargs.get(arg.name, arg.default_value if arg.has_default_value() else None)
            if not isinstance(val, torch.fx.Node) and not (isinstance(val, (list, tuple)) and any(isinstance(q, torch.fx.Node) for q in val)):
                params[arg.name] = val
    location = f"{n.name} = {name}({', '.join(str(a) for a in n.args)})"
    node = Node(
        prim=name,
        inputs=tuple(inputs),
        outputs=outs,
        params=params,
        payload=(op, flat, spec, slots),
        rule=None,
        location=location,
    )
    float_in = any(isinstance(v, Var) and v.is_float for v in inputs)
    if rule is not None:
        _attach_rule(node, rule, params)
    elif not hasattr(op, "_schema"):
        graph.unsupported.append(f"{name} (not an aten op)")
    else:
        base = _base_name(op)
        if base in ("_to_copy", "convert_element_type") and float_in and not outs[0].is_float:
            # float -> integer casts truncate: a jump at every nonzero integer
            node.rule = "trunc" if outs[0].dtype != "bool" else None
            node.params = {}
            if node.rule is None:
                graph.unsupported.append(f"{name} (float -> bool cast)")
        elif base == "div" and params.get("rounding_mode") is not None:
            graph.unsupported.append(f"{name} with rounding_mode={params['rounding_mode']!r} (a jump)")
        elif base not in _SMOOTH and float_in:
            graph.unsupported.append(name)
    graph.nodes.append(node)


def _after(a, b) -> bool:
    """Whether fx node ``a`` comes after ``b`` in the graph."""
    node = b.next
    while node is not None and node.op != "root":
        if node is a:
            return True
        node = node.next
    return False


def _attach_rule(node: Node, rule, params) -> None:
    node.rule = rule.name
    if rule.name == "clamp":
        # clamp_min/clamp_max name their bound min/max already; tensor bounds are rewritten
        node.params = {"min": params.get("min"), "max": params.get("max")}
    elif rule.name == "norm":
        node.params = {"ord": params.get("ord", 2), "dim": params.get("dim"), "keepdim": params.get("keepdim", False)}
    elif rule.name == "pow":
        node.params = {"exponent": params.get("exponent")}


# --------------------------------------------------------------------------- evaluation


def _to64(v):
    """Float tensors -> CPU float64; float dtype/device arguments follow (the analyses run
    on the CPU in float64 whatever device the user's tensors live on)."""
    if isinstance(v, torch.Tensor):
        if v.dtype in _FLOAT_DTYPES:
            return v.detach().to(device="cpu", dtype=torch.float64)
        return v.detach().cpu()
    if isinstance(v, torch.dtype) and v in _FLOAT_DTYPES:
        return torch.float64
    if isinstance(v, torch.device):
        return torch.device("cpu")
    return v


class Backend:
    """Evaluates and differentiates single aten ops in float64."""

    framework = FRAMEWORK

    def __init__(self):
        self._flat64 = {}  # id(node) -> its constant arguments converted once

    # values are torch tensors (float64 for floats); tangents are (k, *shape) tensors

    def const(self, v):
        return _to64(v)

    def input(self, v):
        return _to64(v)

    def _call(self, node: Node, vals):
        args, kwargs = self._args(node, vals)
        return node.payload[0](*args, **kwargs)

    def eval(self, node: Node, vals) -> list:
        out = self._call(node, vals)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def _args(self, node: Node, vals):
        op, flat, spec, slots = node.payload
        key = id(node)
        base = self._flat64.get(key)
        if base is None:
            base = self._flat64[key] = [_to64(a) for a in flat]
        flat = list(base)
        for s, v in zip(slots, vals):
            flat[s] = v
        return pytree.tree_unflatten(flat, spec)

    def jvp(self, node: Node, vals, tans) -> list:
        idx = [i for i, t in enumerate(tans) if t is not None]
        if not idx:
            return [None] * len(node.outputs)
        if hasattr(node.payload[0], "_schema") and all(isinstance(v, torch.Tensor) for v in vals):
            args, kwargs = self._args(node, vals)
            try:
                fast = fast_jvp(node, args, kwargs, vals, tans, lambda v: self._call(node, v))
            except Exception:  # an unusual overload: let functorch handle it
                fast = None
            if fast is not None:
                return fast
        prim = [vals[i] for i in idx]

        def f(*d):
            v = list(vals)
            for i, x in zip(idx, d):
                v[i] = x
            out = self._call(node, v)
            out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
            return tuple(o if (isinstance(o, torch.Tensor) and o.is_floating_point()) else torch.zeros(()) for o in out)

        def one(*t):
            return torch.func.jvp(f, tuple(prim), tuple(t))[1]

        out = torch.func.vmap(one)(*[tans[i] for i in idx])
        return [o if v.is_float else None for o, v in zip(out, node.outputs)]

    def is_linear(self, node: Node, live: list) -> bool:
        """Whether the op is affine in its live inputs (the others held fixed)."""
        op = node.payload[0]
        if getattr(op, "_nonsmooth_linear", False):
            return True
        if not hasattr(op, "_schema"):
            return False
        base = _base_name(op)
        n_live = sum(bool(x) for x in live)
        if base in _LINEAR:
            return True
        if base in _BILINEAR:
            return n_live <= 1
        if base == "div":
            return len(live) < 2 or not live[1]
        return False

    def jacobian(self, fn, xs64, *, reverse: bool) -> np.ndarray:
        """Full float64 Jacobian (out, in) of ``fn`` (tuple of outputs) by torch.func."""
        def flat(*xs):
            return torch.cat([o.reshape(-1) for o in fn(*xs)])

        argnums = tuple(range(len(xs64)))
        jac = (torch.func.jacrev if reverse else torch.func.jacfwd)(flat, argnums=argnums)(*xs64)
        n_out = jac[0].shape[0]
        return np.concatenate([j.reshape(n_out, -1).numpy() for j in jac], axis=1)

    # --- helpers for frozen-branch programs (second-order analysis)

    def where(self, mask, a, b):
        if isinstance(mask, np.ndarray):
            mask = torch.from_numpy(np.array(mask))  # np.ascontiguousarray would make 0-d masks 1-d
        return torch.where(mask, a, b)

    def broadcast(self, a, shape):
        return torch.broadcast_to(a, tuple(shape))

    def flat(self, a):
        return a.reshape(-1)

    def take(self, a, positions):
        if isinstance(positions, np.ndarray):
            positions = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64))
        return a.reshape(-1)[positions]

    def concat(self, parts):
        return torch.cat([p.reshape(-1) for p in parts])

    def compile_jacobian_hessian(self, fn):
        """``(x0, arrays) -> (J (m, n), H (m, n, n))`` of ``fn(x_flat, *arrays)`` in x at x0."""
        def jh(x0, arrays):
            x = torch.from_numpy(np.array(x0, dtype=np.float64))
            arrs = [torch.from_numpy(np.array(a)) for a in arrays]

            def g(z):
                return fn(z, *arrs)

            J = torch.func.jacrev(g)(x)
            H = torch.func.jacfwd(torch.func.jacrev(g))(x)
            return J.detach().numpy(), H.detach().numpy()

        return jh

    def asnumpy(self, v) -> np.ndarray:
        if isinstance(v, torch.Tensor):
            return v.detach().cpu().numpy()
        return np.asarray(v)

    def asarray(self, a: np.ndarray, like=None):
        a = np.asarray(a)
        # np.ascontiguousarray would turn a 0-d array into shape (1,)
        return torch.from_numpy(np.array(a, copy=True, order="C")) if a.ndim else torch.tensor(a.item(), dtype=torch.from_numpy(a.reshape(1)).dtype)

    def zeros_tangent(self, k, shape):
        return torch.zeros((k, *shape), dtype=torch.float64)

    def identity_tangents(self, xs64) -> list:
        sizes = [int(x.numel()) for x in xs64]
        n = sum(sizes)
        eye = torch.eye(n, dtype=torch.float64)
        out, o = [], 0
        for x, s in zip(xs64, sizes):
            out.append(eye[:, o : o + s].reshape(n, *x.shape))
            o += s
        return out

    def tangents_from(self, M: np.ndarray, xs64) -> list:
        """Split a (n, k) direction matrix into per-input tangents of shape (k, *x.shape)."""
        out, o = [], 0
        Mt = torch.from_numpy(np.ascontiguousarray(M.T))
        for x in xs64:
            s = int(x.numel())
            out.append(Mt[:, o : o + s].reshape(M.shape[1], *x.shape))
            o += s
        return out


# --------------------------------------------------------------------------- user-level AD


def as_inputs(x) -> tuple:
    xs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    for i, t in enumerate(xs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"x[{i}] must be a torch.Tensor like the others, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"x[{i}] must have a floating dtype, got {t.dtype}")
    # Any device is accepted: the analyses copy inputs to CPU float64 themselves.
    return xs


def ad_jacobian(f: Callable, xs: tuple, n_out: int | None):
    """What torch's reverse mode returns, in the user's dtype, as float64 (out, in), and
    f's value (float64, flat) from the same call."""
    def flat_f(*args):
        out = f(*args) if len(args) > 1 else f(args[0])
        outs = pytree.tree_leaves(out)
        y = torch.cat([o.reshape(-1) for o in outs])
        return y, y.detach()

    xs_d = tuple(x.detach() for x in xs)
    try:
        jac, y = torch.func.jacrev(flat_f, argnums=tuple(range(len(xs_d))), has_aux=True)(*xs_d)
    except Exception as e:
        # layers that refuse torch.func (implicit layers stop each sample on its own residual
        # and refuse vmap; the perturbed layers' sampling operator mutates its rng state;
        # torch.cond asserts under functorch): the same reverse mode in eager autograd,
        # one output element at a time
        try:
            return _ad_jacobian_rows(flat_f, xs_d)
        except Exception:
            raise e from None
    n = y.numel()
    cols = [j.reshape(n, -1).detach().to(torch.float64).cpu().numpy() for j in jac]
    return np.concatenate(cols, axis=1), y.to(torch.float64).cpu().numpy()


def _ad_jacobian_rows(flat_f, xs_d):
    xs_g = tuple(x.clone().requires_grad_(True) for x in xs_d)
    y, _ = flat_f(*xs_g)
    rows = []
    for i in range(y.numel()):
        gs = torch.autograd.grad(y[i], xs_g, retain_graph=True, allow_unused=True)
        rows.append(np.concatenate([np.zeros(x.numel()) if g is None else g.reshape(-1).detach().to(torch.float64)
                                    .cpu().numpy() for g, x in zip(gs, xs_g)]))
    jac = np.stack(rows) if rows else np.zeros((0, sum(x.numel() for x in xs_d)))
    return jac, y.detach().to(torch.float64).cpu().numpy()


def versions() -> dict:
    return {"torch": torch.__version__}


def shadow_inputs(graph: Graph, xs) -> dict:
    """Inputs of every nonsmooth node as torch computes them in the user's dtype and device
    (no float64 promotion): {node index: [float64 NumPy arrays]}."""
    vals = {v.id: x.detach() for v, x in zip(graph.inputs, xs)}
    for cid, c in graph.consts.items():
        vals[cid] = c.detach() if isinstance(c, torch.Tensor) else c
    out = {}
    with torch.no_grad():
        for i, node in enumerate(graph.nodes):
            ins = [vals.get(v.id) if isinstance(v, Var) else (v.value if isinstance(v, Lit) else None) for v in node.inputs]
            if node.rule is not None:
                out[i] = [np.asarray(a.detach().cpu().to(torch.float64).numpy()) if isinstance(a, torch.Tensor)
                          else np.asarray(a, dtype=np.float64) for a in ins]
            op, flat, spec, slots = node.payload
            flat = list(flat)
            for s_, v in zip(slots, ins):
                flat[s_] = v
            args, kwargs = pytree.tree_unflatten(flat, spec)
            res = op(*args, **kwargs)
            res = list(res) if isinstance(res, (tuple, list)) else [res]
            for o, r in zip(node.outputs, res):
                vals[o.id] = r
    return out


def flushes_subnormals(dtype: str) -> bool:
    """Whether torch treats subnormal ``dtype`` numbers as zero here (``set_flush_denormal``)."""
    dt = getattr(torch, dtype, None)
    if dt is None or dt not in _FLOAT_DTYPES:
        return False
    tiny = torch.finfo(dt).tiny
    x = torch.tensor(-tiny, dtype=dt) / 4  # a negative subnormal, if the format has them
    return bool(x == 0) or not bool(x < 0)


def dtype_name(xs) -> str:
    return _np_dtype(xs[0].dtype)


def eps_of(xs) -> float:
    return float(torch.finfo(xs[0].dtype).eps)


def to_numpy(t) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy()


def to64(t):
    return t.detach().cpu().to(torch.float64)
