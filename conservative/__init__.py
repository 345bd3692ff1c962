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
from ._audit import audit, audit_batch
from ._jacobians import clarke_jacobian, ld_jacobian, selection_jacobians
from ._result import ActiveKink, Audit, ClarkeSet, Verdict
from ._bifurcation import BifurcationStudy, BifurcationZone, bifurcation_study, bifurcation_zone
from ._campaign import Case, CampaignResult, merge_results, run_campaign
from ._conventions import KinkConventions, kink_conventions
from ._rules import RULES, Kink, Rule, rule_for_jax_primitive, rule_for_torch_op
from ._sampling import GradientSample, gradient_sampling

__all__ = [
    "ActiveKink",
    "Audit",
    "BifurcationStudy",
    "BifurcationZone",
    "CampaignResult",
    "Case",
    "ClarkeSet",
    "GradientSample",
    "KinkConventions",
    "Kink",
    "RULES",
    "Rule",
    "Verdict",
    "audit",
    "audit_batch",
    "bifurcation_study",
    "bifurcation_zone",
    "clarke_jacobian",
    "gradient_sampling",
    "kink_conventions",
    "ld_jacobian",
    "merge_results",
    "rule_for_jax_primitive",
    "rule_for_torch_op",
    "run_campaign",
    "selection_jacobians",
]
