"""The Python API: the pipeline's steps as functions with keyword-only options and typed results.

``load`` -> ``convert`` (or ``quantize``) -> ``validate`` -> ``bench`` -> ``report``, with the ``nafnet-edge``
command's defaults (``nafnet_edge.defaults``) and its checks: the command line translates its flags into these
calls and prints what they return. Nothing is printed here; progress goes through ``nafnet_edge.progress`` (a
line per phase on stderr; ``progress.configure(level="quiet")`` silences it), and failures are
``NafnetEdgeError`` subclasses with one-line messages (``UsageError`` for options that cannot work together,
``BadInputError`` for unusable inputs, ``MissingBackendError`` for a runtime that is not installed).

Importing this module imports no torch and no backend: each function imports what it needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nafnet_edge import defaults, progress
from nafnet_edge.archs import LOCAL_ARCHS
from nafnet_edge.errors import UsageError

if TYPE_CHECKING:
    import torch

    from nafnet_edge.benchmark import BenchReport
    from nafnet_edge.checkpoint import LoadedCheckpoint, ParamKey
    from nafnet_edge.conversion import ConvertResult, Int8Settings, ValidationSettings
    from nafnet_edge.manifest import Manifest, ValidationSummary
    from nafnet_edge.model import Arch, NAFNetConfig
    from nafnet_edge.validation import ValidationReport

PathLike = str | Path  # a file or folder, as text or a Path

# bench --frame holds three float32 copies of an RGB frame (the random input, its padded copy and the output):
# 36 bytes per pixel measured (peak RSS at 6 MP); one more copy for the runtime's own buffers and slack.
FRAME_BYTES_PER_PIXEL = 4 * 3 * 4


@dataclass
class ValidationResult:
    """An artifact directory validated again by :func:`validate`: its updated manifest and the full report."""

    directory: Path
    manifest: Manifest
    report: ValidationReport  # per-image metrics, budgets and failures
    passed: bool  # every budget met

    @property
    def target(self) -> str:
        return self.manifest.target

    @property
    def validation(self) -> ValidationSummary | None:
        """The manifest's validation section (what ``ConvertResult.validation`` gives for a fresh artifact)."""
        return self.manifest.validation


# --- loading -------------------------------------------------------------------------------------------------


def load(
    checkpoint: PathLike | None = None,
    *,
    param_key: ParamKey = defaults.PARAM_KEY,
    arch: Arch | None = None,
    train_size: tuple[int, int] | None = None,
    device: str = "cpu",
) -> LoadedCheckpoint:
    """Load a checkpoint of the NAFNet family (the embedded default denoiser when ``checkpoint`` is None) into an
    eval-mode fp32 model, identified from its shapes and sha256. ``arch`` (one of ``nafnet_edge.archs.ARCHS``: TLC or
    not within the identified family) and ``train_size`` (TLC's training crop) override what is identified;
    ``param_key`` picks the entry of a wrapped checkpoint."""
    from nafnet_edge.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint, param_key=param_key, arch=arch, train_size=train_size, device=device)


def _loaded(checkpoint: PathLike | LoadedCheckpoint | None) -> LoadedCheckpoint:
    """``checkpoint`` itself when already loaded, else :func:`load` of it with the defaults."""
    from nafnet_edge.checkpoint import LoadedCheckpoint

    return checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load(checkpoint)


# --- checks shared by convert, quantize and validate -------------------------------------------------------------


def artifact_directory(output: PathLike, target: str, precision: str | None = None, io: str = "tensor") -> Path:
    """Where :func:`convert` writes ``target`` at ``precision`` (None: the target's default) with ``io``:
    ``output/<target>-<precision>`` (``...-image`` for image I/O)."""
    from nafnet_edge.converters import target_class
    from nafnet_edge.manifest import artifact_dirname

    return Path(output) / artifact_dirname(target, precision or target_class(target).default_precision, io)


