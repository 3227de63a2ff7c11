"""Artifact directories are input: validate, bench and report refuse damaged, hand-edited or hostile ones in one
line with exit code 5 (links out of the directory, pipes and devices, garbage models, impossible manifests),
before any file of them is opened. Exit codes mean what they say: a bug in a backend is an internal error (1),
not a usage error, also under --target all, where a missing extra ends in exit 4; a signal arriving while a
failure is being reported gives one "interrupted" line."""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime
import pytest
from helpers import artifact_dir, parser_with, save_tiny_checkpoint, without_progress

from nafnet_edge import cli
from nafnet_edge.artifact_files import artifact_file
from nafnet_edge.cli import main
from nafnet_edge.converters.onnx import ONNXTarget
from nafnet_edge.converters.openvino import OpenVINOTarget
from nafnet_edge.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_MISSING_BACKEND,
    EXIT_OUTPUT,
    ArtifactError,
    NafnetEdgeError,
)

INTERRUPTED = "nafnet-edge: interrupted; no partial output was left in place\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A tiny checkpoint, one validation image and its ONNX artifact (32x32), converted once."""
    root = tmp_path_factory.mktemp("hostile")
    save_tiny_checkpoint(root / "tiny.pth")
    (root / "val").mkdir()
    pixels = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(root / "val" / "a.png"), pixels)
    argv = ["convert", str(root / "tiny.pth"), "--target", "onnx", "--input-size", "32", "--overlap", "8"]
    assert main([*argv, "--val-data", str(root / "val"), "-o", str(root / "out")]) == 0
    return root


@pytest.fixture
def artifact(built: Path, tmp_path: Path) -> Path:
    """A fresh copy of the ONNX artifact directory."""
    return Path(shutil.copytree(artifact_dir(built / "out", "onnx"), tmp_path / "onnx"))


def edit_manifest(directory: Path, **changes) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "shape":
            manifest["io"]["inputs"][0]["shape"] = value
        elif key == "source_path":
            manifest["source"]["path"] = value
        else:
            manifest[key] = value
    path.write_text(json.dumps(manifest))


def command(name: str, directory: Path, built: Path) -> list[str]:
    """validate, bench or report of ``directory``, as fast as each goes."""
    if name == "validate":
        return ["validate", str(directory), "--val-data", str(built / "val"), "--overlap", "8"]
    if name == "bench":
        return ["bench", str(directory), "--runs", "1", "--warmup", "0", "--no-profile", "--no-baseline"]
    return ["report", str(directory), "--images", "0", "-o", str(directory.parent / "report.html")]


