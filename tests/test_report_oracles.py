"""The report's own oracles, checked against closed forms and their definitions."""
import numpy as np
import pytest

from nonsmooth.reports._suite_engine import hull_distance
from nonsmooth.reports._suite_implicit import certified_fixed_point


def test_hull_distance_matches_closed_forms():
    a, b = np.array([[0.0, 0.0]]), np.array([[2.0, 0.0]])
    # a point above the middle of the segment: distance = its height
    assert hull_distance([a, b], np.array([[1.0, 3.0]])) == pytest.approx(3.0, abs=1e-15)
    # beyond an end: distance to that end, sqrt(1 + 1)
    assert hull_distance([a, b], np.array([[3.0, 1.0]])) == pytest.approx(np.sqrt(2.0), abs=1e-15)
    # on the segment and at a vertex: 0
    assert hull_distance([a, b], np.array([[0.5, 0.0]])) == pytest.approx(0.0, abs=1e-15)
    assert hull_distance([a], a) == 0.0
    # the triangle conv{0, e1, e2}: (1, 1) is at distance 1/sqrt(2) from the edge x + y = 1
    tri = [np.zeros(2), np.array([1.0, 0.0]), np.array([0.0, 1.0])]
    assert hull_distance(tri, np.array([1.0, 1.0])) == pytest.approx(1 / np.sqrt(2), abs=1e-15)
    assert hull_distance(tri, np.array([0.2, 0.3])) == pytest.approx(0.0, abs=1e-15)
    assert hull_distance([a, b], np.array([[np.nan, 0.0]])) == np.inf


def test_certified_fixed_point_solves_its_equation():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(6, 6))
    W *= 0.8 / np.linalg.norm(W, 2)
    U, x = rng.normal(size=(6, 3)), rng.normal(size=(3, 3))
    z = certified_fixed_point(W, U, x)
    residual = np.linalg.norm(z - np.tanh(z @ W.T + x @ U.T))
    # for a contraction, ||z - z*|| <= residual / (1 - q): the definition certifies the answer
    assert residual / (1 - 0.8) <= 1e-14
    # W = 0: the fixed point is tanh(x U^T) exactly
    np.testing.assert_array_equal(certified_fixed_point(np.zeros((6, 6)), U, x), np.tanh(x @ U.T))
    with pytest.raises(ValueError, match="not a contraction"):
        certified_fixed_point(2 * np.eye(6), U, x)
