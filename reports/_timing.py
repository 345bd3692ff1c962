"""Timing for benchmarks: candidates measured interleaved in one process.

Interleaving (a, b, c, a, b, c, ...) instead of (a, a, a, b, b, b, ...) spreads the
machine's drift evenly over every candidate, so their *ratios* are trustworthy even
when the absolute numbers wobble.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable


def single_thread() -> None:
    """Pin torch (if loaded) to one thread, as the benchmarks promise."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def interleaved(candidates: dict[str, Callable[[], object]], *, repeats: int = 15,
                warmup: int = 2, min_seconds: float = 0.0) -> dict[str, float]:
    """Median seconds per call for each candidate, measured round-robin.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(128, 1000))
        >>> t = interleaved({"argsort": lambda: np.argsort(x, axis=-1)}, repeats=3)
        >>> t["argsort"] > 0
        True
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    start = time.perf_counter()
    done = 0
    while done < repeats or (time.perf_counter() - start) < min_seconds:
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        done += 1
    return {name: statistics.median(v) for name, v in samples.items()}


def fmt_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"