def resolve_pixel_format(target: str, channels: int, io: str, given: str | None) -> str | None:
    """The pixel format of an artifact with ``io`` ("tensor" or "image") and ``--pixel-format`` ``given`` (None:
    the target's default for ``channels``); None for tensor I/O. ``UsageError`` for a combination that cannot be
    built, saying what to pass."""
    from nafnet_edge.converters import get_target
    from nafnet_edge.pixels import IO_KINDS, check_pixel_format

    if io not in IO_KINDS:
        raise UsageError(f"io {io!r}: choose {' or '.join(IO_KINDS)}")
    if io == "tensor":
        if given is not None:
            raise UsageError("--pixel-format is the pixel layout of image I/O: add --io image")
        return None
    converter = get_target(target)
    chosen = given or converter.default_pixel_format(channels)
    check_pixel_format(chosen, channels)
    converter.check_pixel_format(chosen)
    return chosen


def check_free(directories: Iterable[Path], *, force: bool) -> None:
    """Refuse (``UsageError``) to replace existing artifact directories unless ``force``."""
    existing = [str(d) for d in directories if d.exists()]
    if existing and not force:
        raise UsageError(
            f"{', '.join(existing)} exists; pass --force (force=True in Python) to replace it, or choose another "
            "output folder"
        )


def default_overlap(tile: tuple[int, int]) -> int:
    """The overlap an artifact of fixed input size ``tile`` records when none is given: the default, or a quarter of
    the tile where the default would not fit in it."""
    d = defaults.VALIDATION_OVERLAP_PX
    return d if d < min(tile) else min(tile) // 4


def resolve_overlap(overlap: int | None, input_size: tuple[int, int], *, validate: bool = True) -> int:
    """The validation tile overlap: ``overlap`` or the default (at most a quarter of a small tile), checked against
    the artifact's tile."""
    if overlap is None:
        overlap = default_overlap(input_size)
    if overlap < 0:
        raise UsageError(f"--overlap {overlap}: give 0 or more pixels")
    if validate and overlap >= min(input_size):
        raise UsageError(
            f"--overlap {overlap} must be smaller than the tile the artifact runs on (--input-size "
            f"{input_size[0]}x{input_size[1]})"
        )
    return overlap


def check_input_sizes(
    config: NAFNetConfig, sizes: list[tuple[int, int]], *, more: Sequence[tuple[str, list[tuple[int, int]]]] = ()
) -> None:
    """Refuse (``UsageError``) fixed model input sizes whose forward pass does not fit in this machine's memory:
    ``sizes`` (--input-size) and the sizes of target options (``more``: flag and sizes, see :func:`option_sizes`)."""
    from nafnet_edge.inference import check_input_size_memory

    check_input_size_memory(config, sizes, option="--input-size")
    for flag, extra in more:
        check_input_size_memory(config, extra, option=flag)


