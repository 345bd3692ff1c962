"""`nonsmooth audit FILE.py:FUNC`: verdicts against closed-form Clarke sets."""
import json
from pathlib import Path

import numpy as np
import pytest

from nonsmooth.reports._cli import main as cli_main

pytest.importorskip("torch")
EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "audit_me.py")


def test_relu_difference_is_certified_spurious(capsys):
    # relu(x) - relu(-x) == x: the Clarke Jacobian at 0 is exactly the identity.
    assert cli_main(["audit", f"{EXAMPLE}:relu_difference", "--at", "[0.0, 1.0]"]) == 1
    out = capsys.readouterr().out
    assert "verdict: SPURIOUS" in out
    assert "certified" in out


def test_hinge_net_json_matches_the_closed_form(capsys):
    # f(x) = sum(clamp(W x, 0)) + |x0| at x = (1, 1): row 1 of W x is exactly 0, so the
    # B-subdifferential is {(1.5, 2), (2.5, 1)}; torch picks clamp'(0) = 1 -> (2.5, 1).
    assert cli_main(["audit", f"{EXAMPLE}:hinge_net", "--at", "[1.0, 1.0]", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)[0]
    assert data["verdict"] == "CLARKE"
    np.testing.assert_allclose(data["ad_jacobian"], [[2.5, 1.0]])
    found = sorted(tuple(np.ravel(J)) for J in data["b_subdifferential"])
    np.testing.assert_allclose(found, [(1.5, 2.0), (2.5, 1.0)])


def test_random_points_are_smooth_and_match_the_analytic_gradient(capsys):
    assert cli_main(["audit", f"{EXAMPLE}:hinge_net", "--random", "3", "--dim", "2", "--json"]) == 0
    for a in json.loads(capsys.readouterr().out):
        assert a["verdict"] == "SMOOTH"


@pytest.mark.parametrize("args, message", [
    (["--at", "[0.0, oops]"], "--at must be a JSON"),
    ([], "exactly one of --at"),
    (["--random", "2"], "--dim"),
    (["--random", "0", "--dim", "2"], "--random must be >= 1"),
])
def test_bad_arguments_name_the_argument(args, message, capsys):
    assert cli_main(["audit", f"{EXAMPLE}:hinge_net", *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_function_is_an_error(capsys):
    assert cli_main(["audit", f"{EXAMPLE}:nope", "--at", "[0.0]"]) == 2
    assert "no function 'nope'" in capsys.readouterr().err
