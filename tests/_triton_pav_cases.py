"""The Triton PAV (soft sort/rank on the device), run by Triton's interpreter, against the
C kernel (``_pav.soft_forward``, itself tested against the paper's oracles) and the
documented invariants.  L2 is the whole forward; KL is the isotonic step alone.

Run by tests/test_triton_interpreter.py in a fresh process with ``TRITON_INTERPRET=1``;
``TRITON_INTERPRET=0 python -m pytest tests/_triton_pav_cases.py`` on a CUDA machine runs
them on the device.
"""
import importlib.util
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton not installed", allow_module_level=True)

from nonsmooth.solvers import _soft_sort_core as core  # noqa: E402
from nonsmooth.solvers._isotonic import pav_rows  # noqa: E402
from nonsmooth.solvers._soft_sort_torch import _vjp_torch  # noqa: E402

pytestmark = pytest.mark.skipif(not core._FUSED, reason="needs the C kernel as the reference")


@pytest.fixture(scope="module")
def tpv():
    """(the Triton PAV module, the device)."""
    if os.environ.get("TRITON_INTERPRET") != "0" or not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined
    from nonsmooth.solvers import _triton_pav

    yield _triton_pav, "cpu" if os.environ["TRITON_INTERPRET"] == "1" else "cuda"


