"""Small nonsmooth functions written once for torch and jax (and NumPy for values).

They give campaigns, reproducers and tests something importable by a
``"module:qualname"`` reference, e.g. ``"nonsmooth.testing._examples:relu_difference"``.
Each dispatches on the array type it receives; none imports a framework itself.
"""
from __future__ import annotations

import numpy as np


def _ops(x):
    """(namespace, relu) for the framework that owns ``x``."""
    module = type(x).__module__
    if module.startswith("torch"):
        import torch

        return torch, torch.relu
    if module.startswith("jax") or module.startswith("jaxlib"):
        import jax
        import jax.numpy as jnp

        return jnp, jax.nn.relu
    return np, lambda v: np.maximum(v, 0)


def relu_difference(x):
    """relu(x) - relu(-x), which equals x; backprop gives 2·relu'(0) at 0 (spurious)."""
    _, relu = _ops(x)
    return relu(x) - relu(-x)


def abs_sum(x):
    """sum |x_i|: Clarke set [-1, 1] per coordinate at 0."""
    ns, _ = _ops(x)
    return ns.abs(x).sum()


def max_pair(x):
    """max(x_0, x_1): a tie when x_0 == x_1."""
    ns, _ = _ops(x)
    return ns.maximum(x[0], x[1])


def smooth_quadratic(x):
    """0.5·|x|² + sum sin(x): smooth everywhere."""
    ns, _ = _ops(x)
    return 0.5 * (x * x).sum() + ns.sin(x).sum()


def tiny_relu_net(x):
    """A fixed 2-layer ReLU network R^n -> R with integer weights (exact kinks at integers)."""
    ns, relu = _ops(x)
    n = x.shape[-1]
    W = np.array([[(i + 2 * j) % 3 - 1 for j in range(n)] for i in range(4)], dtype=float)
    b = np.array([0.0, 1.0, -1.0, 0.5])
    if ns is np:
        Wt, bt = W.astype(x.dtype), b.astype(x.dtype)
    elif ns.__name__ == "torch":
        Wt, bt = ns.as_tensor(W, dtype=x.dtype), ns.as_tensor(b, dtype=x.dtype)
    else:
        Wt, bt = ns.asarray(W, dtype=x.dtype), ns.asarray(b, dtype=x.dtype)
    h = relu(Wt @ x + bt)
    return h.sum() - 2 * h[0]
