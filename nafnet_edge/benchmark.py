"""Latency of artifacts in their own runtimes on this machine, the way an app team compares them before shipping.

``bench_artifacts`` runs each artifact directory written by ``convert``/``quantize`` in its runtime, opened by its
target (``Target.open_session``, the loader validation uses too, with the threads and runtime options given here),
and the original PyTorch fp32 model as the baseline. What is timed is the runtime call on the artifact's own input
(``Session.call``): float32 NCHW for tensor I/O, uint8 NHWC pixels for image I/O (the app's call, the 8-bit
conversion inside the artifact included); the record says which (``info["io"]``, ``info["pixel_format"]``). Per
artifact it reports:

- load (compile) time and the first inference, then ``warmup`` runs excluded and ``iters`` timed runs (or as
  many as fit in ``time_s`` seconds): min, median, mean, p90, p99, std (``LatencyStats``);
- throughput in frames/s: the runtime's own throughput mode where its session has one (several requests in
  flight), otherwise one frame after another;
- the process's peak resident memory while loading and running the artifact;
- GFLOP/s achieved (the model's multiply-accumulates x 2 / median) against this machine's fp32 matmul rate
  (``sgemm_gflops``), so figures compare across machines;
- optionally a full frame (e.g. 12 MP) through the artifact's tile, in megapixels per second (float frames through
  the tiler, ``Session.run``, as ``nafnet-edge run`` restores a photo);
- a per-operator profile from the runtime's own profiler where its session offers one, PyTorch's profiler for
  the baseline.

Everything is measured, nothing is estimated: an artifact that cannot run here (its session raises
``NotRunnable``, e.g. where the runtime exists only on another platform) is reported as not runnable, with the
reason. Progress goes through ``nafnet_edge.progress`` (a phase per artifact, a counted task for the timed runs);
what the runtimes print while loading and running is captured (``progress.backend_output``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, SupportsFloat

import numpy as np
import torch
import torch.nn.functional as F

from nafnet_edge import defaults, progress
from nafnet_edge.converters.base import NotRunnable, Session, SessionSettings, operator_profile
from nafnet_edge.errors import ArtifactError, BadInputError, display_path
from nafnet_edge.manifest import BENCH_FILE as BENCH_FILE  # where save writes (re-exported)
from nafnet_edge.manifest import (
    BENCH_VERSION,
    BenchRecord,
    IOSpec,
    Manifest,
    artifact_dirname,
    find_artifacts,
    normalize_profile,
    write_bench,
)
from nafnet_edge.pixels import example_input, io_info

Runner = Callable[[np.ndarray], Any]

MIN_TIMED_RUNS = 3  # a time budget still times this many runs, however long they take
MAX_TIMED_RUNS = 1_000_000  # and stops here at the latest (the CLI's bound on --runs)


@dataclass(frozen=True)
class BenchSettings:
    iters: int = defaults.BENCH_RUNS  # timed runs per artifact (unless time_s is set)
    time_s: float | None = None  # time budget per artifact instead: timed runs until it has passed (see timed_runs)
    warmup: int = defaults.BENCH_WARMUP  # untimed runs after the first inference
    threads: int | None = None  # runtime threads (None: each runtime's default, all cores)
    profile: bool = True  # per-operator profile
    top: int = defaults.BENCH_TOP  # operators listed in the profile
    throughput_frames: int = 0  # frames for a runtime's throughput mode (0: as many as were timed)
    frame: tuple[int, int] | None = None  # full frame (height, width) run through the artifact's tile
    overlap_px: int = defaults.BENCH_OVERLAP_PX  # tile overlap for the full frame
    # the targets' runtime options by TargetOption.dest (SessionSettings.hints), e.g. {"compute_units": "ALL"}
    hints: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds of the timed runs (warm-up excluded)."""

    min: float
    median: float
    mean: float
    p90: float
    p99: float
    std: float
    runs: list[float]

    @classmethod
    def from_ms(cls, runs: Sequence[float]) -> LatencyStats:
        a = np.asarray(runs, dtype=np.float64)
        return cls(
            min=_r(a.min()),
            median=_r(np.median(a)),
            mean=_r(a.mean()),
            p90=_r(np.percentile(a, 90)),
            p99=_r(np.percentile(a, 99)),
            std=_r(a.std(ddof=1) if len(a) > 1 else 0.0),
            runs=[_r(v) for v in a],
        )


