"""Latency of artifacts in their own runtimes on this machine, the way an app team compares them before shipping.

``bench_artifacts`` runs each artifact directory written by ``convert``/``quantize`` in its runtime (OpenVINO with
its latency and throughput hints, ExecuTorch's runtime with XNNPACK's threadpool, onnxruntime, Core ML on macOS)
and the original PyTorch fp32 model as the baseline, and reports per artifact:

- load (compile) time and the first inference, then ``warmup`` runs excluded and ``iters`` timed runs: min,
  median, mean, p90, p99, std (``LatencyStats``);
- throughput in frames/s: OpenVINO's throughput hint with its optimal number of requests (streams), the other
  runtimes run one frame after another;
- the process's peak resident memory while loading and running the artifact;
- GFLOP/s achieved (the model's multiply-accumulates x 2 / median) against this machine's fp32 matmul rate
  (``sgemm_gflops``), so figures compare across machines;
- optionally a full frame (e.g. 12 MP) through the artifact's tile, in megapixels per second;
- a per-operator profile: ExecuTorch's ETDump read by the devtools Inspector (XNNPACK's operators inside the
  delegate), OpenVINO's performance counters, onnxruntime's profiler, PyTorch's profiler for the baseline.

Everything is measured, nothing is estimated: an artifact that cannot run here (Core ML off macOS, a Core ML
delegate in an ExecuTorch program) is reported as not runnable, with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nafnet_edge.errors import ArtifactError, BadInputError

BENCH_FILE = "bench.json"
BENCH_VERSION = 1
Runner = Callable[[np.ndarray], Any]


@dataclass(frozen=True)
class BenchSettings:
    iters: int = 20  # timed runs per artifact
    warmup: int = 3  # untimed runs after the first inference
    threads: int | None = None  # runtime threads (None: each runtime's default, all cores)
    profile: bool = True  # per-operator profile
    top: int = 8  # operators listed in the profile
    throughput_frames: int = 0  # frames for OpenVINO's throughput mode (0: as many as iters)
    frame: tuple[int, int] | None = None  # full frame (height, width) run through the artifact's tile
    overlap_px: int = 32  # tile overlap for the full frame
    compute_units: str = "ALL"  # Core ML (macOS): ALL, CPU_ONLY, CPU_AND_GPU, CPU_AND_NE


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
    input: list[int]
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Session:
    """A loaded artifact: ``run`` for timing, and what else its runtime offers."""

    run: Runner
    runtime: str
    info: dict[str, Any]
    profile: Callable[[np.ndarray, int], dict[str, Any]] | None = None
    throughput: Callable[[np.ndarray, int], dict[str, Any]] | None = None
    keep: Any = None  # objects the runner needs alive


class NotRunnable(Exception):
    """This artifact cannot run on this machine (the message says why)."""


# --- the machine ---------------------------------------------------------------------------------------------


def sgemm_gflops(n: int = 2048, repeats: int = 3) -> float:
    """This machine's fp32 matrix-multiply rate in GFLOP/s (best of ``repeats``, PyTorch's threads): the peak
    that achieved GFLOP/s are compared with."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(*, probe: bool = True) -> dict[str, Any]:
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "sgemm_gflops": round(sgemm_gflops(), 1) if probe else None,
    }


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


# --- sessions per runtime ------------------------------------------------------------------------------------


def open_session(directory: Path, manifest: dict[str, Any], settings: BenchSettings) -> Session:
    """Load the artifact in ``directory`` in its runtime (raises ``NotRunnable`` with the reason when it cannot run
    on this machine, ``ArtifactError`` when its files cannot be used)."""
    from nafnet_edge.converters import get_converter

    target = manifest["target"]
    converter = get_converter(target)
    converter.check_available()
    path = converter.artifact_path(directory)  # every file the runtime reads is checked before it opens one
    with converter.loading(path):
        if target == "openvino":
            return _openvino_session(path, manifest, settings)
        if target == "executorch":
            return _executorch_session(path, settings)
        if target == "onnx":
            return _onnxruntime_session(path, settings)
        if target == "coreml":
            return _coreml_session(path, settings)
        if target == "executorch-coreml":
            return _executorch_coreml_session(path, settings)
    raise NotRunnable(f"no benchmark runner for target {target!r}")


