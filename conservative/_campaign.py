"""Audit campaigns: many (function, point, dtype, seed) cases on any executor.

Functions are referenced as ``"module:qualname"`` strings so a case pickles to any
worker (local processes, a Dask cluster, a batch job).  Results are ordered by case
index and hold only what the evaluation returned, never timings or worker names, so a
campaign gives identical results whatever runs it; ``shard=(i, N)`` plus
:func:`merge_results` splits one campaign over N batch jobs.

Example:
    >>> cases = [Case("nonsmooth.testing._examples:abs_sum", [0.0, 1.5], evaluate_kind="gradient")]
    >>> run_campaign(cases, executor="serial").results[0].ok
    True
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import itertools
import json
import math
import os
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

__all__ = [
    "Case",
    "CaseResult",
    "CampaignResult",
    "audit_case",
    "gradient_case",
    "make_cases",
    "merge_results",
    "parse_shard",
    "resolve",
    "run_campaign",
]

_DTYPES = ("float16", "float32", "float64")
_FRAMEWORKS = ("torch", "jax")
_EVALUATORS = {
    "audit": "nonsmooth.conservative._campaign:audit_case",
    "gradient": "nonsmooth.conservative._campaign:gradient_case",
}


# ----------------------------------------------------------------------------- references
def resolve(reference: str) -> Callable:
    """The object a ``"package.module:Outer.name"`` reference names.

    Example:
        >>> resolve("math:sqrt")(4.0)
        2.0
    """
    if not isinstance(reference, str) or reference.count(":") != 1:
        raise ValueError(f"function reference must be 'module:qualname', got {reference!r}")
    module_name, qualname = reference.split(":")
    if not module_name or not qualname or "<" in qualname:
        raise ValueError(f"function reference must be 'module:qualname' naming a module-level "
                         f"object (no lambdas or locals), got {reference!r}")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module {module_name!r} of reference {reference!r}: {err}") from err
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"reference {reference!r}: {part!r} not found in {module_name!r}") from None
    if not callable(obj):
        raise TypeError(f"reference {reference!r} names a {type(obj).__name__}, not a callable")
    return obj


# ----------------------------------------------------------------------------- cases
def _hex_point(point) -> Any:
    if isinstance(point, (list, tuple)):
        return tuple(_hex_point(p) for p in point)
    if isinstance(point, bool) or not isinstance(point, (int, float, np.floating, np.integer)):
        raise TypeError(f"point entries must be real numbers, got {type(point).__name__}: {point!r}")
    return float(point).hex()


def _unhex(point) -> Any:
    if isinstance(point, (list, tuple)):
        return [_unhex(p) for p in point]
    return float.fromhex(point)


@dataclasses.dataclass(frozen=True)
class Case:
    """One audit: ``function`` ("module:qualname") at ``point`` in ``dtype`` on ``framework``.

    The point is stored with ``float.hex`` so it survives JSON and pickling bit for bit.
    ``evaluate_kind`` picks the evaluator: ``"audit"`` (the conservative engine) or
    ``"gradient"`` (only the framework's AD output; needs no engine).
    """

    function: str
    point: Any
    dtype: str = "float64"
    seed: int = 0
    framework: str = "torch"
    evaluate_kind: str = "audit"
    options: tuple = ()

    def __post_init__(self):
        if not isinstance(self.function, str) or self.function.count(":") != 1:
            raise ValueError(f"function must be a 'module:qualname' string, got {self.function!r}")
        point = self.point
        if isinstance(point, np.ndarray) or hasattr(point, "tolist"):
            point = np.asarray(point).tolist()
        leaves = list(_flat(point))
        if not leaves:
            raise ValueError(f"point must hold at least one number, got {self.point!r}")
        if all(isinstance(v, str) for v in leaves):  # already hex (from JSON)
            try:
                [float.fromhex(v) for v in leaves]
            except ValueError:
                raise ValueError(f"point strings must be float.hex values, got {self.point!r}") from None
            object.__setattr__(self, "point", _freeze(point))
        else:
            object.__setattr__(self, "point", _hex_point(point))
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.framework not in _FRAMEWORKS:
            raise ValueError(f"framework must be one of {_FRAMEWORKS}, got {self.framework!r}")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.evaluate_kind not in _EVALUATORS and ":" not in self.evaluate_kind:
            raise ValueError(f"evaluate_kind must be one of {sorted(_EVALUATORS)} or a "
                             f"'module:qualname' evaluator, got {self.evaluate_kind!r}")
        opts = self.options.items() if isinstance(self.options, dict) else self.options
        object.__setattr__(self, "options", tuple(sorted((str(k), v) for k, v in opts)))

    @property
    def values(self) -> np.ndarray:
        """The point as a float64 array (exact: it was stored with float.hex)."""
        return np.asarray(_unhex(self.point), dtype=np.float64)

    def key(self) -> str:
        """A stable identifier: equal cases have equal keys."""
        return json.dumps(self.to_json(), sort_keys=True)

    def to_json(self) -> dict:
        return {"function": self.function, "point": _listify(self.point), "dtype": self.dtype,
                "seed": int(self.seed), "framework": self.framework,
                "evaluate_kind": self.evaluate_kind, "options": [list(kv) for kv in self.options]}

    @classmethod
    def from_json(cls, data: dict) -> "Case":
        return cls(data["function"], _freeze(data["point"]), data["dtype"], data["seed"],
                   data["framework"], data["evaluate_kind"], tuple(tuple(kv) for kv in data["options"]))


def _flat(x):
    if isinstance(x, (list, tuple)):
        for item in x:
            yield from _flat(item)
    else:
        yield x


def _freeze(x):
    return tuple(_freeze(v) for v in x) if isinstance(x, (list, tuple)) else x


def _listify(x):
    return [_listify(v) for v in x] if isinstance(x, (list, tuple)) else x


def make_cases(functions: Sequence[str], points: Iterable, *, dtypes: Sequence[str] = ("float64",),
               seeds: Sequence[int] = (0,), framework: str = "torch",
               evaluate_kind: str = "audit") -> list[Case]:
    """Every combination of ``functions`` x ``points`` x ``dtypes`` x ``seeds``.

    Example:
        >>> len(make_cases(["m:f", "m:g"], [[0.0], [1.0]], dtypes=("float32", "float64")))
        8
    """
    points = list(points)
    return [Case(f, p, d, s, framework, evaluate_kind)
            for f, p, d, s in itertools.product(functions, points, dtypes, seeds)]


# ----------------------------------------------------------------------------- evaluators
def _framework_array(case: Case):
    values = case.values
    if case.framework == "torch":
        import torch

        return torch.tensor(values, dtype=getattr(torch, case.dtype))
    import jax.numpy as jnp

    return jnp.asarray(values, dtype=case.dtype)


def _x64_context(case: Case):
    import contextlib

    if case.framework == "jax" and case.dtype == "float64":
        import jax

        return jax.enable_x64(True)
    return contextlib.nullcontext()


def _hexify(array) -> Any:
    arr = np.asarray(array, dtype=np.float64)
    return [_hexify(a) for a in arr] if arr.ndim else float(arr).hex()


def gradient_case(case: Case) -> dict:
    """The framework's own output and reverse-mode Jacobian of the case's function at
    its point, in the case's dtype, hex-encoded (no engine involved)."""
    f = resolve(case.function)
    with _x64_context(case):
        x = _framework_array(case)
        if case.framework == "torch":
            import torch

            x = x.detach().requires_grad_(True)
            y = f(x)
            flat = y.reshape(-1)
            rows = [torch.autograd.grad(flat[i], x, retain_graph=True, allow_unused=True)[0]
                    for i in range(flat.numel())]
            jac = [np.zeros(x.shape) if r is None else r.detach().to(torch.float64).numpy() for r in rows]
            value = y.detach().to(torch.float64).numpy()
        else:
            import jax

            y = f(x)
            jac = np.asarray(jax.jacrev(lambda v: f(v).reshape(-1))(x), dtype=np.float64)
            value = np.asarray(y, dtype=np.float64)
    return {"value": _hexify(value), "jacobian": _hexify(np.asarray(jac)),
            "dtype": case.dtype, "framework": case.framework}


def audit_case(case: Case) -> dict:
    """``nonsmooth.conservative.audit`` of the case, as its ``to_json()``."""
    try:
        from nonsmooth.conservative import audit
    except ImportError:  # the engine's module, before the subpackage re-exports it
        from nonsmooth.conservative._audit import audit

    f = resolve(case.function)
    with _x64_context(case):
        x = _framework_array(case)
        result = audit(f, x, seed=int(case.seed), **dict(case.options))
    return result.to_json()


# ----------------------------------------------------------------------------- results
@dataclasses.dataclass(frozen=True)
class CaseResult:
    """What one case returned (``value``) or why it failed (``error``)."""

    index: int
    case: Case
    ok: bool
    value: Any = None
    error: str = ""
    seconds: float = dataclasses.field(default=0.0, compare=False)

    def to_json(self) -> dict:
        return {"index": self.index, "case": self.case.to_json(), "ok": self.ok,
                "value": self.value, "error": self.error, "seconds": round(self.seconds, 6)}

    @classmethod
    def from_json(cls, data: dict) -> "CaseResult":
        return cls(int(data["index"]), Case.from_json(data["case"]), bool(data["ok"]), data["value"],
                   data["error"], float(data.get("seconds", 0.0)))


@dataclasses.dataclass(frozen=True)
class CampaignResult:
    """Every case's result, in case order.  ``shard`` is ``(i, N)`` or None (all cases).

    Equality ignores timings and the executor, so results from different executors
    (or merged shards) compare equal exactly when every case returned the same thing.
    """

    results: tuple
    n_cases: int
    shard: tuple | None = None
    executor: str = dataclasses.field(default="", compare=False)
    seconds: float = dataclasses.field(default=0.0, compare=False)

    @property
    def n_failed(self) -> int:
        return sum(not r.ok for r in self.results)

    def verdict_counts(self) -> dict:
        counts: dict = {}
        for r in self.results:
            key = (r.value or {}).get("verdict", "ok") if r.ok and isinstance(r.value, dict) else (
                "ok" if r.ok else "error")
            counts[str(key)] = counts.get(str(key), 0) + 1
        return counts

    def explain(self) -> str:
        part = "" if self.shard is None else f" (shard {self.shard[0]}/{self.shard[1]})"
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.verdict_counts().items()))
        lines = [f"Campaign{part}: {len(self.results)} of {self.n_cases} case(s) on {self.executor or 'an executor'} "
                 f"in {self.seconds:.2f} s; {counts}."]
        for r in self.results:
            if not r.ok:
                lines.append(f"  case {r.index} {r.case.function} at {r.case.to_json()['point']} "
                             f"({r.case.dtype}, {r.case.framework}) failed: {r.error}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"n_cases": self.n_cases, "shard": list(self.shard) if self.shard else None,
                "executor": self.executor, "seconds": round(self.seconds, 6),
                "results": [r.to_json() for r in self.results]}

    def save(self, path: str | os.PathLike) -> None:
        """One header line and one line per case, JSON (for :func:`merge_results`)."""
        with open(path, "w", encoding="utf-8") as fh:
            head = {k: v for k, v in self.to_json().items() if k != "results"}
            fh.write(json.dumps({"campaign": head}) + "\n")
            for r in self.results:
                fh.write(json.dumps(r.to_json(), sort_keys=True) + "\n")


