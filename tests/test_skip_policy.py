"""The CI skip policy (tests/conftest.py, helpers.require), run on small generated test files: under ``CI=true`` a
missing module fails, however it is skipped; a listed platform limit stays a skip; elsewhere all of them skip."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = (Path(__file__).with_name("conftest.py")).read_text()
MISSING = "nafnet_edge_test_no_such_backend"

TESTS = f"""
import pytest
from helpers import require

def test_require():
    require("{MISSING}")

def test_importorskip():
    pytest.importorskip("{MISSING}")

def test_skip_naming_no_module():
    pytest.skip("the runtime is not available here")

@pytest.mark.skipif(True, reason="this CPU does not report BF16: the plugin cannot run bf16 here")
def test_platform_limit():
    pass

@pytest.mark.xfail(reason="expected to fail")
def test_xfail():
    raise AssertionError

def test_present():
    assert require("json").dumps(1) == "1"
"""
MODULE_LEVEL = f"""
from helpers import require

require("{MISSING}")

def test_never_collected():
    pass
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_backends=TESTS, test_module_level=MODULE_LEVEL)
    return pytester


def outcomes(result: pytest.RunResult) -> dict[str, str]:
    """Each test's outcome by name: the first of its setup/call/teardown reports that did not pass."""
    found: dict[str, str] = {}
    for report in result.reprec.getreports("pytest_runtest_logreport"):  # type: ignore[attr-defined]
        name = report.nodeid.rpartition("::")[2]
        if found.get(name, "passed") == "passed":
            found[name] = "xfailed" if hasattr(report, "wasxfail") else report.outcome
    return found


@pytest.mark.parametrize("value", ["true", "1"])
def test_under_ci_a_missing_backend_fails_and_a_platform_limit_skips(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("CI", value)
    result = suite.runpytest_inprocess("--continue-on-collection-errors")
    assert outcomes(result) == {
        "test_require": "failed",
        "test_importorskip": "failed",
        "test_skip_naming_no_module": "failed",
        "test_platform_limit": "skipped",
        "test_xfail": "xfailed",
        "test_present": "passed",
    }
    result.assert_outcomes(passed=1, failed=3, skipped=1, xfailed=1, errors=1)  # the error: test_module_level.py
    said = "under CI=true, where every extra is installed"
    result.stdout.re_match_lines([rf".*cannot import {MISSING} {said}: No module named '{MISSING}'"])
    result.stdout.re_match_lines([rf"skipped {said}: could not import '{MISSING}'.*"])
    result.stdout.re_match_lines([rf"skipped {said}: the runtime is not available here"])


@pytest.mark.parametrize("value", [None, "false"])
def test_elsewhere_a_missing_backend_skips(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, value) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    result = suite.runpytest_inprocess("-rs")
    assert outcomes(result) == {
        "test_require": "skipped",
        "test_importorskip": "skipped",
        "test_skip_naming_no_module": "skipped",
        "test_platform_limit": "skipped",
        "test_xfail": "xfailed",
        "test_present": "passed",
    }
    result.assert_outcomes(passed=1, skipped=5, xfailed=1)  # the fifth: test_module_level.py, at collection
    result.stdout.fnmatch_lines(["collected 6 items / 1 skipped"])
