"""``validate --arm64``: an artifact validated on x86 as ``validate`` does, then in its own runtime on emulated
ARM64 CPUs, scored by the same code on the same tiles against the same fp32 references.

Each tile also runs in the x86 runtime, so the record says how far the ARM64 kernels' output is from the x86
kernels' (``vs_x86_max_abs``): XNNPACK picks other microkernels on ARM64 (NEON, dot-product and i8mm int8
kernels, another requantization), so an int8 program's outputs may differ by a few quantization steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nafnet_edge import defaults, progress
from nafnet_edge.arm64.emulator import DEFAULT_CPUS, check_cpus, emulated_runtime
from nafnet_edge.arm64.sysroot import Sysroot, require_sysroot
from nafnet_edge.errors import UsageError
from nafnet_edge.manifest import Arm64Validation, Manifest, artifact_dirname, read_manifest, write_manifest

if TYPE_CHECKING:
    from nafnet_edge.api import PathLike, ValidationResult
    from nafnet_edge.checkpoint import LoadedCheckpoint, ParamKey
    from nafnet_edge.conversion import ValidationSettings
    from nafnet_edge.model import Arch

# target -> the aarch64 wheel its runner needs
TARGETS = {"executorch": "executorch", "litert": "ai-edge-litert"}


@dataclass
class Arm64Result:
    """``validate --arm64``: the x86 validation and one record per emulated CPU model."""

    x86: ValidationResult
    arm64: dict[str, Arm64Validation]

    @property
    def passed(self) -> bool:
        return self.x86.passed and all(record.passed for record in self.arm64.values())

    @property
    def manifest(self) -> Manifest:
        return self.x86.manifest


def validate(
    directory: PathLike,
    *,
    cpus: Sequence[str] = DEFAULT_CPUS,
    sysroot_dir: PathLike | None = None,
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
) -> Arm64Result:
    """Validate the artifact in ``directory`` on x86 (:func:`nafnet_edge.api.validate`) and on each emulated ARM64
    CPU in ``cpus``; the manifest gets the x86 ``validation`` and one ``arm64`` record per CPU, written when all
    have run. A missing sysroot is refused before anything runs or is written."""
    from nafnet_edge import api
    from nafnet_edge.atomic import output_lock
    from nafnet_edge.checkpoint import LoadedCheckpoint
    from nafnet_edge.manifest import source_checkpoint

    path = Path(directory)
    manifest = read_manifest(path)
    if manifest.target not in TARGETS:
        raise UsageError(
            f"--arm64 runs {' and '.join(TARGETS)} artifacts (the runtimes Android apps ship), not {manifest.target}"
        )
    sysroot = require_sysroot(Path(sysroot_dir) if sysroot_dir is not None else None, needs=TARGETS[manifest.target])
    cpus = list(check_cpus(sysroot, cpus))
    with output_lock(path.resolve()):
        resolved = api.reference_defaults(
            manifest, arch=arch, train_size=train_size, param_key=param_key, reference_device=reference_device
        )
        if isinstance(checkpoint, LoadedCheckpoint):
            loaded = checkpoint
        else:
            loaded = api.load(
                source_checkpoint(manifest, checkpoint),
                param_key=resolved["param_key"],
                arch=resolved["arch"],
                train_size=resolved["train_size"],
            )
        x86 = api.validate(
            path,
            checkpoint=loaded,
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
        manifest = read_manifest(path)
        settings = api.validation_settings(
            channels=loaded.config.img_channels,
            val_data=val_data,
            val_pairs=val_pairs,
            reference_device=resolved["reference_device"],
            overlap=manifest.tiling.overlap_px,
            min_fidelity=min_fidelity,
            max_drift=max_drift,
            cache=cache,
        )
        records = {cpu: validate_on(path, manifest, loaded, settings, sysroot, cpu) for cpu in cpus}
        manifest.arm64 = {**manifest.arm64, **records}
        write_manifest(path, manifest)
    x86.manifest = manifest
    return Arm64Result(x86, records)


def validate_on(
    directory: Path,
    manifest: Manifest,
    loaded: LoadedCheckpoint,
    settings: ValidationSettings,
    sysroot: Sysroot,
    cpu: str,
) -> Arm64Validation:
    """The artifact in ``directory`` validated in its runtime on the emulated ``cpu``, each tile compared with the
    x86 runtime's output for it too."""
    from nafnet_edge.conversion import run_validation
    from nafnet_edge.converters import get_target
    from nafnet_edge.converters.base import ExportOptions, Session, pixel_session

    converter = get_target(manifest.target)
    label = f"{artifact_dirname(manifest.target, manifest.precision, manifest.io.kind)} on arm64 {cpu}"
    progress.phase(f"{label}: validate in its runtime on the emulated CPU")
    options = ExportOptions(
        input_size=manifest.io.input_size,
        precision=manifest.precision,  # type: ignore[arg-type]
        pixel_format=manifest.io.pixel_format,
    )
    artifact = converter.artifact_path(directory)
    with progress.backend_output():
        x86 = converter.load_runner(directory, export=manifest.export)
    fp16 = x86.info.get("compute") == "fp16"  # LiteRT float16 weights: FP16 arithmetic on both sides
    with emulated_runtime(sysroot, cpu, manifest.target, artifact, fp16=fp16) as emulated:
        arm = Session(emulated.run, manifest.target, {})
        if options.pixel_format is not None:
            arm = pixel_session(arm, options.pixel_format)
        differences: list[float] = []
        differing = [0, 0]  # output samples not bit-identical to x86's, of all

        def run(x: np.ndarray) -> np.ndarray:
            y = np.asarray(arm.run(x), np.float32)
            with np.errstate(invalid="ignore"):
                difference = np.abs(y - np.asarray(x86.run(x), np.float32))
            differences.append(float(np.max(difference)))
            differing[0] += int(np.count_nonzero(difference != 0))
            differing[1] += difference.size
            return y

        with progress.backend_output(), progress.untimed():  # emulation times say nothing about a device
            report = run_validation(loaded, run, options, settings, label=label)
        cpu_info = emulated.cpu
        return Arm64Validation(
            validation=report.to_summary(),
            cpu=cpu,
            hwcaps=list(cpu_info.features),
            midr=f"0x{cpu_info.midr:08x}" if cpu_info.midr else None,
            cpu_features=emulated.cpu_features,
            qemu=sysroot.qemu,
            runner=emulated.runner,
            runtime=_runtime(sysroot, manifest.target) | ({"compute": emulated.compute} if emulated.compute else {}),
            vs_x86_max_abs=float(np.max(differences)) if differences else None,  # NaN when either made one
            vs_x86_differing_share=differing[0] / differing[1] if differing[1] else None,
            tiles=emulated.calls,
        )


def _runtime(sysroot: Sysroot, target: str) -> dict[str, Any]:
    distribution = TARGETS[target]
    runtime: dict[str, Any] = {distribution: sysroot.versions.get(distribution), "wheel": "aarch64 (PyPI)"}
    if target == "litert":
        runtime["numpy"] = sysroot.versions.get("numpy")
        runtime["python"] = f"{sysroot.python.name} (Debian arm64)"
    with contextlib.suppress(metadata.PackageNotFoundError):
        runtime["x86"] = metadata.version(distribution)
    return runtime