def refused(argv: list[str], capsys, code: int, *needles: str) -> str:
    """``main(argv)`` exits ``code`` with one stderr line, an error naming ``needles``."""
    got = main(argv)
    err = without_progress(capsys.readouterr().err)
    assert got == code, err
    assert err.count("\n") == 1 and err.startswith("nafnet-edge: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def never_opened(monkeypatch):
    """``never_opened(path)``: any attempt to open ``path`` (Python's open, os.open, onnx.load, onnxruntime)
    fails the command instead of blocking on a pipe or reading a device forever; returns the attempts."""
    attempts: list[str] = []

    def guard(path: Path):
        target = os.path.abspath(path)

        def watch(function):
            def watched(file, *args, **kwargs):
                if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == target:
                    attempts.append(function.__name__)
                    raise OSError(f"test: {file} was opened")
                return function(file, *args, **kwargs)

            return watched

        for owner, name in ((builtins, "open"), (io, "open"), (os, "open"), (onnx, "load")):
            monkeypatch.setattr(owner, name, watch(getattr(owner, name)))
        monkeypatch.setattr(onnxruntime, "InferenceSession", watch(onnxruntime.InferenceSession))
        return attempts

    return guard


COMMANDS = ["validate", "bench", "report"]


# --- files that are not what they claim ----------------------------------------------------------------------


@pytest.mark.parametrize("name", COMMANDS)
def test_a_model_linked_from_outside_the_directory_is_refused(artifact: Path, built: Path, capsys, name) -> None:
    outside = artifact.parent / "elsewhere.onnx"
    shutil.copy(artifact / "model.onnx", outside)
    (artifact / "model.onnx").unlink()
    (artifact / "model.onnx").symlink_to(outside)
    refused(command(name, artifact, built), capsys, EXIT_BAD_INPUT, "model.onnx is a link to", "outside")


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_a_pipe_device_or_directory_as_model_is_refused_before_it_is_opened(
    artifact: Path, built: Path, capsys, never_opened, name, kind
) -> None:
    model = artifact / "model.onnx"
    model.unlink()
    if kind == "fifo":
        os.mkfifo(model)
        needle = "model.onnx is a named pipe (FIFO), not a regular file"
    elif kind == "dev-zero":
        model.symlink_to("/dev/zero")
        needle = "model.onnx is a link to /dev/zero, outside"
    else:
        model.mkdir()
        needle = "model.onnx is a directory, not a regular file"
    attempts = never_opened(model)
    refused(command(name, artifact, built), capsys, EXIT_BAD_INPUT, needle)
    assert attempts == []


def test_an_executorch_program_linked_to_dev_zero_is_refused(artifact: Path, built: Path, capsys) -> None:
    edit_manifest(artifact, target="executorch", files=["model.pte"])
    (artifact / "model.pte").symlink_to("/dev/zero")
    refused(command("validate", artifact, built), capsys, EXIT_BAD_INPUT, "model.pte is a link to /dev/zero")


@pytest.mark.parametrize("name", ["zero", "null"])
def test_a_device_is_refused_for_what_it_is(name: str) -> None:
    with pytest.raises(ArtifactError, match=f"/dev/{name} is a character device, not a regular file"):
        artifact_file(Path("/dev"), name)


@pytest.mark.parametrize("where", ["listed", "inside-a-bundle"])
def test_report_never_walks_a_link_to_the_root(artifact: Path, built: Path, capsys, monkeypatch, where) -> None:
    if where == "listed":
        edit_manifest(artifact, files=["model.onnx", "root"])
        (artifact / "root").symlink_to("/")
    else:
        edit_manifest(artifact, files=["model.onnx", "extra.mlpackage"])  # a bundle is walked, never through links
        (artifact / "extra.mlpackage" / "Data").mkdir(parents=True)
        (artifact / "extra.mlpackage" / "Data" / "up").symlink_to("/")
    listed: list[str] = []
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p=".": listed.append(str(p)) or listdir(p))
    refused(command("report", artifact, built), capsys, EXIT_BAD_INPUT, "is a link to /, outside")
    assert not any(p == "/" or p.startswith("/proc") or p.endswith("/root") for p in listed), listed


def test_a_link_to_the_root_beside_the_artifacts_is_not_one(built: Path, tmp_path: Path, capsys) -> None:
    out = Path(shutil.copytree(built / "out", tmp_path / "out"))
    (out / "root").symlink_to("/")
    assert main(["report", str(out), "--images", "0"]) == 0
    assert "onnx" in (out / "report.html").read_text()
    assert capsys.readouterr().err.startswith("wrote ")


def test_a_manifest_that_is_a_pipe_is_refused(artifact: Path, built: Path, capsys, never_opened) -> None:
    (artifact / "manifest.json").unlink()
    os.mkfifo(artifact / "manifest.json")
    attempts = never_opened(artifact / "manifest.json")
    refused(command("bench", artifact, built), capsys, EXIT_BAD_INPUT, "manifest.json is a named pipe (FIFO)")
    assert attempts == []


def test_a_bench_json_that_is_a_pipe_is_left_out_of_the_report(artifact: Path, built: Path, capsys) -> None:
    os.mkfifo(artifact / "bench.json")
    assert main(command("report", artifact, built)) == 0
    page = (artifact.parent / "report.html").read_text()
    assert "bench.json is not used" in page and "named pipe (FIFO)" in page


