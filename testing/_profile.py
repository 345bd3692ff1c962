"""The ``nonsmooth-ci`` Hypothesis profile, registered on demand (importing this module does
not import Hypothesis; calling ``register_hypothesis_profile`` does)."""
from __future__ import annotations

PROFILE = "nonsmooth-ci"


def register_hypothesis_profile() -> str:
    """Register the ``"nonsmooth-ci"`` Hypothesis profile and return its name.

    ``deadline=None`` (JIT compiles make first examples slow), ``derandomize=True`` (CI runs
    reproduce), ``print_blob=True``, and the ``too_slow`` and ``function_scoped_fixture`` health
    checks suppressed -- the plugin's ``nonsmooth_framework`` fixture is a plain string that is
    safe to share between examples.  The pytest plugin calls this before Hypothesis reads
    ``--hypothesis-profile``; call it yourself before ``settings.load_profile("nonsmooth-ci")``
    outside pytest.

    Example:
        >>> from hypothesis import settings
        >>> settings.get_profile(register_hypothesis_profile()).deadline is None
        True
    """
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        PROFILE,
        deadline=None,
        derandomize=True,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    return PROFILE
