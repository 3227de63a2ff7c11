"""The typed manifest and bench records: round trips, version 1 files, and every malformed input refused in one line."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest

from nafnet_edge.errors import ArtifactError, BadInputError
from nafnet_edge.manifest import (
    BENCH_FILE,
    MANIFEST_FILE,
    MANIFEST_VERSION,
    MAX_SEARCH_DEPTH,
    PARAM_KEYS,
    BenchRecord,
    IOSpec,
    Manifest,
    ManifestError,
    Reference,
    Source,
    Tiling,
    ValidationSummary,
    artifact_dirname,
    find_artifacts,
    normalize_profile,
    read_bench,
    read_manifest,
    write_bench,
    write_manifest,
)

SHA = "ab" * 32
CONFIG = {"arch": "nafnet", "width": 8, "enc_blk_nums": [1, 1], "middle_blk_num": 1, "dec_blk_nums": [1, 1]}


def manifest(**changes: Any) -> Manifest:
    fields: dict[str, Any] = {
        "target": "onnx",
        "precision": "fp32",
        "files": ["model.onnx"],
        "io": IOSpec.image(3, (64, 48)),
        "padding_multiple": 4,
        "tiling": Tiling((64, 48), 8),
        "tlc": {"arch": "NAFNet", "pools_global": 3},
        "reference": Reference("nafnet", None, "params", "cpu"),
        "source": Source("tiny.pth", SHA, dict(CONFIG), path="/data/tiny.pth", params=1234),
        "deploy": {"passes": ["fold_layernorm_affine"], "stream_scale": 0.5},
        "export": {"opset": 18},
        "tools": {"nafnet-edge": "1.0"},
        "host": {"python": "3.11"},
        "created": "2026-01-01T00:00:00Z",
        "runtime": {"runtime": "onnxruntime"},
        "validation": ValidationSummary(
            passed=True,
            failures=[],
            budgets={"min_fidelity_db": 60.0, "max_drift_db": None},
            reference="original model",
            reference_settings={"arch": "nafnet"},
            data="kodak",
            summary={"images": 2, "fidelity_db_min": float("inf"), "drift_db_mean": -0.001},
            per_image=[{"name": "a.png", "fidelity_db": 70.0}],
        ),
        "seconds": {"export": 1.5},
    }
    fields.update(changes)
    return Manifest(**fields)


def v2(**changes: Any) -> dict[str, Any]:
    data = manifest().to_dict()
    data.update(changes)
    return data


def v1() -> dict[str, Any]:
    """A manifest as version 1 wrote it: top-level input and output, no io."""
    data = v2()
    del data["io"], data["manifest_version"]
    data["input"] = {
        "name": "image",
        "shape": [1, 3, 64, 48],
        "layout": "NCHW",
        "dtype": "float32",
        "channels": "RGB",
        "range": [0.0, 1.0],
    }
    data["output"] = {
        "name": "restored",
        "shape": [1, 3, 64, 48],
        "layout": "NCHW",
        "dtype": "float32",
        "range": "unclamped; clamp to [0, 1] before quantizing",
    }
    data["deploy"] = {"transformations": ["fold_layernorm_affine"], "stream_scale": 0.5}
    return data


# --- round trips -------------------------------------------------------------------------------------------------


def test_a_manifest_round_trips_through_json_and_disk(tmp_path: Path) -> None:
    original = manifest()
    data = json.loads(json.dumps(original.to_dict()))
    assert data["manifest_version"] == MANIFEST_VERSION == 2
    assert "input" not in data and "output" not in data
    assert data["io"]["inputs"][0] == {
        "name": "image",
        "shape": [1, 3, 64, 48],
        "layout": "NCHW",
        "dtype": "float32",
        "channels": "RGB",
        "range": [0.0, 1.0],
    }
    assert data["io"]["outputs"][0]["range"] is None and "unclamped" in data["io"]["outputs"][0]["note"]
    assert Manifest.from_dict(data) == original

    write_manifest(tmp_path, original)
    assert read_manifest(tmp_path) == original
    assert not [p for p in tmp_path.iterdir() if p.name != MANIFEST_FILE]  # written atomically, nothing left over
    again = read_manifest(tmp_path)
    assert again.validation is not None and again.validation.fidelity_db_min == float("inf")
    assert again.validation.drift_db_mean == -0.001 and again.passed


def test_io_spec_describes_the_image_contract() -> None:
    io = IOSpec.image(1, (32, 16), scale=2)
    assert (io.input.name, io.output.name, io.channels, io.input_size) == ("image", "restored", 1, (32, 16))
    assert io.input.channels == io.output.channels == "gray" and io.output.shape == (1, 1, 64, 32)
    assert io.input.value_range == (0.0, 1.0) and io.output.value_range is None
    assert IOSpec.from_dict(io.to_dict()) == io


def test_passed_follows_the_validation() -> None:
    assert manifest(validation=None).passed
    failed = manifest()
    assert failed.validation is not None
    failed.validation.passed = False
    assert not failed.passed


# --- version 1 ---------------------------------------------------------------------------------------------------


def test_a_version_1_manifest_is_read_and_written_back_as_version_2(tmp_path: Path) -> None:
    old = Manifest.from_dict(v1())
    assert old.manifest_version == 1
    assert old.io == IOSpec.image(3, (64, 48))  # the output's range string becomes its note
    assert old.deploy == {"transformations": ["fold_layernorm_affine"], "stream_scale": 0.5}
    assert old.to_dict()["manifest_version"] == 2 and "io" in old.to_dict()


def test_a_version_1_manifest_without_the_newer_sections_gets_their_defaults() -> None:
    data = v1()
    for key in ("reference", "tiling", "padding_multiple", "tlc", "created", "output"):
        del data[key]
    data["source"]["config"] = {**CONFIG, "arch": "nafnet-local", "train_size": [96, 96]}
    old = Manifest.from_dict(data)
    assert old.reference == Reference("nafnet-local", (96, 96), None, None)  # what the source config implies
    assert old.tiling == Tiling((64, 48), 32, align_px=4)  # tile starts on the padding multiple, as the tiler did
    assert old.padding_multiple == 4  # 2 ** encoder levels
    assert old.io.output.shape == (1, 3, 64, 48)


# --- unknown keys ------------------------------------------------------------------------------------------------


def test_unknown_top_level_keys_are_kept_and_unknown_keys_in_typed_sections_ignored() -> None:
    data = v2(inference_precision="bf16", notes={"by": "hand"})
    data["source"]["colour"] = "blue"
    data["io"]["inputs"][0]["colour"] = "blue"
    read = Manifest.from_dict(data)
    assert read.extra == {"inference_precision": "bf16", "notes": {"by": "hand"}}
    written = read.to_dict()
    assert written["inference_precision"] == "bf16" and written["notes"] == {"by": "hand"}
    assert "colour" not in written["source"] and "colour" not in written["io"]["inputs"][0]


# --- malformed manifests -----------------------------------------------------------------------------------------


def _edit(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``data`` with the value at ``path`` ("io.inputs.0.shape") replaced; ``...`` deletes it."""
    data = copy.deepcopy(data)
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = int(last) if isinstance(node, list) else last
    if value is ...:
        del node[key]
    else:
        node[key] = value
    return data


