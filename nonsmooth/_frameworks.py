"""Which array library an object belongs to, without importing any of them.

A torch tensor can only exist if torch is already imported (likewise jax), so looking
in ``sys.modules`` answers the question at no import cost.
"""
from __future__ import annotations

import sys


def array_framework(x) -> str | None:
    """"torch", "jax", "numpy" (ndarray or NumPy scalar) or None for anything else.

    Example:
        >>> import numpy as np
        >>> array_framework(np.zeros(3)), array_framework([1.0])
        ('numpy', None)
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        return "jax"
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(x, (numpy.ndarray, numpy.generic)):
        return "numpy"
    return None
