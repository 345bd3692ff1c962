"""A proof: a named claim with its LaTeX, its assumptions, and the computation that checks it."""
from __future__ import annotations

import dataclasses
import time
import traceback
from typing import Callable

from ._certificate import Certificate, Derivation


@dataclasses.dataclass(frozen=True)
class Proof:
    """A claim and the SymPy computation that certifies it.

    Attributes:
        name: catalog name (``nonsmooth prove NAME``).
        statement: the claim in words.
        latex: the claim in LaTeX.
        assumptions: what the claim assumes, in words.
        run: ``run(derivation)`` performs the computation, recording steps and checks.

    Example:
        >>> from nonsmooth.proofs import get
        >>> proof = get("relu_fixed_point_implicit")
        >>> proof.check().verified
        True
    """

    name: str
    statement: str
    latex: str
    assumptions: tuple
    run: Callable[[Derivation], None] = dataclasses.field(repr=False, compare=False)

    def check(self) -> Certificate:
        """Run the computation and return its :class:`Certificate` (never raises)."""
        derivation = Derivation()
        start = time.perf_counter()
        try:
            self.run(derivation)
        except Exception as exc:  # a crashed computation is a failed certificate, with the reason
            where = traceback.extract_tb(exc.__traceback__)[-1]
            derivation.fail(f"the computation raised {type(exc).__name__}: {exc} "
                            f"(at {where.filename.rsplit('/', 1)[-1]}:{where.lineno})")
        seconds = time.perf_counter() - start
        if derivation.checks == 0:
            derivation.fail("the computation made no checks")
        return Certificate(
            name=self.name,
            statement=self.statement,
            verified=not derivation.failures,
            expressions=tuple(derivation.expressions),
            derivation=tuple(derivation.steps),
            failures=tuple(derivation.failures),
            checks=derivation.checks,
            seconds=seconds,
        )

    def to_json(self) -> dict:
        return {"name": self.name, "statement": self.statement, "latex": self.latex,
                "assumptions": list(self.assumptions)}
