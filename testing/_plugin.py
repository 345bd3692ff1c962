"""The ``nonsmooth`` pytest plugin (entry point ``pytest11``).

Loads without importing torch, jax or Hypothesis (it works when Hypothesis is not
installed): frameworks are looked up with ``importlib.util.find_spec`` and imported only by
the tests that use them; the Hypothesis profile is registered only when asked for.

- marker ``nonsmooth_audit``: tags a test as a gradient audit (select with
  ``-m nonsmooth_audit``);
- fixture ``nonsmooth_framework``: the framework under test, one run per entry of
  ``--nonsmooth-frameworks torch,jax`` (a framework that is not installed is skipped);
  session-scoped, so it combines with ``@given`` under any Hypothesis profile;
- ``--nonsmooth-json PATH``: every audit done through ``nonsmooth.testing``'s assertion
  helpers is written to ``PATH`` as one JSON object per line, for the report;
- the Hypothesis profile ``"nonsmooth-ci"`` (``deadline=None``, ``derandomize=True``, slow
  and function-scoped-fixture health checks off), chosen with
  ``--hypothesis-profile nonsmooth-ci``.
"""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from . import _record
from ._profile import PROFILE, register_hypothesis_profile

KNOWN_FRAMEWORKS = ("torch", "jax")
MARKER = "nonsmooth_audit"


def _maybe_register_profile(config) -> None:
    """Register the profile when this run can use it: Hypothesis is already imported (a
    conftest did), or ``--hypothesis-profile`` names it.  Otherwise Hypothesis stays unimported."""
    try:
        asked = config.getoption("--hypothesis-profile", default=None)
    except ValueError:  # Hypothesis's own plugin is absent: no such option
        asked = None
    if asked == PROFILE or "hypothesis" in sys.modules:
        try:
            register_hypothesis_profile()
        except ImportError:
            if asked == PROFILE:
                raise pytest.UsageError(
                    f"--hypothesis-profile {PROFILE} needs Hypothesis, which failed to import; "
                    "pip install hypothesis") from None


def pytest_addoption(parser):
    group = parser.getgroup("nonsmooth", "nonsmooth gradient audits")
    group.addoption(
        "--nonsmooth-frameworks",
        action="store",
        default="torch,jax",
        metavar="LIST",
        help="comma-separated frameworks the nonsmooth_framework fixture runs over "
        f"(from {', '.join(KNOWN_FRAMEWORKS)}; default: torch,jax; missing ones are skipped)",
    )
    group.addoption(
        "--nonsmooth-json",
        action="store",
        default=None,
        metavar="PATH",
        help="write every audit done by nonsmooth.testing's assertion helpers to PATH "
        "as JSON lines",
    )


def parse_frameworks(text: str) -> list[str]:
    """``"torch, jax"`` -> ``["torch", "jax"]``; unknown names raise ``pytest.UsageError``."""
    names = [part.strip().lower() for part in str(text).split(",") if part.strip()]
    if not names:
        raise pytest.UsageError(
            f"--nonsmooth-frameworks got {text!r}; give a comma-separated list from "
            f"{', '.join(KNOWN_FRAMEWORKS)}"
        )
    bad = [n for n in names if n not in KNOWN_FRAMEWORKS]
    if bad:
        raise pytest.UsageError(
            f"--nonsmooth-frameworks got unknown framework(s) {bad!r} in {text!r}; "
            f"choose from {', '.join(KNOWN_FRAMEWORKS)}"
        )
    return list(dict.fromkeys(names))


class _JsonLines:
    def __init__(self, path: str, *, append: bool):
        self.path = path
        self._file = open(path, "a" if append else "w", encoding="utf-8")
        self.count = 0

    def __call__(self, record: dict) -> None:
        self._file.write(json.dumps(record, default=_json_default, sort_keys=True) + "\n")
        self._file.flush()
        self.count += 1

    def close(self) -> None:
        self._file.close()


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "to_json"):
        return value.to_json()
    return repr(value)


@pytest.hookimpl(tryfirst=True)  # before Hypothesis's plugin loads --hypothesis-profile
def pytest_configure(config):
    _maybe_register_profile(config)
    config.addinivalue_line(
        "markers",
        f"{MARKER}: a gradient audit through nonsmooth.testing (select with -m {MARKER})",
    )
    config._nonsmooth_frameworks = parse_frameworks(config.getoption("--nonsmooth-frameworks"))
    path = config.getoption("--nonsmooth-json")
    if path:
        # xdist workers append to the file their controller created.
        sink = _JsonLines(path, append=hasattr(config, "workerinput"))
        config._nonsmooth_json = sink
        config._nonsmooth_remove_sink = _record.add_sink(sink)


def pytest_unconfigure(config):
    sink = getattr(config, "_nonsmooth_json", None)
    if sink is not None:
        config._nonsmooth_remove_sink()
        sink.close()
        config._nonsmooth_json = None


def pytest_report_header(config):
    sink = getattr(config, "_nonsmooth_json", None)
    line = "nonsmooth: frameworks=" + ",".join(config._nonsmooth_frameworks)
    if sink is not None:
        line += f", audits -> {sink.path}"
    return line


def pytest_generate_tests(metafunc):
    if "nonsmooth_framework" in metafunc.fixturenames:
        # A test that parametrizes the framework itself keeps its own values.
        for marker in metafunc.definition.iter_markers("parametrize"):
            names = marker.args[0] if marker.args else marker.kwargs.get("argnames", "")
            if isinstance(names, str):
                names = [n.strip() for n in names.split(",")]
            if "nonsmooth_framework" in names:
                return
        frameworks = metafunc.config._nonsmooth_frameworks
        metafunc.parametrize("nonsmooth_framework", frameworks, indirect=True, ids=frameworks)


@pytest.fixture(scope="session")
def nonsmooth_framework(request):
    """The framework under test, ``"torch"`` or ``"jax"``; skips if it is not installed."""
    name = getattr(request, "param", None)
    if name is None:
        name = request.config._nonsmooth_frameworks[0]
    if name not in KNOWN_FRAMEWORKS:
        raise pytest.UsageError(f"nonsmooth_framework got {name!r}; choose from {KNOWN_FRAMEWORKS}")
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (pip install 'nonsmooth[{name}]')")
    return name


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _record.set_context(test=item.nodeid)
    try:
        yield
    finally:
        _record.set_context(test=None)