def _openvino_session(path: Path, manifest: dict[str, Any], settings: BenchSettings) -> Session:
    import openvino as ov

    from nafnet_edge.converters.openvino import DEFAULT_INFERENCE_PRECISION, DEVICE, runtime_precisions

    core = ov.Core()
    model = core.read_model(str(path))
    base: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": manifest.get("inference_precision", DEFAULT_INFERENCE_PRECISION)
    }
    if settings.threads:
        base["INFERENCE_NUM_THREADS"] = settings.threads
    compiled = core.compile_model(model, DEVICE, {**base, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    reported, activations = runtime_precisions(compiled)
    info = {
        "device": DEVICE,
        "device_name": core.get_property(DEVICE, "FULL_DEVICE_NAME"),
        "hint": "LATENCY",
        "inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
        "streams": int(compiled.get_property("NUM_STREAMS")),
        "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
        "runtime_precisions": reported,
        "activation_precisions": activations,
        "openvino": ov.get_version(),
    }

    def run(x: np.ndarray) -> Any:
        return request.infer({0: x})

    def profile(x: np.ndarray, runs: int) -> dict[str, Any]:
        counted = core.compile_model(model, DEVICE, {**base, "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True})
        req = counted.create_infer_request()
        req.infer({0: x})
        ops: Counter[str] = Counter()
        counts: Counter[str] = Counter()
        for _ in range(runs):
            req.infer({0: x})
            for p in req.profiling_info:
                if p.status == p.Status.EXECUTED and p.real_time.total_seconds() > 0:
                    key = f"{p.node_type} ({p.exec_type})"
                    ops[key] += p.real_time.total_seconds() * 1e3 / runs
                    counts[key] += 1
        return _profile("OpenVINO performance counters (PERF_COUNT), per executed node", ops, counts, runs)

    def throughput(x: np.ndarray, frames: int) -> dict[str, Any]:
        fast = core.compile_model(model, DEVICE, {**base, "PERFORMANCE_HINT": "THROUGHPUT"})
        requests = int(fast.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        queue = ov.AsyncInferQueue(fast, requests)
        for _ in range(requests):  # warm every request
            queue.start_async({0: x})
        queue.wait_all()
        started = time.perf_counter()
        for _ in range(frames):
            queue.start_async({0: x})
        queue.wait_all()
        seconds = time.perf_counter() - started
        return {
            "mode": "OpenVINO THROUGHPUT hint",
            "fps": _r(frames / seconds),
            "streams": int(fast.get_property("NUM_STREAMS")),
            "requests": requests,
            "frames": frames,
        }

    return Session(run, "openvino", info, profile, throughput, keep=(compiled, model))


def _executorch_session(path: Path, settings: BenchSettings) -> Session:
    from executorch.extension.pybindings import portable_lib

    if settings.threads:
        portable_lib._unsafe_reset_threadpool(settings.threads)
    module = portable_lib._load_for_executorch(str(path))
    module.method_meta("forward")  # the program is read lazily: a damaged file fails here, while loading
    info = {"backend": "XnnpackBackend", "threads": int(portable_lib._threadpool_get_thread_count())}

    def run(x: np.ndarray) -> Any:
        return module.forward([torch.from_numpy(x)])

    def profile(x: np.ndarray, runs: int) -> dict[str, Any]:
        from executorch.devtools import Inspector

        traced = portable_lib._load_for_executorch(str(path), enable_etdump=True, debug_buffer_size=0)
        traced.forward([torch.from_numpy(x)])  # the first run sets XNNPACK up; the Inspector's medians drop it
        for _ in range(runs):
            traced.forward([torch.from_numpy(x)])
        with tempfile.TemporaryDirectory() as tmp:
            etdump = Path(tmp) / "run.etdp"
            traced.write_etdump_result_to_file(str(etdump))
            inspector = Inspector(etdump_path=str(etdump))
        ops: Counter[str] = Counter()
        counts: Counter[str] = Counter()
        for block in inspector.event_blocks:
            if block.name != "Execute":
                continue
            for event in block.events:
                if event.perf_data is None or event.name in ("DELEGATE_CALL", "Method::execute"):
                    continue
                key = event.name.split(" #")[0]  # XNNPACK numbers every instance: "Convolution (NHWC, F32) #3"
                ops[key] += event.perf_data.p50
                counts[key] += 1
        return _profile("ExecuTorch ETDump (devtools Inspector), XNNPACK operators, median per node", ops, counts, 1)

    return Session(run, "executorch", info, profile, keep=module)


def _onnxruntime_session(path: Path, settings: BenchSettings) -> Session:
    import onnxruntime as ort

    from nafnet_edge.converters.onnx import PROVIDERS

    def options(profiling: bool = False) -> Any:
        opts = ort.SessionOptions()
        if settings.threads:
            opts.intra_op_num_threads = settings.threads
        opts.enable_profiling = profiling
        if profiling:
            opts.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="nafnet-edge-ort-")) / "profile")
        return opts

    providers = [p for p in PROVIDERS if p in ort.get_available_providers()]
    session = ort.InferenceSession(str(path), options(), providers=providers)
    name = session.get_inputs()[0].name
    info = {"providers": session.get_providers(), "onnxruntime": ort.__version__, "threads": settings.threads}

    def run(x: np.ndarray) -> Any:
        return session.run(None, {name: x})

    def profile(x: np.ndarray, runs: int) -> dict[str, Any]:
        profiled = ort.InferenceSession(str(path), options(profiling=True), providers=providers)
        profiled.run(None, {name: x})
        for _ in range(runs):
            profiled.run(None, {name: x})
        trace = Path(profiled.end_profiling())
        events = json.loads(trace.read_text())
        trace.unlink(missing_ok=True)
        ops: Counter[str] = Counter()
        counts: Counter[str] = Counter()
        for event in events:
            if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
                key = event.get("args", {}).get("op_name", "?")
                ops[key] += event["dur"] / 1e3 / (runs + 1)
                counts[key] += 1
        return _profile("onnxruntime profiler, kernel time per operator type", ops, counts, runs + 1)

    return Session(run, "onnxruntime", info, profile, keep=session)


COREML_OFF_MACOS = (
    "Core ML runs only on macOS and iOS; this machine is {system}. Validation used the numpy ML-program "
    "evaluator, which says nothing about speed: bench on a Mac"
)


def _coreml_session(path: Path, settings: BenchSettings) -> Session:
    if sys.platform != "darwin":
        raise NotRunnable(COREML_OFF_MACOS.format(system=platform.system()))
    import coremltools as ct

    model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit[settings.compute_units])
    name = model.get_spec().description.input[0].name

    def run(x: np.ndarray) -> Any:
        return model.predict({name: x})

    return Session(run, "coreml", {"compute_units": settings.compute_units}, keep=model)


def _executorch_coreml_session(path: Path, settings: BenchSettings) -> Session:
    from executorch.runtime import Runtime

    from nafnet_edge.converters.coreml import COREML_BACKEND_ID

    runtime = Runtime.get()
    if not runtime.backend_registry.is_available(COREML_BACKEND_ID):
        raise NotRunnable(
            f"this ExecuTorch runtime has no {COREML_BACKEND_ID} (it exists only on Apple platforms); "
            "bench the program on a Mac or in the app"
        )
    program = runtime.load_program(str(path))
    method = program.load_method("forward")

    def run(x: np.ndarray) -> Any:
        return method.execute([torch.from_numpy(x)])

    return Session(run, "executorch-coreml", {"backend": COREML_BACKEND_ID}, keep=(program, method))


def pytorch_session(model: torch.nn.Module, settings: BenchSettings) -> Session:
    """The original model in PyTorch eager, fp32, on the CPU: the baseline."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model = model.float().cpu().eval()

    def run(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return model(torch.from_numpy(x))

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
        return _profile("PyTorch profiler, self CPU time per aten operator", ops, counts, 1)

    info = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__}
    return Session(run, "pytorch", info, profile)


def _profile(source: str, ops: Counter[str], counts: Counter[str], runs: int) -> dict[str, Any]:
    total = sum(ops.values())
    top = [
        {"op": op, "ms": _r(ms), "share": round(ms / total, 4) if total else 0.0, "count": counts[op] // max(runs, 1)}
        for op, ms in ops.most_common()
    ]
    return {"source": source, "total_ms": _r(total), "ops": top}


# --- measuring -----------------------------------------------------------------------------------------------


def measure(
    result: BenchResult,
    open_: Callable[[], Session],
    settings: BenchSettings,
    *,
    macs: int | None,
    peak_gflops: float | None,
    tick: Callable[[str], None] = lambda _: None,
) -> BenchResult:
    """Load, time, profile and (optionally) run a full frame; fills ``result`` in place."""
    n, c, h, w = result.input
    x = np.random.default_rng(0).random((n, c, h, w), dtype=np.float32)
    with PeakMemory() as memory:
        started = time.perf_counter()
        try:
            session = open_()
        except NotRunnable as e:
            result.runnable, result.reason = False, str(e)
            return result
        result.load_s = round(time.perf_counter() - started, 3)
        result.runtime, result.info = session.runtime, session.info
        started = time.perf_counter()
        session.run(x)
        result.first_inference_ms = round((time.perf_counter() - started) * 1e3, 2)
        for _ in range(settings.warmup):
            session.run(x)
            tick("warm-up")
        runs = []
        for _ in range(settings.iters):
            started = time.perf_counter()
            session.run(x)
            runs.append((time.perf_counter() - started) * 1e3)
            tick("timed")
    result.peak_rss_mb = memory.mb
    if memory.before_mb is not None:
        result.added_rss_mb = round(memory.mb - memory.before_mb, 1)
    result.info["peak_rss"] = "since load" if memory.per_block else "process peak so far (ru_maxrss)"
    result.latency_ms = LatencyStats.from_ms(runs)
    median_s = result.latency_ms.median / 1e3
    frames = settings.throughput_frames or settings.iters
    if session.throughput is not None:
        result.throughput = session.throughput(x, frames)
    else:
        result.throughput = {"mode": "one frame after another", "fps": _r(1 / median_s), "streams": 1, "requests": 1}
    if macs:
        result.macs, result.gmacs = macs, round(macs / 1e9, 3)
        result.gflops_per_s = _r(2 * macs / median_s / 1e9)
        if peak_gflops:
            result.peak_fraction = round(result.gflops_per_s / peak_gflops, 3)
    if settings.profile and session.profile is not None:
        tick("profile")
        profile = session.profile(x, max(3, min(settings.iters, 5)))
        profile["ops"] = profile["ops"][: settings.top]
        result.profile = profile
    if settings.frame is not None:
        tick("full frame")
        result.frame = full_frame(session.run, settings.frame, (h, w), settings.overlap_px, c)
    return result


def full_frame(run: Runner, frame: tuple[int, int], tile: tuple[int, int], overlap: int, channels: int) -> dict:
    """One frame of ``frame`` (height, width) through the artifact's fixed tile, blended as ``run`` does it."""
    from nafnet_edge.tiling import run_tiled

    if tile[0] != tile[1]:
        raise BadInputError(f"--frame needs a square artifact input size, this one is {tile[0]}x{tile[1]}")
    size = tile[0]
    image = torch.from_numpy(np.random.default_rng(1).random((1, channels, *frame), dtype=np.float32))
    calls = 0

    def fn(t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return torch.from_numpy(np.asarray(_first_output(run(np.ascontiguousarray(t.numpy()))), np.float32))

    overlap = min(overlap, size // 4)
    # A frame smaller than the tile is padded to it, as an app would (the artifact's input size is fixed).
    padded = F.pad(image, (0, max(0, size - frame[1]), 0, max(0, size - frame[0])))
    started = time.perf_counter()
    run_tiled(fn, padded, tile_px=size, overlap_px=overlap, align_px=16)
    seconds = time.perf_counter() - started
    megapixels = frame[0] * frame[1] / 1e6
    return {
        "height": frame[0],
        "width": frame[1],
        "megapixels": round(megapixels, 4),
        "tile": size,
        "overlap": overlap,
        "tiles": calls,
        "seconds": round(seconds, 4),
        "mp_per_s": round(megapixels / seconds, 4),
    }


def _first_output(out: Any) -> Any:
    """The restored image from whatever the runtime returned (a tensor, a list, an OpenVINO result, a dict)."""
    if isinstance(out, torch.Tensor | np.ndarray):
        return out.numpy() if isinstance(out, torch.Tensor) else out
    if isinstance(out, dict):
        return next(iter(out.values()))
    if hasattr(out, "to_tuple"):
        return out.to_tuple()[0]
    first = out[0]
    return first.numpy() if isinstance(first, torch.Tensor) else first


# --- directories ---------------------------------------------------------------------------------------------


def artifact_directories(paths: Sequence[str | Path]) -> list[Path]:
    """Each path is an artifact directory (it has manifest.json) or a conversion output holding some, found as
    ``report`` finds them."""
    from nafnet_edge.report import find_artifacts

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

    def artifact_record(self, result: BenchResult) -> dict[str, Any]:
        """What ``DIR/bench.json`` holds for one artifact: its result with the machine, settings and baseline."""
        record = {
            "bench_version": BENCH_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": self.machine,
            "settings": _settings_dict(self.settings),
            **result.to_dict(),
        }
        if self.baseline is not None and self.baseline.median_ms:
            record["baseline"] = {"runtime": "pytorch", "median_ms": self.baseline.median_ms}
        return record


def _settings_dict(settings: BenchSettings) -> dict[str, Any]:
    d = dataclasses.asdict(settings)
    d["frame"] = list(settings.frame) if settings.frame else None
    return d


def bench_artifacts(
    directories: Sequence[Path],
    settings: BenchSettings,
    *,
    baseline_model: Callable[[dict[str, Any]], torch.nn.Module | None] | None = None,
    progress: bool = True,
) -> BenchReport:
    """Benchmark every artifact directory, then the PyTorch baseline of the first one's source model
    (``baseline_model(manifest)`` loads it; None, or it returning None, skips the baseline)."""
    from tqdm import tqdm

    from nafnet_edge.complexity import count_macs
    from nafnet_edge.convert import read_manifest

    manifests = [read_manifest(d) for d in directories]
    configs = [_source_config(d, m) for d, m in zip(directories, manifests, strict=True)]  # all, before any runs
    info = machine()
    peak = info["sgemm_gflops"]
    per_artifact = settings.warmup + settings.iters
    units = (len(directories) + (baseline_model is not None)) * per_artifact
    results: list[BenchResult] = []
    baseline: BenchResult | None = None
    reason: str | None = None
    with tqdm(total=units, unit="run", disable=None if progress else True, file=sys.stderr) as bar:

        def tick_for(label: str) -> Callable[[str], None]:
            def tick(phase: str) -> None:
                bar.set_description(f"{label}: {phase}")
                if phase in ("warm-up", "timed"):
                    bar.update(1)

            return tick

        for directory, manifest, config in zip(directories, manifests, configs, strict=True):
            shape = list(manifest["input"]["shape"])
            macs = count_macs(config, shape[2], shape[3])
            result = BenchResult(str(directory), manifest["target"], manifest["precision"], "", True, shape)
            label = f"{manifest['target']} {manifest['precision']}"
            bar.set_description(f"{label}: load")
            done = bar.n
            measure(
                result,
                lambda d=directory, m=manifest: open_session(d, m, settings),
                settings,
                macs=macs,
                peak_gflops=peak,
                tick=tick_for(label),
            )
            bar.update(done + per_artifact - bar.n)
            results.append(result)
        if baseline_model is not None and manifests:
            model = baseline_model(manifests[0])
            if model is None:
                reason = "the source checkpoint is not available: pass --checkpoint CKPT"
            else:
                shape = list(manifests[0]["input"]["shape"])
                baseline = BenchResult("", "pytorch", "fp32", "pytorch", True, shape)
                macs = count_macs(configs[0], shape[2], shape[3])
                measure(
                    baseline,
                    lambda: pytorch_session(model, settings),
                    settings,
                    macs=macs,
                    peak_gflops=peak,
                    tick=tick_for("pytorch fp32"),
                )
    return BenchReport(info, settings, results, baseline, reason)


def _source_config(directory: Path, manifest: dict[str, Any]) -> Any:
    """The source model's ``NAFNetConfig`` recorded in the manifest."""
    from nafnet_edge.model import NAFNetConfig

    try:
        return NAFNetConfig(**manifest["source"]["config"])
    except (TypeError, ValueError) as e:
        raise ArtifactError(
            f"{directory}/manifest.json records a source configuration NAFNet cannot have ({e}); convert again"
        ) from None


def save(report: BenchReport) -> list[Path]:
    """Write ``bench.json`` into every artifact directory (atomically)."""
    from nafnet_edge.atomic import atomic_path

    written = []
    for result in report.artifacts:
        path = Path(result.directory) / BENCH_FILE
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(report.artifact_record(result), indent=2) + "\n")
        written.append(path)
    return written


def format_table(report: BenchReport) -> str:
    """The human table: one line per artifact, the baseline last, then each artifact's top operators."""
    rows = [*report.artifacts, *([report.baseline] if report.baseline else [])]
    base = report.baseline.median_ms if report.baseline else None
    header = (
        f"{'target':<18}{'prec':<6}{'runtime':<13}{'median':>9}{'p90':>9}{'min':>9}{'fps':>8}"
        f"{'load s':>8}{'first':>9}{'+MB':>7}{'GFLOP/s':>9}{'peak':>7}{'vs torch':>9}"
    )
    lines = [
        f"{report.machine['cpu']}, {report.machine['cores']} cores, fp32 sgemm {report.machine['sgemm_gflops']} "
        f"GFLOP/s; {report.settings.iters} timed runs after {report.settings.warmup} warm-up, ms",
        header,
        "-" * len(header),
    ]
    for r in rows:
        if not r.runnable or r.latency_ms is None:
            lines.append(f"{r.target:<18}{r.precision:<6}{'-':<13}not runnable here: {r.reason}")
            continue
        lat = r.latency_ms
        fps = r.throughput["fps"] if r.throughput else float("nan")
        speedup = f"{base / lat.median:.2f}x" if base else "-"
        lines.append(
            f"{r.target:<18}{r.precision:<6}{r.runtime:<13}{lat.median:>9.2f}{lat.p90:>9.2f}{lat.min:>9.2f}"
            f"{fps:>8.1f}{r.load_s:>8.2f}{r.first_inference_ms:>9.1f}{r.added_rss_mb or 0:>7.0f}"
            f"{r.gflops_per_s or 0:>9.1f}{(r.peak_fraction or 0) * 100:>6.0f}%{speedup:>9}"
        )
    if report.baseline is None and report.baseline_reason:
        lines.append(f"(no PyTorch baseline: {report.baseline_reason})")
    for r in rows:
        if r.frame:
            f = r.frame
            lines.append(
                f"{r.target} {r.precision}: {f['megapixels']} MP frame through {f['tiles']} tiles of {f['tile']} px "
                f"in {f['seconds']} s = {f['mp_per_s']} MP/s"
            )
    for r in rows:
        if r.profile and r.profile["ops"]:
            lines.append(f"\n{r.target} {r.precision}, top operators ({r.profile['source']}):")
            for op in r.profile["ops"]:
                lines.append(f"  {op['ms']:>9.2f} ms {op['share'] * 100:>5.1f}%  x{op['count']:<4} {op['op']}")
    return "\n".join(lines)


def _r(value: float) -> float:
    return round(float(value), 3)
