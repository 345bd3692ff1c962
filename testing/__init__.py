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
from ._assertions import (
    DEFAULT_TOLERANCES as DEFAULT_TOLERANCES,
    FDCheck as FDCheck,
    assert_ad_is_clarke as assert_ad_is_clarke,
    assert_matches_fd_off_kinks as assert_matches_fd_off_kinks,
    assert_no_bifurcation as assert_no_bifurcation,
)
from ._record import add_sink as add_sink

__all__ = [
    "DEFAULT_TOLERANCES",
    "FDCheck",
    "assert_ad_is_clarke",
    "assert_matches_fd_off_kinks",
    "assert_no_bifurcation",
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