MALFORMED = [
    # wrong types
    ("target-type", "target", 3, "no 'target' str"),
    ("files-type", "files", "model.onnx", "no 'files' list"),
    ("source-type", "source", [], "no 'source' dict"),
    ("source-sha", "source.sha256", 5, "lacks the checkpoint's config and sha256"),
    ("source-path", "source.path", 3, "'source.path' is a JSON int"),
    ("source-default", "source.embedded_default", "yes", "'source.embedded_default' is a JSON string"),
    ("source-params", "source.params", "many", "'source.params' is a JSON string"),
    ("section", "export", [1], "'export' is a JSON list, not an object"),
    ("runtime", "runtime", "onnxruntime", "'runtime' is a JSON string, not an object"),
    ("seconds", "seconds", {"export": "fast"}, "'seconds' is not an object of numbers"),
    ("tools", "tools", {"torch": 2}, "'tools' is not an object of strings"),
    ("created", "created", 2026, "'created' is a JSON int"),
    ("padding", "padding_multiple", 0, "'padding_multiple' 0 is not a positive integer"),
    ("tiling", "tiling", [64, 64], "'tiling' is a JSON list"),
    ("tiling-overlap", "tiling.overlap_px", -1, "'tiling.overlap_px' -1 is not a number of pixels"),
    ("tiling-tile", "tiling.tile", [64], "'tiling.tile' is not two positive integers"),
    ("validation", "validation", "passed", "'validation' is a JSON string"),
    ("validation-passed", "validation.passed", "yes", "'validation.passed' is not true or false"),
    ("validation-failures", "validation.failures", [1], "'validation.failures' is not a list of strings"),
    ("validation-budgets", "validation.budgets", {"x": "a"}, "'validation.budgets' is not an object of numbers"),
    ("validation-summary", "validation.summary", [], "'validation.summary' is a JSON list"),
    ("version", "manifest_version", 99, "manifest version 99; this nafnet-edge reads 1 to 2"),
    ("version-type", "manifest_version", "2", "manifest version '2'"),
    # unknown names
    ("unknown-target", "target", "tflite", "unknown target 'tflite'; this nafnet-edge knows"),
    ("unknown-precision", "precision", "int3", "unknown precision 'int3'"),
    ("channels", "io.inputs.0.channels", "CMYK", "'io.inputs[0].channels' 'CMYK' is not one of"),
    # bad shapes and io
    ("shape-absurd", "io.inputs.0.shape", [1, 3, 160000, 160000], "[1, 3, 160000, 160000] is not one"),
    ("shape-channels", "io.inputs.0.shape", [1, 4096, 64, 48], "1 to 6 channels"),
    ("shape-batch", "io.inputs.0.shape", [8, 3, 64, 48], "batch 1"),
    ("shape-bool", "io.inputs.0.shape", [1, 3, True, 48], "'io.inputs[0].shape' is not four positive integers"),
    ("shape-rank", "io.inputs.0.shape", [1, 3, 64], "'io.inputs[0].shape' is not four positive integers"),
    ("shape-output", "io.outputs.0.shape", [1, 3, 32, 48], "'io.outputs[0].shape' [1, 3, 32, 48] is not"),
    ("io-type", "io", [], "'io' is a JSON list"),
    ("io-missing", "io", ..., "no 'io' dict"),
    ("io-inputs", "io.inputs", [], "'io.inputs' must list 1 to"),
    ("io-scale", "io.scale", 0, "'io.scale' 0 is not an integer from 1 to"),
    ("io-dtype", "io.inputs.0.dtype", "float16", "'io.inputs[0]' is neither a float32 NCHW tensor nor uint8 NHWC"),
    ("io-range", "io.inputs.0.range", [1, 0], "'io.inputs[0].range' [1, 0] is empty"),
    ("io-name", "io.outputs.0.name", "", "'io.outputs[0].name' is not a name"),
    # files outside the directory
    ("files-empty", "files", [], "'files' must list file names"),
    ("files-absolute", "files", ["/etc/passwd"], "not relative to the directory: '/etc/passwd'"),
    ("files-climbs", "files", ["a/../../x.onnx"], "'files' points outside the directory"),
    ("files-nul", "files", ["model.onnx\0"], "NUL character"),
    ("files-long", "files", ["x" * 5000], "a name of 5000 characters (at most 1024)"),
    ("files-component", "files", ["x" * 300], "a path component of 300 bytes (at most 255)"),
    ("files-backslash", "files", ["..\\x.onnx"], "not relative to the directory"),
]


