"""Stress script for a sanitized build of the fused perturbed kernel (see test_fused.py).

Usage: python _fused_stress.py /path/to/_perturb_c.so
Loads that build under the name ``_perturb_c`` and runs every entry point over odd
shapes (d = 1, 3, 4, 5, 17, 64), both dtypes, every solver / noise / mode / control
variate, several threads, several tangents, empty batches and every rejected argument,
checking the results against the regular build.  Any ASan/UBSan report aborts it.
"""
import importlib.machinery
import importlib.util
import sys

import numpy as np

spec = importlib.util.spec_from_file_location(
    "_perturb_c", sys.argv[1], loader=importlib.machinery.ExtensionFileLoader("_perturb_c",
                                                                             sys.argv[1]))
S = importlib.util.module_from_spec(spec)
spec.loader.exec_module(S)
from nonsmooth.solvers import _perturb_c as R  # noqa: E402  the regular build

rng = np.random.default_rng(0)
calls = 0


def both(fn, *args):
    """Run fn on the sanitized and the regular module with copies of the output arrays."""
    global calls
    outs = []
    for mod in (S, R):
        a = [x.copy() if isinstance(x, np.ndarray) and x.flags.writeable else x for x in args]
        st = getattr(mod, fn)(*a)
        outs.append((st, [x for x in a if isinstance(x, np.ndarray)]))
        calls += 1
    (s1, a1), (s2, a2) = outs
    assert s1 == s2
    for x, y in zip(a1, a2):
        np.testing.assert_array_equal(x, y)


for dtype in (np.float64, np.float32):
    for d in (1, 3, 4, 5, 17, 64):
        for B in (0, 1, 3):
            theta = rng.normal(size=(B, d)).astype(dtype)
            if B and d > 2:
                theta[0, 1] = theta[0, 2]
            if B > 2:
                theta[2] *= 1e4 if dtype == np.float64 else 100  # past the ratio limit
            for solver in range(4):
                k = min(2, d)
                L = d * d if solver == 3 else d
                for noise in (0, 1):
                    for cv in (False, True):
                        for nt in (1, 3):
                            for N in (1, 17, 40):
                                value = None if solver == 3 else np.empty(B, dtype)
                                both("run", 0, theta, None, np.empty((B, L), dtype), value,
                                     12345, N, 0.3, noise, solver, k, cv, nt)
                                for V in (1, 2):
                                    g = rng.normal(size=(V, B, L)).astype(dtype)
                                    both("run", 1, theta, g, None if False else
                                         np.empty((V, B, d), dtype), None, 99, N, 0.3, noise,
                                         solver, k, cv, nt)
                                    v = rng.normal(size=(V, B, d)).astype(dtype)
                                    both("run", 2, theta, v, np.empty((V, B, L), dtype), None,
                                         7, N, 0.3, noise, solver, k, cv, nt)
        for noise in (0, 1):
            z = np.empty((19, 2, d), dtype)
            both("noise", z, np.empty_like(z) if noise == 0 else None, 5, noise)
    x = np.exp2(rng.uniform(-30, 5, 1000)).astype(dtype)
    both("math", 0, x, np.empty_like(x))
    both("math", 3, rng.uniform(0, 50, 1000).astype(dtype), np.empty(1000, dtype))
    w = rng.integers(0, 2**32, 1000, dtype=np.uint64).astype(np.uint32)
    both("math", 1, w, np.empty(1000, dtype))
    both("math", 2, w, np.empty(1000, dtype))
both("philox", 1 << 63, rng.integers(0, 2**32, (50, 4), dtype=np.uint64).astype(np.uint32),
     np.empty((50, 4), np.uint32))

# rejected arguments: every error path releases what it acquired
bad_calls = [
    ("run", (0, np.zeros((2, 3)), None, np.empty((2, 4)), None, 1, 5, 0.5, 0, 0, 1, False, 1)),
    ("run", (0, np.zeros((2, 3)), None, np.empty((2, 3), np.float32), None, 1, 5, 0.5, 0, 0, 1,
             False, 1)),
    ("run", (0, np.zeros((2, 3)).T, None, np.empty((3, 2)), None, 1, 5, 0.5, 0, 0, 1, False, 1)),
    ("run", (1, np.zeros((2, 3)), np.zeros((1, 2, 4)), np.empty((1, 2, 3)), None, 1, 5, 0.5, 0,
             0, 1, False, 1)),
    ("run", (2, np.zeros((2, 3)), np.zeros((1, 2, 3)), np.empty((2, 2, 3)), None, 1, 5, 0.5, 0,
             0, 1, False, 1)),
    ("run", (0, np.zeros((2, 3)), None, np.empty((2, 9)), np.empty(2), 1, 5, 0.5, 0, 3, 1,
             False, 1)),
    ("run", (0, np.zeros((2, 3)), None, None, None, -1, 5, 0.5, 0, 0, 1, False, 1)),
    ("run", (0, np.zeros((2, 3)), None, None, None, 1, 0, 0.5, 0, 0, 1, False, 1)),
    ("run", (0, np.zeros((2, 3)), None, None, None, 1, 5, -0.5, 0, 0, 1, False, 1)),
    ("run", (0, np.zeros((2, 3)), None, None, None, 1, 5, 0.5, 0, 1, 7, False, 1)),
    ("noise", (np.empty((2, 2, 3)), np.empty((2, 2, 4)), 1, 0)),
    ("noise", (np.empty((2, 2, 3)), np.empty((2, 2, 3)), 1, 1)),
    ("math", (0, np.zeros(3), np.empty(3))),
    ("math", (3, np.full(3, 1e9), np.empty(3))),
    ("philox", (1, np.zeros((2, 3), np.uint32), np.empty((2, 4), np.uint32))),
]
for fn, args in bad_calls:
    try:
        getattr(S, fn)(*args)
    except (TypeError, ValueError):
        pass
    else:
        raise AssertionError(f"{fn}{args!r} was accepted")
for status_case in (np.array([[0.0, np.nan]]), np.array([[np.inf, 0.0]]),
                    np.array([[3e38, 0.0]], np.float32)):
    out = np.full(status_case.shape, 7, status_case.dtype)
    assert S.run(0, status_case, None, out, None, 1, 5, 0.5, 0, 0, 1, False, 2) in (1, 2)
    assert (out == 7).all()
print(f"stress: {calls} calls matched the regular build; {len(bad_calls) + 3} rejections")