def merge_results(paths: Sequence[str | os.PathLike]) -> CampaignResult:
    """Join the files saved by the shards of one campaign into one result.

    Raises ValueError when the shards disagree on the campaign size, overlap with
    different results, or leave cases missing.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("merge_results needs at least one path, got an empty list")
    by_index: dict[int, CaseResult] = {}
    n_cases = None
    seconds = 0.0
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            lines = [ln for ln in fh if ln.strip()]
        if not lines or "campaign" not in json.loads(lines[0]):
            raise ValueError(f"{os.fspath(path)!r} is not a saved campaign (no header line)")
        head = json.loads(lines[0])["campaign"]
        if n_cases is not None and head["n_cases"] != n_cases:
            raise ValueError(f"{os.fspath(path)!r} belongs to a campaign of {head['n_cases']} cases, "
                             f"the others to one of {n_cases}")
        n_cases = head["n_cases"]
        seconds += head.get("seconds", 0.0)
        for ln in lines[1:]:
            r = CaseResult.from_json(json.loads(ln))
            if r.index in by_index and by_index[r.index] != r:
                raise ValueError(f"case {r.index} appears in two shards with different results "
                                 f"({os.fspath(path)!r})")
            by_index[r.index] = r
    missing = sorted(set(range(n_cases)) - set(by_index))
    if missing:
        raise ValueError(f"merged shards miss {len(missing)} case(s), first indices {missing[:10]}; "
                         "run the missing shards or merge all their files")
    return CampaignResult(tuple(by_index[i] for i in range(n_cases)), n_cases, None, "merged", seconds)


# ----------------------------------------------------------------------------- running
def parse_shard(text: str) -> tuple[int, int]:
    """``"2/8"`` -> ``(2, 8)``: shard 2 of 8 (0-based), as ``--shard i/N`` gives it."""
    try:
        i, n = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ValueError(f"shard must look like 'i/N' (e.g. '0/4'), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard must be 'i/N' with 0 <= i < N, got {text!r}")
    return i, n


def _check_shard(shard) -> tuple[int, int]:
    if (not isinstance(shard, (tuple, list)) or len(shard) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in shard)):
        raise ValueError(f"shard must be a pair (i, N) of ints, got {shard!r}")
    i, n = int(shard[0]), int(shard[1])
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard must satisfy 0 <= i < N, got {shard!r}")
    return i, n


def _evaluate_chunk(evaluate: str, chunk: list) -> list:
    """Runs on the worker: evaluate each (index, case); errors become data."""
    fn = resolve(_EVALUATORS.get(evaluate, evaluate)) if evaluate else None
    out = []
    for index, case in chunk:
        t0 = time.perf_counter()
        try:
            f = fn or resolve(_EVALUATORS.get(case.evaluate_kind, case.evaluate_kind))
            value = json.loads(json.dumps(f(case), default=_json_default))
            out.append(CaseResult(index, case, True, value, "", time.perf_counter() - t0))
        except Exception as err:  # noqa: BLE001 - a failing case is a result, not a crash
            out.append(CaseResult(index, case, False, None, f"{type(err).__name__}: {err}",
                                  time.perf_counter() - t0))
    return out


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "to_json"):
        return value.to_json()
    raise TypeError(f"case evaluator returned a {type(value).__name__}, which is not JSON data")


class _Serial(concurrent.futures.Executor):
    """Runs each submission at once in this process."""

    def submit(self, fn, /, *args, **kwargs):
        future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001 - delivered through the future
            future.set_exception(err)
        return future


def _make_executor(executor, max_workers):
    """(executor, description, close callback) for the ``executor`` argument."""
    if executor is None or executor == "processes":
        import multiprocessing

        # spawn, not fork: torch and jax keep threads that a forked child inherits broken.
        ex = concurrent.futures.ProcessPoolExecutor(
            max_workers=max_workers, mp_context=multiprocessing.get_context("spawn"))
        return ex, f"local processes ({ex._max_workers})", lambda: ex.shutdown(wait=True)
    if executor == "serial":
        return _Serial(), "serial (this process)", lambda: None
    if isinstance(executor, str) and (executor == "dask-local" or "://" in executor):
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError as err:
            raise ImportError(f"executor={executor!r} needs Dask: pip install 'nonsmooth[dask]'") from err
        if executor == "dask-local":
            cluster = LocalCluster(n_workers=max_workers or 2, threads_per_worker=1, processes=True,
                                   dashboard_address=None)
            client = Client(cluster)

            def close():
                client.close()
                cluster.close()

            return client.get_executor(), f"dask LocalCluster ({len(cluster.workers)} workers)", close
        client = Client(executor)
        return client.get_executor(), f"dask scheduler {executor}", client.close
    if hasattr(executor, "get_executor") and hasattr(executor, "scheduler_info"):  # a dask Client
        return executor.get_executor(), f"dask client {type(executor).__name__}", lambda: None
    if isinstance(executor, concurrent.futures.Executor) or hasattr(executor, "submit"):
        return executor, type(executor).__name__, lambda: None
    raise TypeError(
        f"executor must be None (local processes), 'serial', 'processes', 'dask-local', a Dask "
        f"scheduler address like 'tcp://host:8786', a dask Client or a concurrent.futures.Executor; "
        f"got {executor!r}"
    )


def run_campaign(cases: Iterable, *, executor=None, shard: tuple[int, int] | str | None = None,
                 evaluate: str | None = None, chunksize: int | None = None,
                 max_workers: int | None = None, progress: Callable[[str], None] | None = None,
                 ) -> CampaignResult:
    """Evaluate every case (or shard ``i`` of ``N``: cases ``i, i+N, i+2N, ...``).

    ``executor``: None or "processes" (a local spawn process pool), "serial",
    "dask-local" (a Dask ``LocalCluster``), a Dask scheduler address, a Dask
    ``Client``, or any ``concurrent.futures.Executor``.  ``evaluate`` overrides each
    case's evaluator with a ``"module:qualname"`` function ``f(case) -> JSON data``.

    Example:
        >>> cs = make_cases(["nonsmooth.testing._examples:max_pair"], [[1.0, 1.0]],
        ...                 evaluate_kind="gradient")
        >>> r = run_campaign(cs, executor="serial")
        >>> r.results[0].value["jacobian"]  # torch splits a tie in maximum evenly
        [['0x1.0000000000000p-1', '0x1.0000000000000p-1']]
    """
    case_list = [c if isinstance(c, Case) else (Case(**c) if isinstance(c, dict) else Case(*c))
                 for c in cases]
    if isinstance(shard, str):
        shard = parse_shard(shard)
    elif shard is not None:
        shard = _check_shard(shard)
    if evaluate is not None:
        if not isinstance(evaluate, str) or (evaluate not in _EVALUATORS and ":" not in evaluate):
            raise ValueError(f"evaluate must be {sorted(_EVALUATORS)} or a 'module:qualname' string "
                             f"(so it pickles to workers), got {evaluate!r}")
        resolve(_EVALUATORS.get(evaluate, evaluate))  # fail here, not on every worker
    if max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1):
        raise ValueError(f"max_workers must be a positive int, got {max_workers!r}")
    indexed = [(i, c) for i, c in enumerate(case_list) if shard is None or i % shard[1] == shard[0]]
    ex, description, close = _make_executor(executor, max_workers)
    workers = max_workers or os.cpu_count() or 1
    if chunksize is None:
        chunksize = max(1, math.ceil(len(indexed) / (4 * workers)))
    elif not isinstance(chunksize, int) or chunksize < 1:
        raise ValueError(f"chunksize must be a positive int, got {chunksize!r}")
    chunks = [indexed[k:k + chunksize] for k in range(0, len(indexed), chunksize)]
    start = time.perf_counter()
    results: list[CaseResult] = []
    try:
        futures = [ex.submit(_evaluate_chunk, evaluate or "", chunk) for chunk in chunks]
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            results.extend(future.result())
            if progress is not None:
                progress(f"campaign: {done}/{len(chunks)} chunks done")
    finally:
        close()
    results.sort(key=lambda r: r.index)
    return CampaignResult(tuple(results), len(case_list), shard, description,
                          time.perf_counter() - start)