@pytest.mark.parametrize(("path", "value", "needle"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_a_malformed_manifest_is_refused_naming_what_is_wrong(path: str, value: Any, needle: str) -> None:
    with pytest.raises(ManifestError) as caught:
        Manifest.from_dict(_edit(v2(), path, value), where="/x/manifest.json")
    message = str(caught.value)
    assert message.startswith("/x/manifest.json is not a manifest written by nafnet-edge convert (")
    assert needle in message and message.endswith("; convert again") and "\n" not in message
    assert isinstance(caught.value, ArtifactError) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize("value", [None, [1, 2], "text", 3])
def test_a_manifest_that_is_not_an_object_is_refused(value: Any) -> None:
    with pytest.raises(ManifestError, match="not an object"):
        Manifest.from_dict(value)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ({"arch": "resnet"}, "arch 'resnet'"),
        ({"arch": "nafnet-local", "train_size": [0, 64]}, "train_size [0, 64]"),
        ({"arch": "nafnet", "param_key": "weights"}, "param_key 'weights'"),
        ({"arch": "nafnet", "device": "tpu"}, "device 'tpu'"),
        ([1], "not an object"),
    ],
)
def test_a_damaged_reference_section_is_refused(value: Any, needle: str) -> None:
    with pytest.raises(ManifestError) as caught:
        Manifest.from_dict(v2(reference=value), where="/x/manifest.json")
    assert str(caught.value) == f"/x/manifest.json has a damaged 'reference' section ({needle}); convert again"


