"""The implicit report suite and benchmark produce their checks and tables (no timing asserted)."""
import json

import pytest

pytest.importorskip("torch")


def test_quick_suite_passes_with_numbers_and_figure():
    from nonsmooth.reports._suite_implicit import run

    messages = []
    result = run(quick=True, progress=messages.append)
    failed = [c.name for c in result.checks if not c.passed]
    assert not failed, failed
    assert messages and result.figures and result.figures[0].kind == "line"
    names = " ".join(c.name for c in result.checks)
    assert "y + |y| - x" in names and "SPURIOUS" in names
    assert all(c.numbers for c in result.checks)
    json.dumps(result.to_json())  # the report stores it as JSON


@pytest.mark.slow
def test_quick_bench_tables():
    from nonsmooth.reports._bench_implicit import run

    lines = []
    tables = run(quick=True, out=lines.append)
    assert [t.title for t in tables] == ["ReLU DEQ: forward steps, time and gradient agreement",
                                         "Bytes saved for backward vs forward steps",
                                         "Out of the box: each library's defaults"]
    ours = [r for r in tables[2].rows if r[1] == "nonsmooth defaults"]
    assert len(ours) == 2 and all(float(r[5]) < 1e-3 for r in ours)
    rows = {r[0]: r for r in tables[0].rows}
    assert rows["nonsmooth implicit"][6] == "1.00x"
    assert float(rows["nonsmooth implicit"][-1]) < 1e-4  # gradient agrees with the float64 reference
    mem = tables[1].rows
    assert len({r[1] for r in mem}) == 1  # implicit backward memory does not grow with the steps
    assert float(mem[-1][2].split()[0]) > float(mem[0][2].split()[0])
    assert any("ReLU DEQ" in line for line in lines)
