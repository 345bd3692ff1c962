"""The ReLU'(0) study: statistics vs SciPy, the custom ReLU vs torch's, float16
emulation vs NumPy float16, and the qualitative results of Bertoin et al. (2021)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
from scipy import stats  # noqa: E402

from nonsmooth.conservative._bifurcation import (  # noqa: E402
    _Net,
    bifurcation_study,
    bifurcation_zone,
    load_dataset,
    proportion_interval,
)


@pytest.mark.parametrize("k,n", [(0, 20), (3, 20), (20, 20), (7, 50), (1, 1)])
@pytest.mark.parametrize("method,scipy_method", [("wilson", "wilson"), ("clopper-pearson", "exact")])
def test_intervals_match_scipy(k, n, method, scipy_method):
    lo, hi = proportion_interval(k, n, method=method)
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method=scipy_method)
    assert lo == pytest.approx(ci.low, abs=1e-9) and hi == pytest.approx(ci.high, abs=1e-9)
    assert lo <= k / n <= hi


def test_interval_validation():
    with pytest.raises(ValueError, match="21"):
        proportion_interval(21, 20)
    with pytest.raises(ValueError, match="'bayes'"):
        proportion_interval(1, 2, method="bayes")
    with pytest.raises(ValueError, match="1.5"):
        proportion_interval(1, 2, confidence=1.5)


def test_mnist_like_is_on_the_k_over_255_lattice_and_mostly_zero():
    X, y = load_dataset("mnist_like", n_samples=300, seed=3)
    assert X.shape == (300, 784) and set(np.unique(y)) <= set(range(10))
    k = X * 255
    assert np.array_equal(k, np.round(k)) and k.min() >= 0 and k.max() <= 255
    assert 0.72 <= np.mean(X == 0) <= 0.88
    Xd, yd = load_dataset("digits")
    assert Xd.shape == (1797, 64) and np.all(Xd * 16 == np.round(Xd * 16))


def _one_unit_params(dtype):
    # Hidden unit z = x0 - x1; output logits = [h, -h].  Samples with x0 == x1 put z at 0 exactly.
    W1 = torch.tensor([[1.0, -1.0]], dtype=dtype, requires_grad=True)
    b1 = torch.zeros(1, dtype=dtype, requires_grad=True)
    W2 = torch.tensor([[1.0], [-1.0]], dtype=dtype, requires_grad=True)
    b2 = torch.zeros(2, dtype=dtype, requires_grad=True)
    return [W1, b1, W2, b2]


def test_custom_relu_backward_matches_closed_form_at_an_exact_zero():
    net = _Net(torch, "float64", "native", "cpu")
    params = _one_unit_params(torch.float64)
    X = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    y = torch.tensor([0])
    differs, zeros = net.batch_bifurcates(params, X, y)
    assert differs and zeros == 1
    # Closed form: loss = CE([h, -h], 0) = log(1 + exp(-2h)); dloss/dh at h=0 is -1.
    # With ReLU'(0)=s, dloss/dW1 = -s * x, so s=1 gives [-0.5, -0.5] and s=0 gives 0.
    logits, _ = net.forward(params, X)
    loss = net.loss(logits, y)
    net.s = 1.0
    g1 = torch.autograd.grad(loss, params[0], retain_graph=True)[0]
    net.s = 0.0
    g0 = torch.autograd.grad(loss, params[0])[0]
    assert torch.equal(g1, torch.tensor([[-0.5, -0.5]], dtype=torch.float64))
    assert torch.equal(g0, torch.zeros(1, 2, dtype=torch.float64))


def test_relu_choice_zero_equals_torch_relu_and_no_zero_means_no_bifurcation():
    net = _Net(torch, "float32", "native", "cpu")
    rng = np.random.default_rng(0)
    params = [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in
              (rng.normal(size=(5, 3)), rng.normal(size=5), rng.normal(size=(2, 5)), rng.normal(size=2))]
    X = torch.tensor(rng.normal(size=(7, 3)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 2, size=7))
    logits, zeros = net.forward(params, X)
    assert sum(zeros) == 0
    g_ours = torch.autograd.grad(net.loss(logits, y), params)
    F = torch.nn.functional
    ref = F.cross_entropy(F.linear(torch.relu(F.linear(X, params[0], params[1])), params[2], params[3]), y)
    g_ref = torch.autograd.grad(ref, params)
    assert all(torch.equal(a, b) for a, b in zip(g_ours, g_ref))
    assert net.batch_bifurcates(params, X, y) == (False, 0)


def test_float16_emulations_round_like_numpy_float16():
    rng = np.random.default_rng(1)
    W = rng.normal(size=(4, 6)).astype(np.float16)
    b = rng.normal(size=4).astype(np.float16)
    X = rng.normal(size=(3, 6)).astype(np.float16)
    # Oracle: NumPy float16 arithmetic, one rounding per multiply and per add.
    want = np.empty((3, 4), dtype=np.float16)
    for i in range(3):
        for j in range(4):
            acc = b[j]
            for k in range(6):
                acc = np.float16(acc + np.float16(X[i, k] * W[j, k]))
            want[i, j] = acc
    net = _Net(torch, "float16", "float16-accumulate", "cpu")
    params = [net.tensor(W.astype(np.float64)), net.tensor(b.astype(np.float64)),
              net.tensor(np.eye(4)), net.tensor(np.zeros(4))]
    logits, _ = net.forward(params, net.tensor(X.astype(np.float64)))
    hidden = np.maximum(want.astype(np.float64), 0)
    assert np.array_equal(logits.detach().numpy(), hidden)
    # The op-level emulation: float32 matmul, one rounding to float16 per op.
    net2 = _Net(torch, "float16", "emulated-float16", "cpu")
    z = net2._round(torch.nn.functional.linear(net2.tensor(X.astype(np.float64)),
                                               net2.tensor(W.astype(np.float64)),
                                               net2.tensor(b.astype(np.float64))))
    ref = (X.astype(np.float32) @ W.astype(np.float32).T + b.astype(np.float32)).astype(np.float16)
    assert np.array_equal(z.detach().numpy(), ref.astype(np.float32))


def test_float64_never_bifurcates_for_default_mlps():
    s = bifurcation_study(depth=3, width=128, batch_size=128, n_inits=6, dtypes=("float64",))
    r = s.rates[0]
    assert r.n_bifurcating == 0 and r.n_with_zero == 0 and r.rate == 0.0
    assert r.ci_low == 0.0 and 0 < r.ci_high < 0.5
    assert s.n_batches == 15 and s.n_samples == 1797


def test_precision_ordering_float16_ge_float32_ge_float64():
    s = bifurcation_study(depth=1, width=32, batch_size=128, n_inits=4, float16="accumulate",
                          dataset="digits", seed=0)
    r16, r32, r64 = (s.rate(d) for d in ("float16", "float32", "float64"))
    assert r16 >= r32 >= r64 == 0.0
    assert r16 > r64  # float16 summed term by term bifurcates in practice
    # Bifurcation requires an exact zero: never more bifurcating inits than inits with zeros.
    for row in s.rates:
        assert row.n_bifurcating <= row.n_with_zero
        assert len(row.zeros_per_layer) == 1
        assert sum(row.zeros_per_layer) == round(row.mean_zero_preactivations * row.n_inits)
    text = s.explain()
    assert "float16" in text and "wilson" in text
    js = s.to_json()
    assert js["rates"][0]["dtype"] == "float16" and js["rates"][0]["precision"] == "float16-accumulate"


def test_rate_grows_with_depth_and_width():
    def run(depth, width):
        s = bifurcation_study(depth=depth, width=width, batch_size=128, n_inits=6,
                              dtypes=("float16",), float16="accumulate", seed=2)
        return s.rates[0]

    small, deeper, wider = run(1, 16), run(2, 16), run(1, 64)
    assert deeper.mean_zero_preactivations > small.mean_zero_preactivations
    assert wider.mean_zero_preactivations > small.mean_zero_preactivations
    assert wider.rate >= small.rate and deeper.rate >= small.rate
    assert wider.rate > small.rate or deeper.rate > small.rate


def test_native_float16_runs_on_cpu_and_says_how():
    s = bifurcation_study(depth=1, width=8, batch_size=256, n_inits=2, dtypes=("float16",),
                          dataset="mnist_like", n_samples=256)
    assert s.rates[0].precision in ("native", "emulated-float16")
    s2 = bifurcation_study(depth=1, width=8, batch_size=256, n_inits=2, dtypes=("float16",),
                           float16="emulated", n_samples=256)
    assert s2.rates[0].precision == "emulated-float16"
    assert "emulated" in s2.explain()


def test_zone_is_a_grid_and_its_cells_recompute():
    z = bifurcation_zone(depth=1, width=16, dtype="float16", float16="accumulate", resolution=9,
                         radius=4.0)
    assert len(z.grid) == 9 and all(len(row) == 9 for row in z.grid)
    assert set(c for row in z.grid for c in row) <= {0, 1}
    # A cell bifurcates only where some pre-activation is exactly zero.
    for row, zrow in zip(z.grid, z.zeros):
        for c, nz in zip(row, zrow):
            assert not c or nz > 0
    z64 = bifurcation_zone(depth=1, width=16, dtype="float64", resolution=5)
    assert z64.fraction == 0.0
    assert z.to_json()["grid"] == [list(r) for r in z.grid]


def test_study_validation_names_the_argument():
    with pytest.raises(ValueError, match="depth must be >= 1, got 0"):
        bifurcation_study(depth=0, width=4, batch_size=8, n_inits=1)
    with pytest.raises(TypeError, match="width must be an int"):
        bifurcation_study(depth=1, width=4.5, batch_size=8, n_inits=1)
    with pytest.raises(ValueError, match="'bfloat8'"):
        bifurcation_study(depth=1, width=4, batch_size=8, n_inits=1, dtypes=("bfloat8",))
    with pytest.raises(ValueError, match="'cifar'"):
        bifurcation_study(depth=1, width=4, batch_size=8, n_inits=1, dataset="cifar")
    with pytest.raises(ValueError, match="batch_size=5000"):
        bifurcation_study(depth=1, width=4, batch_size=5000, n_inits=1)
    with pytest.raises(ValueError, match="'fp8'"):
        bifurcation_study(depth=1, width=4, batch_size=8, n_inits=1, float16="fp8")
    with pytest.raises(ValueError, match="radius"):
        bifurcation_zone(radius=float("nan"))
