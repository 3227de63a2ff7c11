"""The Python API (nafnet_edge.api): the documented example runs, options are keyword-only with the command's
defaults, an existing artifact needs force=True, and ``import nafnet_edge`` stays torch-free."""

from __future__ import annotations

import argparse
import inspect
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from helpers import require

import nafnet_edge as ne
from nafnet_edge import api, defaults
from nafnet_edge.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
DOCS_PAGE = ROOT / "docs" / "python-api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.slow  # the embedded default model validated on the shipped photos: about 30 s on 2 cores
def test_the_documented_example_runs_and_measures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    require("onnxruntime")
    (code,) = python_blocks(DOCS_PAGE.read_text())
    monkeypatch.setenv("NAFNET_EDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(compile(code, str(DOCS_PAGE), "exec"), namespace)

    result, timing, page = namespace["result"], namespace["timing"], namespace["page"]
    assert result.directory.name == "onnx-fp32" and result.directory.parent.parent == tmp_path
    manifest = json.loads((result.directory / "manifest.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["io"]["inputs"][0]["shape"][2:] == [128, 128]
    assert result.passed and manifest["validation"]["passed"]
    assert result.validation.fidelity_db_min >= 60.0  # the fp32 budget
    measured = timing.artifacts[0]
    assert measured.directory == str(result.directory) and len(measured.latency_ms.runs) == 3
    assert measured.median_ms > 0 and timing.baseline is not None and timing.baseline.median_ms > 0
    assert page == result.directory.parent / "report.html" and "onnx" in page.read_text()
    out = capsys.readouterr().out
    assert f"fidelity {result.validation.fidelity_db_min:.1f} dB" in out and "report.html" in out


def test_an_existing_artifact_is_replaced_only_with_force(tiny_checkpoint: Path, kodak_data: Path, tmp_path) -> None:
    require("onnxruntime")
    loaded = ne.load(tiny_checkpoint)
    first = ne.convert(loaded, target="onnx", output=tmp_path, input_size=64, val_data=kodak_data)
    assert first.directory == tmp_path / "onnx-fp32" and first.passed
    (first.directory / "marker").write_text("from the first conversion")

    with pytest.raises(UsageError, match=r"exists; pass --force \(force=True in Python\)"):
        ne.convert(loaded, target="onnx", output=tmp_path, input_size=64, validate=False)
    assert (first.directory / "marker").is_file()  # refused: nothing was touched

    again = ne.convert(tiny_checkpoint, target="onnx", output=tmp_path, input_size=64, validate=False, force=True)
    assert again.directory == first.directory and again.validation is None and again.passed
    assert not (again.directory / "marker").exists()  # replaced as a whole
    assert json.loads((again.directory / "manifest.json").read_text())["source"]["sha256"] == loaded.sha256

    checked = ne.validate(again.directory, val_data=kodak_data)  # the recorded checkpoint, loaded again
    assert isinstance(checked, ne.ValidationResult) and checked.target == "onnx" and checked.passed
    assert checked.report.passed and checked.validation is not None and checked.validation.fidelity_db_min >= 60.0
    assert json.loads((again.directory / "manifest.json").read_text())["validation"]["passed"]


def test_options_are_checked_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="not an option of target onnx"):
        ne.convert(target="onnx", output=out, options={"compute_units": "ALL"})
    with pytest.raises(UsageError, match="no int8 quantizer"):
        ne.quantize(target="onnx", train_data=tmp_path, output=out)
    with pytest.raises(UsageError, match="must be smaller than the tile"):
        ne.convert(target="onnx", output=out, input_size=32, overlap=32)
    with pytest.raises(UsageError, match="not a runtime option"):
        ne.bench(tmp_path, options={"dynamic": True})
    assert not out.exists()


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from nafnet_edge.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _default(parser: argparse.ArgumentParser, flag: str) -> Any:
    """The default of ``flag`` as listed in --help (hidden deprecated spellings have none)."""
    for action in parser._actions:
        if flag in action.option_strings and action.help != argparse.SUPPRESS:
            return action.default
    raise AssertionError(f"{parser.prog} has no option {flag}")


# (command, flag, the defaults.py constant, the API function and parameter that take the same value)
SHARED_DEFAULTS = [
    ("convert", "--output", "OUTPUT_DIR", "convert", "output"),
    ("convert", "--input-size", "INPUT_SIZE", "convert", "input_size"),
    ("convert", "--reference-device", "REFERENCE_DEVICE", "convert", "reference_device"),
    ("convert", "--param-key", "PARAM_KEY", "load", "param_key"),
    ("convert", "--method", "METHOD", "convert", "method"),
    ("convert", "--steps", "STEPS", "convert", "steps"),
    ("convert", "--train-batch", "TRAIN_BATCH", "convert", "train_batch"),
    ("convert", "--lr", "LR", "convert", "lr"),
    ("convert", "--seed", "SEED", "convert", "seed"),
    ("convert", "--search-rounds", "SEARCH_ROUNDS", "convert", "search_rounds"),
    ("convert", "--bench-runs", "BENCH_RUNS", "bench", "runs"),
    ("quantize", "--output", "OUTPUT_DIR", "quantize", "output"),
    ("quantize", "--input-size", "INPUT_SIZE", "quantize", "input_size"),
    ("quantize", "--method", "METHOD", "quantize", "method"),
    ("quantize", "--steps", "STEPS", "quantize", "steps"),
    ("quantize", "--train-batch", "TRAIN_BATCH", "quantize", "train_batch"),
    ("quantize", "--lr", "LR", "quantize", "lr"),
    ("quantize", "--seed", "SEED", "quantize", "seed"),
    ("quantize", "--search-rounds", "SEARCH_ROUNDS", "quantize", "search_rounds"),
    ("validate", "--reference-device", "REFERENCE_DEVICE", "validate", "reference_device"),
    ("validate", "--param-key", "PARAM_KEY", "validate", "param_key"),
    ("bench", "--runs", "BENCH_RUNS", "bench", "runs"),
    ("bench", "--warmup", "BENCH_WARMUP", "bench", "warmup"),
    ("bench", "--top", "BENCH_TOP", "bench", "top"),
    ("bench", "--overlap", "BENCH_OVERLAP_PX", "bench", "overlap"),
    ("report", "--images", "REPORT_IMAGES", "report", "images"),
    ("run", "--tile", "RUN_TILE_PX", None, None),
    ("run", "--overlap", "RUN_OVERLAP_PX", None, None),
    ("run", "--tile-batch", "TILE_BATCH", None, None),
    ("inspect", "--size", "GMACS_SIZE", None, None),
    ("reparam", "--stream-scale", "STREAM_SCALE", None, None),
]


def test_the_command_and_the_api_share_their_defaults() -> None:
    commands = _subcommands()
    for command, flag, constant, function, parameter in SHARED_DEFAULTS:
        expected = getattr(defaults, constant)
        assert _default(commands[command], flag) == expected, (command, flag, constant)
        if function is not None:
            signature = inspect.signature(getattr(api, function))
            assert signature.parameters[parameter].default == expected, (function, parameter, constant)
    assert api.resolve_overlap(None, (256, 256)) == defaults.VALIDATION_OVERLAP_PX


def test_no_parser_retypes_a_numeric_default() -> None:
    """Numbers, sizes and paths come from nafnet_edge.defaults, never as literals in a parser."""
    for module in sorted((ROOT / "nafnet_edge" / "cli").glob("*.py")):
        literals = re.findall(r"default\s*=\s*(?:-?\d|\(\s*\d|Path\()[^,)]*", module.read_text())
        assert not literals, f"{module.name}: {literals}"


@pytest.mark.parametrize(
    ("function", "args"),
    [
        ("load", (None, "params")),
        ("convert", (None, "onnx")),
        ("quantize", (None, "executorch", "train")),
        ("validate", ("artifacts/onnx-fp32", None)),
        ("report", ("artifacts", "report.html")),
    ],
)
def test_options_are_keyword_only(function: str, args: tuple[Any, ...]) -> None:
    with pytest.raises(TypeError, match="positional argument"):
        getattr(ne, function)(*args)


def test_every_option_after_the_first_is_keyword_only() -> None:
    for name in ("load", "convert", "quantize", "validate", "bench", "report"):
        function = getattr(ne, name)
        assert function is getattr(api, name) and inspect.isfunction(function)
        first, *rest = inspect.signature(function).parameters.values()
        assert first.kind in (first.POSITIONAL_OR_KEYWORD, first.VAR_POSITIONAL), name
        assert all(p.kind is p.KEYWORD_ONLY for p in rest), name


def test_importing_the_package_and_its_functions_imports_no_torch() -> None:
    code = (
        "import inspect, sys, nafnet_edge\n"
        "assert inspect.isfunction(nafnet_edge.convert) and nafnet_edge.ValidationResult\n"
        "print(sorted(m for m in ('torch', 'numpy', 'onnxruntime') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
