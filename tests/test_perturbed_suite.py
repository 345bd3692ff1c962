"""The perturbed report suite: its verdicts rest on numbers that can fail."""
import json

import pytest

pytest.importorskip("torch")


def test_quick_suite_passes_with_its_numbers():
    from nonsmooth.reports._suite_perturbed import run

    messages = []
    result = run(quick=True, progress=messages.append)
    failed = [(c.name, c.detail) for c in result.checks if not c.passed]
    assert not failed, failed
    assert len(result.checks) >= 10 and messages
    by_name = {c.name: c for c in result.checks}
    slope = by_name["Monte-Carlo error shrinks like 1/sqrt(N)"].numbers["slope"]
    assert -0.6 < slope < -0.4
    fig = result.figures[0]
    assert fig.logx and fig.logy and len(fig.x) == len(fig.series["measured RMS error"])
    # every z-score behind a forward verdict is recorded and within the bound
    for c in result.checks:
        for key in ("max_z", "z"):
            if key in c.numbers:
                assert c.numbers[key] <= 5.0
    json.dumps(result.to_json())  # report.json must be able to hold it
