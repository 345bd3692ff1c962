"""The ``nonsmooth`` command line.

Subcommands: ``report`` (the main job), ``audit`` (a user's function), ``rules`` (kink
conventions of the installed frameworks), ``prove`` (SymPy certificates), ``bench``
(benchmarks with ratios against named baselines), ``study``, ``campaign`` and ``doctor``
(what is installed).  Heavy modules are imported inside each subcommand so
``nonsmooth --help`` is instant.

Exit status, the same for every subcommand (see :data:`EXIT_CODES`): 0 no finding, 1 a
finding (a SPURIOUS or NOT_LIPSCHITZ verdict, a failed certificate, a report suite that
failed or errored), 2 a usage or input error (nothing was judged), 3 undecided (an
UNDECIDED verdict and no finding), 4 an internal error (a bug, with its traceback), 130
interrupted.  A user's mistake gets one ``error:``
line naming the argument and the value, never a Python traceback.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import shlex
import sys
from pathlib import Path

BENCHES = ("pav", "sort", "engine", "perturbed", "implicit")
EXIT_OK, EXIT_FINDING, EXIT_USAGE, EXIT_UNDECIDED, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_CODES = {
    EXIT_OK: "no finding: every verdict SMOOTH or CLARKE, every check and certificate passed",
    EXIT_FINDING: "a finding: a SPURIOUS or NOT_LIPSCHITZ verdict, a failed certificate, or a report suite "
                  "that failed or errored",
    EXIT_USAGE: "usage or input error (bad option, missing file, a point the function cannot take): "
                "nothing was judged",
    EXIT_UNDECIDED: "undecided: some verdict is UNDECIDED and none is a finding",
    EXIT_INTERNAL: "internal error: a bug in nonsmooth (the traceback is printed; please report it)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); `report` still writes a partial report",
}
_EPILOG = "exit status:\n" + "\n".join(f"  {code:<4} {text}" for code, text in EXIT_CODES.items())
_FINDINGS = ("SPURIOUS", "NOT_LIPSCHITZ")


class UsageError(Exception):
    """A mistake in the command line or its inputs: one ``error:`` line, exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _verdict_status(verdicts) -> int:
    names = [getattr(v, "name", str(v)) for v in verdicts]
    if any(n in _FINDINGS for n in names):
        return EXIT_FINDING
    if any(n == "UNDECIDED" for n in names):
        return EXIT_UNDECIDED
    return EXIT_OK


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
    from ._report import SUITES, OutputDirError, check_output_dir, run_report

    frameworks = None
    if args.frameworks:
        frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
        bad = [f for f in frameworks if f not in ("torch", "jax")]
        if bad or not frameworks:
            raise UsageError(f"--frameworks: unknown framework(s) {bad or args.frameworks!r}; "
                             "use torch, jax or torch,jax")
    suites = None
    if args.suites:
        suites = [s.strip() for s in args.suites.split(",") if s.strip()]
        bad = [s for s in suites if s not in SUITES]
        if bad or not suites:
            raise UsageError(f"--suites: unknown suite(s) {bad or args.suites!r}; choose from {', '.join(SUITES)}")
    try:
        check_output_dir(args.out)  # before any suite runs: a bad folder must not cost the whole run
    except OutputDirError as err:
        raise UsageError(f"--out: {err}") from None
    command = shlex.join(["nonsmooth", *args.argv])
    report, paths = run_report(out=args.out, quick=args.quick, frameworks=frameworks, suites=suites,
                               jobs=args.jobs, scheduler=args.scheduler, command=command)
    s = report["summary"]
    print(report["headline"])
    print(f"{s['checks_passed']}/{s['checks_total']} checks passed; {s['suites_passed']}/{s['suites_total']} "
          f"suites passed, {s['suites_failed']} failed, {s['suites_errored']} errored"
          f"{' (PARTIAL)' if report['partial'] else ''}; {s['warnings']} warning(s).")
    for kind, path in paths.items():
        print(f"  {kind:<8} {path}")
    if report["partial"]:
        return EXIT_INTERRUPTED
    return EXIT_OK if report["passed"] else EXIT_FINDING


