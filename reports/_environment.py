"""What this installation is running on: versions, CPU/GPU, which PAV backend is loaded.

Shared by ``nonsmooth doctor`` and the report's environment suite.  Frameworks are
probed with ``importlib.util.find_spec`` first so a missing one costs nothing.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import sys


def _version(module_name: str):
    if importlib.util.find_spec(module_name) is None:
        return None
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a broken install is worth reporting, not crashing on
        return f"broken ({type(exc).__name__}: {exc})"
    return getattr(module, "__version__", "unknown")


def _gpus() -> dict:
    seen: dict = {}
    if importlib.util.find_spec("torch") is not None:
        try:
            import torch

            if torch.cuda.is_available():
                seen["torch"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            else:
                seen["torch"] = []
        except Exception as exc:
            seen["torch"] = f"error: {exc}"
    if importlib.util.find_spec("jax") is not None:
        try:
            import jax

            seen["jax"] = [str(d) for d in jax.devices() if d.platform != "cpu"]
        except Exception as exc:
            seen["jax"] = f"error: {exc}"
    return seen


def pav_status() -> dict:
    """Which isotonic-regression backend is in use, and why."""
    try:
        from nonsmooth.solvers._isotonic import pav_backend
    except Exception as exc:
        return {"backend": "missing", "detail": f"{type(exc).__name__}: {exc}"}
    backend = pav_backend()
    detail = "C extension nonsmooth.solvers._pav loaded" if backend == "c" else (
        "pure-NumPy fallback: the C extension did not build or failed to load")
    return {"backend": backend, "detail": detail}


def _dist_version(name: str):
    """An installed distribution's version without importing it (triton is heavy)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def fused_status() -> dict:
    """Whether the fused perturbed kernel (C) is loaded, with its Philox ISA."""
    try:
        from nonsmooth.solvers import _perturb_c
    except Exception as exc:
        return {"backend": "stacked", "detail": f"C kernel not loaded ({type(exc).__name__}); "
                "perturbed layers use the stacked path"}
    return {"backend": "c", "detail": f"C extension nonsmooth.solvers._perturb_c loaded, "
            f"Philox {_perturb_c.PHILOX_ISA}, threads {'yes' if _perturb_c.HAVE_PTHREADS else 'no'}"}


def environment() -> dict:
    """A JSON-ready description of the running environment.

    Example:
        >>> env = environment()
        >>> sorted(env)[:3]
        ['cpu_count', 'gpus', 'machine']
    """
    from nonsmooth import __version__

    return {
        "nonsmooth": __version__,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "numpy": _version("numpy"),
        "scipy": _version("scipy"),
        "sympy": _version("sympy"),
        "torch": _version("torch"),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "hypothesis": _version("hypothesis"),
        "triton": _dist_version("triton"),
        "pav": pav_status(),
        "perturbed": fused_status(),
        "gpus": _gpus(),
    }
