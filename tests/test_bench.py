"""nafnet-edge bench: every artifact timed in its own runtime, with the statistics, profile and budget it promises."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from helpers import Converted, artifact_dir, require

from nafnet_edge import converters
from nafnet_edge.benchmark import BENCH_FILE, LatencyStats
from nafnet_edge.cli import main, parse_frame
from nafnet_edge.converters import Exported, ExportOptions, Session, SessionSettings, Target
from nafnet_edge.converters.base import pixel_format_of, pixel_session
from nafnet_edge.errors import EXIT_BAD_INPUT, EXIT_BUDGET, EXIT_USAGE

require("onnxruntime")
require("openvino")
require("executorch")
require("coremltools")

# LiteRT where its extra is installed (the shared artifacts include it then: conftest SHARED_TARGETS)
TARGETS = (
    "executorch",
    "openvino",
    "onnx",
    "coreml",
    *(("litert",) if importlib.util.find_spec("ai_edge_litert") else ()),
)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, converted_artifacts: Converted) -> Path:
    """The session's tiny model converted for every target at 64 px, copied: bench --save writes into it."""
    assert sorted(converted_artifacts.targets) == sorted(TARGETS)
    out = tmp_path_factory.mktemp("bench") / "out"
    shutil.copytree(converted_artifacts.out, out)
    return out


