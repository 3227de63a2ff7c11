"""ARM64 validation under qemu user-mode emulation: ``nafnet-edge arm64 prepare`` builds a working sysroot once,
and ``validate --arm64`` runs a tiny ExecuTorch int8 ``.pte`` and a tiny LiteRT ``.tflite`` on the emulated
cortex-a76 (dot product) and max,sme=off (i8mm) CPUs, scored like the x86 validation and recorded beside it
(the LiteRT model with image I/O too).

The sysroot is prepared once per test session (Debian arm64 packages and aarch64 wheels: the slow part). Locally
these tests skip where qemu, the cross compiler or apt's arm64 index is missing; under CI they must run.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import require, running_in_ci

from nafnet_edge import reporting
from nafnet_edge.arm64.emulator import DEFAULT_CPUS
from nafnet_edge.arm64.sysroot import (
    CROSS_CXX,
    HWCAP_HEADER,
    QEMU,
    Sysroot,
    hwcap_names_from_header,
    read_sysroot,
    wanted_versions,
)
from nafnet_edge.cli import main
from nafnet_edge.errors import EXIT_MISSING_BACKEND, EXIT_USAGE
from nafnet_edge.manifest import Manifest, ManifestError, read_manifest
from nafnet_edge.validation import MIN_FIDELITY_DB


def _host_problem() -> str | None:
    for tool, package in ((QEMU, "qemu-user-static"), (CROSS_CXX, "g++-aarch64-linux-gnu")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    if shutil.which("dpkg") is None:
        return "not a Debian machine (no dpkg)"
    foreign = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout
    if "arm64" not in foreign.split():
        return "apt has no arm64 index (dpkg --add-architecture arm64 && apt-get update)"
    return None


PROBLEM = _host_problem()
if PROBLEM is not None:
    if running_in_ci():
        pytest.fail(f"ARM64 validation cannot run under CI=true: {PROBLEM}", pytrace=False)
    pytest.skip(f"ARM64 emulation unavailable here: {PROBLEM}", allow_module_level=True)

require("executorch")
require("ai_edge_litert")

# An int8 program's ARM64 outputs may differ from x86's by a quantization step of the output where fp32 parts of
# the graph (reductions in another order, fused multiply-adds) move a value across a rounding boundary:
# measured 0.0126 (one step) on one tile in seven of the tiny model.
MAX_INT8_VS_X86 = 0.05
MAX_FP32_VS_X86 = 1e-5  # fp32 kernels: rounding only; measured 9.5e-7
# FP16 arithmetic: native on the emulated ARM cores, each operation in float32 rounded to float16 on x86; measured
# 1.3e-3 on the embedded model.
MAX_FP16_VS_X86 = 1e-2


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


@pytest.fixture(scope="session")
def sysroot(tmp_path_factory: pytest.TempPathFactory) -> Sysroot:
    """One sysroot for the session, prepared as a user does (``nafnet-edge arm64 prepare --dir``)."""
    folder = tmp_path_factory.mktemp("arm64") / "sysroot"
    code, out = run_cli("arm64", "prepare", "--dir", str(folder))
    assert code == 0 and out.startswith("prepared "), out
    prepared = read_sysroot(folder)
    assert prepared is not None
    return prepared


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, kodak_data: Path) -> Path:
    """A tiny int8 ExecuTorch program (PTQ) and tiny fp32 LiteRT models (tensor and image I/O) at 64 px, validated
    on x86."""
    root = tmp_path_factory.mktemp("arm64-artifacts")
    out = root / "out"
    train = root / "train"
    train.mkdir()
    shutil.copy(kodak_data / "crop0.png", train)  # the crop larger than the 64 px tile
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAFNET_EDGE_CACHE", str(root / "cache"))
        common = ["-o", str(out), "--input-size", "64", "--val-data", str(kodak_data)]
        int8 = ["quantize", str(tiny_checkpoint), "--target", "executorch", "--method", "ptq"]
        code, _ = run_cli(*int8, "--train-data", str(train), "--search-rounds", "0", *common)
        assert code == 0
        for io in ("tensor", "image"):
            code, _ = run_cli("convert", str(tiny_checkpoint), "--target", "litert", "--io", io, *common)
            assert code == 0
        code, _ = run_cli("convert", str(tiny_checkpoint), "--target", "litert", "--precision", "fp16", *common)
        assert code == 0
    return out


def validate_arm64(directory: Path, data: Path, sysroot: Sysroot, *extra: str) -> tuple[int, dict]:
    code, out = run_cli(
        "validate", str(directory), "--arm64", "--arm64-dir", str(sysroot.directory), "--val-data", str(data),
        "--json", *extra,
    )  # fmt: skip
    return code, json.loads(out)


def test_prepare_is_complete_and_a_second_prepare_does_nothing(sysroot: Sysroot) -> None:
    assert sysroot.versions == wanted_versions()
    assert sysroot.python.is_file() and sysroot.et_runner.is_file() and sysroot.cpu_probe.is_file()
    assert sysroot.qemu.startswith(("7.", "8.", "9.", "10."))
    code, out = run_cli("arm64", "prepare", "--dir", str(sysroot.directory))
    assert code == 0 and out.startswith("already prepared: "), out
    code, out = run_cli("arm64", "status", "--dir", str(sysroot.directory))
    assert code == 0 and "executorch" in out and "not usable" not in out, out


def test_checking_the_host_leaves_setuptools_importable() -> None:
    """prepare's host check must not switch off setuptools' distutils shim for the process (it does once anything
    calls importlib.util.find_spec("pip")): NNCF imports setuptools later in the same process."""
    code = "from nafnet_edge.arm64.sysroot import check_host; check_host(); import setuptools; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_hwcap_names_come_from_the_kernel_header() -> None:
    names = hwcap_names_from_header(HWCAP_HEADER)
    assert names["hwcap"]["20"] == "asimddp" and names["hwcap2"]["13"] == "i8mm"


@pytest.mark.parametrize(
    ("name", "bound"),
    [
        ("executorch-int8", MAX_INT8_VS_X86),
        ("litert-fp32", MAX_FP32_VS_X86),
        ("litert-fp32-image", MAX_FP32_VS_X86),
        ("litert-fp16", MAX_FP16_VS_X86),
    ],
    ids=["pte", "tflite", "tflite-image", "tflite-fp16"],
)
def test_artifact_validates_on_emulated_arm64_cpus(
    artifacts: Path, kodak_data: Path, sysroot: Sysroot, tmp_path: Path, name: str, bound: float
) -> None:
    directory = shutil.copytree(artifacts / name, tmp_path / name)
    code, report = validate_arm64(directory, kodak_data, sysroot)
    assert code == 0 and report["passed"], report
    manifest = read_manifest(directory)
    assert manifest.validation is not None and list(manifest.arm64) == list(DEFAULT_CPUS)
    precision = manifest.precision
    for cpu, record in manifest.arm64.items():
        summary = record.validation.summary
        assert record.passed and summary["fidelity_db_min"] >= MIN_FIDELITY_DB[precision], (cpu, summary)
        assert summary["images"] == 2 and "drift_db_mean" not in summary  # --val-data: no ground truth
        assert record.vs_x86_max_abs is not None and math.isfinite(record.vs_x86_max_abs)
        assert record.vs_x86_max_abs <= bound, (cpu, record.vs_x86_max_abs)
        assert record.tiles == sum(r["tiles"] for r in record.validation.per_image) > 0
        assert record.runner == ("executorch C++ Module" if precision == "int8" else "ai-edge-litert interpreter")
        assert report["arm64"][cpu] == record.to_dict()
        if manifest.target == "litert":  # the arithmetic the x86 session ran: FP16 for float16 weights
            assert record.runtime["compute"] == ("fp16" if precision == "fp16" else "fp32"), record.runtime
        if manifest.io.kind == "image":  # scored on 8-bit pixels, as on x86
            assert summary["within_one_level_share_min"] >= record.validation.budgets["min_within_one_level"]
    a76, big = manifest.arm64["cortex-a76"], manifest.arm64["max,sme=off"]
    assert "asimddp" in a76.hwcaps and "i8mm" not in a76.hwcaps and a76.midr == "0x414fd0b1"
    assert "i8mm" in big.hwcaps and "sme" not in big.hwcaps
    if precision == "int8":  # ExecuTorch's runner reports what XNNPACK's CPU detection read
        assert a76.cpu_features is not None and big.cpu_features is not None
        assert a76.cpu_features["neon_dot"] and not a76.cpu_features["i8mm"]
        assert big.cpu_features["i8mm"] and not big.cpu_features["sme"]
    again = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert again.arm64 == manifest.arm64 and again.to_dict() == manifest.to_dict()
    facts = dict(reporting._details(reporting.Artifact(directory, manifest), tmp_path)["facts"])
    for cpu, record in manifest.arm64.items():  # the report's details list each CPU's scores, no time
        line = facts[f"ARM64 {cpu}"]
        assert f"fidelity min {record.validation.summary['fidelity_db_min']:.1f} dB" in line and "passed" in line
        assert "emulated" in line and re.search(r"\d\s?m?s\b", line) is None, line  # no time
    if manifest.target == "litert":
        gpu = manifest.export["gpu_delegate"]
        assert facts["export"] == f"{gpu['accepted']}/{gpu['nodes']} on GPU"


def test_without_a_sysroot_validate_arm64_exits_4_and_leaves_the_manifest(
    artifacts: Path, kodak_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = shutil.copytree(artifacts / "litert-fp32", tmp_path / "litert-fp32")
    before = (directory / "manifest.json").read_bytes()
    empty = tmp_path / "no-sysroot"
    code = main(["validate", str(directory), "--arm64", "--arm64-dir", str(empty), "--val-data", str(kodak_data)])
    err = capsys.readouterr().err
    assert code == EXIT_MISSING_BACKEND
    assert err.count("\n") == 1 and "nafnet-edge arm64 prepare" in err and str(empty) in err, err
    assert (directory / "manifest.json").read_bytes() == before
    assert not empty.exists()


def test_an_unknown_cpu_model_is_a_usage_error(
    artifacts: Path, sysroot: Sysroot, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = shutil.copytree(artifacts / "litert-fp32", tmp_path / "litert-fp32")
    before = (directory / "manifest.json").read_bytes()
    code = main(["validate", str(directory), "--arm64", "--arm64-dir", str(sysroot.directory), "--cpu", "pentium"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "qemu emulates no CPU pentium" in err and "cortex-a76" in err, err
    assert (directory / "manifest.json").read_bytes() == before


def test_prepare_names_what_to_install_when_qemu_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no qemu, no compiler, no apt
    code = main(["arm64", "prepare", "--dir", str(tmp_path / "sysroot")])
    err = capsys.readouterr().err
    assert code == EXIT_MISSING_BACKEND and "apt-get install qemu-user-static" in err, err
    assert not (tmp_path / "sysroot").exists()


def test_a_damaged_arm64_record_is_refused(artifacts: Path) -> None:
    data = json.loads((artifacts / "litert-fp32" / "manifest.json").read_text())
    assert "arm64" not in data and Manifest.from_dict(data).arm64 == {}  # manifests before ARM64 validation
    data["arm64"] = {"cortex-a76": {"passed": True, "cpu": "cortex-a76", "qemu": 7, "runner": "x"}}
    with pytest.raises(ManifestError, match=r"arm64\.cortex-a76\.qemu"):
        Manifest.from_dict(data)


def test_prepare_never_replaces_a_folder_that_is_not_a_sysroot(tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["arm64", "prepare", "--dir", str(tmp_path)]) == EXIT_MISSING_BACKEND
    assert "is not an ARM64 sysroot" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
