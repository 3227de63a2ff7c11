"""Skips under CI: a failure unless the reason is a platform limit listed in ``ALLOWED_SKIPS``.

CI (``CI=true``) installs every extra, so a test skipped there for a missing module, backend or tool would let a
broken install pass. :func:`helpers.require` already fails such imports; the hooks below catch every other skip
(an ``importorskip`` or ``pytest.skip`` anywhere, a ``skipif`` mark) whose reason is not listed here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import running_in_ci

from nafnet_edge.model import NAFNet, NAFNetConfig

pytest_plugins = ["pytester"]  # tests/test_skip_policy.py runs these hooks on small generated test files

# Reason prefix -> why it cannot be fixed by installing something. Everything else that skips fails under CI.
ALLOWED_SKIPS = {
    "this CPU does not report BF16": "hardware: OpenVINO runs bf16 only on CPUs with BF16 instructions",
    "on macOS the ExecuTorch runtime runs any .pte": "platform: the refusal it tests exists only off Apple platforms",
    "needs Linux's peak-RSS reset": "platform: /proc/self/clear_refs exists only on Linux",
    "root without mount namespaces": "sandbox: neither a read-only mount nor file permissions bind root there",
}


def skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail_skips_in_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail") or not running_in_ci():
        return
    reason = skip_reason(report)
    if reason.startswith(tuple(ALLOWED_SKIPS)):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under CI=true, where every extra is installed: {reason}\n"
        "(install what is missing; a platform limit that no install can fix belongs in tests/conftest.py "
        "ALLOWED_SKIPS)"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    outcome = yield
    _fail_skips_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    _fail_skips_in_ci(outcome.get_result())


@pytest.fixture(scope="module")
def zero_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A four-level width-8 NAFNet whose weights are all zero: with the global residual it returns its input, so
    image I/O can be checked exactly."""
    config = NAFNetConfig(width=8, enc_blk_nums=(1, 1, 1, 1), middle_blk_num=1, dec_blk_nums=(1, 1, 1, 1))
    path = tmp_path_factory.mktemp("ckpt") / "zero.pth"
    torch.save({"params": {k: torch.zeros_like(v) for k, v in NAFNet(config).state_dict().items()}}, path)
    return path
