"""The conversion pipeline: checkpoint -> deploy graph -> artifact -> manifest and usage note -> validation.

Each target gets its own directory ``OUT/<target>/`` holding the artifact, ``manifest.json`` and ``USAGE.md``.
The directory is built under a temporary name beside it and renamed into place only when export and
validation have finished (a validation that misses its budget still lands, marked failed in the manifest,
so the user can inspect it); on any error or interrupt the temporary directory is removed and a previous
result, if any, is left untouched.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nafnet_edge.atomic import output_lock, staged_directory
from nafnet_edge.checkpoint import WRAPPER_KEYS, LoadedCheckpoint, is_size
from nafnet_edge.converters import INPUT_NAME, OUTPUT_NAME, ExportOptions, get_converter
from nafnet_edge.deploy import DEFAULT_STREAM_SCALE, TRANSFORMATIONS, FixedPool, deploy
from nafnet_edge.errors import BadInputError, OptionError
from nafnet_edge.model import NAFNetLocal
from nafnet_edge.report import read_manifest
from nafnet_edge.usage import budget_advice, usage_note
from nafnet_edge.validate import (
    DEFAULT_OVERLAP_PX,
    Budgets,
    ValidationImage,
    ValidationReport,
    reference_outputs,
    validate_runner,
)

MANIFEST = "manifest.json"
USAGE = "USAGE.md"
MANIFEST_VERSION = 1
TOOL_PACKAGES = ("nafnet-edge", "torch", "coremltools", "executorch", "openvino", "onnx", "onnxruntime", "numpy")


@dataclass(frozen=True)
class ValidationSettings:
    images: list[ValidationImage]
    data: str  # how the images were chosen, for the manifest
    reference_device: torch.device
    overlap_px: int = DEFAULT_OVERLAP_PX
    min_fidelity_db: float | None = None
    max_drift_db: float | None = None
    use_cache: bool = True


@dataclass(frozen=True)
class Int8Settings:
    """What ``--precision int8`` needs: training images (see ``nafnet_edge.quantization.train``) and the loop."""

    images: list[Any]  # nafnet_edge.quantization.train.TrainImage
    config: Any  # nafnet_edge.quantization.train.TrainConfig
    data: str  # how the images were chosen, for the manifest
    checkpoint: Path | None = None  # training state, for --resume
    resume: bool = False
    progress: bool = True
    rank: int = 0  # under torchrun every rank trains; only rank 0 exports
    keep_float: tuple[str, ...] = ()  # units to leave in float from the start
    search_rounds: int = 4  # at most this many more rounds keeping sensitive units float to meet the budget
    quantizer_options: dict[str, Any] = field(default_factory=dict)  # get_quantizer(target, **options)


@dataclass
class ConvertResult:
    target: str
    directory: Path
    manifest: dict[str, Any]

    @property
    def validation(self) -> dict[str, Any] | None:
        return self.manifest.get("validation")

    @property
    def passed(self) -> bool:
        return self.validation is None or bool(self.validation["passed"])


def tool_versions() -> dict[str, str]:
    versions = {}
    for name in TOOL_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def tlc_settings(loaded: LoadedCheckpoint, graph: torch.nn.Module) -> dict[str, Any]:
    """How channel attention pools in the exported graph (TLC's local pooling is fixed for the input size)."""
    pools = [m for m in graph.modules() if isinstance(m, FixedPool)]
    local = [list(p.kernel_size) for p in pools if p.kernel_size is not None]
    return {
        "arch": "NAFNetLocal" if isinstance(loaded.model, NAFNetLocal) else "NAFNet",
        "train_size": list(loaded.config.train_size) if loaded.config.train_size else None,
        "pools_global": len(pools) - len(local),
        "pools_local": len(local),
        "local_kernels": sorted({tuple(k) for k in local}) if local else [],
    }


def reference_settings(loaded: LoadedCheckpoint, device: str | None) -> dict[str, Any]:
    """The effective settings of the fp32 reference the artifact is validated against; ``validate`` loads the
    checkpoint with them again unless a flag says otherwise."""
    local = loaded.config.arch == "nafnet-local"
    return {
        "arch": loaded.config.arch,
        "train_size": list(loaded.config.train_size) if local else None,
        "param_key": loaded.raw_param_key,
        "device": device,
        "precision": "fp32",
    }


def recorded_reference(manifest: dict[str, Any], directory: str | Path) -> dict[str, Any]:
    """The reference settings a manifest records (:func:`reference_settings`; manifests without them give the
    class and TLC training size of their source config); a damaged section is a BadInputError."""
    section = manifest.get("reference")
    if section is None:
        config = manifest["source"]["config"]
        arch, size = config.get("arch"), config.get("train_size")
        local = arch == "nafnet-local" and is_size(size)
        return {
            "arch": arch if arch in ("nafnet", "nafnet-local") else None,
            "train_size": tuple(size) if local else None,
            "param_key": None,
            "device": None,
        }
    problem = None
    if not isinstance(section, dict):
        problem = "not an object"
    elif section.get("arch") not in ("nafnet", "nafnet-local"):
        problem = f"arch {section.get('arch')!r}"
    elif section.get("train_size") is not None and not is_size(section["train_size"]):
        problem = f"train_size {section['train_size']!r}"
    elif section.get("param_key") is not None and section["param_key"] not in WRAPPER_KEYS:
        problem = f"param_key {section['param_key']!r}"
    elif section.get("device") not in (None, "cpu", "cuda"):
        problem = f"device {section.get('device')!r}"
    if problem:
        raise BadInputError(
            f"{Path(directory) / MANIFEST} has a damaged 'reference' section ({problem}); convert again"
        )
    size = section.get("train_size")
    return {
        "arch": section["arch"],
        "train_size": tuple(size) if size is not None else None,
        "param_key": section.get("param_key"),
        "device": section.get("device"),
    }


def build_manifest(
    loaded: LoadedCheckpoint,
    target: str,
    options: ExportOptions,
    graph: torch.nn.Module,
    exported_files: list[str],
    export_info: dict[str, Any],
    overlap_px: int,
    *,
    reference_device: str | None = None,
) -> dict[str, Any]:
    h, w = options.input_size
    c = loaded.config.img_channels
    release = loaded.release
    return {
        "manifest_version": MANIFEST_VERSION,
        "target": target,
        "precision": options.precision,
        "files": exported_files,
        "input": {
            "name": INPUT_NAME,
            "shape": [1, c, h, w],
            "layout": "NCHW",
            "dtype": "float32",
            "channels": "RGB" if c == 3 else "gray",
            "range": [0.0, 1.0],
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": [1, c, h, w],
            "layout": "NCHW",
            "dtype": "float32",
            "range": "unclamped; clamp to [0, 1] before quantizing",
        },
        "padding_multiple": loaded.config.pad_multiple,
        "tiling": {"tile": [h, w], "overlap_px": overlap_px, "blend": "raised cosine, weights sum to one"},
        "tlc": tlc_settings(loaded, graph),
        "reference": reference_settings(loaded, reference_device),
        "source": {
            "checkpoint": loaded.path.name,
            "path": None if loaded.is_default else str(loaded.path.resolve()),
            "embedded_default": loaded.is_default,
            "sha256": loaded.sha256,
            "release": release.name if release else None,
            "arch_source": loaded.arch_source,
            "config": loaded.config.to_dict(),
            "params": loaded.num_params,
        },
        "deploy": {"transformations": list(TRANSFORMATIONS), "stream_scale": DEFAULT_STREAM_SCALE},
        "export": export_info,
        "tools": tool_versions(),
        "host": {"platform": platform.platform(), "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def graph_metadata(loaded: LoadedCheckpoint, target: str, options: ExportOptions) -> dict[str, str]:
    """The manifest essentials every artifact carries inside itself (str -> str)."""
    release = loaded.release
    return {
        "nafnet_edge.version": tool_versions().get("nafnet-edge", "unknown"),
        "nafnet_edge.target": target,
        "nafnet_edge.precision": options.precision,
        "nafnet_edge.source_sha256": loaded.sha256,
        "nafnet_edge.release": release.name if release else "",
        "nafnet_edge.arch": type(loaded.model).__name__,
        "nafnet_edge.config": json.dumps(loaded.config.to_dict()),
        "nafnet_edge.input": f"{INPUT_NAME}: float32 NCHW [1,{loaded.config.img_channels},"
        f"{options.input_size[0]},{options.input_size[1]}] RGB in [0,1]",
        "nafnet_edge.output": f"{OUTPUT_NAME}: same shape, unclamped",
        "nafnet_edge.padding_multiple": str(loaded.config.pad_multiple),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


def convert(
    loaded: LoadedCheckpoint,
    target: str,
    out_dir: str | Path,
    options: ExportOptions,
    *,
    validation: ValidationSettings | None,
    int8: Int8Settings | None = None,
    step: Callable[[str], None] | None = None,
) -> ConvertResult:
    """Export ``loaded`` for ``target`` into ``out_dir/target`` and validate it (unless ``validation`` is None).

    With ``options.precision == "int8"`` the deploy graph goes through the target's quantizer and the shared
    PTQ/QAT loop (``int8`` settings) before export."""
    converter = get_converter(target)
    converter.check_available()
    quantizer = None
    if options.precision == "int8":
        from nafnet_edge.quantization import get_quantizer

        if int8 is None:
            raise OptionError("int8 needs training or calibration images: --data DIR")
        quantizer = get_quantizer(target, **int8.quantizer_options)
        quantizer.check_available()
        if options.bundle or options.dynamic or options.extra_sizes:
            raise OptionError("int8 artifacts take none of --bundle, --dynamic, --sizes")
    else:
        converter.check_options(options)
    m = loaded.config.pad_multiple
    if options.input_size[0] % m or options.input_size[1] % m:
        raise OptionError(f"input size {options.input_size[0]}x{options.input_size[1]} must be a multiple of {m}")
    say = step or (lambda _: None)
    final = Path(out_dir) / target
    if quantizer is not None and int8 is not None and int8.rank != 0:
        graph = deploy(loaded.model, target=quantizer.deploy_target, input_size=options.input_size)  # type: ignore[arg-type]
        quantizer.keep_float = frozenset(int8.keep_float)
        _quantize(quantizer, graph, options, int8)
        return ConvertResult(target, final, {})
    with output_lock(final), staged_directory(final) as tmp:
        say(f"{target}: deploy graph")
        graph = deploy(loaded.model, target=converter.deploy_target, input_size=options.input_size)  # type: ignore[arg-type]
        graph.manifest_metadata = graph_metadata(loaded, target, options)
        if options.bundle and validation is not None and not options.test_inputs:
            options = _with_test_io(options, loaded, validation)
        stage = _Stage(loaded, target, converter, graph, options, validation, say)
        if quantizer is not None and int8 is not None:
            manifest = _int8_search(stage, quantizer, int8, tmp)
        else:
            say(f"{target}: export")
            manifest, _ = stage.export_and_validate(lambda d: converter.export(graph, d, options), tmp)
        (tmp / USAGE).write_text(usage_note(target, manifest))
        write_json(tmp / MANIFEST, manifest)
    return ConvertResult(target, final, manifest)


@dataclass
class _Stage:
    """What exporting and validating one artifact needs."""

    loaded: LoadedCheckpoint
    target: str
    converter: Any
    graph: torch.nn.Module
    options: ExportOptions
    validation: ValidationSettings | None
    say: Callable[[str], None]

    def export_and_validate(self, export: Callable[[Path], Any], directory: Path) -> tuple[dict[str, Any], Any]:
        """Export into ``directory`` and validate there; the manifest and the runner (None without validation)."""
        started = time.perf_counter()
        exported = export(directory)
        overlap = self.validation.overlap_px if self.validation else DEFAULT_OVERLAP_PX
        device = str(self.validation.reference_device) if self.validation else None
        manifest = build_manifest(
            self.loaded,
            self.target,
            self.options,
            self.graph,
            exported.files,
            exported.info,
            overlap,
            reference_device=device,
        )
        manifest["seconds"] = {"export": round(time.perf_counter() - started, 2)}
        if self.validation is None:
            return manifest, None
        self.say(f"{self.target}: validate in its runtime")
        started = time.perf_counter()
        runner = self.converter.load_runner(directory, manifest)
        manifest["runtime"] = runner.info
        report = run_validation(self.loaded, runner.run, self.options, self.validation)
        manifest["validation"] = report.to_dict()
        manifest["seconds"]["validate"] = round(time.perf_counter() - started, 2)
        return manifest, runner


@dataclass
class _Round:
    """One quantize-export-validate round of the int8 search; its files live in ``directory`` until it is kept."""

    number: int  # 1-based, as the progress lines say
    kept_float: list[str]
    directory: Path
    manifest: dict[str, Any]
    runner: Any  # None when the artifact is not validated

    def record(self) -> dict[str, Any]:
        """The round's entry in the manifest's ``quantization.search.rounds``."""
        summary = self.manifest["validation"]["summary"]
        return {
            "kept_float": list(self.kept_float),
            "passed": self.manifest["validation"]["passed"],
            "drift_db_mean": summary.get("drift_db_mean"),
            "fidelity_db_min": summary["fidelity_db_min"],
            "seconds": {**self.manifest["seconds"]},
        }


def _round_order(entry: dict[str, Any]) -> tuple[bool, float]:
    """Sort key of a round's entry, best first: passed before failed, then the lowest drift where drift is
    measured (ground-truth pairs), otherwise the highest minimum fidelity."""
    drift = entry["drift_db_mean"]
    return not entry["passed"], drift if drift is not None else -entry["fidelity_db_min"]


def _round_line(target: str, number: int, total: int, entry: dict[str, Any], verdict: str) -> str:
    kept = entry["kept_float"]
    units = f"{len(kept)} unit(s) float ({', '.join(kept)})" if kept else "all units int8"
    drift = entry["drift_db_mean"]
    measured = (f"drift {drift:+.3f} dB, " if drift is not None else "") + f"fidelity {entry['fidelity_db_min']:.1f} dB"
    return f"{target} int8 round {number}/{total}: {units}: {measured} - {verdict}"


def _tell(line: str) -> None:
    """One line on stderr, above the progress bar when one is shown."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def _int8_search(stage: _Stage, quantizer: Any, int8: Int8Settings, tmp: Path) -> dict[str, Any]:
    """Quantize, export and validate; while the artifact misses its budget, keep the next most sensitive units in
    float (1, 2, 4, ... more of them, ranked once by ``rank_units``) and go again, at most ``int8.search_rounds``
    times, stopping early at the first round worse than the best so far (``_round_order``). Each round is
    exported into its own folder under ``tmp`` and reported on stderr as it finishes; the best round's files
    are moved into ``tmp`` at the end and its manifest is returned. The manifest records every round, which
    one was kept (``kept_round``, an index into ``rounds``), why the search stopped, the ranking and the latency
    of the kept round against the first, measured side by side."""
    from dataclasses import replace

    from nafnet_edge.quantization.sensitivity import (
        SENSITIVITY_CROPS,
        check_units,
        interleaved_medians,
        next_kept,
        rank_units,
    )
    from nafnet_edge.quantization.train import calibration_crops, held_out_crops

    check_units(stage.graph, int8.keep_float)
    kept = list(int8.keep_float)
    total = int8.search_rounds + 1
    rounds: list[dict[str, Any]] = []
    ranking: list[tuple[str, float]] | None = None
    first: _Round | None = None
    best: _Round  # set by the first round
    stopped = ""
    scratch = tmp / ".int8-rounds"
    try:
        while True:
            number = len(rounds) + 1
            quantizer.keep_float = frozenset(kept)
            note = f" keeping {len(kept)} unit(s) float" if kept else ""
            stage.say(f"{stage.target}: int8 {int8.config.method}{note}")
            settings = int8 if not rounds else replace(int8, resume=False)
            started = time.perf_counter()
            log = _quantize(quantizer, stage.graph, stage.options, settings)
            seconds = round(time.perf_counter() - started, 2)
            prepared, example = log.pop("prepared"), log.pop("example")
            directory = scratch / str(number)
            directory.mkdir(parents=True)
            manifest, runner = stage.export_and_validate(
                lambda d, p=prepared, e=example: quantizer.export(p, d, e), directory
            )
            manifest["seconds"]["quantize"] = seconds
            manifest["quantization"] = {"data": int8.data, **log, "kept_float": list(kept)}
            this = _Round(number, list(kept), directory, manifest, runner)
            if runner is None:  # not validated: nothing to compare rounds by
                best = this
                break
            rounds.append(this.record())
            first = first or this
            previous = best if len(rounds) > 1 else None
            if previous is None or _round_order(rounds[-1]) < _round_order(rounds[previous.number - 1]):
                best = this
            if rounds[-1]["passed"]:
                verdict, stopped = "meets the budget", "met the budget"
            elif previous is None:
                verdict = "misses the budget"
            elif best is this:
                verdict = "misses the budget, best so far"
            elif _round_order(rounds[-1]) > _round_order(rounds[previous.number - 1]):
                verdict = f"worse than round {previous.number}: stopping, keeping round {previous.number}"
                stopped = f"round {number} was worse than round {previous.number}"
            else:
                verdict = f"no better than round {previous.number}"
            _tell(_round_line(stage.target, number, total, rounds[-1], verdict))
            if previous is not None and previous is not best and previous is not first:
                shutil.rmtree(previous.directory)  # superseded: only the first (for latency) and the best stay
            if this is not best and this is not first:
                shutil.rmtree(this.directory)
            if stopped:
                break
            if number == total:
                stopped = f"--search-rounds {int8.search_rounds} spent" if int8.search_rounds else "search off"
                break
            if ranking is None:
                stage.say(f"{stage.target}: ranking units by int8 sensitivity")
                h = stage.options.input_size[0]
                crops = held_out_crops(int8.images, h, int8.config, SENSITIVITY_CROPS)
                calibration = calibration_crops(int8.images, h, int8.config)
                try:
                    ranking = rank_units(quantizer, stage.graph, crops, calibration, exclude=kept)
                except NotImplementedError as e:
                    stopped = str(e)
                    break
            following = next_kept(kept, ranking)
            if following == kept:
                stopped = "every unit is float already"
                break
            kept = following
        manifest = best.manifest
        if rounds:
            search: dict[str, Any] = {
                "budget_rounds": int8.search_rounds,
                "rounds": rounds,
                "kept_round": best.number - 1,
                "stopped": stopped,
            }
            if ranking is not None:
                search["sensitivity_db"] = {unit: round(gain, 3) for unit, gain in ranking}
            if first is not None and first is not best:
                stage.say(f"{stage.target}: latency of the kept units")
                c = stage.loaded.config.img_channels
                x = np.random.default_rng(0).random((1, c, *stage.options.input_size), dtype=np.float32)
                medians = interleaved_medians({"first": first.runner.run, "kept": best.runner.run}, x)
                search["latency_ms"] = {
                    "first_round": medians["first"],
                    "kept_round": medians["kept"],
                    "ratio": round(medians["kept"] / medians["first"], 3) if medians["first"] > 0 else None,
                    "input": list(x.shape),
                    "note": "medians of 7 interleaved runs on this machine",
                }
            manifest["quantization"]["search"] = search
            if not manifest["validation"]["passed"]:
                failures = "; ".join(manifest["validation"]["failures"])
                _tell(
                    f"{stage.target} int8 missed its budget in {len(rounds)} round(s) ({stopped}); kept round "
                    f"{best.number}: {failures}. Try next: {budget_advice(manifest)}"
                )
        for path in list(best.directory.iterdir()):
            shutil.move(str(path), str(tmp / path.name))
        return manifest
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _quantize(quantizer: Any, graph: torch.nn.Module, options: ExportOptions, int8: Int8Settings) -> dict[str, Any]:
    from nafnet_edge.quantization.train import quantize_graph

    h, w = options.input_size
    if h != w:
        raise OptionError("int8 training uses square crops: give a square --input-size")
    prepared, log = quantize_graph(
        quantizer,
        graph,
        int8.images,
        h,
        int8.config,
        checkpoint=int8.checkpoint,
        resume=int8.resume,
        progress=int8.progress,
    )
    example = torch.rand(1, graph.intro.in_channels, h, w)
    return {"prepared": prepared, "example": example, **log}


def run_validation(
    loaded: LoadedCheckpoint,
    run: Callable[[np.ndarray], np.ndarray],
    options: ExportOptions,
    settings: ValidationSettings,
) -> ValidationReport:
    if not settings.images:
        raise BadInputError("no validation images")
    tile = options.input_size
    refs = reference_outputs(
        loaded.model,
        loaded.sha256,
        settings.images,
        tile=tile,
        overlap=settings.overlap_px,
        device=settings.reference_device,
        use_cache=settings.use_cache,
        param_key=loaded.raw_param_key,
    )
    loaded.model.cpu()
    budgets = Budgets.for_precision(
        options.precision, min_fidelity_db=settings.min_fidelity_db, max_drift_db=settings.max_drift_db
    )
    report = validate_runner(
        run,
        refs,
        settings.images,
        tile=tile,
        overlap=settings.overlap_px,
        multiple=loaded.config.pad_multiple,
        budgets=budgets,
        reference_device=str(settings.reference_device),
        data=settings.data,
    )
    report.reference_settings = reference_settings(loaded, str(settings.reference_device))
    return report


def _with_test_io(options: ExportOptions, loaded: LoadedCheckpoint, settings: ValidationSettings) -> ExportOptions:
    """A bundled program's test case: the first validation image's top-left tile and the reference output."""
    from dataclasses import replace

    h, w = options.input_size
    pixels = settings.images[0].input[:h, :w]
    x = np.zeros((1, pixels.shape[2], h, w), np.float32)
    x[0, :, : pixels.shape[0], : pixels.shape[1]] = pixels.transpose(2, 0, 1)
    with torch.inference_mode():
        y = loaded.model.float().cpu()(torch.from_numpy(x)).numpy()
    return replace(options, test_inputs=(x,), test_outputs=(y,))


def validate_directory(
    directory: str | Path, loaded: LoadedCheckpoint, settings: ValidationSettings
) -> tuple[dict[str, Any], ValidationReport]:
    """Re-validate an artifact directory; the manifest's validation section and USAGE.md are rewritten atomically.

    Holds the artifact's :func:`output_lock` from reading the manifest to writing it, so a concurrent
    ``convert --force`` of the same artifact is refused rather than interleaved."""
    from nafnet_edge.atomic import atomic_path

    directory = Path(directory)
    with output_lock(directory.resolve()):
        manifest = read_manifest(directory)
        if manifest["source"]["sha256"] != loaded.sha256:
            raise BadInputError(
                f"{directory} was converted from a checkpoint with sha256 {manifest['source']['sha256'][:12]}..., "
                f"not {loaded.sha256[:12]}...: pass the checkpoint it came from"
            )
        converter = get_converter(manifest["target"])
        converter.check_available()
        runner = converter.load_runner(directory, manifest)
        h, w = manifest["input"]["shape"][2:]
        options = ExportOptions(input_size=(h, w), precision=manifest["precision"])
        report = run_validation(loaded, runner.run, options, settings)
        manifest["runtime"] = runner.info
        manifest["validation"] = report.to_dict()
        manifest.setdefault("tiling", {})["overlap_px"] = settings.overlap_px  # validate runs with it by default
        with atomic_path(directory / USAGE) as tmp:  # its header says whether the artifact met its budget
            tmp.write_text(usage_note(manifest["target"], manifest))
        with atomic_path(directory / MANIFEST) as tmp:
            write_json(tmp, manifest)
    return manifest, report
