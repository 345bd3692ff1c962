"""The bifurcation report suite returns checks backed by numbers, a rate table, a bar
figure and an image figure of the zone."""
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")


@pytest.mark.slow
def test_quick_suite_shapes_and_verdicts():
    from nonsmooth.reports._suite import Figure, SuiteResult
    from nonsmooth.reports._suite_bifurcation import run

    messages = []
    r = run(quick=True, progress=messages.append)
    assert isinstance(r, SuiteResult) and r.name == "bifurcation"
    assert messages and all(isinstance(m, str) for m in messages)
    assert r.passed, [c for c in r.checks if not c.passed]
    assert all(c.numbers for c in r.checks)
    bar, image = r.figures
    assert isinstance(bar, Figure) and bar.kind == "bar" and bar.x == ["float16", "float32", "float64"]
    assert image.kind == "image" and len(image.series["z"]) == len(image.y) == 13
    assert all(len(row) == len(image.x) for row in image.series["z"])
    table = r.tables[0]
    assert all(len(row) == len(table.columns) for row in table.rows)
    r.to_json()
