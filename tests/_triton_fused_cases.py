"""The Triton perturbed kernels, run by Triton's interpreter on the CPU, against the C kernel.

Same key -> same Philox words -> bit-identical samples (the interpreter runs the float
operations as numpy does, without contraction) -> identical solver outputs: forward
means must be equal exactly, values and gradients to rounding (sums are taken in another
order).  The interpreter is slow (tens of milliseconds per sample and program), so the
default run keeps problems tiny; the full matrix is marked slow.  On a CUDA machine,
``TRITON_INTERPRET=0`` runs the same tests on the device.

Run by tests/test_triton_interpreter.py in a fresh process with ``TRITON_INTERPRET=1``
(the switch must be on before triton is first imported, and must not leak into the
other tests); run it directly with ``python -m pytest tests/_triton_fused_cases.py``.
"""
import importlib.util
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton not installed", allow_module_level=True)
C = pytest.importorskip("nonsmooth.solvers._perturb_c")

from nonsmooth.solvers import _fused  # noqa: E402

K_OF = {"argmax": 1, "topk": 2, "rank": 0, "sortperm": 0}


@pytest.fixture(scope="module")
def tp():
    """(the kernels module, the device, the math test kernel), interpreted unless
    TRITON_INTERPRET=0 and a GPU is there."""
    if os.environ.get("TRITON_INTERPRET") != "0" or not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined
    import triton
    import triton.language as tl

    from nonsmooth.solvers import _triton_perturb as TP

    globals()["TP"] = TP  # Triton resolves a kernel's names in its module globals
    device = "cpu" if os.environ["TRITON_INTERPRET"] == "1" else "cuda"

    @triton.jit
    def math_kernel(x_ptr, w_ptr, out_ptr, n, WHICH: tl.constexpr, F64: tl.constexpr,
                    BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        if WHICH == 0:
            x = tl.load(x_ptr + i, mask=m, other=1.0)
            y = TP._vlog(x)
        elif WHICH == 3:
            x = tl.load(x_ptr + i, mask=m, other=0.0)
            y = TP._vexp(x)
        else:
            c, s = TP._sincos(tl.load(w_ptr + i, mask=m, other=0), F64)
            if WHICH == 1:
                y = c
            else:
                y = s
        tl.store(out_ptr + i, y, mask=m)

    yield TP, device, math_kernel


@pytest.fixture(autouse=True)
def few_programs(tp, monkeypatch):
    monkeypatch.setattr(tp[0], "TARGET_PROGRAMS", 4)  # 2 rows x 2 sample chunks


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_elementwise_math_is_bit_identical_to_the_c_kernel(tp, dtype):
    _, _, math_kernel = tp
    rng = np.random.default_rng(0)
    n = 4096
    w = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    limit = 60.0 if dtype == np.float32 else 600.0
    inputs = {0: np.exp2(rng.uniform(-33, 5, n)).astype(dtype), 3: rng.uniform(0, limit, n).astype(dtype)}
    for which in (0, 1, 2, 3):
        x = inputs.get(which, np.ones(n, dtype))
        ours = np.empty(n, dtype)
        C.math(which, w if which in (1, 2) else x, ours)
        out = torch.empty(n, dtype=torch.float64 if dtype == np.float64 else torch.float32)
        math_kernel[(n // 512,)](torch.from_numpy(x), torch.from_numpy(w.view(np.int32)), out, n,
                                  WHICH=which, F64=dtype == np.float64, BLOCK=512)
        np.testing.assert_array_equal(out.numpy(), ours)


@pytest.mark.parametrize("noise", ["gumbel", "normal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_key_same_samples_as_the_c_kernel(tp, noise, dtype):
    TP, DEVICE, _ = tp
    key = (0x1234ABCD << 32) | 0x9876
    Z, E = TP.noise(torch.tensor([key]), 3, (2, 9), noise=noise, dtype=dtype, device=DEVICE)
    Zc, Ec = _fused.noise(key, 3, (2, 9), noise=noise,
                          dtype=np.float64 if dtype == torch.float64 else np.float32)
    np.testing.assert_array_equal(Z.cpu().numpy(), Zc)
    if noise == "gumbel":
        np.testing.assert_array_equal(E.cpu().numpy(), Ec)


def _compare(tp, name, noise, cv, dtype, N=12, d=7):
    TP, DEVICE, _ = tp
    rng = np.random.default_rng(abs(hash((name, noise, cv, str(dtype)))) % 2**32)
    theta = torch.tensor(rng.normal(size=(2, d)), dtype=dtype, device=DEVICE)
    theta[1] *= 300.0  # a row past the Gumbel ratio limit
    theta[0, 3] = theta[0, 1]
    key = torch.tensor([987654321], device=DEVICE)
    sp = _fused.Spec(name, K_OF[name], N, 0.4, noise, cv, "mean")
    want_value = name != "sortperm"
    mean, value = TP.forward(theta, key, sp, want_value=want_value)
    th = theta.cpu().numpy()
    mean_c, value_c = _fused.forward_numpy(th, 987654321, sp, want_value=want_value)
    np.testing.assert_array_equal(mean.cpu().numpy(), mean_c)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    if want_value:
        np.testing.assert_allclose(value.cpu().numpy(), value_c, **tol)
    g = torch.tensor(rng.normal(size=mean.shape), dtype=dtype, device=DEVICE)
    grad = TP.vjp(theta, key, g, sp)
    grad_c = _fused.vjp_numpy(th, g.cpu().numpy()[None], 987654321, sp)[0]
    np.testing.assert_allclose(grad.cpu().numpy(), grad_c, **tol)


@pytest.mark.parametrize("name, noise, cv, dtype", [
    ("argmax", "gumbel", False, torch.float32),
    ("topk", "normal", True, torch.float64),
    ("rank", "gumbel", True, torch.float32),
    ("sortperm", "gumbel", False, torch.float64),
])
def test_kernels_match_the_c_kernel(tp, name, noise, cv, dtype):
    _compare(tp, name, noise, cv, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["argmax", "topk", "rank", "sortperm"])
@pytest.mark.parametrize("noise", ["gumbel", "normal"])
@pytest.mark.parametrize("cv", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_match_the_c_kernel_full_matrix(tp, name, noise, cv, dtype):
    _compare(tp, name, noise, cv, dtype, N=20, d=9)


def test_empty_batch_and_layer_dispatch(tp):
    TP, DEVICE, _ = tp
    theta = torch.zeros((0, 5), device=DEVICE)
    sp = _fused.Spec("argmax", 1, 4, 0.5, "gumbel", False, "mean")
    mean, value = TP.forward(theta, torch.tensor([1]), sp, want_value=True)
    assert mean.shape == (0, 5) and value.shape == (0,)
    if DEVICE == "cpu":
        return
    from nonsmooth.solvers import argmax_onehot, perturbed  # pragma: no cover - GPU only

    t = torch.randn(3, 5, device=DEVICE, requires_grad=True)
    y = perturbed(argmax_onehot, num_samples=8)(t)
    y.sum().backward()
    assert y.device.type == "cuda" and t.grad.device.type == "cuda"