def test_param_keys_are_the_checkpoint_loaders() -> None:
    from nafnet_edge.checkpoint import WRAPPER_KEYS

    assert PARAM_KEYS == WRAPPER_KEYS


def test_targets_come_from_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    import nafnet_edge.converters as registry

    monkeypatch.setattr(registry, "target_names", lambda: ["onnx", "litert"], raising=False)
    assert Manifest.from_dict(v2(target="litert")).target == "litert"
    with pytest.raises(ManifestError, match="unknown target 'openvino'; this nafnet-edge knows onnx, litert"):
        Manifest.from_dict(v2(target="openvino"))


# --- reading files -----------------------------------------------------------------------------------------------


def test_read_manifest_refuses_what_is_not_a_manifest_file(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="has no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ManifestError, match="manifest.json is not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ManifestError, match="manifest.json is not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).unlink()
    outside = tmp_path.parent / f"{tmp_path.name}-elsewhere.json"
    outside.write_text(json.dumps(v2()))
    (tmp_path / MANIFEST_FILE).symlink_to(outside)
    with pytest.raises(ArtifactError, match="outside"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).unlink()
    os.mkfifo(tmp_path / MANIFEST_FILE)
    with pytest.raises(ArtifactError, match=r"named pipe \(FIFO\)"):
        read_manifest(tmp_path)


# --- finding artifact directories ----------------------------------------------------------------------------


def _artifact(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / MANIFEST_FILE).write_text("{}")  # found by its name; read_manifest judges the content later
    return folder


def test_precisions_of_one_target_are_found_side_by_side_and_at_any_depth(tmp_path: Path) -> None:
    out = tmp_path / "out"
    fp32 = _artifact(out / artifact_dirname("executorch", "fp32"))
    int8 = _artifact(out / artifact_dirname("executorch", "int8"))
    nested = _artifact(out / "a" / "b" / "coreml-fp16")
    (out / "a" / "notes").mkdir()  # a folder without artifacts is passed over
    assert find_artifacts(out) == [nested, fp32, int8]
    assert find_artifacts(out / "a") == [nested]
    assert find_artifacts(int8) == [int8]  # an artifact directory is its own result


def test_the_search_stays_out_of_artifacts_hidden_folders_and_links_out_of_the_tree(tmp_path: Path) -> None:
    out = tmp_path / "out"
    onnx = _artifact(out / "onnx-fp32")
    _artifact(onnx / "inner")  # inside an artifact directory: part of it, not another artifact
    _artifact(out / ".onnx-int8.1a2b.partial")  # a conversion still writing
    _artifact(tmp_path / "elsewhere" / "openvino-fp32")
    (out / "elsewhere").symlink_to(tmp_path / "elsewhere")  # outside the tree: not followed
    (out / "root").symlink_to("/")
    (out / "loop").symlink_to(out)  # a loop is walked once
    (out / "again").symlink_to(onnx)  # the same artifact through a link inside the tree is listed once
    assert find_artifacts(out) == [onnx]


def test_the_search_has_a_depth_limit(tmp_path: Path) -> None:
    deep = tmp_path / "out" / Path(*["d"] * (MAX_SEARCH_DEPTH - 1))
    found = _artifact(deep / "onnx-fp32")
    _artifact(deep / "d" / "onnx-fp32")
    assert find_artifacts(tmp_path / "out") == [found]


def test_no_artifact_below_a_folder_is_one_line_naming_the_layout(tmp_path: Path) -> None:
    (tmp_path / "out" / "onnx-fp32").mkdir(parents=True)
    with pytest.raises(BadInputError) as e:
        find_artifacts(tmp_path / "out")
    message = str(e.value)
    assert "\n" not in message and "nafnet-edge convert (-o OUT)" in message and "OUT/<target>-<precision>" in message
    with pytest.raises(BadInputError, match="is not a directory"):
        find_artifacts(tmp_path / "missing")


# --- bench.json --------------------------------------------------------------------------------------------------


def test_a_bench_record_round_trips_with_its_operator_profile_under_top(tmp_path: Path) -> None:
    record = BenchRecord(
        target="onnx",
        precision="fp32",
        runtime="onnxruntime",
        input=[1, 3, 64, 48],
        latency_ms={"min": 1.0, "median": 1.5, "p90": 2.0},
        throughput={"fps": 600.0, "streams": 1},
        profile=normalize_profile({"source": "test", "total_ms": 1.0, "ops": [{"op": "Conv", "ms": 1.0}]}),
        baseline={"runtime": "pytorch", "median_ms": 3.0},
    )
    assert record.profile == {"source": "test", "total_ms": 1.0, "top": [{"op": "Conv", "ms": 1.0}]}
    path = write_bench(tmp_path, record)
    assert path == tmp_path / BENCH_FILE and json.loads(path.read_text())["profile"]["top"][0]["op"] == "Conv"
    read, note = read_bench(tmp_path)
    assert note is None and read == record
    assert (read.median_ms, read.p90_ms, read.fps, read.baseline_ms) == (1.5, 2.0, 600.0, 3.0)


def test_a_version_1_bench_record_keeps_its_operators() -> None:
    old = BenchRecord.from_dict({"bench_version": 1, "target": "openvino", "profile": {"ops": [{"op": "Conv"}, 3]}})
    assert old.profile == {"top": [{"op": "Conv"}]} and old.bench_version == 1


def test_a_hand_edited_bench_record_reads_what_it_can() -> None:
    odd = BenchRecord.from_dict({"target": 3, "latency_ms": "fast", "peak_rss_mb": "lots", "runnable": False})
    assert (odd.target, odd.latency_ms, odd.peak_rss_mb, odd.runnable, odd.median_ms) == ("?", None, None, False, None)


def test_an_unusable_bench_json_is_left_out_with_the_reason(tmp_path: Path) -> None:
    assert read_bench(tmp_path) == (None, None)
    (tmp_path / BENCH_FILE).write_text("[1]")
    assert read_bench(tmp_path) == (None, "bench.json is not a benchmark record; benchmark again")
    (tmp_path / BENCH_FILE).write_text("{")
    record, note = read_bench(tmp_path)
    assert record is None and note is not None and note.startswith("bench.json is unreadable")
    (tmp_path / BENCH_FILE).unlink()
    os.mkfifo(tmp_path / BENCH_FILE)
    record, note = read_bench(tmp_path)
    assert record is None and note is not None and "bench.json is not used" in note and "named pipe" in note


def test_tensors_describe_themselves_in_one_line_for_artifact_metadata() -> None:
    io = IOSpec.image(1, (64, 96), scale=2)
    assert io.input.describe() == "image: float32 NCHW [1,1,64,96] gray in [0, 1]"
    assert io.output.describe() == (
        "restored: float32 NCHW [1,1,128,192] gray, unclamped; clamp to [0, 1] before quantizing"
    )
