"""The pytest plugin, exercised through pytester in fresh pytest runs."""
import json
import subprocess
import sys

import pytest

pytest_plugins = ["pytester"]


def test_plugin_and_testing_package_load_without_torch_jax_or_hypothesis():
    code = (
        "import sys\n"
        "import nonsmooth.testing._plugin, nonsmooth.testing\n"
        "heavy = sorted(m for m in ('torch', 'jax', 'jaxlib', 'hypothesis') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_a_plain_pytest_session_never_imports_torch_jax_or_hypothesis(pytester):
    pytester.makepyfile(
        """
        import sys
        def test_light():
            heavy = [m for m in ('torch', 'jax', 'hypothesis') if m in sys.modules]
            assert not heavy, heavy
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


_BLOCK_HYPOTHESIS = """
import sys

class _NoHypothesis:
    # As if Hypothesis were not installed: every import of it fails.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("hypothesis", "_hypothesis_pytestplugin", "_hypothesis_globals"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoHypothesis())
"""


def test_pytest_runs_when_hypothesis_cannot_be_imported(pytester, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCK_HYPOTHESIS)
    pytester.makepyfile(
        """
        import sys
        import pytest

        def test_trivial():
            with pytest.raises(ImportError):
                import hypothesis  # the block works
            assert 'torch' not in sys.modules and 'jax' not in sys.modules

        def test_fixture_works(nonsmooth_framework):
            assert nonsmooth_framework in ('torch', 'jax')

        def test_helpers_without_hypothesis():
            from nonsmooth.testing import assert_matches_fd_off_kinks, add_sink
            assert callable(assert_matches_fd_off_kinks) and callable(add_sink)

        def test_strategies_say_what_is_missing():
            with pytest.raises(ImportError, match="pip install hypothesis"):
                from nonsmooth.testing import kink_points
        """
    )
    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    # An uninstalled Hypothesis also has no pytest11 entry point: -p no:hypothesispytest stands for that.
    cmd = [sys.executable, "-m", "pytest", "-p", "no:hypothesispytest", "-p", "no:cacheprovider", "-q",
           "--nonsmooth-frameworks", "torch,jax", str(pytester.path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=pytester.path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "5 passed" in out.stdout, out.stdout


def test_framework_fixture_with_given_passes_the_health_checks(pytester):
    # the documented usage: the fixture and @given together, with and without the CI profile
    pytester.makepyfile(
        """
        from hypothesis import given, settings, strategies as st

        @given(st.floats(-1, 1))
        def test_prop(nonsmooth_framework, v):
            assert nonsmooth_framework in ("torch", "jax") and -1 <= v <= 1
        """
    )
    pytester.runpytest("-p", "no:cacheprovider", "--nonsmooth-frameworks", "torch,jax").assert_outcomes(passed=2)
    ci = pytester.runpytest("-p", "no:cacheprovider", "--hypothesis-profile", "nonsmooth-ci")
    ci.assert_outcomes(passed=2)


def test_marker_is_registered_under_strict_markers(pytester):
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.nonsmooth_audit
        def test_marked():
            pass
        def test_unmarked():
            pass
        """
    )
    result = pytester.runpytest("--strict-markers", "-m", "nonsmooth_audit")
    result.assert_outcomes(passed=1, deselected=1)
    markers = pytester.runpytest("--markers")
    markers.stdout.fnmatch_lines(["*nonsmooth_audit*"])


def test_framework_fixture_parametrizes_over_the_option(pytester):
    pytester.makepyfile(
        """
        def test_fw(nonsmooth_framework):
            assert nonsmooth_framework in ("torch", "jax")
        """
    )
    result = pytester.runpytest("-v", "--nonsmooth-frameworks", "torch,jax")
    result.stdout.fnmatch_lines(["*test_fw?torch? PASSED*", "*test_fw?jax? PASSED*"])
    result.assert_outcomes(passed=2)
    only = pytester.runpytest("-v", "--nonsmooth-frameworks", "jax")
    only.assert_outcomes(passed=1)
    only.stdout.fnmatch_lines(["*test_fw?jax? PASSED*"])


def test_unknown_framework_is_a_usage_error_quoting_it(pytester):
    pytester.makepyfile("def test_x(nonsmooth_framework): pass")
    result = pytester.runpytest("--nonsmooth-frameworks", "torch,mxnet")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*'mxnet'*"])


def test_explicit_parametrize_of_the_fixture_wins(pytester):
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.parametrize("nonsmooth_framework", ["torch"], indirect=True)
        def test_fw(nonsmooth_framework):
            assert nonsmooth_framework == "torch"
        """
    )
    pytester.runpytest("--nonsmooth-frameworks", "torch,jax").assert_outcomes(passed=1)


def test_json_option_writes_every_helper_call(pytester, tmp_path):
    pytest.importorskip("torch")
    pytester.makepyfile(
        """
        import pytest, torch
        from nonsmooth.testing import assert_matches_fd_off_kinks
        from nonsmooth.testing._examples import abs_sum

        @pytest.mark.nonsmooth_audit
        def test_ok():
            assert_matches_fd_off_kinks(abs_sum, torch.tensor([0.0, 1.0], dtype=torch.float64))
            assert_matches_fd_off_kinks(abs_sum, torch.tensor([2.0, -1.0], dtype=torch.float64))

        def test_fails():
            class Bad(torch.autograd.Function):
                @staticmethod
                def forward(ctx, x): return x * 2
                @staticmethod
                def backward(ctx, g): return g
            assert_matches_fd_off_kinks(lambda x: Bad.apply(x).sum(), torch.tensor([1.0]))
        """
    )
    path = tmp_path / "audits.jsonl"
    result = pytester.runpytest(f"--nonsmooth-json={path}")
    result.assert_outcomes(passed=1, failed=1)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 3
    assert [r["passed"] for r in records] == [True, True, False]
    assert records[0]["test"].endswith("::test_ok") and records[2]["test"].endswith("::test_fails")
    assert all(r["helper"] == "assert_matches_fd_off_kinks" for r in records)
    assert records[0]["check"]["skipped"] == {"0": records[0]["check"]["skipped"]["0"]}
    assert "0x0.0p+0" in records[0]["x_hex"][0]
    result.stdout.fnmatch_lines(["*audits -> *audits.jsonl*"])


def test_ci_hypothesis_profile_is_registered(pytester):
    from hypothesis import HealthCheck, settings

    from nonsmooth.testing import register_hypothesis_profile

    profile = settings.get_profile(register_hypothesis_profile())
    assert profile.deadline is None and profile.derandomize is True
    assert HealthCheck.function_scoped_fixture in profile.suppress_health_check
    pytester.makepyfile(
        """
        from hypothesis import given, settings, strategies as st
        def test_profile():
            assert settings.default.derandomize is True
            assert settings.default.deadline is None
        """
    )
    pytester.runpytest("--hypothesis-profile", "nonsmooth-ci").assert_outcomes(passed=1)