def rows(rng, dtype, DEVICE):
    x = rng.normal(size=(4, 11))
    x[0, 2] = x[0, 7] = x[0, 5]  # ties
    x[1] *= 1e-3  # everything pooled at moderate eps
    x[2] = np.sort(x[2])  # already sorted
    x[3, :] = 0.25  # all equal
    return torch.tensor(x, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("op", ["rank", "sort"])
@pytest.mark.parametrize("descending", [False, True])
def test_l2_forward_matches_the_c_kernel(tpv, dtype, op, descending):
    TPV, DEVICE = tpv
    x = rows(np.random.default_rng(1), dtype, DEVICE)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for eps in (1e-3, 0.3, 1.0, 50.0, 1e6):  # 1e6: the pooled-sort closed form
        out, perm, block = TPV.soft_forward_l2(x, rank=op == "rank", strength=eps,
                                               descending=descending)
        oc, pc, bc = core.forward_checked(x.cpu().numpy(), op=op, regularization="l2",
                                          strength=eps, descending=descending)
        scale = np.abs(oc).max(initial=1.0)
        np.testing.assert_allclose(out.cpu().numpy(), oc, rtol=tol, atol=tol * scale)
        np.testing.assert_array_equal(perm.cpu().numpy(), pc)
        np.testing.assert_array_equal(block.cpu().numpy(), bc)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ties_stay_tied_at_any_scale_on_the_device(tpv, dtype):
    """Ranks of tied keys are equal and in [1, n] however large |x| / eps (exact fractions)."""
    TPV, DEVICE = tpv
    big = 1e16 if dtype == torch.float64 else 2.0 ** 24
    x = torch.tensor([[3.0, 3.0, 1.0], [big, big, big]], dtype=dtype, device=DEVICE)
    r, _, _ = TPV.soft_forward_l2(x, rank=True, strength=1e-16 if dtype == torch.float64 else 1e-6,
                                  descending=False)
    np.testing.assert_array_equal(r.cpu().numpy(), np.array([[2.5, 2.5, 1.0], [2.0, 2.0, 2.0]]))


def test_l2_invariants_and_device_backward(tpv):
    TPV, DEVICE = tpv
    x = torch.tensor(np.random.default_rng(2).normal(size=(3, 9)), device=DEVICE)
    n = x.shape[-1]
    r, perm, block = TPV.soft_forward_l2(x, rank=True, strength=0.7, descending=False)
    np.testing.assert_allclose(r.sum(-1).cpu().numpy(), n * (n + 1) / 2, rtol=1e-14)
    s, _, _ = TPV.soft_forward_l2(x, rank=False, strength=0.7, descending=False)
    np.testing.assert_allclose(s.sum(-1).cpu().numpy(), x.sum(-1).cpu().numpy(), rtol=1e-13)
    hard, _, _ = TPV.soft_forward_l2(x, rank=True, strength=1e-9, descending=False)
    np.testing.assert_array_equal(hard.cpu().numpy(), x.argsort(-1).argsort(-1).cpu().numpy() + 1)
    # the device backward on the Triton perm/block equals the C backward
    g = torch.randn_like(x)
    dx = _vjp_torch(x, perm, block, g, strength=0.7, regularization="l2", rank=True,
                    descending=False)
    ref = core.vjp_rows(x.cpu().numpy(), perm.cpu().numpy(), block.cpu().numpy(),
                        g.cpu().numpy(), op="rank", regularization="l2", strength=0.7,
                        descending=False)
    np.testing.assert_allclose(dx.cpu().numpy(), ref, rtol=1e-13, atol=1e-15)


def test_bad_input_gets_the_host_paths_errors(tpv):
    TPV, DEVICE = tpv
    with pytest.raises(ValueError, match="must be finite"):
        TPV.soft_forward_l2(torch.tensor([[1.0, float("nan")]], device=DEVICE), rank=True,
                            strength=1.0, descending=False)
    # huge keys: the host path ranks them (differences of keys only), so must the device
    out, _, _ = TPV.soft_forward_l2(torch.tensor([[3e38, -3e38]], device=DEVICE), rank=True,
                                    strength=1e-3, descending=False)
    np.testing.assert_array_equal(out.cpu().numpy(), [[2.0, 1.0]])
    out, perm, block = TPV.soft_forward_l2(torch.zeros((0, 5), device=DEVICE), rank=True,
                                           strength=1.0, descending=False)
    assert out.shape == perm.shape == block.shape == (0, 5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kl_isotonic_step_matches_the_c_kernel(tpv, dtype):
    TPV, DEVICE = tpv
    rng = np.random.default_rng(3)
    y = rng.normal(size=(5, 13)) * np.array([[1.0], [0.01], [30.0], [1.0], [1.0]])
    w = -np.sort(-rng.normal(size=(5, 13)), axis=-1)
    y[3] = w[3] + 0.5  # every block pooled to one value
    y, w = y.astype(np.float64 if dtype == torch.float64 else np.float32), w.astype(y.dtype)
    w = w.astype(y.dtype)
    v, block = TPV.iso_kl_rows(torch.tensor(y, device=DEVICE), torch.tensor(w, device=DEVICE))
    vc, bc = pav_rows(y, w, kind="kl")
    v, block = v.cpu().numpy(), block.cpu().numpy()
    # row 3 ties everywhere (y - w = 1/2): the pooling there depends on the last bit of
    # exp/log, but every partition gives the value 1/2
    np.testing.assert_array_equal(block[[0, 1, 2, 4]], bc[[0, 1, 2, 4]])
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(v, vc, rtol=tol, atol=tol)
    np.testing.assert_allclose(v[3], 0.5, rtol=tol)
    bc = block
    # the optimality condition of the KL isotonic problem on every block:
    # sum_B exp(y - v) = sum_B exp(w)
    for r in range(y.shape[0]):
        for s in np.unique(bc[r]):
            B = bc[r] == s
            lhs = np.exp(y[r, B].astype(np.float64) - float(v[r][B][0]))
            np.testing.assert_allclose(lhs.sum(), np.exp(w[r, B].astype(np.float64)).sum(),
                                       rtol=10 * tol)


def test_soft_rank_of_a_cuda_tensor_stays_on_the_device(tpv):  # pragma: no cover - GPU only
    if tpv[1] != "cuda":
        pytest.skip("needs a CUDA device (TRITON_INTERPRET=0)")
    from nonsmooth.solvers import soft_rank

    x = torch.randn(8, 100, device="cuda", requires_grad=True)
    r = soft_rank(x, regularization_strength=0.5)
    r.sum().backward()
    assert r.device.type == "cuda" and x.grad.device.type == "cuda"
    ref = soft_rank(x.detach().cpu(), regularization_strength=0.5)
    np.testing.assert_array_equal(r.detach().cpu().numpy(), ref.numpy())
