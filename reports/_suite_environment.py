"""Report suite 1: the environment the report was produced on."""
from __future__ import annotations

import time

from ._environment import environment
from ._suite import Check, SuiteResult, Table


def run(*, quick: bool = False, progress=None) -> SuiteResult:
    t0 = time.perf_counter()
    env = environment()
    rows = [[k, str(v)] for k, v in env.items() if k not in ("pav", "gpus")]
    rows.append(["PAV backend", f"{env['pav']['backend']} ({env['pav']['detail']})"])
    rows.append(["GPUs", str(env["gpus"])])
    checks = [
        Check("C PAV kernel loaded", env["pav"]["backend"] == "c", env["pav"]["detail"],
              {"backend": env["pav"]["backend"]}),
        Check("torch importable", isinstance(env["torch"], str) and not env["torch"].startswith("broken"),
              f"torch {env['torch']}", {}),
        Check("jax importable", isinstance(env["jax"], str) and not env["jax"].startswith("broken"),
              f"jax {env['jax']}", {}),
    ]
    return SuiteResult(
        name="environment",
        title="Environment",
        checks=checks,
        tables=[Table("Versions and hardware", ["item", "value"], rows)],
        summary=f"Python {env['python']}, torch {env['torch']}, jax {env['jax']}, PAV backend {env['pav']['backend']}.",
        seconds=time.perf_counter() - t0,
    )
