"""nonsmooth: what backpropagation really computes through nonsmooth programs.

Subpackages (imported on first use, so ``import nonsmooth`` stays light):

- ``nonsmooth.conservative``: the audit engine (verdicts on AD outputs at kinks).
- ``nonsmooth.solvers``: fast differentiable solvers (soft sort/rank, perturbed optimizers).
- ``nonsmooth.implicit``: fixed-point/root solvers, implicit differentiation, DEQ layers.
- ``nonsmooth.testing``: Hypothesis strategies, assertions and the pytest plugin.
- ``nonsmooth.proofs``: SymPy certificates.
- ``nonsmooth.reports``: the correctness report and the ``nonsmooth`` command line.
"""
import importlib as _importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("conservative", "solvers", "implicit", "testing", "proofs", "reports")
__all__ = ["__version__", *_SUBPACKAGES]


def __getattr__(name):
    if name in _SUBPACKAGES:
        return _importlib.import_module(f"nonsmooth.{name}")
    raise AttributeError(f"module 'nonsmooth' has no attribute {name!r}")
