"""nonsmooth.conservative: what AD really returns through nonsmooth programs.

``audit(f, x)`` traces ``f`` (torch or jax) into a small IR, finds the nonsmooth
primitives sitting at a kink, computes lexicographic (LD) derivatives, AD-selection
Jacobians and, within a budget, every essentially active piece, and says whether AD's
output is in the Clarke Jacobian::

    >>> import torch
    >>> from nonsmooth.conservative import audit
    >>> audit(lambda x: torch.relu(x) - torch.relu(-x), torch.zeros(1)).verdict.value
    'SPURIOUS'

Importing this package imports neither torch nor jax; the adapters load on first use.
"""
import importlib.util as _ilu

from ._audit import (
    ActiveKink,
    Audit,
    ClarkeSet,
    Verdict,
    audit,
    audit_batch,
    clarke_jacobian,
    ld_jacobian,
    selection_jacobians,
)
from ._rules import RULES, Kink, Rule, rule_for_jax_primitive, rule_for_torch_op

__all__ = [
    "ActiveKink",
    "Audit",
    "ClarkeSet",
    "Kink",
    "RULES",
    "Rule",
    "Verdict",
    "audit",
    "audit_batch",
    "clarke_jacobian",
    "ld_jacobian",
    "rule_for_jax_primitive",
    "rule_for_torch_op",
    "selection_jacobians",
]

# The periphery (conventions, gradient sampling) lives in its own modules.
if _ilu.find_spec(f"{__name__}._conventions") is not None:
    from ._conventions import kink_conventions  # noqa: F401

    __all__.append("kink_conventions")
if _ilu.find_spec(f"{__name__}._sampling") is not None:
    from ._sampling import gradient_sampling  # noqa: F401

    __all__.append("gradient_sampling")
