"""Skips under CI: a failure unless the reason is a platform limit listed in ``ALLOWED_SKIPS``.

CI (``CI=true``) installs every extra, so a test skipped there for a missing module, backend or tool would let a
broken install pass. :func:`helpers.require` already fails such imports; the hooks below catch every other skip
(an ``importorskip`` or ``pytest.skip`` anywhere, a ``skipif`` mark) whose reason is not listed here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import TINY_CONFIG, Converted, kodak_crops, running_in_ci, save_tiny_checkpoint

from nafnet_edge.model import NAFNet, NAFNetConfig


def _shipped_auto() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from nafnet_edge.quantization import norm_kernels
    from nafnet_edge.quantization import openvino as ov_quantization

    return norm_kernels.AUTO, ov_quantization.AUTO_PRECISIONS


SHIPPED_AUTO = _shipped_auto()  # before untimed_float_choices pins them
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


@pytest.fixture(scope="session", autouse=True)
def untimed_float_choices() -> Iterator[None]:
    """int8 exports with ``auto`` float parts take the baseline without timing (fp32 norms for ExecuTorch, f32
    for OpenVINO): timing costs XNNPACK a second lowering (25-40 s) per artifact, and a choice by timing could
    differ between two artifacts a test compares. Tests of the choice itself use :func:`timed_float_choices`."""
    from nafnet_edge.quantization import norm_kernels
    from nafnet_edge.quantization import openvino as ov_quantization

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(norm_kernels, "AUTO", (norm_kernels.BASELINE,))
        patch.setattr(ov_quantization, "AUTO_PRECISIONS", (ov_quantization.DEFAULT_INFERENCE_PRECISION,))
        yield


@pytest.fixture
def timed_float_choices() -> Iterator[None]:
    """``auto`` as shipped: the candidates are timed."""
    from nafnet_edge.quantization import norm_kernels
    from nafnet_edge.quantization import openvino as ov_quantization

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(norm_kernels, "AUTO", SHIPPED_AUTO[0])
        patch.setattr(ov_quantization, "AUTO_PRECISIONS", SHIPPED_AUTO[1])
        yield


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


@pytest.fixture(scope="session")
def tiny_config() -> NAFNetConfig:
    """helpers.TINY_CONFIG: width 8, two levels (pads to 4), one block each: milliseconds per 64 px frame."""
    return TINY_CONFIG


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The randomized two-level width-8 NAFNet (helpers.TINY_CONFIG) as an official ``{'params': ...}`` file.
    Read-only: a test that changes it copies it first."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pth")


@pytest.fixture(scope="session")
def kodak_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two crops of the shipped photos, one larger than a 64 px artifact (tiled), one smaller (padded). Read-only."""
    return kodak_crops(tmp_path_factory.mktemp("kodak") / "data", [(96, 120), (50, 40)])


# The targets the shared artifacts are converted for, in the order convert runs them, each where its backend is
# importable (under CI every one is: a test that needs one fails through helpers.require when it is missing).
SHARED_TARGETS = ("onnx", "openvino", "coreml", "executorch", "litert")
_TARGET_MODULES = {
    "onnx": "onnxruntime",
    "openvino": "openvino",
    "coreml": "coremltools",
    "executorch": "executorch",
    "litert": "ai_edge_litert",
}


@pytest.fixture(scope="session")
def converted_artifacts(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, kodak_data: Path) -> Converted:
    """``tiny_checkpoint`` converted once per session for every installed target at 64 px and validated on
    ``kodak_data``, shared by the bench, report and pipeline tests. Read-only: a test that changes an artifact
    directory (writes bench.json, runs a snippet in it, damages a file) copies it first."""
    from nafnet_edge.cli import main

    root = tmp_path_factory.mktemp("converted")
    out = root / "out"
    stdout: dict[str, str] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAFNET_EDGE_CACHE", str(root / "cache"))
        for target in SHARED_TARGETS:
            if importlib.util.find_spec(_TARGET_MODULES[target]) is None:
                continue
            args = ["convert", str(tiny_checkpoint), "--target", target, "-o", str(out), "--input-size", "64"]
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                code = main([*args, "--val-data", str(kodak_data)])
            assert code == 0, f"converting the shared {target} artifact failed (exit {code})"
            stdout[target] = printed.getvalue()
    return Converted(out=out, checkpoint=tiny_checkpoint, data=kodak_data, stdout=stdout)