def bench_json(capsys, *args: str) -> tuple[int, dict]:
    code = main(["bench", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_each_artifact_runs_in_its_runtime_with_full_statistics(artifacts: Path, capsys) -> None:
    code, report = bench_json(capsys, str(artifacts), "--runs", "6", "--warmup", "1")
    assert code == 0 and report["failures"] == []
    got = {a["target"]: a for a in report["artifacts"]}
    assert sorted(got) == sorted(TARGETS)
    assert report["machine"]["sgemm_gflops"] > 1 and report["machine"]["cores"] >= 1
    runtimes = {"executorch": "executorch", "openvino": "openvino", "onnx": "onnxruntime"}
    for target, runtime in runtimes.items():
        a = got[target]
        assert a["runnable"] and a["runtime"] == runtime, a
        lat = a["latency_ms"]
        assert len(lat["runs"]) == 6
        assert lat["min"] <= lat["median"] <= lat["p90"] <= lat["p99"] <= max(lat["runs"]) + 1e-3
        assert lat["std"] >= 0 and a["load_s"] > 0 and a["first_inference_ms"] > 0
        assert a["throughput"]["fps"] > 0 and a["peak_rss_mb"] > 0
        # GFLOP/s is the model's work over the measured median, compared with the machine's matmul probe
        expected = 2 * a["macs"] / 1e9 / (lat["median"] / 1e3)
        assert a["gflops_per_s"] == pytest.approx(expected, rel=0.01)
        assert a["peak_fraction"] == pytest.approx(a["gflops_per_s"] / report["machine"]["sgemm_gflops"], rel=0.01)
        ops = a["profile"]["top"]
        # shares are rounded to 4 decimals: their sum may pass 1 by half a unit of the last decimal per operator
        assert ops and sum(op["share"] for op in ops) <= 1 + 5e-5 * len(ops) and all(op["ms"] >= 0 for op in ops)
    if "litert" in got:  # the interpreter on XNNPACK: no per-operator profile in its Python API
        a = got["litert"]
        assert a["runnable"] and a["runtime"] == "litert" and a["info"]["compute"] == "fp32" and a["profile"] is None
        assert a["latency_ms"]["median"] > 0 and a["throughput"]["fps"] > 0
    assert got["openvino"]["info"]["inference_precision"] == "f32"
    assert got["openvino"]["throughput"]["mode"] == "OpenVINO THROUGHPUT hint"
    assert got["openvino"]["throughput"]["requests"] >= 1 and got["openvino"]["throughput"]["streams"] >= 1
    assert any("Convolution" in op["op"] for op in got["openvino"]["profile"]["top"])  # performance counters
    assert any("NHWC" in op["op"] or "GEMM" in op["op"] for op in got["executorch"]["profile"]["top"])  # ETDump
    assert any(op["op"] == "Conv" for op in got["onnx"]["profile"]["top"])
    if sys.platform != "darwin":
        assert not got["coreml"]["runnable"] and "macOS" in got["coreml"]["reason"]
        assert got["coreml"]["latency_ms"] is None
    baseline = report["baseline"]
    assert baseline["runtime"] == "pytorch" and baseline["latency_ms"]["median"] > 0
    assert any(op["op"].startswith("aten::") for op in baseline["profile"]["top"])


def test_the_table_shows_every_artifact_and_where_the_time_goes(artifacts: Path, capsys) -> None:
    directories = [str(artifact_dir(artifacts, "openvino")), str(artifact_dir(artifacts, "coreml"))]
    assert main(["bench", *directories, "--runs", "3"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.startswith("openvino") and "openvino" in line[18:] for line in lines)
    assert any(line.startswith("coreml") and "not runnable here" in line for line in lines) or sys.platform == "darwin"
    ratio = any(line.startswith("pytorch") and line.rstrip().endswith("1.00x") for line in lines)
    assert ratio or "warning: baseline is unstable" in out  # a noisy baseline gives no ratios, and says so
    assert "top operators (OpenVINO performance counters" in out


def test_max_latency_gates_ci_with_exit_3(artifacts: Path, capsys) -> None:
    directory = str(artifact_dir(artifacts, "onnx"))
    code, report = bench_json(
        capsys, directory, "--runs", "3", "--no-profile", "--no-baseline", "--max-latency-ms", "1e-6"
    )
    capsys.readouterr()
    assert code == EXIT_BUDGET and len(report["failures"]) == 1 and "onnx fp32: median" in report["failures"][0]
    code, report = bench_json(
        capsys, directory, "--runs", "3", "--no-profile", "--no-baseline", "--max-latency-ms", "1e6"
    )
    assert code == 0 and report["failures"] == [] and report["baseline"] is None
    with pytest.raises(SystemExit) as usage:
        main(["bench", directory, "--max-latency-ms", "0"])
    assert usage.value.code == EXIT_USAGE and "expected a positive number" in capsys.readouterr().err


def test_save_writes_bench_json_beside_the_manifest(artifacts: Path, capsys) -> None:
    directory = artifact_dir(artifacts, "executorch")
    (directory / BENCH_FILE).unlink(missing_ok=True)
    code, report = bench_json(capsys, str(directory), "--runs", "3", "--no-profile", "--save")
    assert code == 0
    saved = json.loads((directory / BENCH_FILE).read_text())
    assert saved["target"] == "executorch" and saved["latency_ms"] == report["artifacts"][0]["latency_ms"]
    assert saved["machine"] == report["machine"] and saved["baseline"]["median_ms"] > 0
    assert not list(directory.glob(".*partial*"))


def test_a_full_frame_runs_through_the_tile(artifacts: Path, capsys) -> None:
    directory = str(artifact_dir(artifacts, "openvino"))
    code, report = bench_json(capsys, directory, "--runs", "2", "--no-profile", "--frame", "100x150")
    frame = report["artifacts"][0]["frame"]
    assert code == 0 and frame["height"] == 100 and frame["width"] == 150 and frame["tile"] == 64
    assert frame["tiles"] >= math.ceil(100 / 64) * math.ceil(150 / 64)
    assert frame["mp_per_s"] == pytest.approx(frame["megapixels"] / frame["seconds"], rel=0.05)


def test_a_frame_smaller_than_the_tile_is_padded_to_it(artifacts: Path, capsys) -> None:
    directory = str(artifact_dir(artifacts, "openvino"))
    code, report = bench_json(capsys, directory, "--runs", "1", "--no-profile", "--frame", "1x1")
    frame = report["artifacts"][0]["frame"]
    assert code == 0 and frame["tiles"] == 1 and (frame["height"], frame["width"]) == (1, 1)


def test_frame_sizes_parse() -> None:
    assert parse_frame("3000x4000") == (3000, 4000)
    h, w = parse_frame("12MP")
    assert (h, w) == (3000, 4000) and abs(h * w - 12e6) < 1e4


def test_bad_directories_are_refused_in_one_line(tmp_path: Path, capsys) -> None:
    assert main(["bench", str(tmp_path / "missing")]) == EXIT_BAD_INPUT
    assert "is not a directory" in capsys.readouterr().err
    assert main(["bench", str(tmp_path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert "manifest.json" in err and "nafnet-edge convert" in err and len(err.splitlines()) == 1


def test_latency_stats_are_the_usual_ones() -> None:
    stats = LatencyStats.from_ms([4.0, 1.0, 3.0, 2.0, 100.0])
    assert (stats.min, stats.median, stats.mean) == (1.0, 3.0, 22.0)
    assert stats.p90 == pytest.approx(61.6) and stats.p99 == pytest.approx(96.16)


def test_convert_with_bench_measures_what_it_built(tiny_checkpoint: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("NAFNET_EDGE_CACHE", str(tmp_path / "cache"))
    checkpoint = tiny_checkpoint
    args = ["convert", str(checkpoint), "--target", "onnx", "-o", str(tmp_path / "out"), "--input-size", "64"]
    assert main([*args, "--no-validate", "--bench", "--bench-runs", "3", "--json"]) == 0
    (artifact,) = json.loads(capsys.readouterr().out)["artifacts"]
    assert artifact["bench"]["runtime"] == "onnxruntime" and len(artifact["bench"]["latency_ms"]["runs"]) == 3
    saved = json.loads((artifact_dir(tmp_path / "out", "onnx") / BENCH_FILE).read_text())
    assert saved["latency_ms"] == artifact["bench"]["latency_ms"]


def test_a_busy_machine_and_an_unstable_baseline_are_said_and_give_no_ratio() -> None:
    from nafnet_edge.benchmark import BenchReport, BenchResult, BenchSettings, LatencyStats, format_table

    def result(target: str, runs: list[float]) -> BenchResult:
        return BenchResult(
            "d",
            target,
            "fp32",
            target,
            True,
            [1, 3, 64, 64],
            latency_ms=LatencyStats.from_ms(runs),
            load_s=0.1,
            first_inference_ms=1.0,
        )

    steady, jumpy = [10.0] * 9 + [10.5], [10.0] * 5 + [30.0] * 5  # p90/median 1.0 and 1.5
    machine = {"cpu": "test CPU", "cores": 2, "sgemm_gflops": 100.0, "load_average": 3.5}
    table = format_table(BenchReport(machine, BenchSettings(), [result("onnx", steady)], result("pytorch", jumpy)))
    assert "warning: the machine is busy (load average 3.50 on 2 cores" in table
    assert "warning: baseline is unstable (p90 1.50x its median); no ratios against it" in table
    assert "x" not in table.splitlines()[3].split()[-1]  # the onnx row's ratio column: "-", not "0.50x"
    noisy_probe = {**machine, "load_average": 0.2, "sgemm_spread": 1.6}
    table = format_table(BenchReport(noisy_probe, BenchSettings(), [result("onnx", steady)], result("pytorch", steady)))
    assert "warning: the matrix-multiply probe varied 1.60x between repeats" in table
    assert "busy" not in table and table.splitlines()[3].split()[-1] == "1.00x"  # a warning, the ratio still stands
    quiet = {**machine, "load_average": 0.2, "sgemm_spread": 1.05}
    table = format_table(BenchReport(quiet, BenchSettings(), [result("onnx", steady)], result("pytorch", steady)))
    assert "warning" not in table and table.splitlines()[3].split()[-1] == "1.00x"


# --- a time budget instead of a run count ------------------------------------------------------------------------


class _Clock:
    """Stands in for the ``time`` module of nafnet_edge.benchmark: time advances only when a run is made."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("budget_s", "cap", "expected"),
    [(1.0, None, 4), (1e-6, None, 3), (10.0, 5, 5)],  # runs of 0.25 s: the budget, the minimum, the maximum
)
def test_a_time_budget_sets_the_number_of_runs_within_its_bounds(monkeypatch, budget_s, cap, expected) -> None:
    from nafnet_edge import benchmark
    from nafnet_edge.benchmark import MIN_TIMED_RUNS, BenchSettings, timed_runs

    clock = _Clock()
    monkeypatch.setattr(benchmark, "time", clock)
    if cap is not None:
        monkeypatch.setattr(benchmark, "MAX_TIMED_RUNS", cap)

    def run() -> None:
        clock.now += 0.25  # a power of two: the sums are exact

    advanced: list[int] = []
    runs = timed_runs(run, BenchSettings(iters=50, time_s=budget_s), advanced.append)
    assert len(runs) == expected == sum(advanced) and all(ms == 250.0 for ms in runs)
    assert len(runs) >= MIN_TIMED_RUNS
    assert len(timed_runs(run, BenchSettings(iters=7), advanced.append)) == 7  # no budget: the count given


def test_bench_time_is_recorded_with_the_runs_it_made(artifacts: Path, capsys) -> None:
    directory = artifact_dir(artifacts, "onnx")
    code, report = bench_json(capsys, str(directory), "--time", "0.05", "--no-profile", "--no-baseline", "--save")
    assert code == 0 and report["settings"]["time_s"] == 0.05 and report["settings"]["iters"] is None
    runs = report["artifacts"][0]["latency_ms"]["runs"]
    assert len(runs) >= 3
    saved = json.loads((directory / BENCH_FILE).read_text())
    assert saved["settings"]["time_s"] == 0.05 and saved["latency_ms"]["runs"] == runs


def test_bench_finds_precisions_side_by_side_at_any_depth(
    tiny_checkpoint: Path, converted_artifacts: Converted, tmp_path: Path, capsys, monkeypatch
) -> None:
    """``convert`` writes OUT/<target>-<precision>: an fp32 and an fp16 OpenVINO artifact in one OUT, and one more
    in a folder below it, are all benchmarked from ``bench OUT``."""
    monkeypatch.setenv("NAFNET_EDGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    shutil.copytree(converted_artifacts.dir("openvino"), artifact_dir(out, "openvino"))
    shutil.copytree(converted_artifacts.dir("onnx"), artifact_dir(out / "phone" / "older", "onnx"))
    convert = ["convert", str(tiny_checkpoint), "--target", "openvino", "--precision", "fp16", "-o", str(out)]
    assert main([*convert, "--input-size", "64", "--no-validate"]) == 0
    capsys.readouterr()
    code, report = bench_json(capsys, str(out), "--runs", "2", "--warmup", "0", "--no-profile", "--no-baseline")
    assert code == 0
    found = [
        (Path(a["directory"]).relative_to(out).as_posix(), a["target"], a["precision"]) for a in report["artifacts"]
    ]
    assert found == [
        ("openvino-fp16", "openvino", "fp16"),
        ("openvino-fp32", "openvino", "fp32"),
        ("phone/older/onnx-fp32", "onnx", "fp32"),
    ]
    assert all(a["runnable"] and len(a["latency_ms"]["runs"]) == 2 for a in report["artifacts"])


# --- image I/O: the timed call takes the artifact's own uint8 pixels ---------------------------------------------


class PixelEchoTarget(Target):
    """A stand-in target with image I/O: the deploy graph saved as weights plus recipe and run again in PyTorch
    behind 8-bit pixel I/O (``nafnet_edge.pixels.image_io_module``). It counts what bench calls: the runtime call on
    pixels (``native``) and the float adapter (``run``), and the inputs the runtime call was given."""

    name: ClassVar[str] = "pixel-echo"
    artifact: ClassVar[str] = "model.safetensors"
    file_kind: ClassVar[str] = "pixel-echo model"
    pixel_formats: ClassVar[tuple[str, ...]] = ("rgba", "rgb")
    usage_title: ClassVar[str] = "Pixel echo"
    usage_body: ClassVar[str] = "## Pixel echo\n\nLoad `{artifact}` with `load_deploy`.\n"
    calls: ClassVar[Counter[str]] = Counter()
    inputs: ClassVar[set[tuple[str, tuple[int, ...]]]] = set()

    def export(self, graph: torch.nn.Module, out_dir: Path, options: ExportOptions) -> Exported:
        from nafnet_edge.deploy.io import save_deploy

        self.check_options(options)
        save_deploy(graph, out_dir / self.artifact)
        io = {"io": "image", "pixel_format": options.pixel_format} if options.pixel_format else {"io": "tensor"}
        return Exported([self.artifact], io)

    def open_session(
        self, out_dir: Path, *, export: Mapping[str, Any] | None = None, settings: SessionSettings | None = None
    ) -> Session:
        from nafnet_edge.deploy.io import load_deploy
        from nafnet_edge.pixels import image_io_module

        graph = load_deploy(self.artifact_path(out_dir))
        fmt = pixel_format_of(export)
        assert fmt is not None, "this stand-in exports image I/O only"
        module = image_io_module(graph, fmt)
        cls = type(self)

        def native(pixels: np.ndarray) -> np.ndarray:
            cls.calls["native"] += 1
            cls.inputs.add((str(pixels.dtype), pixels.shape))
            with torch.inference_mode():
                return module(torch.from_numpy(pixels)).numpy()

        session = pixel_session(Session(native, "torch (pixel echo)", {"torch": torch.__version__}), fmt)
        adapter = session.run

        def run(x: np.ndarray) -> np.ndarray:
            cls.calls["run"] += 1
            return adapter(x)

        session.run = run
        return session


@pytest.fixture
def pixel_echo(monkeypatch, tmp_path: Path) -> Iterator[type[PixelEchoTarget]]:
    """``PixelEchoTarget`` registered for one test (a copy of the registry, put back at its end), its counters
    cleared."""
    monkeypatch.setattr(converters, "TARGETS", dict(converters.TARGETS))
    monkeypatch.setenv("NAFNET_EDGE_CACHE", str(tmp_path / "cache"))
    PixelEchoTarget.calls.clear()
    PixelEchoTarget.inputs.clear()
    yield converters.register(PixelEchoTarget)


def test_an_image_io_artifact_is_timed_on_its_own_pixels_and_says_so(
    pixel_echo, tiny_checkpoint: Path, kodak_data: Path, converted_artifacts: Converted, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    convert = ["convert", str(tiny_checkpoint), "--target", "pixel-echo", "--io", "image", "--pixel-format", "rgba"]
    assert main([*convert, "-o", str(out), "--input-size", "64", "--val-data", str(kodak_data)]) == 0
    capsys.readouterr()
    directory = out / "pixel-echo-fp32-image"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["validation"]["passed"] and manifest["io"]["inputs"][0]["dtype"] == "uint8"
    shutil.copytree(converted_artifacts.dir("onnx"), out / "onnx-fp32")  # a tensor-I/O artifact beside it
    pixel_echo.calls.clear()
    pixel_echo.inputs.clear()

    args = ["--runs", "4", "--warmup", "1", "--no-profile", "--frame", "100x150"]
    code, report = bench_json(capsys, str(out), *args, "--save")
    assert code == 0
    got = {a["target"]: a for a in report["artifacts"]}
    image, tensor = got["pixel-echo"], got["onnx"]
    assert image["input"] == [1, 64, 64, 4] and tensor["input"] == [1, 3, 64, 64]
    assert image["info"]["io"] == "image" and image["info"]["pixel_format"] == "rgba"
    assert tensor["info"]["io"] == "tensor" and "pixel_format" not in tensor["info"]
    assert report["baseline"]["input"] == [1, 3, 64, 64] and report["baseline"]["info"]["io"] == "tensor"
    assert image["macs"] == tensor["macs"] > 0  # the model's work at 64x64, whatever the I/O
    # first call + warm-up + timed runs went to the runtime call on uint8 pixels; only the frame's tiles went
    # through the float adapter (which calls the runtime once per tile)
    tiles = image["frame"]["tiles"]
    assert tiles >= 6 and pixel_echo.calls == Counter({"native": 1 + 1 + 4 + tiles, "run": tiles})
    assert pixel_echo.inputs == {("uint8", (1, 64, 64, 4))}
    saved = json.loads((directory / BENCH_FILE).read_text())
    assert saved["info"]["io"] == "image" and saved["info"]["pixel_format"] == "rgba"
    assert saved["input"] == [1, 64, 64, 4]

    assert main(["bench", str(out), "--runs", "2", "--warmup", "0", "--no-profile", "--no-baseline"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[3:5]}
    assert rows["pixel-echo"][1:4] == ["fp32", "image", "rgba"]
    assert rows["onnx"][1:4] == ["fp32", "tensor", "onnxruntime"]


def test_a_real_image_io_artifact_is_profiled_and_run_in_throughput_mode_on_its_pixels(
    tiny_checkpoint: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """OpenVINO behind its pre/post-processing (u8 NHWC BGR): the timed calls, the performance counters and the
    THROUGHPUT mode all take the IR's own uint8 input."""
    monkeypatch.setenv("NAFNET_EDGE_CACHE", str(tmp_path / "cache"))
    convert = ["convert", str(tiny_checkpoint), "--target", "openvino", "--io", "image", "-o", str(tmp_path / "out")]
    assert main([*convert, "--input-size", "64", "--no-validate"]) == 0
    capsys.readouterr()
    code, report = bench_json(capsys, str(tmp_path / "out"), "--runs", "3", "--warmup", "0", "--no-baseline")
    (a,) = report["artifacts"]
    assert code == 0 and a["runnable"] and a["runtime"] == "openvino"
    assert a["input"] == [1, 64, 64, 3] and a["info"]["io"] == "image" and a["info"]["pixel_format"] == "bgr"
    assert len(a["latency_ms"]["runs"]) == 3 and a["throughput"]["mode"] == "OpenVINO THROUGHPUT hint"
    assert a["throughput"]["fps"] > 0 and any("Convolution" in op["op"] for op in a["profile"]["top"])
