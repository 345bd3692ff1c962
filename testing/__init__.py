"""What test authors import: Hypothesis strategies that aim at kinks, assertion helpers
that audit gradients, and (via the ``pytest11`` entry point) the pytest plugin.

Importing this package is free: each name loads its module on first use.  The strategies
need Hypothesis (``pip install hypothesis``); the assertion helpers need NumPy only (and the
framework of the arrays they are given); nothing here imports torch or jax by itself, and the
pytest plugin loads without Hypothesis installed.
"""
from __future__ import annotations

import importlib as _importlib

_STRATEGIES = (
    "PLProgram",
    "adversarial_arrays",
    "adversarial_floats",
    "kink_points",
    "pl_programs",
    "pl_programs_and_points",
    "tied_arrays",
    "zero_preactivations",
)
_ASSERTIONS = (
    "DEFAULT_TOLERANCES",
    "FDCheck",
    "assert_ad_is_clarke",
    "assert_matches_fd_off_kinks",
    "assert_no_bifurcation",
)
_WHERE = {
    **{name: "._strategies" for name in _STRATEGIES},
    **{name: "._assertions" for name in _ASSERTIONS},
    "add_sink": "._record",
    "register_hypothesis_profile": "._profile",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'nonsmooth.testing' has no attribute {name!r}")
    if module == "._strategies":
        try:
            _importlib.import_module("hypothesis")
        except ImportError as err:
            raise ImportError(
                f"nonsmooth.testing.{name} is a Hypothesis strategy and needs Hypothesis, which failed to "
                f"import ({err}); install it with pip install hypothesis (or pip install 'nonsmooth[dev]'). "
                "The assertion helpers (assert_matches_fd_off_kinks, ...) work without it.") from err
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
