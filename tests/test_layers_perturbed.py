"""The audit engine through perturbed layers, Fenchel-Young losses and surrogate backward passes.

Oracles: the closed forms of Gumbel-perturbed argmax, ``y_sigma = softmax(theta / sigma)``
with Jacobian ``(diag p - p p^T) / sigma`` and ``F_sigma = sigma logsumexp(theta / sigma) +
sigma euler_gamma`` with gradient ``softmax(theta / sigma)`` (Berthet et al. 2020, derived in
the test from the Gumbel-max trick); the standard normal quantile for the Bonferroni
threshold; the hard solvers' zero Jacobian off ties for the surrogate layers' forward.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from _layer_oracles import gumbel_argmax_jacobian

os.environ.setdefault("NONSMOOTH_ENGINE_DEBUG", "1")

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from nonsmooth.conservative import Verdict, audit  # noqa: E402
from nonsmooth.conservative import _layer_perturbed as LP  # noqa: E402
from nonsmooth.solvers import (argmax_onehot, blackbox_backward, fenchel_young_loss, identity_backward,  # noqa: E402
                               perturbed, perturbed_max, shortest_path_edges, topk_mask)

THETA = [0.0, 0.5, 1.0]
SIGMA = 0.5


def _arr(fw, x):
    if fw == "torch":
        return torch.tensor(x, dtype=torch.float64)
    return jnp.asarray(np.asarray(x, dtype=np.float64))


def _audit(fw, f, x):
    with jax.enable_x64(True):
        return audit(f, _arr(fw, x))


def _softmax(t):
    e = np.exp(t - t.max())
    return e / e.sum()


@pytest.mark.parametrize("fw", ["torch", "jax"])
def test_gumbel_argmax_audit_against_the_softmax_jacobian(fw):
    layer = perturbed(argmax_onehot, num_samples=2000, sigma=SIGMA)
    a = _audit(fw, lambda t: layer(t), THETA)
    J = gumbel_argmax_jacobian(np.array(THETA), SIGMA)
    assert a.verdict is Verdict.SMOOTH, a.explain()
    np.testing.assert_allclose(a.b_subdifferential[0], J, atol=1e-12)
    mc = a.monte_carlo
    np.testing.assert_allclose(mc["reference_jacobian"], J, atol=1e-12)
    assert mc["reference_samples"] is None and "closed form" in mc["reference"]
    assert mc["z_score"] <= mc["threshold"]
    # the reported standard errors are those of the score-function estimator with 2000 samples:
    # |AD - J| is of their order (a loose, two-sided sanity bound)
    err = np.abs(a.ad_jacobian - J)
    assert err.max() < 6 * mc["standard_error"].max() and mc["standard_error"].max() < 0.1
    assert "Monte Carlo" in a.explain() and "standard errors" in a.explain()
    assert a.to_json()["monte_carlo"]["z_score"] == pytest.approx(mc["z_score"])


@pytest.mark.parametrize("fw", ["torch", "jax"])
def test_gumbel_perturbed_max_and_fenchel_young_loss(fw):
    """F_sigma = sigma logsumexp(theta/sigma) + sigma gamma, gradient softmax; the FY loss
    F_sigma(theta) - <theta, y> has gradient softmax - y."""
    t = np.array(THETA)
    p = _softmax(t / SIGMA)
    layer = perturbed_max(argmax_onehot, num_samples=2000, sigma=SIGMA)
    a = _audit(fw, lambda v: layer(v), THETA)
    assert a.verdict is Verdict.SMOOTH
    np.testing.assert_allclose(a.b_subdifferential[0][0], p, atol=1e-12)
    y = np.array([0.0, 0.0, 1.0])
    loss = fenchel_young_loss(argmax_onehot, num_samples=2000, sigma=SIGMA)
    yy = _arr(fw, y)
    b = _audit(fw, lambda v: loss(v, yy), THETA)
    assert b.verdict is Verdict.SMOOTH
    np.testing.assert_allclose(b.b_subdifferential[0][0], p - y, atol=1e-12)


@pytest.mark.parametrize("fw", ["torch", "jax"])
def test_sampled_reference_for_a_solver_without_closed_form(fw):
    layer = perturbed(topk_mask(2), num_samples=500, sigma=SIGMA, noise="normal")
    a = _audit(fw, lambda v: layer(v), THETA)
    assert a.verdict is Verdict.SMOOTH
    mc = a.monte_carlo
    assert mc["reference_samples"] >= 20 * 500 and mc["z_score"] <= mc["threshold"]
    assert np.all(mc["standard_error_reference"] < mc["standard_error_ad"] + 1e-15)


def test_sampled_reference_agrees_with_the_closed_form(monkeypatch):
    """Force the sampling path on Gumbel argmax: the large-sample reference must sit within
    a few of its own standard errors of the exact Jacobian."""
    monkeypatch.setattr(LP.MonteCarloSpec, "closed", False, raising=False)
    orig = LP.MonteCarloSpec.__init__

    def init(self, *a, **k):
        orig(self, *a, **k)
        self.closed = False

    monkeypatch.setattr(LP.MonteCarloSpec, "__init__", init)
    layer = perturbed(argmax_onehot, num_samples=1000, sigma=SIGMA)
    a = _audit("torch", lambda v: layer(v), THETA)
    J = gumbel_argmax_jacobian(np.array(THETA), SIGMA)
    se_ref = a.monte_carlo["standard_error_reference"]
    assert np.all(np.abs(a.monte_carlo["reference_jacobian"] - J) <= 5 * se_ref + 1e-12)
    assert a.verdict is Verdict.SMOOTH


def test_a_biased_estimate_is_undecided_with_the_numbers(monkeypatch):
    """If AD were far from the reference (here the reference is shifted by 1 per entry, far
    beyond the estimator's spread) the audit says so, and does not claim SPURIOUS."""
    orig = LP.MonteCarloSpec._reference

    def shifted(self, theta):
        v, J = orig(self, theta)
        return v, J + 1.0

    monkeypatch.setattr(LP.MonteCarloSpec, "_reference", shifted)
    layer = perturbed(argmax_onehot, num_samples=1000, sigma=SIGMA)
    a = _audit("torch", lambda v: layer(v), THETA)
    assert a.verdict is Verdict.UNDECIDED
    assert a.monte_carlo["z_score"] > a.monte_carlo["threshold"] and "standard errors" in a.reason


def test_bonferroni_threshold():
    from scipy.stats import norm

    assert LP.threshold(1) == pytest.approx(norm.isf(LP.ALPHA / 2))
    assert LP.threshold(9) == pytest.approx(3.8649, abs=1e-3)  # Phi^-1(1 - 0.001 / 18)


def test_perturbed_layer_inside_a_model():
    W = torch.tensor([[1.0, -1.0], [0.5, 0.5], [0.0, 2.0]], dtype=torch.float64)
    layer = perturbed(argmax_onehot, num_samples=2000, sigma=SIGMA)
    f = lambda v: torch.tanh(layer(W @ v)).sum() * 3.0  # noqa: E731
    a = audit(f, torch.tensor([0.2, -0.1], dtype=torch.float64))
    assert a.verdict is Verdict.SMOOTH
    th = W.numpy() @ np.array([0.2, -0.1])
    p = _softmax(th / SIGMA)
    grad = 3.0 * (1 - np.tanh(p) ** 2) @ gumbel_argmax_jacobian(th, SIGMA) @ W.numpy()
    np.testing.assert_allclose(a.b_subdifferential[0][0], grad, atol=1e-12)


@pytest.mark.parametrize("fw", ["torch", "jax"])
def test_surrogates_are_named_and_the_forward_clarke_set_reported(fw):
    layer = identity_backward(argmax_onehot)
    a = _audit(fw, lambda v: layer(v), THETA)
    assert a.verdict is Verdict.UNDECIDED and "surrogate" in a.reason and "identity" in a.reason
    assert np.all(a.b_subdifferential == 0.0) and a.exact  # off ties the solver is locally constant
    assert np.abs(a.ad_jacobian).max() > 0  # AD returns the surrogate direction
    bb = blackbox_backward(shortest_path_edges((2, 2)), lambda_=1.0)
    b = _audit(fw, lambda v: bb(v), [1.0, 1.0, 1.0, 1.0])  # two optimal paths: a jump
    assert b.verdict is Verdict.NOT_LIPSCHITZ and any("surrogate" in n for n in b.notes)