# --- damaged artifacts and impossible manifests ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["validate", "bench"])
def test_a_garbage_model_is_bad_input_naming_the_file(artifact: Path, built: Path, capsys, name) -> None:
    (artifact / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
    refused(command(name, artifact, built), capsys, EXIT_BAD_INPUT, "model.onnx is not a loadable ONNX model")


MANIFESTS = [
    ("unknown-target", {"target": "tflite"}, "unknown target 'tflite'"),
    ("unknown-precision", {"precision": "int3"}, "unknown precision 'int3'"),
    ("absurd-shape", {"shape": [1, 3, 160000, 160000]}, "'io.inputs[0].shape' [1, 3, 160000, 160000] is not one"),
    ("many-channels", {"shape": [1, 4096, 32, 32]}, "1 to 6 channels"),
    ("batch", {"shape": [8, 3, 32, 32]}, "batch 1"),
    ("bool-shape", {"shape": [1, 3, True, 32]}, "'io.inputs[0].shape' is not four positive integers"),
    ("long-name", {"files": ["model.onnx", "x" * 5000]}, "a name of 5000 characters (at most 1024)"),
    ("long-component", {"files": ["model.onnx", "x" * 300]}, "a path component of 300 bytes (at most 255)"),
    ("nul", {"files": ["model.onnx\0"]}, "NUL character"),
    ("absolute", {"files": ["/etc/passwd"]}, "not relative to the directory: '/etc/passwd'"),
    ("climbs", {"files": ["a/../../x.onnx"]}, "'files' points outside the directory"),
    ("source-path", {"source_path": 3}, "'source.path' is a JSON int"),
    ("section", {"export": [1]}, "'export' is a JSON list, not an object"),
]


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize(("changes", "needle"), [m[1:] for m in MANIFESTS], ids=[m[0] for m in MANIFESTS])
def test_an_impossible_manifest_is_refused_in_one_line(
    artifact: Path, built: Path, capsys, name, changes, needle
) -> None:
    edit_manifest(artifact, **changes)
    err = refused(command(name, artifact, built), capsys, EXIT_BAD_INPUT, "is not a manifest written by", needle)
    assert len(err) < 600, err


def test_a_deeply_nested_manifest_is_bad_input(artifact: Path, built: Path, capsys) -> None:
    (artifact / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(command("validate", artifact, built), capsys, EXIT_BAD_INPUT, "manifest.json is not valid JSON")


def _with_external_data(artifact: Path, location: str) -> None:
    model = onnx.load(str(artifact / "model.onnx"))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(artifact / "model.onnx"))


@pytest.mark.parametrize("name", ["validate", "bench"])
@pytest.mark.parametrize("kind", ["climbs", "link", "fifo"])
def test_onnx_external_data_must_be_a_file_inside_the_directory(
    artifact: Path, built: Path, capsys, never_opened, name, kind
) -> None:
    if kind == "climbs":
        _with_external_data(artifact, "../../../../etc/passwd")
        needle = "a name that points outside the directory: '../../../../etc/passwd'"
    elif kind == "link":
        _with_external_data(artifact, "weights.bin")
        (artifact / "weights.bin").symlink_to("/etc/passwd")
        needle = "weights.bin is a link to /etc/passwd, outside"
    else:
        _with_external_data(artifact, "weights.bin")
        os.mkfifo(artifact / "weights.bin")
        needle = "weights.bin is a named pipe (FIFO)"
    attempts = never_opened(artifact / "weights.bin")
    refused(command(name, artifact, built), capsys, EXIT_BAD_INPUT, needle)
    assert attempts == []


# --- outputs ---------------------------------------------------------------------------------------------------


def test_report_to_an_existing_directory_is_an_output_error(artifact: Path, capsys) -> None:
    (artifact.parent / "taken").mkdir()
    argv = ["report", str(artifact), "--images", "0", "-o", str(artifact.parent / "taken")]
    refused(argv, capsys, EXIT_OUTPUT, "it is a directory; give a file name, e.g. -o ")
    assert list((artifact.parent / "taken").iterdir()) == []


def test_report_of_a_directory_whose_name_is_not_utf8(artifact: Path, capsys) -> None:
    strange = Path(os.fsdecode(os.fsencode(str(artifact.parent)) + b"/bad-\xff-name"))
    shutil.copytree(artifact, strange)
    assert main(["report", str(strange), "--images", "0"]) == 0
    page = (strange / "report.html").read_bytes().decode("utf-8")  # valid UTF-8 throughout
    assert "bad-\\udcff-name" in page
    err = capsys.readouterr().err
    assert err.startswith("wrote ") and err.count("\n") == 1, err


# --- exit codes: a backend's bug is not a usage error ----------------------------------------------------------


def _boom(*args, **kwargs):
    raise ValueError("boom")


def _two_quick_targets(monkeypatch) -> None:
    """--target all of two quick targets: the registry holding onnx and openvino alone."""
    from nafnet_edge import converters

    monkeypatch.setattr(converters, "TARGETS", {name: converters.TARGETS[name] for name in ("onnx", "openvino")})


@pytest.mark.parametrize("target", ["onnx", "all"])
def test_a_valueerror_inside_a_backend_is_an_internal_error(
    built: Path, tmp_path: Path, capsys, monkeypatch, target
) -> None:
    _two_quick_targets(monkeypatch)
    monkeypatch.setattr(ONNXTarget, "export", _boom)
    argv = ["convert", str(built / "tiny.pth"), "--target", target, "--input-size", "32", "--no-validate"]
    assert main([*argv, "-o", str(tmp_path / "out")]) == EXIT_FAILURE
    err = without_progress(capsys.readouterr().err)
    assert err == "nafnet-edge: internal error: ValueError: boom (rerun with --debug for details)\n"
    # the bug stopped the command, it did not skip a target
    assert not artifact_dir(tmp_path / "out", "openvino").exists()


def test_all_with_a_missing_extra_builds_the_others_and_exits_4(
    built: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    _two_quick_targets(monkeypatch)
    monkeypatch.setattr(OpenVINOTarget, "modules", ("no_such_runtime_module",))
    argv = ["convert", str(built / "tiny.pth"), "--target", "all", "--input-size", "32", "--no-validate"]
    assert main([*argv, "-o", str(tmp_path / "out")]) == EXIT_MISSING_BACKEND
    err = without_progress(capsys.readouterr().err)
    assert err == (
        "skipped openvino: --target openvino needs no_such_runtime_module: pip install 'nafnet-edge[openvino]'\n"
    )
    assert (artifact_dir(tmp_path / "out", "onnx") / "model.onnx").is_file()
    assert not artifact_dir(tmp_path / "out", "openvino").exists()


def test_all_skips_a_target_an_option_does_not_apply_to(built: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    _two_quick_targets(monkeypatch)
    argv = ["convert", str(built / "tiny.pth"), "--target", "all", "--input-size", "32", "--no-validate"]
    assert main([*argv, "--precision", "fp16", "-o", str(tmp_path / "out")]) == 0
    assert (
        without_progress(capsys.readouterr().err) == "skipped onnx: --target onnx supports precision fp32, not fp16\n"
    )
    assert (artifact_dir(tmp_path / "out", "openvino", "fp16") / "model.xml").is_file()


# --- a signal while a failure is being reported -----------------------------------------------------------------


class _InterruptedWhileReported(NafnetEdgeError):
    """Its message is read while main() reports it; SIGINT arrives at that very moment."""

    def __str__(self) -> str:
        os.kill(os.getpid(), signal.SIGINT)
        return "a failure"


class _BugInterruptedWhileReported(RuntimeError):
    def __str__(self) -> str:
        os.kill(os.getpid(), signal.SIGINT)
        return "a bug"


def _fails_with(error: type[BaseException]):
    def func(args) -> int:
        raise error()

    return func


def _native_call_interrupted(args) -> int:
    """A native call that a signal cut short and that turned the interrupt into its own error."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
    except KeyboardInterrupt:
        raise RuntimeError("the native call failed") from None
    raise AssertionError("SIGINT did not interrupt")


@pytest.mark.parametrize(
    "func",
    [
        _fails_with(_InterruptedWhileReported),
        _fails_with(_BugInterruptedWhileReported),
        _native_call_interrupted,
    ],
    ids=["error", "internal-error", "native-call"],
)
@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_a_signal_while_a_failure_is_reported_gives_one_interrupted_line(capsys, monkeypatch, func, debug) -> None:
    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(cli, "build_parser", parser_with(cli.build_parser, "inspect", func))
    assert main([*(["--debug"] if debug else []), "inspect"]) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == INTERRUPTED
    assert signal.getsignal(signal.SIGINT) is before


def test_a_second_signal_does_not_cut_the_clean_up_short(capsys, monkeypatch) -> None:
    def interrupted_twice(args) -> int:
        try:
            os.kill(os.getpid(), signal.SIGINT)
        finally:  # clean-up running after the first Ctrl-C gets a second one: it is not cut short
            os.kill(os.getpid(), signal.SIGINT)
            cleaned.append(True)
        return 0

    cleaned: list[bool] = []
    monkeypatch.setattr(cli, "build_parser", parser_with(cli.build_parser, "inspect", interrupted_twice))
    before = signal.getsignal(signal.SIGINT)
    assert main(["inspect"]) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == INTERRUPTED
    assert cleaned == [True]
    assert signal.getsignal(signal.SIGINT) is before


def test_result_and_progress_lines_escape_a_hostile_output_name(tmp_path: Path, capsys) -> None:
    """An output folder named with a terminal escape and a newline: every line printed shows it escaped."""
    out = tmp_path / "out\x1b[31m\nfake"
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pth")
    assert main(["convert", str(ckpt), "--target", "onnx", "--input-size", "32", "--no-validate", "-o", str(out)]) == 0
    assert main(["report", str(out), "--images", "1"]) == 0
    printed = capsys.readouterr()
    assert "\x1b" not in printed.out + printed.err
    assert "out\\x1b[31m\\nfake" in printed.out  # the result line
    assert "out\\x1b[31m\\nfake" in printed.err  # the report's progress and "wrote" lines