def _load_function(spec: str):
    if ":" not in spec:
        raise UsageError(f"FUNCTION must look like FILE.py:NAME, got {spec!r}")
    file, _, name = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise UsageError(f"no such file {file!r} (FUNCTION is FILE.py:NAME)")
    mod_spec = importlib.util.spec_from_file_location(f"_nonsmooth_user_{path.stem}", path)
    if mod_spec is None or mod_spec.loader is None:
        raise UsageError(f"{file!r} is not a Python file that can be imported")
    module = importlib.util.module_from_spec(mod_spec)
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        mod_spec.loader.exec_module(module)
    except Exception as err:  # the user's module: report where it failed, not our stack
        line = ""
        tb = err.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == str(path) or Path(tb.tb_frame.f_code.co_filename) == path:
                line = f" (line {tb.tb_lineno})"
            tb = tb.tb_next
        if isinstance(err, SyntaxError) and err.lineno:
            line = f" (line {err.lineno})"
        raise UsageError(f"importing {file!r} failed{line}: {type(err).__name__}: {err}") from None
    finally:
        sys.path.pop(0)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"{file!r} has no function {name!r}")
    framework = None
    if "torch" in vars(module) and "jax" not in vars(module) and "jnp" not in vars(module):
        framework = "torch"
    elif ("jax" in vars(module) or "jnp" in vars(module)) and "torch" not in vars(module):
        framework = "jax"
    return fn, framework


def _parse_point(text: str):
    """--at's JSON as a finite float64 array (a number, or a rectangular list of numbers)."""
    import numpy as np

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--at must be a JSON number or list, got {text!r} ({exc})") from None
    bad_type = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, (str, bool, dict))
                or v is None]
    if bad_type:
        raise UsageError(f"--at must hold numbers only, got {text!r} (not a number: {bad_type[0]!r})")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--at must be a number or a rectangular list of numbers, got {text!r} ({exc})") from None
    if arr.size == 0:
        raise UsageError(f"--at is empty ({text!r}): give the point to audit, e.g. \"[0.0, 1.0]\"")
    if not np.all(np.isfinite(arr)):
        raise UsageError(f"--at must be finite, got {text!r}: NaN and infinity are not points a derivative "
                         "can be audited at")
    return arr.tolist()


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

    if (args.at is None) == (args.random is None):
        raise UsageError("give exactly one of --at '[...]' or --random N")
    if args.at is not None:
        points = [_parse_point(args.at)]
    else:
        if args.random < 1:
            raise UsageError(f"--random must be >= 1, got {args.random}")
        if args.dim is None:
            raise UsageError("--random needs --dim D (the input length)")
        if args.dim < 1:
            raise UsageError(f"--dim must be >= 1, got {args.dim}")
        rng = np.random.default_rng(args.seed)
        points = [rng.standard_normal(args.dim).tolist() for _ in range(args.random)]
    fn, guessed = _load_function(args.function)
    framework = args.framework or guessed
    if framework is None:
        raise UsageError("cannot tell whether the function uses torch or jax; pass --framework torch|jax")
    if importlib.util.find_spec(framework) is None:
        raise UsageError(f"--framework {framework}: {framework} is not installed "
                         f"(pip install 'nonsmooth[{framework}]')")
    from nonsmooth.conservative import audit

    name = args.function.rpartition(":")[2]
    results = []
    for point in points:
        x = _make_array(point, framework, args.dtype)
        try:
            fn(x)  # the user's function must take this point at all before it can be audited
        except Exception as err:
            raise UsageError(f"{name}({point}) raised {type(err).__name__}: {err}; check that the point "
                             "has the shape your function expects") from None
        results.append(audit(fn, x, seed=args.seed))
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
    return _verdict_status(a.verdict for a in results)


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


_STUDY_DTYPES = ("float16", "float32", "float64")


def _cmd_study(args) -> int:
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    bad = [d for d in dtypes if d not in _STUDY_DTYPES]
    if bad or not dtypes or len(set(dtypes)) != len(dtypes):
        raise UsageError(f"--dtypes: {args.dtypes!r} is not a comma-separated list of distinct dtypes from "
                         f"{', '.join(_STUDY_DTYPES)}" + (f" (unknown: {', '.join(bad)})" if bad else ""))
    if importlib.util.find_spec("torch") is None:
        raise UsageError("the study needs torch: pip install 'nonsmooth[torch,report]'")
    from nonsmooth.conservative._bifurcation import bifurcation_study

    study = bifurcation_study(depth=args.depth, width=args.width, batch_size=args.batch_size,
                              n_inits=args.n_inits, dtypes=dtypes, dataset=args.dataset, seed=args.seed,
                              float16=args.float16,
                              progress=(lambda m: print(m, file=sys.stderr)) if not args.json else None)
    print(json.dumps(study.to_json(), indent=1) if args.json else study.explain())
    return EXIT_OK


