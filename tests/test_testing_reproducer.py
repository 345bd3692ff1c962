"""Failure reproducers: the printed script, run on its own in a fresh interpreter and an
unrelated folder, rebuilds the function (lambda or local def, with the arrays and scalars it
captures) and fails the same way -- or names exactly what it could not write out."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from nonsmooth.testing import assert_matches_fd_off_kinks

torch = pytest.importorskip("torch")

GLOBAL_G = torch.tensor([[1.0, 2.0]], dtype=torch.float64)


def _reproducer(call, *args, **kwargs):
    with pytest.raises(AssertionError) as info:
        call(*args, **kwargs)
    msg = str(info.value)
    return msg[msg.index("# --- nonsmooth reproducer"):]


def _run(code, tmp_path):
    script = tmp_path / "repro.py"
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)


def test_lambda_with_captured_arrays_and_scalars_reproduces(tmp_path):
    W = torch.tensor([[0.5, -1.25], [3.0, 0.1]], dtype=torch.float64)
    idx = torch.tensor([1, 0])
    big = torch.linspace(-1, 1, 100, dtype=torch.float32) / 3  # > 64 entries: written as base64
    scale = 0.1
    # x * x.detach() has AD x but derivative 2x: a wrong gradient away from any kink.
    # Two lambdas on one line: the reproducer must pick the one that failed.
    f = lambda v: ((W @ v)[idx] * (GLOBAL_G @ v).detach()).sum() * scale + big.double().sum() * v.sum(); g = lambda v: v  # noqa: E731,E702,E501
    assert g is not f
    code = _reproducer(assert_matches_fd_off_kinks, f, torch.tensor([0.1, 0.7], dtype=torch.float64))
    assert "MISSING" not in code and "rebuild" not in code
    assert "lambda v: ((W @ v)[idx]" in code and "lambda v: v" not in code
    assert "base64" in code and "idx = torch.as_tensor" in code and "scale = 0.1" in code
    out = _run(code, tmp_path)
    assert out.returncode != 0
    assert "AssertionError" in out.stderr and "does not match float64 central differences" in out.stderr
    # same numbers as in this process: the AD and FD values quoted match
    first = [ln for ln in code.splitlines() if "d out[0] / d x[0]" in ln]
    assert not first  # the reproducer does not carry the old message...
    original = str(pytest.raises(AssertionError, assert_matches_fd_off_kinks, f,
                                 torch.tensor([0.1, 0.7], dtype=torch.float64)).value)
    quoted = [ln.strip() for ln in original.splitlines() if ln.strip().startswith("d out[")]
    assert quoted and all(q in out.stderr for q in quoted)  # ...but prints the same AD/FD numbers


def test_local_def_calling_a_local_helper_reproduces(tmp_path):
    shift = torch.tensor([0.25, -0.5], dtype=torch.float64)

    def helper(v):
        return v + shift

    def bad(v):
        h = helper(v)
        return (h * h.detach()).sum()

    code = _reproducer(assert_matches_fd_off_kinks, bad, torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert "MISSING" not in code and "def helper(v):" in code and "def bad(v):" in code
    out = _run(code, tmp_path)
    assert out.returncode != 0 and "does not match float64 central differences" in out.stderr


def test_jax_float64_closure_reproduces_under_x64(tmp_path):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    with jax.enable_x64(True):
        A = jnp.asarray([[2.0, 0.0], [1.0, 1.0]], dtype=jnp.float64)
        f = lambda v: jnp.sum((A @ v) * jax.lax.stop_gradient(v))  # noqa: E731
        code = _reproducer(assert_matches_fd_off_kinks, f, jnp.asarray([0.3, -1.1], dtype=jnp.float64))
    assert "with jax.enable_x64(True)" in code and "MISSING" not in code
    out = _run(code, tmp_path)
    assert out.returncode != 0 and "does not match float64 central differences" in out.stderr


def test_what_cannot_be_written_out_is_named(tmp_path):
    layer = torch.nn.Linear(2, 1).double()
    f = lambda v: (layer(v) * v.detach()).sum()  # noqa: E731
    code = _reproducer(assert_matches_fd_off_kinks, f, torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert "# MISSING: 'layer' (torch.nn.modules.linear.Linear) cannot be written out" in code
    out = _run(code, tmp_path)
    assert out.returncode != 0 and "NameError: name 'layer' is not defined" in out.stderr

    ns = {"torch": torch}
    exec("h = lambda v: (v * v.detach()).sum()", ns)  # no source file to read
    code = _reproducer(assert_matches_fd_off_kinks, ns["h"], torch.tensor([1.0], dtype=torch.float64))
    assert "# MISSING: the source of f" in code and "without a source file" in code


def test_pl_programs_reproduce_by_their_own_source(tmp_path):
    from nonsmooth.testing import PLProgram

    program = PLProgram(2, (("linear", ((1, 1),), (0,)), ("relu",), ("linear", ((1,),), (0,))))
    f = program.to_torch()
    # float16 input with float64 tolerances: AD in float16 is visibly off -> a failure to reproduce
    x = torch.tensor([0.3, 0.9], dtype=torch.float16)
    code = _reproducer(assert_matches_fd_off_kinks, lambda v: f(v) * 1.001, x, rtol=0.0, atol=0.0)
    assert "nonsmooth.testing.PLProgram(2," in code and ".to_torch()" in code and "MISSING" not in code
    out = _run(code, tmp_path)
    assert out.returncode != 0 and "AssertionError" in out.stderr


@pytest.mark.slow
def test_engine_assertion_reproducer_runs(tmp_path):
    from nonsmooth.testing import assert_ad_is_clarke

    s = 1.0
    code = _reproducer(assert_ad_is_clarke, lambda v: torch.relu(s * v) - torch.relu(-s * v),
                       torch.zeros(2, dtype=torch.float64))
    assert "MISSING" not in code
    out = _run(code, tmp_path)
    assert out.returncode != 0 and "SPURIOUS" in out.stderr


def test_value_sources_are_bit_exact():
    from nonsmooth.testing._reproduce import _Script, value_source

    rng = np.random.default_rng(0)
    values = {
        "f32": torch.tensor(rng.normal(size=(3, 4)), dtype=torch.float32),
        "bf16": torch.tensor(rng.normal(size=5), dtype=torch.bfloat16),
        "big": torch.tensor(rng.normal(size=300)),
        "np": rng.normal(size=(2, 2)),
        "ints": np.arange(5, dtype=np.int32),
        "mixed": (1, -0.0, float("inf"), "s", None, [np.float32(0.1)]),
    }
    for name, v in values.items():
        script = _Script()
        expr = value_source(v, name, script)
        ns = {}
        exec("\n".join(script.imports), ns)
        back = eval(expr, ns)
        if isinstance(v, torch.Tensor):
            assert back.dtype == v.dtype and torch.equal(back, v)
        elif isinstance(v, np.ndarray):
            assert back.dtype == v.dtype and np.array_equal(back, v)
        else:
            assert repr(back) == repr(v) and np.copysign(1.0, back[1]) == -1.0
