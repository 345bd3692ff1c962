"""The ``nonsmooth`` command line.

Subcommands: ``report`` (the main job), ``audit`` (a user's function), ``rules`` (kink
conventions of the installed frameworks), ``prove`` (SymPy certificates), ``bench``
(benchmarks with ratios against named baselines) and ``doctor`` (what is installed).
Heavy modules are imported inside each subcommand so ``nonsmooth --help`` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

BENCHES = ("pav", "sort", "engine", "perturbed", "implicit")


def _cmd_doctor(args) -> int:
    from ._environment import environment

    env = environment()
    if args.json:
        print(json.dumps(env, indent=1))
    else:
        width = max(len(k) for k in env)
        for key, value in env.items():
            if key in ("pav", "perturbed"):
                value = f"{value['backend']}  ({value['detail']})"
            elif key == "gpus":
                value = ", ".join(f"{fw}: {v if v else 'none'}" for fw, v in value.items()) or "none"
            print(f"{key:<{width}}  {value if value is not None else 'not installed'}")
    for part in ("pav", "perturbed"):
        if args.require_c and env[part]["backend"] != "c":
            print(f"error: the C {part} kernel is not in use ({env[part]['detail']}); "
                  "reinstall with gcc and the Python headers available", file=sys.stderr)
            return 1
    return 0


def _cmd_bench(args) -> int:
    names = list(BENCHES) if "all" in args.names else args.names
    status = 0
    for name in names:
        module = importlib.import_module(f"nonsmooth.reports._bench_{name}")
        print(f"== nonsmooth bench {name}{' (quick)' if args.quick else ''} ==")
        module.run(quick=args.quick)
        print()
    return status


def _cmd_report(args) -> int:
    from ._report import SUITES, run_report

    frameworks = None
    if args.frameworks:
        frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
        bad = [f for f in frameworks if f not in ("torch", "jax")]
        if bad:
            print(f"error: --frameworks: unknown framework(s) {bad!r}; use torch, jax or torch,jax",
                  file=sys.stderr)
            return 2
    suites = None
    if args.suites:
        suites = [s.strip() for s in args.suites.split(",") if s.strip()]
        bad = [s for s in suites if s not in SUITES]
        if bad:
            print(f"error: --suites: unknown suite(s) {bad!r}; choose from {', '.join(SUITES)}",
                  file=sys.stderr)
            return 2
    report, paths = run_report(out=args.out, quick=args.quick, frameworks=frameworks, suites=suites,
                               jobs=args.jobs, scheduler=args.scheduler)
    s = report["summary"]
    failed = [x["name"] for x in report["suites"] if not x["passed"]]
    print(f"{s['checks_passed']}/{s['checks_total']} checks passed; {s['suites_passed']}/{s['suites_total']} "
          f"suites passed{' (PARTIAL)' if report['partial'] else ''}"
          + (f"; failed or errored: {', '.join(failed)}." if failed else "."))
    for kind, path in paths.items():
        print(f"  {kind:<8} {path}")
    if report["partial"]:
        return 130
    return 0 if report["passed"] else 1


def _load_function(spec: str):
    if ":" not in spec:
        raise SystemExit(f"error: FUNCTION must look like FILE.py:NAME, got {spec!r}")
    file, _, name = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise SystemExit(f"error: no such file {file!r}")
    mod_spec = importlib.util.spec_from_file_location(f"_nonsmooth_user_{path.stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        mod_spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise SystemExit(f"error: {file!r} has no function {name!r}")
    framework = None
    if "torch" in vars(module) and "jax" not in vars(module) and "jnp" not in vars(module):
        framework = "torch"
    elif ("jax" in vars(module) or "jnp" in vars(module)) and "torch" not in vars(module):
        framework = "jax"
    return fn, framework


def _make_array(values, framework, dtype):
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    if framework == "torch":
        import torch

        return torch.tensor(arr, dtype=getattr(torch, dtype))
    import jax
    import jax.numpy as jnp

    if dtype == "float64":
        # Building the user's float64 input needs x64; the engine manages its own precision.
        jax.config.update("jax_enable_x64", True)
    return jnp.asarray(arr, dtype=getattr(jnp, dtype))


def _cmd_audit(args) -> int:
    import numpy as np

    fn, guessed = _load_function(args.function)
    framework = args.framework or guessed
    if framework is None:
        print("error: cannot tell whether the function uses torch or jax; pass --framework torch|jax",
              file=sys.stderr)
        return 2
    if (args.at is None) == (args.random is None):
        print("error: give exactly one of --at '[...]' or --random N", file=sys.stderr)
        return 2
    if args.at is not None:
        try:
            points = [json.loads(args.at)]
        except json.JSONDecodeError as exc:
            print(f"error: --at must be a JSON number or list, got {args.at!r} ({exc})", file=sys.stderr)
            return 2
    else:
        if args.random < 1:
            print(f"error: --random must be >= 1, got {args.random}", file=sys.stderr)
            return 2
        if args.dim is None:
            print("error: --random needs --dim D (the input length)", file=sys.stderr)
            return 2
        rng = np.random.default_rng(args.seed)
        points = [rng.standard_normal(args.dim).tolist() for _ in range(args.random)]
    from nonsmooth.conservative import audit

    results = []
    worst = 0
    for point in points:
        x = _make_array(point, framework, args.dtype)
        a = audit(fn, x, seed=args.seed)
        results.append(a)
        if a.verdict.name in ("SPURIOUS", "NOT_LIPSCHITZ"):
            worst = 1
    if args.json:
        print(json.dumps([json.loads(a.to_json()) if isinstance(a.to_json(), str) else a.to_json()
                          for a in results], indent=1))
    else:
        np.set_printoptions(precision=6, suppress=True)
        for point, a in zip(points, results):
            print(f"x = {point}")
            print(f"verdict: {a.verdict.name}")
            print(f"AD Jacobian ({a.framework}):\n{np.asarray(a.ad_jacobian)}")
            elements = [] if a.b_subdifferential is None else list(a.b_subdifferential)
            if elements:
                shown = elements[:4]
                print(f"B-subdifferential elements found ({len(elements)}"
                      f"{', complete' if a.exact else ''}):")
                for J in shown:
                    print(np.asarray(J))
                if len(elements) > len(shown):
                    print(f"... and {len(elements) - len(shown)} more (--json for all)")
            print(a.explain())
            print()
    return worst


def _cmd_rules(args) -> int:
    from nonsmooth.conservative import kink_conventions

    frameworks = [args.framework] if args.framework else [
        f for f in ("torch", "jax") if importlib.util.find_spec(f) is not None]
    if not frameworks:
        print("error: neither torch nor jax is installed; pip install 'nonsmooth[torch,jax]'", file=sys.stderr)
        return 2
    for fw in frameworks:
        conv = kink_conventions(fw)
        print(conv.to_markdown())
        print()
    return 0


def _cmd_study(args) -> int:
    from nonsmooth.conservative._bifurcation import bifurcation_study

    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    study = bifurcation_study(depth=args.depth, width=args.width, batch_size=args.batch_size,
                              n_inits=args.n_inits, dtypes=dtypes, dataset=args.dataset, seed=args.seed,
                              float16=args.float16,
                              progress=(lambda m: print(m, file=sys.stderr)) if not args.json else None)
    print(json.dumps(study.to_json(), indent=1) if args.json else study.explain())
    return 0


def _cmd_campaign(args) -> int:
    from nonsmooth.conservative._campaign import Case, run_campaign

    try:
        data = json.loads(Path(args.cases).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: cannot read cases from {args.cases!r}: {exc}", file=sys.stderr)
        return 2
    if isinstance(data, dict):
        data = data.get("cases", [])
    cases = [Case.from_json(c) if "evaluate_kind" in c and "options" in c else Case(**c) for c in data]
    executor = None if args.executor == "processes" else args.executor
    result = run_campaign(cases, executor=executor, shard=args.shard,
                          progress=lambda m: print(m, file=sys.stderr))
    if args.out:
        result.save(args.out)
    print(result.explain())
    return 0 if result.n_failed == 0 else 1


def _cmd_campaign_merge(args) -> int:
    from nonsmooth.conservative._campaign import merge_results

    merged = merge_results(args.paths)
    merged.save(args.out)
    print(merged.explain())
    return 0 if merged.n_failed == 0 else 1


def _cmd_prove(args) -> int:
    from nonsmooth.proofs._cli import main as prove_main

    return prove_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nonsmooth",
        description="What backpropagation really computes through nonsmooth programs: audits, "
                    "certificates, fast differentiable solvers and a correctness report.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    r = sub.add_parser("report", help="run the built-in suites and write the correctness report",
                       description="Run the built-in suites (environment, kink conventions, engine showcase, "
                                   "solvers, implicit layers, ReLU'(0) study, proofs, benchmarks) and write "
                                   "report.json, report.md, index.html and junit.xml.")
    r.add_argument("--out", default="nonsmooth-report", help="output folder (default ./nonsmooth-report/)")
    r.add_argument("--quick", action="store_true", help="small sizes; about a minute on 2 cores")
    r.add_argument("--frameworks", help="comma-separated subset of torch,jax (default: all installed)")
    r.add_argument("--suites", help="comma-separated subset of suites to run (default: all)")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--jobs", type=int, default=1, help="run suites in N local processes")
    g.add_argument("--scheduler", help="Dask scheduler address to run the suites on")
    r.set_defaults(func=_cmd_report)

    a = sub.add_parser("audit", help="audit a function of yours at a point: what AD returns vs the Clarke set",
                       description="Audit FILE.py:FUNC at a point. Prints the verdict (SMOOTH, CLARKE, "
                                   "SPURIOUS, NOT_LIPSCHITZ, UNDECIDED) and its explanation. Exit status 1 "
                                   "when a verdict is SPURIOUS or NOT_LIPSCHITZ.")
    a.add_argument("function", help="FILE.py:FUNC, a function of one torch tensor or jax array")
    a.add_argument("--at", help='the point as JSON, e.g. "[0.0, 1.0]"')
    a.add_argument("--random", type=int, help="audit N random standard-normal points (needs --dim)")
    a.add_argument("--dim", type=int, help="input length for --random")
    a.add_argument("--framework", choices=("torch", "jax"), help="default: guessed from the file's imports")
    a.add_argument("--dtype", default="float64", choices=("float16", "bfloat16", "float32", "float64"))
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--json", action="store_true", help="print the audits as JSON")
    a.set_defaults(func=_cmd_audit)

    ru = sub.add_parser("rules", help="print the kink-convention table of the installed frameworks",
                        description="Measure live what the installed torch/jax AD returns at every registered "
                                    "primitive's kinks, and whether it lies in the Clarke set.")
    ru.add_argument("--framework", choices=("torch", "jax"))
    ru.set_defaults(func=_cmd_rules)

    pr = sub.add_parser("prove", help="check the SymPy certificates (nonsmooth prove --help for options)",
                        add_help=False)
    pr.add_argument("rest", nargs=argparse.REMAINDER)
    pr.set_defaults(func=_cmd_prove)

    st = sub.add_parser("study", help="the ReLU'(0) bifurcation study (Bertoin et al. 2021)",
                        description="For an MLP of the given depth and width, over n random initialisations, "
                                    "in each dtype: does backprop with ReLU'(0)=0 differ from ReLU'(0)=1 on "
                                    "some minibatch of one pass over the data set? Prints rates with "
                                    "confidence intervals.")
    st.add_argument("--depth", type=int, default=3)
    st.add_argument("--width", type=int, default=256)
    st.add_argument("--batch-size", type=int, default=128)
    st.add_argument("--n-inits", type=int, default=20)
    st.add_argument("--dtypes", default="float16,float32,float64")
    st.add_argument("--dataset", default="digits", choices=("digits", "mnist_like"))
    st.add_argument("--float16", default="auto", choices=("auto", "native", "emulated", "accumulate"),
                    help="how float16 is computed on CPU (see bifurcation_study)")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_study)

    c = sub.add_parser("campaign", help="run many audit cases on local processes, Dask, or one shard of N",
                       description="Run the cases of a JSON file (a list of {function: 'module:qualname', "
                                   "point, dtype, seed, framework, evaluate_kind}) on an executor; results are "
                                   "identical whatever runs them. Exit 1 if a case failed.")
    c.add_argument("cases", help="JSON file with the list of cases")
    c.add_argument("--executor", default="processes",
                   help="processes (default), serial, dask-local, or a Dask scheduler address")
    c.add_argument("--shard", help="i/N: run cases i, i+N, ... (for batch schedulers)")
    c.add_argument("--out", help="save results (JSON lines) for 'nonsmooth campaign-merge'")
    c.set_defaults(func=_cmd_campaign)

    cm = sub.add_parser("campaign-merge", help="merge the saved results of a campaign's shards",
                        description="Join the files saved by 'nonsmooth campaign --shard i/N --out FILE'.")
    cm.add_argument("paths", nargs="+")
    cm.add_argument("--out", required=True)
    cm.set_defaults(func=_cmd_campaign_merge)

    b = sub.add_parser("bench", help="benchmarks with ratios against named baselines",
                       description="Benchmarks measured interleaved in one process, one thread; each prints "
                                   "ratios against named baselines (and peers when installed).")
    b.add_argument("names", nargs="+", choices=(*BENCHES, "all"), metavar="NAME",
                   help=f"one or more of {', '.join(BENCHES)}, all")
    b.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
    b.set_defaults(func=_cmd_bench)

    d = sub.add_parser("doctor", help="versions, C kernel, GPUs",
                       description="Print versions of Python, numpy, torch, jax; whether the C PAV kernel is "
                                   "loaded; GPUs seen.")
    d.add_argument("--json", action="store_true")
    d.add_argument("--require-c", action="store_true", help="exit 1 unless the C kernel is the backend in use")
    d.set_defaults(func=_cmd_doctor)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "prove":
        # The prove command owns its options (--list, --json ...); argparse's REMAINDER
        # would not pass options that come before a name.
        return _cmd_prove(argparse.Namespace(rest=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