@dataclass
class BenchResult:
    """One artifact (or the PyTorch baseline); the fields of ``bench.json``."""

    directory: str
    target: str
    precision: str
    runtime: str
    runnable: bool
    input: list[int]  # the artifact's input: (1, C, H, W) float32, or (1, H, W, P) uint8 pixels for image I/O
    reason: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    load_s: float | None = None
    first_inference_ms: float | None = None
    latency_ms: LatencyStats | None = None
    throughput: dict[str, Any] | None = None
    peak_rss_mb: float | None = None  # the process's peak while loading and running this artifact
    added_rss_mb: float | None = None  # that peak minus the resident memory before loading
    macs: int | None = None  # multiply-accumulates of one inference
    gmacs: float | None = None
    gflops_per_s: float | None = None
    peak_fraction: float | None = None
    frame: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None

    @property
    def median_ms(self) -> float | None:
        return self.latency_ms.median if self.latency_ms else None

    @property
    def io(self) -> str:
        """What was timed: ``tensor`` or ``image`` with the pixel format (``image rgba``)."""
        return io_label(self.info)

    @property
    def name(self) -> str:
        """``onnx fp32``, ``onnx fp32 image`` for image I/O: the artifact in warnings and notes."""
        return f"{self.target} {self.precision}" + (" image" if self.info.get("io") == "image" else "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def io_label(info: dict[str, Any]) -> str:
    """``tensor`` or ``image rgba`` from a bench record's ``info`` (``tensor`` when it does not say)."""
    if info.get("io") == "image":
        return f"image {info.get('pixel_format') or '?'}"
    return "tensor"


# --- the machine ---------------------------------------------------------------------------------------------


def sgemm_probe(n: int = 2048, repeats: int = 3) -> tuple[float, float]:
    """This machine's fp32 matrix-multiply rate in GFLOP/s (best of ``repeats``, PyTorch's threads), the peak that
    achieved GFLOP/s are compared with, and the spread of the repeats (slowest / fastest): on a quiet machine the
    same multiply takes the same time, so a large spread means other work is competing for the cores."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    return 2 * n**3 / min(times) / 1e9, max(times) / min(times)


def sgemm_gflops(n: int = 2048, repeats: int = 3) -> float:
    """The rate of :func:`sgemm_probe`."""
    return sgemm_probe(n, repeats)[0]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The instruction-set extensions that decide which kernels the runtimes pick (fp16/bf16/int8 paths).
ISA_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "asimddp",
    "sve",
    "i8mm",
    "bf16",
)


def cpu_isa() -> list[str]:
    """The ISA_FLAGS this CPU reports (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in ISA_FLAGS if flag in present]
    return []


def memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _probe(probe: bool) -> dict[str, float | None]:
    if not probe:
        return {"sgemm_gflops": None}
    gflops, spread = sgemm_probe()
    return {"sgemm_gflops": round(gflops, 1), "sgemm_spread": round(spread, 2)}


def machine(*, probe: bool = True) -> dict[str, Any]:
    return {
        "cpu": cpu_name(),
        "isa": cpu_isa(),
        "cores": os.cpu_count(),
        "memory_gb": memory_gb(),
        "platform": platform.platform(),
        **_probe(probe),
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,  # 1 min, at the start
    }


UNSTABLE_SPREAD = 1.3  # p90 / median above this: the timings are dominated by interference, not the model
BUSY_LOAD_PER_CORE = 0.5  # 1-minute load average per core above this: other work competes for the cores


def stability_notes(report: BenchReport) -> list[str]:
    """Warnings about the conditions of a run: a busy machine, and results whose p90 is far from their median
    (ratios against an unstable baseline are not printed)."""
    notes = []
    load, cores = report.machine.get("load_average"), report.machine.get("cores") or 1
    if load is not None and load > BUSY_LOAD_PER_CORE * cores:
        notes.append(
            f"warning: the machine is busy (load average {load:.2f} on {cores} cores when the run started); "
            "timings are noisy: rerun when it is quiet, or compare only ratios measured in one run"
        )
    probe = report.machine.get("sgemm_spread")
    if probe is not None and probe > UNSTABLE_SPREAD:
        notes.append(
            f"warning: the matrix-multiply probe varied {probe:.2f}x between repeats at the start: other work "
            "is competing for the cores, so timings are noisy"
        )
    rows = [*report.artifacts, *([report.baseline] if report.baseline else [])]
    for r in rows:
        spread = _spread(r)
        if spread is not None and spread > UNSTABLE_SPREAD:
            what = "baseline" if r is report.baseline else r.name
            consequence = "; no ratios against it" if r is report.baseline else ""
            notes.append(
                f"warning: {what} is unstable (p90 {spread:.2f}x its median){consequence}; rerun with more "
                "--runs (or a longer --time) on a quieter machine"
            )
    return notes


def _spread(result: BenchResult | None) -> float | None:
    if result is None or result.latency_ms is None or result.latency_ms.median <= 0:
        return None
    return result.latency_ms.p90 / result.latency_ms.median


class PeakMemory:
    """The process's peak resident set over a block. On Linux the kernel's high-water mark is reset at the
    start (``/proc/self/clear_refs``), so each artifact gets its own peak; elsewhere it is the process's peak so
    far (``ru_maxrss``), which only grows."""

    def __enter__(self) -> PeakMemory:
        self.per_block = _reset_peak_rss()
        self.before_mb = _rss_mb("VmRSS:")
        return self

    def __exit__(self, *exc: object) -> None:
        self.mb = _peak_rss_mb()


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    peak_mb = _rss_mb("VmHWM:")
    if peak_mb is not None:
        return peak_mb
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


# --- sessions ------------------------------------------------------------------------------------------------


def open_session(directory: Path, manifest: Manifest, settings: BenchSettings) -> Session:
    """Load the artifact in ``directory`` in its runtime through its target (the same loader validation uses;
    raises ``NotRunnable`` with the reason when it cannot run on this machine, ``ArtifactError`` when its files
    cannot be used)."""
    from nafnet_edge.converters import get_target

    target = get_target(manifest.target)
    target.check_available()
    return target.open_session(
        directory,
        export=manifest.export,
        settings=SessionSettings(threads=settings.threads, hints=settings.hints, timing=True),
    )


def pytorch_session(model: torch.nn.Module, settings: BenchSettings) -> Session:
    """The original model in PyTorch eager, fp32, on the CPU: the baseline."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model = model.float().cpu().eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    def profile(x: np.ndarray, runs: int) -> dict[str, Any]:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        run(x)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                run(x)
        ops: Counter[str] = Counter()
        counts: Counter[str] = Counter()
        for event in prof.key_averages():
            if event.key.startswith("aten::") and event.self_cpu_time_total > 0:
                ops[event.key] += event.self_cpu_time_total / 1e3 / runs
                counts[event.key] += event.count // runs
        return operator_profile("PyTorch profiler, self CPU time per aten operator", ops, counts, 1)

    info = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__}
    return Session(run, "pytorch", info, profile)


# --- measuring -----------------------------------------------------------------------------------------------


def timed_runs(run: Callable[[], Any], settings: BenchSettings, advance: Callable[[int], None]) -> list[float]:
    """Milliseconds of each timed call of ``run``: ``settings.iters`` of them, or with ``settings.time_s`` as many as
    start before that many seconds have passed (at least :data:`MIN_TIMED_RUNS`, at most :data:`MAX_TIMED_RUNS`)."""
    runs: list[float] = []
    deadline = None if settings.time_s is None else time.perf_counter() + settings.time_s
    while len(runs) < (settings.iters if deadline is None else MAX_TIMED_RUNS):
        if deadline is not None and len(runs) >= MIN_TIMED_RUNS and time.perf_counter() >= deadline:
            break
        started = time.perf_counter()
        run()
        runs.append((time.perf_counter() - started) * 1e3)
        advance(1)
    return runs


def measure(
    result: BenchResult,
    open_: Callable[[], Session],
    settings: BenchSettings,
    *,
    io: IOSpec,
    macs: int | None,
    peak_gflops: float | None,
    label: str = "",
) -> BenchResult:
    """Load, time, profile and (optionally) run a full frame; fills ``result`` in place. ``io`` is the artifact's
    input and output: the timed calls, the profile and the throughput mode get a random input of its own type
    (``Session.call``: uint8 pixels for image I/O), the full frame goes through the float tiler (``Session.run``).
    ``label`` names the artifact in progress lines. The runtime's own output while it loads and runs is captured."""
    x = example_input(io.input.shape, io.input.dtype)
    result.info = {**result.info, **io_info(io.pixel_format)}
    label = label or f"{result.target}-{result.precision}"
    with progress.backend_output():
        with PeakMemory() as memory:
            started = time.perf_counter()
            try:
                session = open_()
            except NotRunnable as e:
                result.runnable, result.reason = False, str(e)
                progress.phase(f"{label}: not runnable here")
                return result
            result.load_s = round(time.perf_counter() - started, 3)
            result.runtime, result.info = session.runtime, {**session.info, **io_info(io.pixel_format)}
            call = session.call
            started = time.perf_counter()
            call(x)
            result.first_inference_ms = round((time.perf_counter() - started) * 1e3, 2)
            for _ in range(settings.warmup):
                call(x)
            what = f"{label}: timed runs" + (f" for {settings.time_s:g}s" if settings.time_s is not None else "")
            total = settings.iters if settings.time_s is None else None
            with progress.task(what, total=total, unit="run") as advance:
                runs = timed_runs(lambda: call(x), settings, advance)
        result.peak_rss_mb = memory.mb
        if memory.before_mb is not None:
            result.added_rss_mb = round(memory.mb - memory.before_mb, 1)
        result.info["peak_rss"] = "since load" if memory.per_block else "process peak so far (ru_maxrss)"
        result.latency_ms = LatencyStats.from_ms(runs)
        median_s = result.latency_ms.median / 1e3
        frames = settings.throughput_frames or len(runs)
        if session.throughput is not None:
            progress.phase(f"{label}: throughput ({frames} frames)")
            result.throughput = session.throughput(x, frames)
        else:
            result.throughput = {
                "mode": "one frame after another",
                "fps": _r(1 / median_s),
                "streams": 1,
                "requests": 1,
            }
        if macs:
            result.macs, result.gmacs = macs, round(macs / 1e9, 3)
            result.gflops_per_s = _r(2 * macs / median_s / 1e9)
            if peak_gflops:
                result.peak_fraction = float(f"{result.gflops_per_s / peak_gflops:.3g}")  # 3 significant digits
        if settings.profile and session.profile is not None:
            progress.phase(f"{label}: operator profile")
            result.profile = normalize_profile(session.profile(x, max(3, min(len(runs), 5))), limit=settings.top)
        if settings.frame is not None:
            progress.phase(f"{label}: full frame {settings.frame[0]}x{settings.frame[1]}")
            result.frame = full_frame(
                session.run, settings.frame, io.input_size, settings.overlap_px, io.channels, scale=io.scale
            )
    return result


def full_frame(
    run: Runner, frame: tuple[int, int], tile: tuple[int, int], overlap: int, channels: int, *, scale: int = 1
) -> dict:
    """One frame of ``frame`` (height, width; input pixels, so a super-resolution artifact's output is ``scale``
    times larger) through the artifact's fixed tile, blended as ``run`` does it."""
    from nafnet_edge.tiling import run_tiled

    if tile[0] != tile[1]:
        raise BadInputError(f"--frame needs a square artifact input size, this one is {tile[0]}x{tile[1]}")
    size = tile[0]
    image = torch.from_numpy(np.random.default_rng(1).random((1, channels, *frame), dtype=np.float32))
    calls = 0

    def fn(t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return torch.from_numpy(np.asarray(run(np.ascontiguousarray(t.numpy())), np.float32))

    overlap = min(overlap, size // 4)
    # A frame smaller than the tile is padded to it, as an app would (the artifact's input size is fixed).
    padded = F.pad(image, (0, max(0, size - frame[1]), 0, max(0, size - frame[0])))
    started = time.perf_counter()
    run_tiled(fn, padded, tile_px=size, overlap_px=overlap, align_px=16, scale=scale)
    seconds = time.perf_counter() - started
    megapixels = frame[0] * frame[1] / 1e6
    return {
        "height": frame[0],
        "width": frame[1],
        "megapixels": round(megapixels, 4),
        "tile": size,
        "scale": scale,
        "overlap": overlap,
        "tiles": calls,
        "seconds": round(seconds, 4),
        "mp_per_s": round(megapixels / seconds, 4),
    }


# --- directories ---------------------------------------------------------------------------------------------


def artifact_directories(paths: Sequence[str | Path]) -> list[Path]:
    """Each path is an artifact directory (it has manifest.json) or a conversion output holding some, found as
    ``report`` finds them."""
    return [directory for path in paths for directory in find_artifacts(path)]


@dataclass
class BenchReport:
    machine: dict[str, Any]
    settings: BenchSettings
    artifacts: list[BenchResult]
    baseline: BenchResult | None
    baseline_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "bench_version": BENCH_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": self.machine,
            "settings": _settings_dict(self.settings),
            "artifacts": [a.to_dict() for a in self.artifacts],
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "baseline_reason": self.baseline_reason,
        }

    def artifact_record(self, result: BenchResult) -> BenchRecord:
        """What ``DIR/bench.json`` holds for one artifact: its result with the machine, settings and baseline."""
        record = BenchRecord.from_dict(result.to_dict())
        record.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record.machine = self.machine
        record.settings = _settings_dict(self.settings)
        if self.baseline is not None and self.baseline.median_ms:
            record.baseline = {"runtime": "pytorch", "median_ms": self.baseline.median_ms}
        return record


def _settings_dict(settings: BenchSettings) -> dict[str, Any]:
    """The settings as ``bench.json`` records them: ``iters`` is None when a time budget (``time_s``) set the
    number of runs instead (each artifact's count is ``latency_ms.runs``)."""
    d = dataclasses.asdict(settings)
    d["frame"] = list(settings.frame) if settings.frame else None
    if settings.time_s is not None:
        d["iters"] = None
    return d


def bench_artifacts(
    directories: Sequence[Path],
    settings: BenchSettings,
    *,
    baseline_model: Callable[[Manifest], torch.nn.Module | None] | None = None,
) -> BenchReport:
    """Benchmark every artifact directory, then the PyTorch baseline of the first one's source model
    (``baseline_model(manifest)`` loads it; None, or it returning None, skips the baseline)."""
    from nafnet_edge.complexity import count_macs
    from nafnet_edge.manifest import read_manifest

    manifests = [read_manifest(d) for d in directories]
    configs = [_source_config(d, m) for d, m in zip(directories, manifests, strict=True)]  # all, before any runs
    progress.phase("bench: measuring this machine's fp32 matmul rate")
    info = machine()
    peak = info["sgemm_gflops"]
    results: list[BenchResult] = []
    baseline: BenchResult | None = None
    reason: str | None = None
    for i, (directory, manifest, config) in enumerate(zip(directories, manifests, configs, strict=True), 1):
        shape = list(manifest.io.input.shape)
        macs = count_macs(config, *manifest.io.input_size)
        result = BenchResult(str(directory), manifest.target, manifest.precision, "", True, shape)
        label = artifact_dirname(manifest.target, manifest.precision, manifest.io.kind)
        progress.phase(f"{label}: bench {display_path(directory)} ({i}/{len(directories)})")
        measure(
            result,
            functools.partial(open_session, directory, manifest, settings),
            settings,
            io=manifest.io,
            macs=macs,
            peak_gflops=peak,
            label=label,
        )
        results.append(result)
    if baseline_model is not None and manifests:
        model = baseline_model(manifests[0])
        if model is None:
            reason = "the source checkpoint is not available: pass --checkpoint CKPT"
        else:
            # the model's own tensors at the first artifact's size, whatever that artifact's I/O
            tensors = IOSpec.image(manifests[0].io.channels, manifests[0].io.input_size, scale=manifests[0].io.scale)
            baseline = BenchResult("", "pytorch", "fp32", "pytorch", True, list(tensors.input.shape))
            macs = count_macs(configs[0], *tensors.input_size)
            progress.phase("pytorch-fp32: bench the source model (baseline)")
            measure(
                baseline,
                lambda: pytorch_session(model, settings),
                settings,
                io=tensors,
                macs=macs,
                peak_gflops=peak,
                label="pytorch-fp32",
            )
    return BenchReport(info, settings, results, baseline, reason)


def _source_config(directory: Path, manifest: Manifest) -> Any:
    """The source model's ``NAFNetConfig`` recorded in the manifest."""
    from nafnet_edge.model import NAFNetConfig

    try:
        return NAFNetConfig(**manifest.source.config)
    except (TypeError, ValueError) as e:
        raise ArtifactError(
            f"{directory}/manifest.json records a source configuration NAFNet cannot have ({e}); convert again"
        ) from None


def save(report: BenchReport) -> list[Path]:
    """Write ``bench.json`` into every artifact directory (atomically)."""
    return [write_bench(result.directory, report.artifact_record(result)) for result in report.artifacts]


def format_table(report: BenchReport) -> str:
    """The human table: one line per artifact, the baseline last, then each artifact's top operators."""
    rows = [*report.artifacts, *([report.baseline] if report.baseline else [])]
    spread = _spread(report.baseline)
    stable = spread is not None and spread <= UNSTABLE_SPREAD
    base = report.baseline.median_ms if report.baseline and stable else None
    header = (
        f"{'target':<18}{'prec':<6}{'io':<12}{'runtime':<13}{'median':>9}{'p90':>9}{'min':>9}{'fps':>8}"
        f"{'load s':>8}{'first':>9}{'+MB':>7}{'GFLOP/s':>9}{'peak':>7}{'vs torch':>9}"
    )
    settings = report.settings
    timed = f"{settings.iters} timed runs" if settings.time_s is None else f"timed for {settings.time_s:g} s each"
    lines = [
        f"{report.machine['cpu']}, {report.machine['cores']} cores, fp32 sgemm {report.machine['sgemm_gflops']} "
        f"GFLOP/s; {timed} after {settings.warmup} warm-up, ms per call on the artifact's own input (io: float32 "
        "NCHW tensors, or uint8 pixels in the format named)",
        header,
        "-" * len(header),
    ]
    for r in rows:
        if not r.runnable or r.latency_ms is None:
            lines.append(f"{r.target:<18}{r.precision:<6}{r.io:<12}{'-':<13}not runnable here: {r.reason}")
            continue
        lat = r.latency_ms
        fps = r.throughput["fps"] if r.throughput else float("nan")
        speedup = f"{base / lat.median:.2f}x" if base else "-"
        lines.append(
            f"{r.target:<18}{r.precision:<6}{r.io:<12}{r.runtime:<13}{lat.median:>9.2f}{lat.p90:>9.2f}{lat.min:>9.2f}"
            f"{fps:>8.1f}{r.load_s:>8.2f}{r.first_inference_ms:>9.1f}{r.added_rss_mb or 0:>7.0f}"
            f"{r.gflops_per_s or 0:>9.1f}{(r.peak_fraction or 0) * 100:>6.0f}%{speedup:>9}"
        )
    if report.baseline is None and report.baseline_reason:
        lines.append(f"(no PyTorch baseline: {report.baseline_reason})")
    lines += stability_notes(report)
    for r in rows:
        if r.frame:
            f = r.frame
            lines.append(
                f"{r.name}: {f['megapixels']} MP frame through {f['tiles']} tiles of {f['tile']} px "
                f"in {f['seconds']} s = {f['mp_per_s']} MP/s"
            )
    for r in rows:
        if r.profile and r.profile["top"]:
            lines.append(f"\n{r.name}, top operators ({r.profile.get('source', 'profiler')}):")
            for op in r.profile["top"]:
                lines.append(f"  {op['ms']:>9.2f} ms {op['share'] * 100:>5.1f}%  x{op['count']:<4} {op['op']}")
    return "\n".join(lines)


def _r(value: SupportsFloat) -> float:
    return round(float(value), 3)
