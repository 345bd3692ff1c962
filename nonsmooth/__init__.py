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
import os as _os

__version__ = "0.1.0"

_SUBPACKAGES = ("conservative", "solvers", "implicit", "testing", "proofs", "reports")
__all__ = ["__version__", *_SUBPACKAGES]


def _source_checkout_root():
    """The repository root when this file is imported from a source checkout.

    In the repository the subpackages are sibling folders of this one (``pyproject.toml``
    maps ``solvers/`` to ``nonsmooth.solvers`` and so on).  ``python -m pytest`` from the
    root puts the root on ``sys.path``, so this folder shadows the installed package;
    adding the root to ``__path__`` makes ``nonsmooth.solvers`` resolve to ``solvers/``,
    which is where the build also copies the C extension.
    """
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    marks = ("pyproject.toml", "solvers", "conservative", "reports")
    return root if all(_os.path.exists(_os.path.join(root, m)) for m in marks) else None


_root = _source_checkout_root()
if _root is not None and _root not in __path__:
    __path__.append(_root)


def __getattr__(name):
    if name in _SUBPACKAGES:
        return _importlib.import_module(f"nonsmooth.{name}")
    raise AttributeError(f"module 'nonsmooth' has no attribute {name!r}")
