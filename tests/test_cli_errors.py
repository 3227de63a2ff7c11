"""Every kind of CLI failure: one line on stderr saying what is wrong and what to do, the documented exit code, a
traceback only with --debug. Commands run in-process through ``main`` (the subprocess behaviour, signals and
disks, is in test_interrupts.py)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import artifact_dir, parser_with, save_tiny_checkpoint

from nafnet_edge import cli
from nafnet_edge.cli import main
from nafnet_edge.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_MISSING_BACKEND,
    EXIT_USAGE,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("files")
    save_tiny_checkpoint(root / "tiny.pth")
    cv2.imwrite(str(root / "x.png"), np.zeros((8, 8, 3), np.uint8))
    (root / "empty").mkdir()
    escape = {"target": "onnx", "precision": "fp32", "files": ["../../x.onnx"]}
    escape["input"] = {"name": "image", "shape": [1, 3, 16, 16]}
    escape["source"] = {"config": {}, "sha256": "0" * 64}
    manifests = {"broken": "{not json", "tampered": json.dumps({"target": "onnx"}), "list": "[1, 2]"}
    valid = {**escape, "files": ["model.onnx"]}
    for name, manifest in {**manifests, "escape": json.dumps(escape), "valid": json.dumps(valid)}.items():
        (root / name).mkdir()
        (root / name / "manifest.json").write_text(manifest)
    artifact_dir(root / "exists", "onnx").mkdir(parents=True)
    return root


CASES = [
    # usage (2): argparse and impossible combinations
    ("no-command", "", EXIT_USAGE, "the following arguments are required: COMMAND"),
    ("unknown-command", "frobnicate", EXIT_USAGE, "invalid choice: 'frobnicate'"),
    ("bad-choice", "convert --target tflite", EXIT_USAGE, "invalid choice: 'tflite'"),
    ("negative-tile", "run {x.png} -o o --tile -3", EXIT_USAGE, "expected a non-negative integer"),
    ("bad-size", "inspect --size 12xab", EXIT_USAGE, "expected a size like 256 or 512x768"),
    ("missing-output", "run {x.png}", EXIT_USAGE, "-o/--output"),
    ("overlap-over-tile", "run {x.png} -o o --tile 64 --overlap 64", EXIT_USAGE, "smaller than --tile"),
    ("cuda-absent", "run {x.png} -o o --device cuda", EXIT_USAGE, "no CUDA device"),
    ("exists-no-force", "convert {tiny.pth} --target onnx -o {exists}", EXIT_USAGE, "pass --force"),
    ("data-and-pairs", "convert --target onnx -o {empty}/a --val-data {empty} --val-pairs {empty} {empty}",
     EXIT_USAGE, "alternatives"),
    ("int8-without-data", "convert --target onnx --precision int8 -o {empty}/b", EXIT_USAGE, "--train-data DIR"),
    ("weights-only-off-coreml", "quantize --target openvino --train-data {empty} --weights-only -o {empty}/c",
     EXIT_USAGE, "--weights-only is an option of --target coreml"),
    ("dynamic-off-onnx", "convert --target openvino -o {empty}/c --dynamic", EXIT_USAGE,
     "--dynamic is an option of --target onnx"),
    ("latency-zero", "bench {empty} --max-latency-ms 0", EXIT_USAGE, "expected a positive number, got '0'"),
    ("budget-nan", "convert --target onnx -o {empty}/g --min-fidelity nan", EXIT_USAGE, "expected a finite number"),
    ("lr-negative", "quantize --target openvino --train-data {empty} --lr -1", EXIT_USAGE,
     "expected a positive number"),
    ("overlap-over-input", "convert --target onnx -o {empty}/h --input-size 32 --overlap 32", EXIT_USAGE,
     "--overlap 32 must be smaller than the tile"),
    ("reparam-size", "reparam -o {empty}/d.safetensors --input-size 100", EXIT_USAGE, "multiple of 16"),
    ("pixel-format-without-image-io", "convert --target onnx -o {empty}/i --pixel-format rgba", EXIT_USAGE,
     "add --io image"),
    ("image-io-tensor-only-target", "convert --target executorch-coreml -o {empty}/j --io image", EXIT_USAGE,
     "tensor I/O only"),
    ("gray-pixels-rgb-model", "convert {tiny.pth} --target onnx -o {empty}/k --io image --pixel-format gray",
     EXIT_USAGE, "takes --pixel-format rgb, bgr, rgba or bgra, not gray"),
    ("bad-pixel-format", "convert --target onnx -o {empty}/l --io image --pixel-format argb", EXIT_USAGE,
     "invalid choice: 'argb'"),
    # bad input (5)
    ("missing-checkpoint", "inspect {empty}/nope.pth", EXIT_BAD_INPUT, "checkpoint not found"),
    ("missing-image", "run {empty}/nope.png -o o", EXIT_BAD_INPUT, "input not found"),
    ("folder-without-images", "run {empty} -o o", EXIT_BAD_INPUT, "contains no PNG, JPEG or TIFF"),
    ("validate-no-manifest", "validate {empty}", EXIT_BAD_INPUT, "has no manifest.json"),
    ("validate-broken-manifest", "validate {broken}", EXIT_BAD_INPUT, "is not valid JSON"),
    ("validate-tampered-manifest", "validate {tampered}", EXIT_BAD_INPUT, "not a manifest written by nafnet-edge"),
    ("validate-list-manifest", "validate {list}", EXIT_BAD_INPUT, "not a manifest written by nafnet-edge"),
    ("bench-no-artifacts", "bench {empty}", EXIT_BAD_INPUT, "has no manifest.json"),
    ("manifest-files-outside", "bench {escape}", EXIT_BAD_INPUT, "'files' points outside the directory"),
    ("validate-overlap", "validate {valid} --overlap 16", EXIT_USAGE, "must be smaller than the artifact's 16x16"),
    ("bench-tampered-manifest", "bench {tampered}", EXIT_BAD_INPUT, "not a manifest written by nafnet-edge"),
    ("report-no-artifacts", "report {empty}", EXIT_BAD_INPUT, "manifest"),
    ("train-data-empty", "quantize --target executorch --train-data {empty} -o {empty}/e",
     EXIT_BAD_INPUT, "no PNG, JPEG or TIFF"),
    ("val-data-missing", "convert --target onnx -o {empty}/f --val-data {empty}/nope", EXIT_BAD_INPUT, "nope"),
]  # fmt: skip


def expand(argv: list[str], root: Path) -> list[str]:
    return [a.replace("{", str(root) + "/").replace("/}", "").replace("}", "") if "{" in a else a for a in argv]


@pytest.mark.parametrize(("argv", "code", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_error_is_one_line_with_its_exit_code(files: Path, capsys, monkeypatch, argv, code, needle) -> None:
    monkeypatch.chdir(files)
    try:
        got = main(expand(shlex.split(argv), files))
    except SystemExit as e:  # argparse
        got = e.code
    err = capsys.readouterr().err
    assert got == code, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(("nafnet-edge: error: ", "nafnet-edge ")) and "error: " in err, err
    assert needle in err, err
    assert not (files / "o").exists()  # nothing written for a refused command


def _value(option) -> list[str]:
    """Command-line words giving ``option`` a valid value."""
    if option.kind == "flag":
        return [option.flag]
    if option.choices:
        return [option.flag, option.choices[-1]]
    if option.type is cli.parse_size:
        return [option.flag, "64"]
    return [option.flag, str(option.default if option.default not in (None, (), []) else 1)]


def _refusals() -> list[tuple[str, str, list[str], str]]:
    """(command, another target, argv, owners) for every real target's convert/quantize option."""
    from nafnet_edge.converters import target_class, target_names

    cases = []
    for command in ("convert", "quantize"):
        names = [n for n in target_names() if command == "convert" or target_class(n).quantizer is not None]
        for option, owners in cli.target_options(command):
            owning = [cls.name for cls in owners]
            other = next(n for n in names if n not in owning)
            cases.append((command, other, _value(option), " or ".join(owning)))
    return cases


