"""The catalog of proofs: every module's proofs, the rule-table ones rebuilt from the live registry."""
from __future__ import annotations

import fnmatch
import importlib
from typing import Callable, Sequence

from ._certificate import Certificate
from ._proof import Proof

# Modules contributing proofs, in the order the catalog lists them.  A module exposes
# either ``PROOFS`` (a tuple) or ``proofs()`` (rebuilt on every call: the rule table
# follows the engine's registry as it is now, so a primitive added later is covered).
_MODULES = ("_rule_table", "_soft_sort", "_perturbed", "_implicit", "_spurious", "_path")


def catalog() -> tuple[Proof, ...]:
    """Every proof, in catalog order.

    Example:
        >>> from nonsmooth.proofs import catalog
        >>> "spurious_derivative" in [p.name for p in catalog()]
        True
    """
    out: list[Proof] = []
    for name in _MODULES:
        module = importlib.import_module(f"nonsmooth.proofs.{name}")
        maker = getattr(module, "proofs", None)
        out.extend(maker() if callable(maker) else module.PROOFS)
    return tuple(out)


def _select(proofs: Sequence[Proof], names) -> list[Proof]:
    if names is None:
        return list(proofs)
    if isinstance(names, str):
        names = [names]
    try:
        names = list(names)
    except TypeError:
        raise TypeError(f"names must be None, a str or a list of str, got {names!r}") from None
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"names must be strings (proof names or patterns such as 'rule:*'), got {bad[0]!r}")
    chosen: list[Proof] = []
    for pattern in names:
        hits = [p for p in proofs if fnmatch.fnmatchcase(p.name, pattern)]
        if not hits:
            known = ", ".join(p.name for p in proofs)
            raise ValueError(f"no proof named {pattern!r} (shell-style patterns such as 'rule:*' are "
                             f"accepted); the catalog has: {known}")
        chosen.extend(p for p in hits if p not in chosen)
    return chosen


def get(name: str) -> Proof:
    """The proof called ``name``.

    Example:
        >>> from nonsmooth.proofs import get
        >>> get("gumbel_argmax_is_softmax").name
        'gumbel_argmax_is_softmax'
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {name!r} of type {type(name).__name__}")
    for proof in catalog():
        if proof.name == name:
            return proof
    _select(catalog(), [name])  # raises with the list of known names
    raise AssertionError("unreachable")  # pragma: no cover


def check_all(names=None, progress: Callable[[int, int, str], None] | None = None
              ) -> tuple[Certificate, ...]:
    """Check the proofs called ``names`` (all when None; shell patterns allowed).

    ``progress(done, total, name)`` is called before each proof (``name`` is the one
    about to run) and once at the end with ``done == total`` and ``name == ""``.

    Example:
        >>> from nonsmooth.proofs import check_all
        >>> [c.verified for c in check_all(["spurious_derivative"])]
        [True]
    """
    proofs = _select(catalog(), names)
    certificates = []
    for i, proof in enumerate(proofs):
        if progress is not None:
            progress(i, len(proofs), proof.name)
        certificates.append(proof.check())
    if progress is not None:
        progress(len(proofs), len(proofs), "")
    return tuple(certificates)
