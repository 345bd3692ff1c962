"""The Triton kernels' tests, run by Triton's interpreter in a fresh process.

``TRITON_INTERPRET=1`` must be set before triton is first imported (torch may import it
earlier in a long test session, and triton's own library kernels are decorated at import),
and neither the switch nor the import may leak into the other tests, so the cases live in
``tests/_triton_fused_cases.py`` and ``tests/_triton_pav_cases.py`` and run here in a
subprocess; a failure quotes the subprocess's report.  The full solver x noise x control
variate x dtype matrix is slow.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None
                                or importlib.util.find_spec("torch") is None,
                                reason="needs triton and torch")
HERE = Path(__file__).resolve().parent


def run_cases(name: str, marker: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-m", marker, str(HERE / name)], capture_output=True, text=True,
                         env=env, cwd=HERE.parent, timeout=1800)
    report = res.stdout[-4000:] + res.stderr[-2000:]
    assert res.returncode == 0, report
    assert " passed" in res.stdout, report


@pytest.mark.parametrize("name", ["_triton_fused_cases.py", "_triton_pav_cases.py"])
def test_triton_kernels_match_the_c_kernels_under_the_interpreter(name):
    run_cases(name, "not slow")


@pytest.mark.slow
def test_triton_perturbed_kernels_full_matrix_under_the_interpreter():
    run_cases("_triton_fused_cases.py", "slow")
