"""The command line: a user's mistake is one `error:` line and exit 2, never a traceback;
exit codes a script can use; help text for every option.

Oracles: the exit codes and messages the README documents; the real console script
(`nonsmooth`, run as a subprocess) for what a shell sees.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nonsmooth.reports._cli import EXIT_CODES, build_parser, main as cli_main
from nonsmooth.reports._report import SUITES

EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "audit_me.py")
NONSMOOTH = shutil.which("nonsmooth") or str(Path(sys.executable).parent / "nonsmooth")


def _run(*args, cwd=None, env=None):
    return subprocess.run([NONSMOOTH, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize("argv, message", [
    (["audit", f"{EXAMPLE}:hinge_net", "--at", '["a", 1]'], "--at must hold numbers only"),
    (["audit", f"{EXAMPLE}:hinge_net", "--at", "[]"], "--at is empty"),
    (["audit", f"{EXAMPLE}:hinge_net", "--at", "[NaN, 1]"], "--at must be finite, got '[NaN, 1]'"),
    (["audit", f"{EXAMPLE}:hinge_net", "--at", "[[1, 2], [3]]"], "rectangular list of numbers"),
    # hinge_net is a function of two inputs: one value cannot be audited, and says why
    (["audit", f"{EXAMPLE}:hinge_net", "--at", "[1.0]"], "hinge_net([1.0]) raised RuntimeError"),
    (["audit", "no_such_file.py:f", "--at", "[1.0]"], "no such file 'no_such_file.py'"),
    (["audit", f"{EXAMPLE}:nope", "--at", "[0.0]"], "has no function 'nope'"),
    (["report", "--jobs", "0"], "argument --jobs: must be an integer >= 1, got '0'"),
    (["report", "--out", "/dev/null/x", "--suites", "environment"],
     "--out: cannot write the report to '/dev/null/x': Not a directory"),
    (["report", "--suites", "environment,bogus"], "unknown suite(s) ['bogus']"),
    (["study", "--dtypes", "float8"], "--dtypes: 'float8' is not a comma-separated list"),
    (["study", "--n-inits", "0"], "argument --n-inits: must be an integer >= 1"),
    (["campaign", "missing.json"], "cannot read cases from 'missing.json'"),
])
def test_a_users_mistake_is_one_error_line_and_exit_2(argv, message, capsys):
    pytest.importorskip("torch")
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_the_console_script_exits_2_without_a_traceback(tmp_path):
    for argv in (["report", "--jobs", "0"], ["audit", f"{EXAMPLE}:hinge_net", "--at", "[NaN, 1]"],
                 ["report", "--out", "/dev/null/x"], ["study", "--dtypes", "float8"]):
        out = _run(*argv, cwd=tmp_path)
        assert out.returncode == 2, (argv, out.stderr)
        assert "error" in out.stderr and "Traceback" not in out.stderr, (argv, out.stderr)
    assert not (tmp_path / "nonsmooth-report").exists()  # --out checked before anything ran


def test_a_syntax_error_in_the_users_file_is_an_input_error(tmp_path, capsys):
    bad = tmp_path / "broken.py"
    bad.write_text("import torch\n\ndef f(x):\n    return x +\n")
    assert cli_main(["audit", f"{bad}:f", "--at", "[1.0]"]) == 2
    err = capsys.readouterr().err
    assert "importing" in err and "line 4" in err and "SyntaxError" in err and "Traceback" not in err


def test_exit_codes_tell_finding_undecided_and_no_finding_apart(tmp_path, capsys):
    pytest.importorskip("torch")
    mod = tmp_path / "fns.py"
    mod.write_text("import numpy as np\nimport torch\n\n"
                   "def identity_via_relu(x):\n    return torch.relu(x) - torch.relu(-x)\n\n"
                   "def smooth(x):\n    return torch.tanh(x)\n\n"
                   "def through_numpy(x):  # leaves the graph: nothing can be traced, so no verdict\n"
                   "    return torch.from_numpy(np.abs(x.detach().numpy()))\n")
    # relu(x) - relu(-x) = x: AD's 0 at 0 is certified SPURIOUS -> 1
    assert cli_main(["audit", f"{mod}:identity_via_relu", "--at", "[0.0]"]) == 1
    # tanh is smooth: SMOOTH -> 0
    assert cli_main(["audit", f"{mod}:smooth", "--at", "[0.3, -1.0]"]) == 0
    # UNDECIDED, with no finding -> 3
    assert cli_main(["audit", f"{mod}:through_numpy", "--at", "[0.0, 1.0]"]) == 3
    out = capsys.readouterr().out
    assert "verdict: SPURIOUS" in out and "verdict: SMOOTH" in out and "verdict: UNDECIDED" in out


def test_help_documents_exit_codes_suites_and_every_option():
    top = _run("--help")
    assert top.returncode == 0
    for code, meaning in EXIT_CODES.items():
        assert f"{code}" in top.stdout and meaning.split(":")[0] in top.stdout
    report_help = _run("report", "--help").stdout
    for name in SUITES:
        assert name in report_help
    assert "exit status" in report_help
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, p in sub.choices.items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help:
                missing.append(f"{name} {action.dest}")
    assert missing == []


def test_campaign_finds_a_module_in_the_current_directory(tmp_path):
    pytest.importorskip("torch")
    (tmp_path / "my_functions.py").write_text("import torch\n\ndef g(x):\n    return torch.abs(x).sum()\n")
    cases = [{"function": "my_functions:g", "point": [0.5, -1.0], "evaluate_kind": "gradient"},
             {"function": "my_functions:g", "point": [2.0, 3.0], "evaluate_kind": "gradient"}]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = _run("campaign", "cases.json", "--executor", "processes", "--out", "results.jsonl", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = (tmp_path / "results.jsonl").read_text().splitlines()[1:]
    results = [json.loads(line) for line in lines]
    assert all(r["ok"] for r in results) and len(results) == 2
    # d/dx sum|x| = sign(x), an exact closed form
    assert [r["value"]["jacobian"] for r in results] == [[[(1.0).hex(), (-1.0).hex()]], [[(1.0).hex(), (1.0).hex()]]]
