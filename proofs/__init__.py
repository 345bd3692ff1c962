"""SymPy certificates for the formulas the rest of ``nonsmooth`` relies on.

Each proof states a claim (words, LaTeX, assumptions) and checks it by computation:
``check()`` returns a :class:`Certificate` with the verdict, the SymPy expressions
involved, a derivation a person can follow and the time taken.  The rule-table proofs
rebuild every primitive of the engine's registry from an independent table of
mathematical definitions, so a primitive added without a definition fails.

Example:
    >>> from nonsmooth.proofs import get
    >>> cert = get("spurious_derivative").check()
    >>> cert.verified, cert.checks > 0
    (True, True)

From the shell: ``nonsmooth prove`` (all), ``nonsmooth prove --list``,
``nonsmooth prove 'rule:*' --json certs.json``.
"""
from ._catalog import catalog, check_all, get
from ._certificate import Certificate
from ._proof import Proof

__all__ = ["Certificate", "Proof", "catalog", "check_all", "get"]