def _user_modules_importable() -> None:
    """Let `module:function` references name modules in the current directory, here and in
    the worker processes the campaign starts (they inherit PYTHONPATH)."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if cwd not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([cwd, *paths])


def _campaign_status(result) -> int:
    if result.n_failed:
        return EXIT_USAGE
    verdicts = [(r.value or {}).get("verdict") for r in result.results if isinstance(r.value, dict)]
    return _verdict_status(v for v in verdicts if v)


def _cmd_campaign(args) -> int:
    from nonsmooth.conservative._campaign import Case, run_campaign

    try:
        data = json.loads(Path(args.cases).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read cases from {args.cases!r}: {exc}") from None
    if isinstance(data, dict):
        data = data.get("cases", [])
    if not isinstance(data, list) or not all(isinstance(c, dict) for c in data):
        raise UsageError(f"{args.cases!r} must hold a JSON list of case objects (or {{\"cases\": [...]}})")
    _user_modules_importable()
    try:
        cases = [Case.from_json(c) if "evaluate_kind" in c and "options" in c else Case(**c) for c in data]
    except (TypeError, ValueError, KeyError) as exc:
        raise UsageError(f"a case in {args.cases!r} is malformed: {exc}") from None
    executor = None if args.executor == "processes" else args.executor
    try:
        result = run_campaign(cases, executor=executor, shard=args.shard,
                              progress=lambda m: print(m, file=sys.stderr))
    except ValueError as exc:  # a bad --shard or --executor, named by run_campaign
        raise UsageError(str(exc)) from None
    if args.out:
        result.save(args.out)
    print(result.explain())
    return _campaign_status(result)


def _cmd_campaign_merge(args) -> int:
    from nonsmooth.conservative._campaign import merge_results

    missing = [p for p in args.paths if not Path(p).is_file()]
    if missing:
        raise UsageError(f"no such file(s): {', '.join(map(repr, missing))}")
    try:
        merged = merge_results(args.paths)
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot merge {args.paths}: {exc}") from None
    merged.save(args.out)
    print(merged.explain())
    return _campaign_status(merged)


def _cmd_prove(args) -> int:
    from nonsmooth.proofs._cli import main as prove_main

    return prove_main(args.rest)


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def build_parser() -> argparse.ArgumentParser:
    from ._report import SUITES

    p = argparse.ArgumentParser(
        prog="nonsmooth", formatter_class=_formatter, epilog=_EPILOG,
        description="What backpropagation really computes through nonsmooth programs: audits, "
                    "certificates, fast differentiable solvers and a correctness report.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name, **kw):
        return sub.add_parser(name, formatter_class=_formatter, epilog=_EPILOG, **kw)

    r = add("report", help="run the built-in suites and write the correctness report",
            description="Run the built-in suites and write report.json, report.md, index.html and junit.xml.\n\n"
                        "suites (in order): " + ", ".join(SUITES) + "\n\n"
                        "Exit 0 when every suite passed, 1 when one failed or errored (the banner of "
                        "index.html names it and why).")
    r.add_argument("--out", default="nonsmooth-report", metavar="DIR",
                   help="output folder, checked before any suite runs (default ./nonsmooth-report/)")
    r.add_argument("--quick", action="store_true", help="small sizes; about a minute on 2 cores")
    r.add_argument("--frameworks", metavar="LIST", help="comma-separated subset of torch,jax (default: all installed)")
    r.add_argument("--suites", metavar="LIST",
                   help="comma-separated subset of the suites to run (default: all): " + ", ".join(SUITES))
    g = r.add_mutually_exclusive_group()
    g.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                   help="run the suites in N local processes (N >= 1, default 1)")
    g.add_argument("--scheduler", metavar="ADDR", help="Dask scheduler address to run the suites on")
    r.set_defaults(func=_cmd_report)

    a = add("audit", help="audit a function of yours at a point: what AD returns vs the Clarke set",
            description="Audit FILE.py:FUNC at a point. Prints the verdict (SMOOTH, CLARKE, SPURIOUS, "
                        "NOT_LIPSCHITZ, UNDECIDED) and its explanation.")
    a.add_argument("function", metavar="FILE.py:FUNC", help="a function of one torch tensor or jax array")
    a.add_argument("--at", metavar="JSON", help='the point as JSON, e.g. "[0.0, 1.0]" (finite numbers)')
    a.add_argument("--random", type=int, metavar="N", help="audit N random standard-normal points (needs --dim)")
    a.add_argument("--dim", type=int, metavar="D", help="input length for --random")
    a.add_argument("--framework", choices=("torch", "jax"), help="default: guessed from the file's imports")
    a.add_argument("--dtype", default="float64", choices=("float16", "bfloat16", "float32", "float64"),
                   help="dtype of the input built from the point (default float64)")
    a.add_argument("--seed", type=int, default=0, help="seed of --random and of the audit's random directions")
    a.add_argument("--json", action="store_true", help="print the audits as JSON")
    a.set_defaults(func=_cmd_audit)

    ru = add("rules", help="print the kink-convention table of the installed frameworks",
             description="Measure live what the installed torch/jax AD returns at every registered "
                         "primitive's kinks, and whether it lies in the Clarke set.")
    ru.add_argument("--framework", choices=("torch", "jax"), help="only this framework (default: every installed one)")
    ru.set_defaults(func=_cmd_rules)

    pr = add("prove", help="check the SymPy certificates (nonsmooth prove --help for options)", add_help=False)
    pr.add_argument("rest", nargs=argparse.REMAINDER, help="names and options of nonsmooth prove")
    pr.set_defaults(func=_cmd_prove)

    st = add("study", help="the ReLU'(0) bifurcation study (Bertoin et al. 2021)",
             description="For an MLP of the given depth and width, over n random initialisations, in each "
                         "dtype: does backprop with ReLU'(0)=0 differ from ReLU'(0)=1 on some minibatch of one "
                         "pass over the data set? Prints rates with confidence intervals.")
    st.add_argument("--depth", type=_positive_int, default=3, help="hidden layers of the MLP (default 3)")
    st.add_argument("--width", type=_positive_int, default=256, help="units per hidden layer (default 256)")
    st.add_argument("--batch-size", type=_positive_int, default=128, help="minibatch size (default 128)")
    st.add_argument("--n-inits", type=_positive_int, default=20, help="random initialisations per dtype (default 20)")
    st.add_argument("--dtypes", default="float16,float32,float64",
                    help=f"comma-separated, from {', '.join(_STUDY_DTYPES)} (default: all three)")
    st.add_argument("--dataset", default="digits", choices=("digits", "mnist_like"),
                    help="scikit-learn's digits, or a synthetic 28x28 MNIST-like set (default digits)")
    st.add_argument("--float16", default="auto", choices=("auto", "native", "emulated", "accumulate"),
                    help="how float16 is computed on CPU (see bifurcation_study)")
    st.add_argument("--seed", type=int, default=0, help="seed of the initialisations and the shuffling")
    st.add_argument("--json", action="store_true", help="print the study as JSON")
    st.set_defaults(func=_cmd_study)

    c = add("campaign", help="run many audit cases on local processes, Dask, or one shard of N",
            description="Run the cases of a JSON file (a list of {function: 'module:qualname', point, dtype, "
                        "seed, framework, evaluate_kind}) on an executor; results are identical whatever runs "
                        "them. Modules in the current directory are found (it is put on the path of every "
                        "worker). Exit 2 if a case could not run.")
    c.add_argument("cases", metavar="CASES.json", help="JSON file with the list of cases")
    c.add_argument("--executor", default="processes",
                   help="processes (default), serial, dask-local, or a Dask scheduler address")
    c.add_argument("--shard", metavar="i/N", help="run cases i, i+N, ... (for batch schedulers)")
    c.add_argument("--out", metavar="FILE", help="save results (JSON lines) for 'nonsmooth campaign-merge'")
    c.set_defaults(func=_cmd_campaign)

    cm = add("campaign-merge", help="merge the saved results of a campaign's shards",
             description="Join the files saved by 'nonsmooth campaign --shard i/N --out FILE'.")
    cm.add_argument("paths", nargs="+", metavar="FILE", help="the shards' result files")
    cm.add_argument("--out", required=True, metavar="FILE", help="where to write the merged results")
    cm.set_defaults(func=_cmd_campaign_merge)

    b = add("bench", help="benchmarks with ratios against named baselines",
            description="Benchmarks measured interleaved in one process, one thread; each prints ratios "
                        "against named baselines (and peers when installed).")
    b.add_argument("names", nargs="+", choices=(*BENCHES, "all"), metavar="NAME",
                   help=f"one or more of {', '.join(BENCHES)}, all")
    b.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
    b.set_defaults(func=_cmd_bench)

    d = add("doctor", help="versions, C kernel, GPUs",
            description="Print versions of Python, numpy, torch, jax; whether the C PAV kernel is loaded; "
                        "GPUs seen.")
    d.add_argument("--json", action="store_true", help="print the environment as JSON")
    d.add_argument("--require-c", action="store_true", help="exit 1 unless the C kernel is the backend in use")
    d.set_defaults(func=_cmd_doctor)
    return p


def main(argv=None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Example:
        >>> main(["report", "--jobs", "0"])  # doctest: +SKIP
        2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "prove":
        # The prove command owns its options (--list, --json ...); argparse's REMAINDER
        # would not pass options that come before a name.
        return _cmd_prove(argparse.Namespace(rest=argv[1:]))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), message already printed
        return int(exc.code or 0)
    args.argv = argv
    try:
        return args.func(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `nonsmooth audit ... | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13  # as the shell reports a SIGPIPE
    except Exception:  # not the user's mistake: show where, and keep 1 for findings only
        import traceback

        traceback.print_exc()
        print("error: internal error in nonsmooth (a bug): please report it with the traceback above",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
