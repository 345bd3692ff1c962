"""A small framework-free IR of a traced program.

A :class:`Graph` is a list of :class:`Node` in topological order.  Each node names the
framework primitive (``prim``), the registry rule when the primitive is nonsmooth
(``rule``), its inputs (:class:`Var` or :class:`Lit`), its scalar params and its
outputs.  ``payload`` is the framework's own callable for the primitive: the IR never
looks inside it, the framework adapter (``_torch_backend``/``_jax_backend``) does.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Var:
    id: int
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name, e.g. "float32", "int64", "bool"

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith(("float", "bfloat", "complex"))

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n


@dataclasses.dataclass(frozen=True)
class Lit:
    """A constant operand written into the program (a Python scalar or small array)."""

    value: Any


@dataclasses.dataclass
class Node:
    prim: str
    inputs: tuple  # of Var | Lit | None
    outputs: tuple[Var, ...]
    params: dict
    payload: Any = None
    rule: str | None = None
    location: str = ""  # human-readable place in the trace, e.g. "relu_1 = aten.relu(mv)"
    origin: str = ""  # when a tracer rewrote a primitive (clamp -> max/min), its original name

    def describe(self) -> str:
        return self.location or self.prim


@dataclasses.dataclass
class Graph:
    framework: str  # "torch" | "jax"
    inputs: list[Var]
    outputs: list[Var]
    nodes: list[Node]
    consts: dict[int, Any]  # Var.id -> framework array (closed-over weights, ...)
    unsupported: list[str] = dataclasses.field(default_factory=list)

    def nonsmooth_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.rule is not None]

    def summary(self) -> str:
        lines = [f"graph ({self.framework}): inputs {[v.shape for v in self.inputs]}"]
        for n in self.nodes:
            tag = f"  [{n.rule}]" if n.rule else ""
            lines.append(f"  {n.describe()}{tag}")
        return "\n".join(lines)
