"""The conversion pipeline: checkpoint -> deploy graph -> artifact -> manifest and usage note -> validation.

Each artifact gets its own directory ``OUT/<target>-<precision>/`` holding the artifact, ``manifest.json`` and
``USAGE.md``. The directory is built under a temporary name beside it and renamed into place only when export and
validation have finished (a validation that misses its budget still lands, marked failed in the manifest,
so the user can inspect it); on any error or interrupt the temporary directory is removed and a previous
result, if any, is left untouched.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nafnet_edge import progress
from nafnet_edge.atomic import output_lock, staged_directory
from nafnet_edge.checkpoint import LoadedCheckpoint
from nafnet_edge.converters import ExportOptions, get_target, target_class, target_names
from nafnet_edge.deploy import DeployNAFNet, deploy
from nafnet_edge.errors import BadInputError, OptionError
from nafnet_edge.manifest import (
    MANIFEST_FILE,
    USAGE_FILE,
    IOSpec,
    Manifest,
    Reference,
    Source,
    Tiling,
    ValidationSummary,
    artifact_dirname,
    read_manifest,
    write_manifest,
)
from nafnet_edge.pixels import quantized, to_pixels
from nafnet_edge.usage import usage_note
from nafnet_edge.validation import (
    DEFAULT_OVERLAP_PX,
    Budgets,
    ValidationImage,
    ValidationReport,
    reference_outputs,
    validate_runner,
)

MANIFEST = MANIFEST_FILE
USAGE = USAGE_FILE
CORE_PACKAGES = ("nafnet-edge", "torch", "numpy")  # and every registered target's runtime_packages


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
    manifest: Manifest | None  # None on the ranks of a distributed int8 run that do not export

    @property
    def validation(self) -> ValidationSummary | None:
        return self.manifest.validation if self.manifest is not None else None

    @property
    def passed(self) -> bool:
        return self.validation is None or self.validation.passed


def tool_packages() -> tuple[str, ...]:
    """The distributions whose versions a manifest records: nafnet-edge, torch, every registered target's
    ``runtime_packages`` (in registration order), numpy."""
    runtimes = (p for name in target_names() for p in target_class(name).runtime_packages)
    return tuple(dict.fromkeys([*CORE_PACKAGES[:2], *runtimes, *CORE_PACKAGES[2:]]))


def tool_versions() -> dict[str, str]:
    versions = {}
    for name in tool_packages():
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def tlc_settings(loaded: LoadedCheckpoint, graph: DeployNAFNet) -> dict[str, Any]:
    """How channel attention pools in the exported graph (TLC's local pooling is fixed for the input size), from
    the deploy graph's recipe."""
    recipe = graph.recipe
    local = recipe.local_pooling
    return {
        "arch": recipe.arch,
        "train_size": list(loaded.config.train_size) if loaded.config.train_size else None,
        "pools_global": len(graph.blocks()) - len(local),
        "pools_local": len(local),
        "local_kernels": sorted(set(local)),
    }


def reference_settings(loaded: LoadedCheckpoint, device: str | None) -> dict[str, Any]:
    """The effective settings of the fp32 reference the artifact is validated against; ``validate`` loads the
    checkpoint with them again unless a flag says otherwise."""
    local = loaded.config.local
    return {
        "arch": loaded.config.arch,
        "train_size": list(loaded.config.train_size) if local else None,
        "param_key": loaded.raw_param_key,
        "device": device,
        "precision": "fp32",
    }


def reference_record(loaded: LoadedCheckpoint, device: str | None) -> Reference:
    """:func:`reference_settings` as the manifest's ``reference`` section."""
    settings = reference_settings(loaded, device)
    size = settings["train_size"]
    return Reference(settings["arch"], (size[0], size[1]) if size else None, settings["param_key"], device)


def build_manifest(
    loaded: LoadedCheckpoint,
    target: str,
    options: ExportOptions,
    graph: DeployNAFNet,
    exported_files: list[str],
    export_info: dict[str, Any],
    overlap_px: int,
    *,
    reference_device: str | None = None,
) -> Manifest:
    h, w = options.input_size
    release = loaded.release
    return Manifest(
        target=target,
        precision=options.precision,
        files=list(exported_files),
        io=io_spec(loaded, options),
        padding_multiple=loaded.config.pad_multiple,
        tiling=Tiling((h, w), overlap_px, align_px=loaded.config.pad_multiple),
        tlc=tlc_settings(loaded, graph),
        reference=reference_record(loaded, reference_device),
        source=Source(
            checkpoint=loaded.path.name,
            path=None if loaded.is_default else str(loaded.path.resolve()),
            embedded_default=loaded.is_default,
            sha256=loaded.sha256,
            release=release.name if release else None,
            arch_source=loaded.arch_source,
            config=loaded.config.to_dict(),
            params=loaded.num_params,
        ),
        deploy={"passes": list(graph.recipe.passes), "stream_scale": graph.recipe.stream_scale},
        export=export_info,
        tools=tool_versions(),
        host={"platform": platform.platform(), "python": platform.python_version()},
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def io_spec(loaded: LoadedCheckpoint, options: ExportOptions) -> IOSpec:
    """The artifact's tensors: the model's channels (a stereo model's views stacked: 6), its output scale."""
    config = loaded.config
    return IOSpec.image(
        config.in_channels, options.input_size, scale=config.up_scale, pixel_format=options.pixel_format
    )


def graph_metadata(loaded: LoadedCheckpoint, target: str, options: ExportOptions) -> dict[str, str]:
    """The manifest essentials every artifact carries inside itself (str -> str)."""
    release = loaded.release
    io = io_spec(loaded, options)
    return {
        "nafnet_edge.version": tool_versions().get("nafnet-edge", "unknown"),
        "nafnet_edge.target": target,
        "nafnet_edge.precision": options.precision,
        "nafnet_edge.source_sha256": loaded.sha256,
        "nafnet_edge.release": release.name if release else "",
        "nafnet_edge.arch": type(loaded.model).__name__,
        "nafnet_edge.config": json.dumps(loaded.config.to_dict()),
        "nafnet_edge.input": io.input.describe(),
        "nafnet_edge.output": io.output.describe(),
        "nafnet_edge.padding_multiple": str(loaded.config.pad_multiple),
        "nafnet_edge.scale": str(loaded.config.up_scale),
        "nafnet_edge.views": str(loaded.config.views),
    }


def convert(
    loaded: LoadedCheckpoint,
    target: str,
    out_dir: str | Path,
    options: ExportOptions,
    *,
    validation: ValidationSettings | None,
    int8: Int8Settings | None = None,
) -> ConvertResult:
    """Export ``loaded`` for ``target`` into ``out_dir/<target>-<precision>`` and validate it (unless
    ``validation`` is None), announcing each phase through :mod:`nafnet_edge.progress`.

    With ``options.precision == "int8"`` the deploy graph goes through the target's quantizer and the shared
    PTQ/QAT loop (``int8`` settings) before export."""
    get_target(target).check_available()  # a missing backend is said before anything starts
    label = artifact_dirname(target, options.precision, "image" if options.pixel_format else "tensor")
    progress.phase(f"{label}: load the converter")
    with progress.backend_output():  # checking the options imports the backend, which has its say on import
        converter, quantizer = _checked(target, options, int8)
    if options.pixel_format is not None and loaded.config.views > 1:
        raise OptionError(
            f"{loaded.config.class_name} takes a stereo pair as one 6-channel tensor (left RGB, then right RGB), "
            "which 8-bit pixel formats cannot carry: convert with --io tensor"
        )
    m = loaded.config.pad_multiple
    if options.input_size[0] % m or options.input_size[1] % m:
        raise OptionError(f"input size {options.input_size[0]}x{options.input_size[1]} must be a multiple of {m}")
    final = Path(out_dir) / label
    if quantizer is not None and int8 is not None and int8.rank != 0:
        from nafnet_edge.quantization.search import quantize

        graph = deploy(loaded.model, norm_form=quantizer.norm_form, input_size=options.input_size)
        quantize(quantizer, graph, options.input_size, int8)
        return ConvertResult(target, final, None)
    with output_lock(final), staged_directory(final) as tmp:
        progress.phase(f"{label}: deploy graph")
        metadata = graph_metadata(loaded, target, options)
        with progress.backend_output():
            graph = deploy(
                loaded.model, norm_form=converter.norm_form, input_size=options.input_size, metadata=metadata
            )
        if converter.needs_test_io(options) and validation is not None and not options.test_inputs:
            options = _with_test_io(options, loaded, validation)
        stage = _Stage(loaded, target, label, converter, graph, options, validation)
        if quantizer is not None and int8 is not None:
            from nafnet_edge.quantization import get_quantizer
            from nafnet_edge.quantization.search import int8_search

            manifest = int8_search(
                stage, lambda kept: get_quantizer(target, keep_float=kept, **int8.quantizer_options), int8, tmp
            )
        else:
            progress.phase(f"{label}: export")
            manifest, _ = stage.export_and_validate(lambda d: converter.export(graph, d, options), tmp)
        progress.phase(f"{label}: write {final}")
        (tmp / USAGE).write_text(usage_note(target, manifest))
        write_manifest(tmp, manifest)
    return ConvertResult(target, final, manifest)


def _checked(target: str, options: ExportOptions, int8: Int8Settings | None) -> tuple[Any, Any]:
    """The target's converter and, for int8, its quantizer, once the backends are installed and ``options``
    suit them."""
    converter = get_target(target)
    converter.check_available()
    if options.precision != "int8":
        converter.check_options(options)
        return converter, None
    from nafnet_edge.quantization import get_quantizer

    if int8 is None:
        raise OptionError("int8 needs training or calibration images: --train-data DIR")
    quantizer = get_quantizer(target, keep_float=int8.keep_float, **int8.quantizer_options)
    quantizer.check_available()
    own = {option.dest: option for option in converter.options if "quantize" not in option.commands}
    given = [own[d].flag for d, value in options.settings.items() if d in own and value != own[d].default]
    if given:  # the quantizer exports its own artifact: the float export's options do not reach it
        raise OptionError(f"int8 artifacts take none of {', '.join(given)}")
    return converter, quantizer


@dataclass
class _Stage:
    """What exporting and validating one artifact needs."""

    loaded: LoadedCheckpoint
    target: str
    label: str  # "<target>-<precision>", as the progress lines and the artifact's folder say
    converter: Any
    graph: DeployNAFNet
    options: ExportOptions
    validation: ValidationSettings | None

    def export_and_validate(self, export: Callable[[Path], Any], directory: Path) -> tuple[Manifest, Any]:
        """Export into ``directory`` and validate there; the manifest and the runner (None without validation).
        The exporter's and the runtime's own output is captured (:func:`progress.backend_output`)."""
        started = time.perf_counter()
        with progress.backend_output():
            exported = export(directory)
        overlap = (
            self.validation.overlap_px
            if self.validation
            else (
                DEFAULT_OVERLAP_PX
                if min(self.options.input_size) > DEFAULT_OVERLAP_PX
                else min(self.options.input_size) // 4
            )
        )
        device = str(self.validation.reference_device) if self.validation else None
        manifest = build_manifest(
            self.loaded,
            self.target,
            self.options,
            self.graph,
            [*exported.files, *copy_helpers(self.converter, directory)],
            exported.info,
            overlap,
            reference_device=device,
        )
        manifest.seconds = {"export": round(time.perf_counter() - started, 2)}
        if self.validation is None:
            return manifest, None
        progress.phase(f"{self.label}: validate in its runtime")
        started = time.perf_counter()
        with progress.backend_output():
            runner = self.converter.load_runner(directory, export=manifest.export)
            manifest.runtime = runner.info
            report = run_validation(self.loaded, runner.run, self.options, self.validation, label=self.label)
        manifest.validation = report.to_summary()
        manifest.seconds["validate"] = round(time.perf_counter() - started, 2)
        return manifest, runner


def copy_helpers(converter: Any, directory: Path) -> list[str]:
    """Copy the target's app helpers (``Target.helpers``, source files shipped in this package) into the artifact
    directory; their names, for the manifest's files."""
    from importlib import resources

    names = []
    for helper in getattr(converter, "helpers", ()):  # a stand-in converter in tests may have none
        source = resources.files("nafnet_edge").joinpath(helper)
        (directory / Path(helper).name).write_bytes(source.read_bytes())
        names.append(Path(helper).name)
    return names


def run_validation(
    loaded: LoadedCheckpoint,
    run: Callable[[np.ndarray], np.ndarray],
    options: ExportOptions,
    settings: ValidationSettings,
    *,
    label: str = "artifact",
) -> ValidationReport:
    """Validate ``run`` (the artifact in its runtime) against the fp32 reference; ``label`` (``coreml-fp16``)
    starts its progress lines."""
    if not settings.images:
        raise BadInputError("no validation images")
    tile = options.input_size
    images = settings.images
    if options.pixel_format is not None:  # an 8-bit camera frame: the reference sees the same pixels
        images = [replace(image, input=quantized(image.input)) for image in images]
    refs = reference_outputs(
        loaded.model,
        loaded.sha256,
        images,
        tile=tile,
        overlap=settings.overlap_px,
        device=settings.reference_device,
        use_cache=settings.use_cache,
        param_key=loaded.raw_param_key,
        label=f"{label}: fp32 reference",
    )
    loaded.model.cpu()
    budgets = Budgets.for_precision(
        options.precision,
        min_fidelity_db=settings.min_fidelity_db,
        max_drift_db=settings.max_drift_db,
        pixels=options.pixel_format is not None,
    )
    report = validate_runner(
        run,
        refs,
        images,
        tile=tile,
        overlap=settings.overlap_px,
        multiple=loaded.config.pad_multiple,
        budgets=budgets,
        reference_device=str(settings.reference_device),
        data=settings.data,
        label=f"{label}: run in its runtime",
        scale=loaded.config.up_scale,
    )
    report.reference_settings = reference_settings(loaded, str(settings.reference_device))
    return report


def _with_test_io(options: ExportOptions, loaded: LoadedCheckpoint, settings: ValidationSettings) -> ExportOptions:
    """A bundled program's test case: the first validation image's top-left tile and the reference output (as
    8-bit pixels for image I/O)."""
    h, w = options.input_size
    pixels = settings.images[0].input[:h, :w]
    x = np.zeros((1, pixels.shape[2], h, w), np.float32)
    x[0, :, : pixels.shape[0], : pixels.shape[1]] = pixels.transpose(2, 0, 1)
    if options.pixel_format is not None:
        x = quantized(x)
    with torch.inference_mode():
        y = loaded.model.float().cpu()(torch.from_numpy(x)).numpy()
    if options.pixel_format is not None:
        return replace(
            options,
            test_inputs=(to_pixels(x, options.pixel_format),),
            test_outputs=(to_pixels(y, options.pixel_format),),
        )
    return replace(options, test_inputs=(x,), test_outputs=(y,))


def validate_directory(
    directory: str | Path, loaded: LoadedCheckpoint, settings: ValidationSettings
) -> tuple[Manifest, ValidationReport]:
    """Re-validate an artifact directory; the manifest's validation section and USAGE.md are rewritten atomically.

    Holds the artifact's :func:`output_lock` from reading the manifest to writing it, so a concurrent
    ``convert --force`` of the same artifact is refused rather than interleaved."""
    from nafnet_edge.atomic import atomic_path

    directory = Path(directory)
    with output_lock(directory.resolve()):
        manifest = read_manifest(directory)
        if manifest.source.sha256 != loaded.sha256:
            raise BadInputError(
                f"{directory} was converted from a checkpoint with sha256 {manifest.source.sha256[:12]}..., "
                f"not {loaded.sha256[:12]}...: pass the checkpoint it came from"
            )
        converter = get_target(manifest.target)
        converter.check_available()
        label = artifact_dirname(manifest.target, manifest.precision, manifest.io.kind)
        progress.phase(f"{label}: validate in its runtime")
        options = ExportOptions(
            input_size=manifest.io.input_size,
            precision=manifest.precision,  # type: ignore[arg-type]
            pixel_format=manifest.io.pixel_format,
        )
        with progress.backend_output():
            runner = converter.load_runner(directory, export=manifest.export)
            report = run_validation(loaded, runner.run, options, settings, label=label)
        manifest.runtime = runner.info
        manifest.validation = report.to_summary()
        manifest.tiling.overlap_px = settings.overlap_px  # validate runs with it by default
        with atomic_path(directory / USAGE) as tmp:  # its header says whether the artifact met its budget
            tmp.write_text(usage_note(manifest.target, manifest))
        write_manifest(directory, manifest)
    return manifest, report