def target_settings(target: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` (a target's own options by destination, e.g. ``{"dynamic": True}`` for ONNX) checked against
    what ``target`` declares."""
    from nafnet_edge.converters import target_class

    settings = dict(options or {})
    own = {option.dest for option in target_class(target).options}
    unknown = sorted(set(settings) - own)
    if unknown:
        known = ", ".join(sorted(own)) or "none"
        raise UsageError(f"{', '.join(map(repr, unknown))}: not an option of target {target} (its options: {known})")
    return settings


def option_sizes(target: str, settings: Mapping[str, Any]) -> list[tuple[str, list[tuple[int, int]]]]:
    """The options in ``settings`` that are model input sizes (parsed by ``parse_size``), as (flag, sizes)."""
    from nafnet_edge.converters import target_class
    from nafnet_edge.sizes import parse_size

    found = []
    for option in target_class(target).options:
        if option.type is parse_size and option.dest in settings:
            value = settings[option.dest]
            found.append((option.flag, list(value) if option.kind == "values" else [value]))
    return found


def check_validation_data(val_data: PathLike | None, val_pairs: tuple[PathLike, PathLike] | None) -> None:
    """Refuse (``UsageError``) a folder of validation images together with folder pairs."""
    if val_data and val_pairs:
        raise UsageError("--val-data and --val-pairs are alternatives; give one")


def check_train_data(train_data: PathLike | None) -> PathLike:
    """``train_data``; ``UsageError`` when an int8 artifact has no images to calibrate or train on."""
    if train_data is None:
        raise UsageError("--precision int8 needs images to calibrate on: --train-data DIR (nafnet-edge quantize)")
    return train_data


def validation_settings(
    *,
    channels: int,
    val_data: PathLike | None = None,
    val_pairs: tuple[PathLike, PathLike] | None = None,
    reference_device: str = defaults.REFERENCE_DEVICE,
    overlap: int = defaults.VALIDATION_OVERLAP_PX,
    min_fidelity: float | None = None,
    max_drift: float | None = None,
    cache: bool = True,
    scale: int = 1,
    views: int = 1,
) -> ValidationSettings:
    """What validation runs on: ``val_data`` (a folder of images), ``val_pairs`` (degraded and ground-truth
    folders) or the shipped Kodak photos with seeded noise (bicubic downscales of them for a super-resolution
    model: ``scale``, ``views``), and the budgets (None: the precision's)."""
    from nafnet_edge.conversion import ValidationSettings
    from nafnet_edge.inference import resolve_device
    from nafnet_edge.validation import default_images, folder_images, paired_images, sr_data_note

    check_validation_data(val_data, val_pairs)
    if val_pairs:
        inputs, targets = val_pairs
        images, data = paired_images(inputs, targets, channels=channels, scale=scale), f"pairs {inputs}"
    elif val_data:
        images, data = folder_images(val_data, channels=channels), f"folder {val_data}"
    else:
        images, data = default_images(channels, scale=scale, views=views), defaults.VALIDATION_DATA_NOTE
        if scale > 1 or views > 1:
            data = sr_data_note(scale, views)
    return ValidationSettings(
        images=images,
        data=data,
        reference_device=resolve_device(reference_device),
        overlap_px=overlap,
        min_fidelity_db=min_fidelity,
        max_drift_db=max_drift,
        use_cache=cache,
    )


def int8_settings(
    loaded: LoadedCheckpoint,
    *,
    target: str,
    output: PathLike,
    input_size: tuple[int, int],
    train_data: PathLike | None,
    train_pairs: PathLike | None = None,
    method: str = defaults.METHOD,
    steps: int = defaults.STEPS,
    train_batch: int = defaults.TRAIN_BATCH,
    lr: float = defaults.LR,
    seed: int = defaults.SEED,
    keep_float: Sequence[str] = (),
    search_rounds: int = defaults.SEARCH_ROUNDS,
    resume: bool = False,
) -> Int8Settings:
    """What an int8 artifact needs: the training images (square crops of ``input_size``), the PTQ/QAT loop and
    its state file ``output/.<target>-int8-train.pt``. Joins the process group under ``torchrun``."""
    from nafnet_edge.conversion import Int8Settings
    from nafnet_edge.manifest import artifact_dirname
    from nafnet_edge.quantization.train import TrainConfig, init_distributed, load_training_images

    train_path = Path(check_train_data(train_data))
    h, w = input_size
    if h != w:
        raise UsageError("int8 trains on square crops of the input size: give a square --input-size")
    if method not in ("qat", "ptq"):
        raise UsageError(f"method {method!r}: choose 'qat' (fine-tune) or 'ptq' (calibrate only)")
    if steps < 1 or train_batch < 1 or not 0 < lr <= 1:
        raise UsageError("--steps and --train-batch take 1 or more, --lr a number in (0, 1]")
    if search_rounds < 0:
        raise UsageError("--search-rounds takes 0 (no search) or more")
    rank, world = init_distributed()
    pairs_path = Path(train_pairs) if train_pairs is not None else None
    model = loaded.config
    images = load_training_images(
        train_path, h, pairs=pairs_path, channels=model.img_channels, scale=model.up_scale, views=model.views
    )
    config = TrainConfig(method=method, iters=steps, batch=train_batch, lr=lr, seed=seed)  # type: ignore[arg-type]
    return Int8Settings(
        images=images,
        config=config,
        data=f"{train_path}" + (f" (ground truth {pairs_path})" if pairs_path else " (distilled)"),
        checkpoint=Path(output) / f".{artifact_dirname(target, 'int8')}-train.pt",
        resume=resume,
        progress=rank == 0,
        rank=rank,
        keep_float=tuple(keep_float),
        search_rounds=search_rounds if world == 1 else 0,  # the ranks train together; rank 0 alone validates
    )


def target_int8(int8: Int8Settings, target: str, settings: Mapping[str, Any]) -> Int8Settings:
    """``int8`` for ``target``: its quantizer's options from the target's own option values (``settings``); a
    post-training-only mode (Core ML weight-only) turns QAT into PTQ."""
    from nafnet_edge.converters import get_target
    from nafnet_edge.quantization import get_quantizer

    options = get_target(target).quantizer_options(dict(settings))
    config = int8.config
    if options and not get_quantizer(target, **options).trains:
        config = dataclasses.replace(config, method="ptq")
    return dataclasses.replace(int8, quantizer_options=options, config=config)


def _size(value: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (value, value) if isinstance(value, int) else value
    if height < 1 or width < 1:
        raise UsageError(f"--input-size {height}x{width}: give a positive size")
    return int(height), int(width)


def writer_lock(directory: Path) -> contextlib.AbstractContextManager[None]:
    """convert's output lock, held from the existence check to the rename (under torchrun only rank 0 writes)."""
    from nafnet_edge.atomic import output_lock

    return output_lock(directory) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()


# --- convert, quantize, validate ---------------------------------------------------------------------------------


def convert(
    checkpoint: PathLike | LoadedCheckpoint | None = None,
    *,
    target: str,
    output: PathLike = defaults.OUTPUT_DIR,
    precision: str | None = None,
    input_size: int | tuple[int, int] = defaults.INPUT_SIZE,
    validate: bool = True,
    val_data: PathLike | None = None,
    val_pairs: tuple[PathLike, PathLike] | None = None,
    reference_device: str = defaults.REFERENCE_DEVICE,
    overlap: int | None = None,
    min_fidelity: float | None = None,
    max_drift: float | None = None,
    cache: bool = True,
    train_data: PathLike | None = None,
    train_pairs: PathLike | None = None,
    method: str = defaults.METHOD,
    steps: int = defaults.STEPS,
    train_batch: int = defaults.TRAIN_BATCH,
    lr: float = defaults.LR,
    seed: int = defaults.SEED,
    keep_float: Sequence[str] = (),
    search_rounds: int = defaults.SEARCH_ROUNDS,
    resume: bool = False,
    options: Mapping[str, Any] | None = None,
    io: str = "tensor",
    pixel_format: str | None = None,
    force: bool = False,
) -> ConvertResult:
    """Export a checkpoint for one ``target`` into ``output/<target>-<precision>/`` (artifact, ``manifest.json``,
    ``USAGE.md``) and validate it in its runtime against the fp32 PyTorch reference.

    ``io="image"``: the artifact takes and returns 8-bit pixels (uint8 NHWC in ``pixel_format``, None: the
    target's default; a Core ML image for Core ML) with the scale, clamp and round inside, written to
    ``output/<target>-<precision>-image/``; ``"tensor"``: float32 NCHW in [0, 1], unclamped output.

    ``checkpoint``: a path, a :func:`load` result (reused, not loaded again), or None for the embedded default.
    ``precision``: fp32, fp16 or int8 (None: the target's default, fp16 for Core ML, else fp32). int8 trains on
    ``train_data`` (``method``, ``steps``, ``train_batch``, ``lr``, ``seed``, ``keep_float``, ``search_rounds``,
    ``resume`` as ``nafnet-edge quantize``). ``options``: the target's own options by name (``{"dynamic": True}``
    for ONNX). An existing artifact directory is refused unless ``force``. The result's ``passed`` is False when
    the artifact missed its budget (``min_fidelity``/``max_drift`` dB, None: the precision's).
    """
    from nafnet_edge.conversion import convert as convert_loaded
    from nafnet_edge.converters import ExportOptions, target_class

    precision = precision or target_class(target).default_precision
    if precision not in ("fp32", "fp16", "int8"):
        raise UsageError(f"precision {precision!r}: choose fp32, fp16 or int8")
    size = _size(input_size)
    settings = target_settings(target, options)
    directory = artifact_directory(output, target, precision, io)
    if io != "tensor" or pixel_format is not None:  # refused before the checkpoint is read
        resolve_pixel_format(target, 1 if pixel_format == "gray" else 3, io, pixel_format)
    with writer_lock(directory):
        overlap = resolve_overlap(overlap, size, validate=validate)
        check_free([directory], force=force)
        loaded = _loaded(checkpoint)
        check_input_sizes(loaded.config, [size], more=option_sizes(target, settings))
        validation = None
        if validate:
            validation = validation_settings(
                channels=loaded.config.img_channels,
                scale=loaded.config.up_scale,
                views=loaded.config.views,
                val_data=val_data,
                val_pairs=val_pairs,
                reference_device=reference_device,
                overlap=overlap,
                min_fidelity=min_fidelity,
                max_drift=max_drift,
                cache=cache,
            )
        int8 = None
        if precision == "int8":
            common = int8_settings(
                loaded,
                target=target,
                output=output,
                input_size=size,
                train_data=train_data,
                train_pairs=train_pairs,
                method=method,
                steps=steps,
                train_batch=train_batch,
                lr=lr,
                seed=seed,
                keep_float=keep_float,
                search_rounds=search_rounds,
                resume=resume,
            )
            int8 = target_int8(common, target, settings)
        pixels = resolve_pixel_format(target, loaded.config.img_channels, io, pixel_format)
        export = ExportOptions(
            input_size=size,
            precision=precision,  # type: ignore[arg-type]
            settings=settings,
            pixel_format=pixels,
        )
        return convert_loaded(loaded, target, Path(output), export, validation=validation, int8=int8)


def quantize(
    checkpoint: PathLike | LoadedCheckpoint | None = None,
    *,
    target: str,
    train_data: PathLike,
    train_pairs: PathLike | None = None,
    output: PathLike = defaults.OUTPUT_DIR,
    input_size: int | tuple[int, int] = defaults.INPUT_SIZE,
    method: str = defaults.METHOD,
    steps: int = defaults.STEPS,
    train_batch: int = defaults.TRAIN_BATCH,
    lr: float = defaults.LR,
    seed: int = defaults.SEED,
    keep_float: Sequence[str] = (),
    search_rounds: int = defaults.SEARCH_ROUNDS,
    resume: bool = False,
    val_data: PathLike | None = None,
    val_pairs: tuple[PathLike, PathLike] | None = None,
    reference_device: str = defaults.REFERENCE_DEVICE,
    overlap: int | None = None,
    min_fidelity: float | None = None,
    max_drift: float | None = None,
    cache: bool = True,
    options: Mapping[str, Any] | None = None,
    io: str = "tensor",
    pixel_format: str | None = None,
    force: bool = False,
) -> ConvertResult:
    """An int8 artifact for ``target``: :func:`convert` with ``precision="int8"``, trained (``method="qat"``) or
    calibrated (``"ptq"``) on the images of ``train_data`` (distilled from the fp32 model, or against the
    same-named clean images of ``train_pairs``), then validated. Runs data-parallel under ``torchrun``."""
    from nafnet_edge.converters import target_class, target_names

    if target_class(target).quantizer is None:
        int8_targets = [name for name in target_names() if target_class(name).quantizer is not None]
        raise UsageError(f"{target} has no int8 quantizer; int8 targets: {', '.join(int8_targets)}")
    return convert(
        checkpoint,
        target=target,
        output=output,
        precision="int8",
        input_size=input_size,
        val_data=val_data,
        val_pairs=val_pairs,
        reference_device=reference_device,
        overlap=overlap,
        min_fidelity=min_fidelity,
        max_drift=max_drift,
        cache=cache,
        train_data=train_data,
        train_pairs=train_pairs,
        method=method,
        steps=steps,
        train_batch=train_batch,
        lr=lr,
        seed=seed,
        keep_float=keep_float,
        search_rounds=search_rounds,
        resume=resume,
        options=options,
        io=io,
        pixel_format=pixel_format,
        force=force,
    )


def validate(
    directory: PathLike,
    *,
    checkpoint: PathLike | LoadedCheckpoint | None = None,
    val_data: PathLike | None = None,
    val_pairs: tuple[PathLike, PathLike] | None = None,
    reference_device: str = defaults.REFERENCE_DEVICE,
    overlap: int | None = None,
    min_fidelity: float | None = None,
    max_drift: float | None = None,
    cache: bool = True,
    param_key: ParamKey = defaults.PARAM_KEY,
    arch: Arch | None = None,
    train_size: tuple[int, int] | None = None,
) -> ValidationResult:
    """Validate an artifact directory written by :func:`convert` again, in its runtime, against the fp32
    reference; its manifest and ``USAGE.md`` are updated.

    The reference is the one convert used: the checkpoint the manifest records (``checkpoint`` when it moved),
    loaded with the recorded class, TLC size, checkpoint entry and device unless ``arch``, ``train_size``,
    ``param_key`` or ``reference_device`` say otherwise (a note then says so). ``overlap`` None: the recorded
    overlap."""
    from nafnet_edge.atomic import output_lock
    from nafnet_edge.manifest import read_manifest

    path = Path(directory)
    if not path.is_dir():
        read_manifest(path)  # its one-line "not an artifact directory" error, before any lock file
    with output_lock(path.resolve()):  # convert's lock: a concurrent convert --force is refused
        return _validate_locked(
            path,
            checkpoint=checkpoint,
            val_data=val_data,
            val_pairs=val_pairs,
            reference_device=reference_device,
            overlap=overlap,
            min_fidelity=min_fidelity,
            max_drift=max_drift,
            cache=cache,
            param_key=param_key,
            arch=arch,
            train_size=train_size,
        )


def _validate_locked(
    directory: Path,
    *,
    checkpoint: PathLike | LoadedCheckpoint | None,
    val_data: PathLike | None,
    val_pairs: tuple[PathLike, PathLike] | None,
    reference_device: str,
    overlap: int | None,
    min_fidelity: float | None,
    max_drift: float | None,
    cache: bool,
    param_key: ParamKey,
    arch: Arch | None,
    train_size: tuple[int, int] | None,
) -> ValidationResult:
    from nafnet_edge.checkpoint import LoadedCheckpoint
    from nafnet_edge.conversion import validate_directory
    from nafnet_edge.manifest import read_manifest, source_checkpoint

    manifest = read_manifest(directory)
    tile = manifest.io.input_size
    if overlap is None:  # the overlap the artifact was validated with when it was converted
        recorded_overlap = manifest.tiling.overlap_px
        overlap = recorded_overlap if recorded_overlap < min(tile) else defaults.VALIDATION_OVERLAP_PX
    if overlap >= min(tile):
        raise UsageError(f"--overlap {overlap} must be smaller than the artifact's {tile[0]}x{tile[1]} tile")
    resolved = reference_defaults(
        manifest, arch=arch, train_size=train_size, param_key=param_key, reference_device=reference_device
    )
    if isinstance(checkpoint, LoadedCheckpoint):
        loaded = checkpoint
    else:
        path = source_checkpoint(manifest, checkpoint)
        loaded = load(path, param_key=resolved["param_key"], arch=resolved["arch"], train_size=resolved["train_size"])
    settings = validation_settings(
        channels=loaded.config.img_channels,
        scale=loaded.config.up_scale,
        views=loaded.config.views,
        val_data=val_data,
        val_pairs=val_pairs,
        reference_device=resolved["reference_device"],
        overlap=overlap,
        min_fidelity=min_fidelity,
        max_drift=max_drift,
        cache=cache,
    )
    manifest, report = validate_directory(directory, loaded, settings)
    return ValidationResult(directory, manifest, report, report.passed)


def reference_defaults(
    manifest: Manifest,
    *,
    arch: str | None = None,
    train_size: tuple[int, int] | None = None,
    param_key: str = defaults.PARAM_KEY,
    reference_device: str = defaults.REFERENCE_DEVICE,
) -> dict[str, Any]:
    """The reference settings to validate with: the class, TLC training size, checkpoint entry and device the
    manifest records fill in what is not given (None, or "auto"). A value given that differs from the recorded
    one wins, and a note says so. Returns ``arch``, ``train_size``, ``param_key`` and ``reference_device``."""
    import torch

    reference = manifest.reference
    recorded: dict[str, Any] = {
        "arch": reference.arch,
        "train_size": reference.train_size,
        "param_key": reference.param_key,
        "device": reference.device,
    }
    given = {
        "arch": arch,
        "train_size": train_size,
        "param_key": None if param_key == "auto" else param_key,
        "device": None if reference_device == "auto" else reference_device,
    }
    flags = {"arch": "--arch", "train_size": "--train-size", "param_key": "--param-key", "device": "--reference-device"}

    def shown(value: Any) -> str:
        return f"{value[0]}x{value[1]}" if isinstance(value, tuple) else str(value)

    for key, flag in flags.items():
        if given[key] is not None and recorded[key] is not None and given[key] != recorded[key]:
            progress.note(
                f"{flag} {shown(given[key])} differs from the manifest's reference ({shown(recorded[key])}); "
                f"validating with {flag} {shown(given[key])}"
            )
    arch = arch or recorded["arch"]
    if train_size is None and arch in LOCAL_ARCHS:
        train_size = recorded["train_size"]
    if given["param_key"] is None and recorded["param_key"] is not None:
        param_key = recorded["param_key"]
    if given["device"] is None and recorded["device"] is not None:
        if recorded["device"] == "cuda" and not torch.cuda.is_available():
            progress.note("the manifest's reference ran on cuda; no CUDA device here, so it runs on cpu")
        else:
            reference_device = recorded["device"]
    return {"arch": arch, "train_size": train_size, "param_key": param_key, "reference_device": reference_device}


# --- bench and report -------------------------------------------------------------------------------------------


def baseline_loader(
    checkpoint: PathLike | LoadedCheckpoint | None = None,
) -> Callable[[Manifest], torch.nn.Module | None]:
    """Loads the source model of a manifest for the PyTorch baseline (``checkpoint`` when given, else the one the
    manifest records); the loader returns None when that file cannot be found."""

    def load_source(manifest: Manifest) -> torch.nn.Module | None:
        from nafnet_edge.checkpoint import LoadedCheckpoint
        from nafnet_edge.manifest import source_checkpoint

        if isinstance(checkpoint, LoadedCheckpoint):
            return checkpoint.model
        try:
            path = source_checkpoint(manifest, checkpoint)
        except UsageError:  # the recorded file is gone: no baseline
            return None
        config = manifest.source.config
        return load(path, arch=config["arch"], train_size=tuple(config["train_size"])).model

    return load_source


def check_frame_memory(frame: tuple[int, int]) -> None:
    """Refuse (``UsageError``) a full frame whose buffers do not fit in this machine's memory, naming the largest
    that does."""
    import torch

    from nafnet_edge.inference import available_memory_bytes

    available = available_memory_bytes(torch.device("cpu"))
    needed = frame[0] * frame[1] * FRAME_BYTES_PER_PIXEL
    if available is not None and needed > available:
        height = int(math.sqrt(available / FRAME_BYTES_PER_PIXEL * 3 / 4))  # the largest 4:3 frame that fits
        raise UsageError(
            f"--frame {frame[0]}x{frame[1]} needs about {needed / 1e9:.1f} GB for the frame, {available / 1e9:.1f} GB "
            f"are available; use --frame {height}x{height * 4 // 3} or smaller"
        )


def bench_hints(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The targets' runtime options for ``bench`` by destination (``SessionSettings.hints``), checked: each
    artifact's target reads its own and takes its option's default for the others."""
    from nafnet_edge.converters import all_options

    hints = dict(options or {})
    known = {option.dest for _, option in all_options() if "bench" in option.commands}
    unknown = sorted(set(hints) - known)
    if unknown:
        raise UsageError(
            f"{', '.join(map(repr, unknown))}: not a runtime option of any target "
            f"(bench options: {', '.join(sorted(known)) or 'none'})"
        )
    return hints


def bench(
    *directories: PathLike,
    runs: int = defaults.BENCH_RUNS,
    time: float | None = None,
    warmup: int = defaults.BENCH_WARMUP,
    threads: int | None = None,
    profile: bool = True,
    top: int = defaults.BENCH_TOP,
    frame: tuple[int, int] | None = None,
    overlap: int = defaults.BENCH_OVERLAP_PX,
    baseline: bool = True,
    checkpoint: PathLike | LoadedCheckpoint | None = None,
    save: bool = False,
    options: Mapping[str, Any] | None = None,
) -> BenchReport:
    """Time artifacts in their runtimes on this machine: each of ``directories`` is an artifact directory or a
    folder holding some (found at any depth). ``runs`` timed runs after ``warmup`` untimed ones, or runs for
    ``time`` seconds when given; ``frame`` (height, width) also runs one full frame through the artifact's tile
    with ``overlap``. ``baseline`` adds the source model in PyTorch fp32 (``checkpoint`` when the recorded file
    moved). ``save`` writes ``bench.json`` into each artifact directory. ``options``: the targets' runtime
    options by name (``{"compute_units": "CPU_ONLY"}`` for Core ML)."""
    from nafnet_edge.benchmark import BenchSettings, artifact_directories, bench_artifacts
    from nafnet_edge.benchmark import save as save_bench

    if not directories:
        raise UsageError("bench needs at least one artifact directory")
    if runs < 1 or warmup < 0 or top < 1 or overlap < 0 or (threads is not None and threads < 1):
        raise UsageError("--runs, --top and --threads take 1 or more, --warmup and --overlap 0 or more")
    if time is not None and not (math.isfinite(time) and time > 0):
        raise UsageError(f"--time {time}: give a positive number of seconds")
    if frame is not None:
        check_frame_memory(frame)
    settings = BenchSettings(
        iters=runs,
        warmup=warmup,
        threads=threads,
        profile=profile,
        top=top,
        frame=frame,
        overlap_px=overlap,
        hints=bench_hints(options),
        time_s=time,
    )
    loader = baseline_loader(checkpoint) if baseline else None
    measured = bench_artifacts(artifact_directories(directories), settings, baseline_model=loader)
    if save:
        save_bench(measured)
    return measured


def report(
    directory: PathLike,
    *,
    output: PathLike | None = None,
    images: int = defaults.REPORT_IMAGES,
    val_data: PathLike | None = None,
    checkpoint: PathLike | None = None,
) -> Path:
    """Write one self-contained HTML page for a convert output folder (or one artifact directory) to ``output``
    (default ``directory/report.html``) and return its path: artifacts side by side with their size, fidelity,
    drift and latency (from ``bench.json``), and crops of ``images`` validation images (0: none)."""
    from nafnet_edge.reporting import write_report

    if images < 0:
        raise UsageError("--images takes 0 or more")
    return write_report(directory, output, images=images, val_data=val_data, checkpoint=checkpoint)