REFUSALS = _refusals()


@pytest.mark.parametrize(
    ("command", "other", "words", "owners"), REFUSALS, ids=[f"{c[0]} {c[2][0]} for {c[1]}" for c in REFUSALS]
)
def test_each_target_option_is_refused_for_another_target(
    files: Path, capsys, command: str, other: str, words: list[str], owners: str
) -> None:
    data = ["--train-data", str(files / "empty")] if command == "quantize" else []
    out = files / "empty" / "refused"
    assert main([command, "--target", other, "-o", str(out), *data, *words]) == EXIT_USAGE
    assert capsys.readouterr().err == f"nafnet-edge: error: {words[0]} is an option of --target {owners}\n"
    assert not out.exists()


def test_missing_backend_names_the_extra(files: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the onnx extra were not installed
    assert (
        main(["convert", str(files / "tiny.pth"), "--target", "onnx", "-o", str(files / "mb")]) == EXIT_MISSING_BACKEND
    )
    err = capsys.readouterr().err
    assert err == "nafnet-edge: error: --target onnx needs onnx: pip install 'nafnet-edge[onnx]'\n"
    assert not (files / "mb").exists()


def _explode(args) -> int:
    raise RuntimeError("unexpected\nover two lines")


def test_an_internal_error_is_one_line_and_the_traceback_needs_debug(files: Path, capsys, monkeypatch) -> None:
    argv = ["inspect", str(files / "tiny.pth")]
    monkeypatch.setattr(cli, "build_parser", parser_with(cli.build_parser, "inspect", _explode))
    assert main(argv) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert (
        err == "nafnet-edge: internal error: RuntimeError: unexpected over two lines (rerun with --debug for details)\n"
    )
    assert main(["--debug", *argv]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "RuntimeError: unexpected" in err


def test_debug_shows_the_traceback_of_a_handled_error(files: Path, capsys) -> None:
    assert main(["--debug", "inspect", str(files / "empty" / "nope.pth")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback" in err and "CheckpointNotFoundError" in err
    assert err.rstrip().splitlines()[-1].startswith("nafnet-edge: error: checkpoint not found")


def _interrupt(args) -> int:
    raise KeyboardInterrupt


def test_interrupt_exit_code_and_handlers_restored(files: Path, capsys, monkeypatch) -> None:
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    monkeypatch.setattr(cli, "build_parser", parser_with(cli.build_parser, "inspect", _interrupt))
    assert main(["inspect"]) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "nafnet-edge: interrupted; no partial output was left in place\n"
    assert {s: signal.getsignal(s) for s in before} == before  # notebooks keep their own handlers


def test_target_takes_a_comma_separated_list_each_once_and_all_alone(tmp_path: Path, capsys) -> None:
    from nafnet_edge.cli import main

    out = tmp_path / "out"
    assert (
        main(["convert", "--target", "onnx,openvino,onnx", "--no-validate", "--input-size", "32", "-o", str(out)]) == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["onnx-fp32", "openvino-fp32"]
    capsys.readouterr()
    for bad, said in (("onnx,tflite", "invalid choice: 'tflite'"), ("onnx,all", "'all' stands alone")):
        with pytest.raises(SystemExit) as info:
            main(["convert", "--target", bad, "-o", str(tmp_path / "never")])
        assert info.value.code == EXIT_USAGE and said in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
