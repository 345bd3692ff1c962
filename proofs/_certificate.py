"""What a proof returns: a computed certificate, and the recorder that builds it.

A certificate is plain data: whether every computed check held, the SymPy expressions
involved (as strings that ``sympy.sympify`` parses back), the derivation a person can
follow step by step, and the time it took.  Nothing in it is typed in by hand: each
check is the outcome of a SymPy computation recorded by :class:`Derivation`.
"""
from __future__ import annotations

import dataclasses
import json

import sympy as sp


@dataclasses.dataclass(frozen=True)
class Certificate:
    """The computed outcome of one proof.

    Attributes:
        name: the proof's catalog name.
        statement: the claim, in words.
        verified: True when every computed check held (and at least one was made).
        expressions: ``(label, expression)`` pairs; each expression is a string that
            ``sympy.sympify`` parses back.
        derivation: the steps, in order, each a sentence with the computed result.
        failures: why the certificate is not verified (empty when it is).
        checks: how many computed checks were made.
        seconds: wall time of the check.

    Example:
        >>> from nonsmooth.proofs import get
        >>> cert = get("spurious_derivative").check()
        >>> cert.verified
        True
    """

    name: str
    statement: str
    verified: bool
    expressions: tuple = ()
    derivation: tuple = ()
    failures: tuple = ()
    checks: int = 0
    seconds: float = 0.0

    def explain(self) -> str:
        """A readable account: verdict, statement, derivation, failures."""
        head = "VERIFIED" if self.verified else "FAILED"
        lines = [f"[{head}] {self.name} ({self.checks} computed checks, {self.seconds:.2f} s)",
                 f"  claim: {self.statement}"]
        lines += [f"  {i}. {step}" for i, step in enumerate(self.derivation, 1)]
        lines += [f"  FAILURE: {f}" for f in self.failures]
        return "\n".join(lines)

    def to_json(self) -> dict:
        """A JSON-serializable dict (expressions as a label -> string mapping)."""
        return {
            "name": self.name,
            "statement": self.statement,
            "verified": self.verified,
            "expressions": {label: text for label, text in self.expressions},
            "derivation": list(self.derivation),
            "failures": list(self.failures),
            "checks": self.checks,
            "seconds": round(self.seconds, 4),
        }

    def __str__(self) -> str:  # pragma: no cover - convenience
        return self.explain()


def expr_text(expr) -> str:
    """A string of ``expr`` that ``sympy.sympify`` parses back."""
    if isinstance(expr, str):
        return expr
    return sp.sstr(sp.sympify(expr), order="none")


def is_zero(expr) -> bool:
    """True when SymPy can show ``expr`` is identically zero (False when unsure)."""
    expr = sp.sympify(expr)
    if expr == 0:
        return True
    if expr.has(sp.Piecewise):
        switching = set()
        for pw in expr.atoms(sp.Piecewise):
            for _, cond in pw.args:
                if cond not in (sp.true, sp.false):
                    switching |= cond.free_symbols
        if len(switching) == 1:
            from ._piecewise1d import is_zero_1d

            try:
                return is_zero_1d(expr, switching.pop())
            except ValueError:
                pass
        expr = sp.piecewise_fold(expr)
    simplified = sp.simplify(expr)
    if simplified == 0:
        return True
    try:
        return bool(simplified.equals(0))
    except Exception:  # equals() can raise on exotic expressions; "unsure" is not proof
        return False


class Derivation:
    """Records steps, expressions and computed checks while a proof runs."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.expressions: list[tuple[str, str]] = []
        self.failures: list[str] = []
        self.checks = 0

    def step(self, text: str) -> None:
        self.steps.append(text)

    def expr(self, label: str, expr) -> object:
        """Record ``expr`` under ``label`` (returned unchanged for chaining)."""
        self.expressions.append((label, expr_text(expr)))
        return expr

    def require(self, ok: bool, what: str, *, failure: str | None = None) -> bool:
        """Record a computed check; ``what`` describes it, ``failure`` says why it failed."""
        self.checks += 1
        ok = bool(ok)
        if ok:
            self.steps.append(f"checked: {what}")
        else:
            self.failures.append(failure or f"does not hold: {what}")
        return ok

    def equal(self, a, b, what: str) -> bool:
        """Check ``a == b`` identically (``simplify(a - b) == 0``)."""
        diff = sp.sympify(a) - sp.sympify(b)
        return self.require(is_zero(diff), what,
                            failure=f"{what}: {expr_text(a)} != {expr_text(b)} "
                                    f"(difference {expr_text(sp.simplify(diff))})")

    def fail(self, why: str) -> None:
        self.checks += 1
        self.failures.append(why)
