"""What test authors import: Hypothesis strategies that aim at kinks, assertion helpers
that audit gradients, and (via the ``pytest11`` entry point) the pytest plugin.

Importing this package loads NumPy and Hypothesis, never torch or jax.
"""
from ._strategies import (
    PLProgram as PLProgram,
    adversarial_arrays as adversarial_arrays,
    adversarial_floats as adversarial_floats,
    kink_points as kink_points,
    pl_programs as pl_programs,
    pl_programs_and_points as pl_programs_and_points,
    tied_arrays as tied_arrays,
    zero_preactivations as zero_preactivations,
)
from ._record import add_sink as add_sink

__all__ = [
    "PLProgram",
    "adversarial_arrays",
    "adversarial_floats",
    "add_sink",
    "kink_points",
    "pl_programs",
    "pl_programs_and_points",
    "tied_arrays",
    "zero_preactivations",
]
