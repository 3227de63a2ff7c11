"""nafnet-edge bench: every artifact timed in its own runtime, with the statistics, profile and budget it promises."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from helpers import Converted, artifact_dir, require

from nafnet_edge.benchmark import BENCH_FILE, LatencyStats
from nafnet_edge.cli import main, parse_frame
from nafnet_edge.errors import EXIT_BAD_INPUT, EXIT_BUDGET, EXIT_USAGE

require("onnxruntime")
require("openvino")
require("executorch")
require("coremltools")

TARGETS = ("executorch", "openvino", "onnx", "coreml")


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
