"""nonsmooth.conservative: what AD really returns through nonsmooth programs.

The rule registry (plain data, no framework imports) is importable on its own::

    >>> from nonsmooth.conservative import RULES
    >>> RULES["abs"].kinks[0].clarke
    ('Min(-1, 1)', 'Max(-1, 1)')
"""
from ._rules import RULES, Kink, Rule, rule_for_jax_primitive, rule_for_torch_op

__all__ = ["RULES", "Kink", "Rule", "rule_for_jax_primitive", "rule_for_torch_op"]
