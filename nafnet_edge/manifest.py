"""The records of an artifact directory, typed: ``manifest.json`` (what ``convert`` made) and ``bench.json``
(how fast it ran). One reader and one writer for each, so every stage reads the same objects.

Every value a command reads is checked here for its type and range, so a hand-edited or damaged manifest is
refused in one line (:class:`ManifestError`, exit code 5) instead of failing somewhere later, and the files it
names must stay inside the directory. No torch, no runtime: the report and the registry import this module.

Manifest versions: version 2 describes the model's tensors in an ``io`` section (``inputs``, ``outputs``,
``scale``); version 1 files, with top-level ``input`` and ``output`` sections, are still read (and written back
as version 2 when a command rewrites them). Unknown top-level keys are kept (:attr:`Manifest.extra`) and written
back; unknown keys inside the typed sections (``io``, ``tiling``, ``reference``, ``source``, ``validation``,
``arm64``) are ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeGuard

from nafnet_edge.archs import ARCHS, LOCAL_ARCHS
from nafnet_edge.artifact_files import MAX_PATH_CHARS, MAX_RECORD_BYTES, artifact_file, name_problem
from nafnet_edge.errors import ArtifactError, BadInputError

MANIFEST_FILE = "manifest.json"
BENCH_FILE = "bench.json"
USAGE_FILE = "USAGE.md"
MANIFEST_VERSION = 2  # version 1 files (top-level "input"/"output") are still read
BENCH_VERSION = 2  # version 1 files kept the operator profile under "profile.ops"; still read

PRECISIONS = ("fp32", "fp16", "int8")
# of a tensor (model channels) or of pixels; "RGB+RGB": a stereo pair on the channel axis, left view first (NAFSSR)
CHANNEL_KINDS = ("RGB", "gray", "RGBA", "BGR", "BGRA", "RGB+RGB", "gray+gray")
DEVICES = (None, "cpu", "cuda")
# The checkpoint entries a reference may name: nafnet_edge.checkpoint.WRAPPER_KEYS (not imported: torch).
PARAM_KEYS = ("params", "params_ema", "state_dict", "model_state_dict", "model", "net", "network")
MAX_CHANNELS = 6  # RGB or gray models, RGBA pixels, a stereo RGB pair
MAX_SIDE_PX = 16384  # an artifact's fixed input size (tiles); larger frames are tiled
MAX_INPUT_PIXELS = 64 << 20  # 8192 x 8192: one input tensor of 0.75 GiB in float32 RGB
MAX_SCALE = 8  # output side / input side
MAX_FILES = 64
MAX_TENSORS = 16
DEFAULT_OVERLAP_PX = 32  # tile overlap when a manifest records none (nafnet_edge.validation.DEFAULT_OVERLAP_PX)
BLEND = "raised cosine, weights sum to one"  # what manifests written before the window formula say
# The blend window exactly (nafnet_edge.tiling.axis_weights), for an app that tiles frames itself.
WINDOW = (
    "separable: a tile's weight at (i, j) is wy(i) * wx(j). Along an axis, a tile's raw weight is 1, except over "
    "an overlap of r px with the previous tile: 0 for the first r//4 px, then 0.5 - 0.5*cos(pi*(k + 0.5)/n) for "
    "k = 0..n-1 with n = r - 2*(r//4), then 1; mirrored towards the next tile (the smaller of the two where both "
    "apply). Each raw weight is then divided by the sum of the raw weights of all tiles covering that position, "
    "so the weights sum to one everywhere"
)
PADDING = "zeros on the right and bottom: to a multiple of padding_multiple, and at least to the tile size"
OUTPUT_NOTE = "unclamped; clamp to [0, 1] before quantizing"
SECTIONS = ("tlc", "deploy", "export", "tools", "host", "runtime", "quantization", "seconds")
_KNOWN = {
    "manifest_version",
    "target",
    "precision",
    "files",
    "io",
    "input",
    "output",
    "padding_multiple",
    "tiling",
    "reference",
    "source",
    "validation",
    "arm64",
    "created",
    *SECTIONS,
}


class ManifestError(ArtifactError):
    """A ``manifest.json`` or ``bench.json`` that cannot be used: damaged, hand-edited, or from elsewhere. The
    message names the file and what is wrong, and says to convert (or benchmark) again."""


class _Problem(Exception):
    """What makes a manifest unusable, in words (turned into a ManifestError naming the file)."""


# --- tensors -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor of the artifact's model."""

    name: str
    shape: tuple[int, ...]
    layout: str = "NCHW"
    dtype: str = "float32"
    channels: str = "RGB"  # CHANNEL_KINDS: the model's channels, or the pixel format of uint8 NHWC pixels
    value_range: tuple[float, float] | None = (0.0, 1.0)  # None: not bounded (see ``note``)
    note: str = ""  # e.g. "unclamped; clamp to [0, 1] before quantizing"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "shape": list(self.shape),
            "layout": self.layout,
            "dtype": self.dtype,
            "channels": self.channels,
            "range": list(self.value_range) if self.value_range is not None else None,
        }
        if self.note:
            out["note"] = self.note
        return out

    def describe(self) -> str:
        """One line for people and artifact metadata: ``image: float32 NCHW [1,3,256,256] RGB in [0, 1]``."""
        bounds = f" in [{self.value_range[0]:g}, {self.value_range[1]:g}]" if self.value_range else ""
        shape = ",".join(str(d) for d in self.shape)
        return f"{self.name}: {self.dtype} {self.layout} [{shape}] {self.channels}{bounds}" + (
            f", {self.note}" if self.note else ""
        )

    @classmethod
    def from_dict(cls, data: Any, where: str) -> TensorSpec:
        if not isinstance(data, dict):
            raise _Problem(f"{where!r} is a JSON {_kind(data)}, not an object")
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise _Problem(f"'{where}.name' is not a name")
        shape = data.get("shape")
        if not (isinstance(shape, list) and len(shape) == 4 and all(_is_int(v) and v > 0 for v in shape)):
            raise _Problem(f"'{where}.shape' is not four positive integers")
        for key in ("layout", "dtype", "note"):
            if key in data and not isinstance(data[key], str):
                raise _Problem(f"'{where}.{key}' is a JSON {_kind(data[key])}")
        kind = (data.get("dtype", "float32"), data.get("layout", "NCHW"))
        if kind not in (("float32", "NCHW"), ("uint8", "NHWC")):
            raise _Problem(f"'{where}' is neither a float32 NCHW tensor nor uint8 NHWC pixels")
        channels = data.get("channels", _channel_kind(shape[1] if kind[1] == "NCHW" else shape[3]))
        if channels not in CHANNEL_KINDS:
            raise _Problem(f"'{where}.channels' {_short(channels)} is not one of {', '.join(CHANNEL_KINDS)}")
        value_range: tuple[float, float] | None = None
        note = data.get("note", "")
        bounds = data.get("range")
        if isinstance(bounds, str):  # version 1 outputs: "unclamped; clamp to [0, 1] before quantizing"
            note = note or bounds
        elif bounds is not None:
            if not (isinstance(bounds, list) and len(bounds) == 2 and all(_is_number(v) for v in bounds)):
                raise _Problem(f"'{where}.range' is not two numbers")
            if not bounds[0] < bounds[1]:
                raise _Problem(f"'{where}.range' {bounds} is empty")
            value_range = (float(bounds[0]), float(bounds[1]))
        return cls(name, tuple(shape), kind[1], kind[0], channels, value_range, note)

    @property
    def is_pixels(self) -> bool:
        """uint8 NHWC pixels (image I/O) rather than a float32 NCHW tensor."""
        return self.dtype == "uint8"

    @property
    def size(self) -> tuple[int, int]:
        """Height and width."""
        return (self.shape[1], self.shape[2]) if self.layout == "NHWC" else (self.shape[2], self.shape[3])

    @property
    def model_channels(self) -> int:
        """The model's channels behind this tensor (pixels: 3 for RGB/BGR(A), 1 for gray)."""
        if self.layout == "NHWC":
            return 1 if self.channels == "gray" else 3
        return self.shape[1]


@dataclass(frozen=True)
class IOSpec:
    """The tensors of the artifact's model: what a caller feeds and gets back, and the output's scale."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    scale: int = 1  # output side / input side

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]

    @property
    def output(self) -> TensorSpec:
        return self.outputs[0]

    @property
    def channels(self) -> int:
        """The model's channels (3 for RGB or BGR(A) pixels)."""
        return self.input.model_channels

    @property
    def input_size(self) -> tuple[int, int]:
        return self.input.size

    @property
    def kind(self) -> str:
        """``image`` (uint8 pixels in and out, ``--io image``) or ``tensor`` (float32 NCHW)."""
        return "image" if self.input.is_pixels else "tensor"

    @property
    def pixel_format(self) -> str | None:
        """The pixel format of an image-I/O artifact (``rgba``, ``bgr``, ``gray``...); None for tensor I/O."""
        return self.input.channels.lower() if self.input.is_pixels else None

    @classmethod
    def image(cls, channels: int, size: tuple[int, int], *, scale: int = 1, pixel_format: str | None = None) -> IOSpec:
        """The image-restoration contract: one input ``image`` (NCHW float32 in [0, 1], batch 1) and one output
        ``restored`` with the same channels, ``scale`` times the size, not clamped. With ``pixel_format`` (image
        I/O): uint8 NHWC pixels in that format in and out, clamped and rounded inside (``nafnet_edge.pixels``)."""
        from nafnet_edge.converters.base import INPUT_NAME, OUTPUT_NAME

        h, w = size
        if pixel_format is not None:
            from nafnet_edge.pixels import IMAGE_IO_NOTE, has_alpha, pixel_channels

            depth = pixel_channels(pixel_format)
            kind = pixel_format.upper() if pixel_format != "gray" else "gray"
            note = "alpha ignored" if has_alpha(pixel_format) else ""
            return cls(
                inputs=(TensorSpec(INPUT_NAME, (1, h, w, depth), "NHWC", "uint8", kind, (0.0, 255.0), note),),
                outputs=(
                    TensorSpec(
                        OUTPUT_NAME,
                        (1, h * scale, w * scale, depth),
                        "NHWC",
                        "uint8",
                        kind,
                        (0.0, 255.0),
                        IMAGE_IO_NOTE + ("; alpha 255" if note else ""),
                    ),
                ),
                scale=scale,
            )
        kind = _channel_kind(channels)
        return cls(
            inputs=(TensorSpec(INPUT_NAME, (1, channels, h, w), channels=kind),),
            outputs=(
                TensorSpec(
                    OUTPUT_NAME, (1, channels, h * scale, w * scale), channels=kind, value_range=None, note=OUTPUT_NOTE
                ),
            ),
            scale=scale,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "scale": self.scale,
        }

    @classmethod
    def from_dict(cls, data: Any) -> IOSpec:
        if not isinstance(data, dict):
            raise _Problem(f"'io' is a JSON {_kind(data)}, not an object")
        scale = data.get("scale", 1)
        if not _is_int(scale) or not 1 <= scale <= MAX_SCALE:
            raise _Problem(f"'io.scale' {_short(scale)} is not an integer from 1 to {MAX_SCALE}")
        specs: dict[str, tuple[TensorSpec, ...]] = {}
        for key in ("inputs", "outputs"):
            items = data.get(key)
            if not isinstance(items, list) or not 1 <= len(items) <= MAX_TENSORS:
                raise _Problem(f"'io.{key}' must list 1 to {MAX_TENSORS} tensors")
            specs[key] = tuple(TensorSpec.from_dict(item, f"io.{key}[{i}]") for i, item in enumerate(items))
        io = cls(specs["inputs"], specs["outputs"], scale)
        _check_shapes(io, "io.inputs[0].shape", "io.outputs[0].shape")
        return io

    @classmethod
    def from_v1(cls, data: dict[str, Any]) -> IOSpec:
        """The ``io`` of a version 1 manifest (top-level ``input`` and ``output``)."""
        if not isinstance(data.get("input"), dict):
            raise _Problem("no 'input' dict")
        first = TensorSpec.from_dict(data["input"], "input")
        if "output" in data:
            second = TensorSpec.from_dict(data["output"], "output")
        else:
            second = IOSpec.image(first.shape[1], (first.shape[2], first.shape[3])).output
        io = cls((first,), (second,), 1)
        _check_shapes(io, "input.shape", "output.shape")
        return io


def _check_shapes(io: IOSpec, input_key: str, output_key: str) -> None:
    shape = list(io.input.shape)
    n = shape[0]
    c = shape[3] if io.input.layout == "NHWC" else shape[1]
    h, w = io.input.size
    if io.input.layout != io.output.layout or io.input.channels != io.output.channels:
        raise _Problem(f"'{output_key}' is not the same kind of tensor as '{input_key}'")
    if n != 1 or c > MAX_CHANNELS or max(h, w) > MAX_SIDE_PX or h * w > MAX_INPUT_PIXELS:
        raise _Problem(
            f"'{input_key}' {shape} is not one nafnet-edge exports: batch 1, 1 to {MAX_CHANNELS} channels, height "
            f"and width at most {MAX_SIDE_PX} and {MAX_INPUT_PIXELS >> 20} megapixels together"
        )
    expected = [1, h * io.scale, w * io.scale, c] if io.input.layout == "NHWC" else [1, c, h * io.scale, w * io.scale]
    if list(io.output.shape) != expected:
        raise _Problem(f"'{output_key}' {list(io.output.shape)} is not {expected} (the input's, times the scale)")


def _channel_kind(channels: int) -> str:
    return {3: "RGB", 4: "RGBA", 6: "RGB+RGB", 2: "gray+gray"}.get(channels, "gray")


# --- sections ----------------------------------------------------------------------------------------------------


@dataclass
class Source:
    """The checkpoint the artifact was converted from."""

    checkpoint: str
    sha256: str
    config: dict[str, Any]
    path: str | None = None  # absolute path at conversion time; None for the embedded default
    embedded_default: bool = False
    release: str | None = None
    arch_source: str | None = None
    params: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "path": self.path,
            "embedded_default": self.embedded_default,
            "sha256": self.sha256,
            "release": self.release,
            "arch_source": self.arch_source,
            "config": self.config,
            "params": self.params,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Source:
        if not isinstance(data, dict):
            raise _Problem("no 'source' dict")
        if not isinstance(data.get("config"), dict) or not isinstance(data.get("sha256"), str):
            raise _Problem("'source' lacks the checkpoint's config and sha256")
        for key, kinds in (
            ("path", (str, type(None))),
            ("checkpoint", (str,)),
            ("embedded_default", (bool,)),
            ("release", (str, type(None))),
            ("arch_source", (str, type(None))),
        ):
            if key in data and not isinstance(data[key], kinds):
                raise _Problem(f"'source.{key}' is a JSON {_kind(data[key])}")
        params = data.get("params")
        if params is not None and not (_is_int(params) and params >= 0):
            raise _Problem(f"'source.params' is a JSON {_kind(params)}")
        return cls(
            checkpoint=data.get("checkpoint", "checkpoint"),
            sha256=data["sha256"],
            config=data["config"],
            path=data.get("path"),
            embedded_default=data.get("embedded_default", False),
            release=data.get("release"),
            arch_source=data.get("arch_source"),
            params=params,
        )


@dataclass
class Reference:
    """How the fp32 reference the artifact is validated against was loaded (``validate`` loads it so again)."""

    arch: str | None  # one of nafnet_edge.archs.ARCHS; None when the manifest cannot tell
    train_size: tuple[int, int] | None  # TLC's training size (local archs only)
    param_key: str | None  # the checkpoint entry the weights came from
    device: str | None  # "cpu" | "cuda"
    precision: str = "fp32"

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "train_size": list(self.train_size) if self.train_size is not None else None,
            "param_key": self.param_key,
            "device": self.device,
            "precision": self.precision,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Reference:
        problem = None
        if not isinstance(data, dict):
            problem = "not an object"
        elif data.get("arch") not in ARCHS:
            problem = f"arch {_short(data.get('arch'))}"
        elif data.get("train_size") is not None and not _is_size(data["train_size"]):
            problem = f"train_size {_short(data['train_size'])}"
        elif data.get("param_key") is not None and data["param_key"] not in PARAM_KEYS:
            problem = f"param_key {_short(data['param_key'])}"
        elif data.get("device") not in DEVICES:
            problem = f"device {_short(data.get('device'))}"
        elif data.get("precision", "fp32") != "fp32":
            problem = f"precision {_short(data.get('precision'))}"
        if problem:
            raise ManifestError(f"{where} has a damaged 'reference' section ({problem}); convert again")
        size = data.get("train_size")
        return cls(
            data["arch"], (size[0], size[1]) if size is not None else None, data.get("param_key"), data.get("device")
        )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Reference:
        """What a manifest written before the ``reference`` section existed implies: its source config's class
        and TLC training size."""
        arch, size = config.get("arch"), config.get("train_size")
        train_size = (size[0], size[1]) if arch in LOCAL_ARCHS and _is_size(size) else None
        return cls(arch if arch in ARCHS else None, train_size, None, None)


@dataclass
class Tiling:
    """How frames larger than the artifact's input size are cut and blended back."""

    tile: tuple[int, int]
    overlap_px: int
    blend: str = WINDOW
    align_px: int = 16  # tile starts are multiples of this (the padding multiple: the U-Net's stride grid)
    padding: str = PADDING

    def to_dict(self) -> dict[str, Any]:
        return {
            "tile": list(self.tile),
            "overlap_px": self.overlap_px,
            "align_px": self.align_px,
            "padding": self.padding,
            "blend": self.blend,
        }

    @classmethod
    def from_dict(cls, data: Any, size: tuple[int, int], multiple: int = 16) -> Tiling:
        if data is None:
            return cls(size, DEFAULT_OVERLAP_PX, align_px=multiple)
        if not isinstance(data, dict):
            raise _Problem(f"'tiling' is a JSON {_kind(data)}, not an object")
        tile = data.get("tile", list(size))
        if not _is_size(tile):
            raise _Problem("'tiling.tile' is not two positive integers")
        overlap = data.get("overlap_px", DEFAULT_OVERLAP_PX)
        if not _is_int(overlap) or not 0 <= overlap < MAX_SIDE_PX:
            raise _Problem(f"'tiling.overlap_px' {_short(overlap)} is not a number of pixels")
        blend = data.get("blend", WINDOW)
        if not isinstance(blend, str):
            raise _Problem(f"'tiling.blend' is a JSON {_kind(blend)}")
        if blend == BLEND:  # written before the formula was recorded; the window itself has not changed
            blend = WINDOW
        align = data.get("align_px", multiple)  # the tiler has always aligned tile starts to the padding multiple
        if not _is_int(align) or not 1 <= align <= MAX_SIDE_PX:
            raise _Problem(f"'tiling.align_px' {_short(align)} is not a positive number of pixels")
        padding = data.get("padding", PADDING)
        if not isinstance(padding, str):
            raise _Problem(f"'tiling.padding' is a JSON {_kind(padding)}")
        return cls((tile[0], tile[1]), overlap, blend, align, padding)


@dataclass
class ValidationSummary:
    """The artifact's validation in its runtime against the fp32 reference (``nafnet_edge.validation``)."""

    passed: bool
    failures: list[str]
    budgets: dict[str, float | None]
    reference: str
    reference_settings: dict[str, Any] | None
    data: str
    summary: dict[str, Any]
    per_image: list[dict[str, Any]]

    @property
    def fidelity_db_min(self) -> float | None:
        return _number(self.summary.get("fidelity_db_min"))

    @property
    def drift_db_mean(self) -> float | None:
        return _number(self.summary.get("drift_db_mean"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "failures": list(self.failures),
            "budgets": dict(self.budgets),
            "reference": self.reference,
            "reference_settings": self.reference_settings,
            "data": self.data,
            "summary": self.summary,
            "per_image": self.per_image,
        }

    @classmethod
    def from_dict(cls, data: Any) -> ValidationSummary:
        if not isinstance(data, dict):
            raise _Problem(f"'validation' is a JSON {_kind(data)}, not an object")
        if not isinstance(data.get("passed"), bool):
            raise _Problem("'validation.passed' is not true or false")
        failures = data.get("failures", [])
        if not isinstance(failures, list) or not all(isinstance(f, str) for f in failures):
            raise _Problem("'validation.failures' is not a list of strings")
        budgets = data.get("budgets", {})
        if not isinstance(budgets, dict) or not all(v is None or _is_number(v) for v in budgets.values()):
            raise _Problem("'validation.budgets' is not an object of numbers")
        for key in ("reference", "data"):
            if not isinstance(data.get(key, ""), str):
                raise _Problem(f"'validation.{key}' is a JSON {_kind(data[key])}")
        settings = data.get("reference_settings")
        if settings is not None and not isinstance(settings, dict):
            raise _Problem(f"'validation.reference_settings' is a JSON {_kind(settings)}")
        summary = data.get("summary", {})
        if not isinstance(summary, dict):
            raise _Problem(f"'validation.summary' is a JSON {_kind(summary)}, not an object")
        per_image = data.get("per_image", [])
        if not isinstance(per_image, list) or not all(isinstance(r, dict) for r in per_image):
            raise _Problem("'validation.per_image' is not a list of objects")
        return cls(
            passed=data["passed"],
            failures=list(failures),
            budgets=dict(budgets),
            reference=data.get("reference", ""),
            reference_settings=settings,
            data=data.get("data", ""),
            summary=summary,
            per_image=per_image,
        )


@dataclass
class Arm64Validation:
    """The artifact validated in its own runtime on one emulated ARM64 CPU (qemu user-mode emulation), scored as
    ``validation`` is (same images, tiling, reference and budgets): ``nafnet_edge.arm64``. No times: emulation
    says nothing about speed."""

    validation: ValidationSummary  # written flat: passed, failures, budgets, summary, per_image...
    cpu: str  # qemu's -cpu model
    hwcaps: list[str]  # the emulated CPU's HWCAP and HWCAP2 features, as /proc/cpuinfo names them
    midr: str | None  # its MIDR_EL1, "0x414fd0b1"
    cpu_features: dict[str, bool] | None  # what the runtime's CPU detection read (None: not available)
    qemu: str  # qemu's version
    runner: str  # "executorch C++ Module" | "ai-edge-litert interpreter"
    runtime: dict[str, Any]  # the aarch64 runtime's versions and settings
    vs_x86_max_abs: float | None  # largest |ARM64 output - x86 output| over every tile, the same inputs
    vs_x86_differing_share: float | None = None  # share of output samples not bit-identical to the x86 output
    tiles: int = 0

    @property
    def passed(self) -> bool:
        return self.validation.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.validation.to_dict(),
            "cpu": self.cpu,
            "hwcaps": list(self.hwcaps),
            "midr": self.midr,
            "cpu_features": self.cpu_features,
            "qemu": self.qemu,
            "runner": self.runner,
            "runtime": self.runtime,
            "vs_x86_max_abs": self.vs_x86_max_abs,
            "vs_x86_differing_share": self.vs_x86_differing_share,
            "tiles": self.tiles,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Arm64Validation:
        if not isinstance(data, dict):
            raise _Problem(f"'{where}' is a JSON {_kind(data)}, not an object")
        validation = ValidationSummary.from_dict(data)
        for key in ("cpu", "qemu", "runner"):
            if not isinstance(data.get(key), str):
                raise _Problem(f"'{where}.{key}' is not a string")
        hwcaps = data.get("hwcaps", [])
        if not isinstance(hwcaps, list) or not all(isinstance(h, str) for h in hwcaps):
            raise _Problem(f"'{where}.hwcaps' is not a list of strings")
        midr = data.get("midr")
        if midr is not None and not isinstance(midr, str):
            raise _Problem(f"'{where}.midr' is a JSON {_kind(midr)}")
        features = data.get("cpu_features")
        if features is not None and not (
            isinstance(features, dict) and all(isinstance(v, bool) for v in features.values())
        ):
            raise _Problem(f"'{where}.cpu_features' is not an object of true/false")
        runtime = data.get("runtime", {})
        if not isinstance(runtime, dict):
            raise _Problem(f"'{where}.runtime' is a JSON {_kind(runtime)}")
        for key in ("vs_x86_max_abs", "vs_x86_differing_share"):
            if data.get(key) is not None and not _is_number(data[key]):
                raise _Problem(f"'{where}.{key}' is a JSON {_kind(data[key])}")
        tiles = data.get("tiles", 0)
        if not (_is_int(tiles) and tiles >= 0):
            raise _Problem(f"'{where}.tiles' is not a count")
        return cls(
            validation=validation,
            cpu=data["cpu"],
            hwcaps=list(hwcaps),
            midr=midr,
            cpu_features=dict(features) if features is not None else None,
            qemu=data["qemu"],
            runner=data["runner"],
            runtime=dict(runtime),
            vs_x86_max_abs=_number(data.get("vs_x86_max_abs")),
            vs_x86_differing_share=_number(data.get("vs_x86_differing_share")),
            tiles=tiles,
        )


def _arm64_records(data: Any) -> dict[str, Arm64Validation]:
    if not isinstance(data, dict):
        raise _Problem(f"'arm64' is a JSON {_kind(data)}, not an object")
    return {str(cpu): Arm64Validation.from_dict(record, f"arm64.{cpu}") for cpu, record in data.items()}


# --- the manifest --------------------------------------------------------------------------------------------------


@dataclass
class Manifest:
    """``manifest.json``: what an artifact directory holds and how it was made, validated and is to be run."""

    target: str
    precision: str
    files: list[str]
    io: IOSpec
    padding_multiple: int
    tiling: Tiling
    tlc: dict[str, Any]
    reference: Reference
    source: Source
    deploy: dict[str, Any]
    export: dict[str, Any]
    tools: dict[str, str]
    host: dict[str, str]
    created: str
    runtime: dict[str, Any] | None = None
    validation: ValidationSummary | None = None
    quantization: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    # Validation on emulated ARM64 CPUs, by qemu -cpu model (``nafnet-edge validate --arm64``); empty: none.
    arm64: dict[str, Arm64Validation] = field(default_factory=dict)
    manifest_version: int = MANIFEST_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # unknown top-level keys, kept and written back

    @property
    def passed(self) -> bool:
        """Validation met its budget, or there was none (ARM64 validations are judged on their own)."""
        return self.validation is None or self.validation.passed

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``manifest.json`` (always the current version)."""
        out: dict[str, Any] = {
            "manifest_version": MANIFEST_VERSION,
            "target": self.target,
            "precision": self.precision,
            "files": list(self.files),
            "io": self.io.to_dict(),
            "padding_multiple": self.padding_multiple,
            "tiling": self.tiling.to_dict(),
            "tlc": self.tlc,
            "reference": self.reference.to_dict(),
            "source": self.source.to_dict(),
            "deploy": self.deploy,
            "export": self.export,
            "tools": self.tools,
            "host": self.host,
            "created": self.created,
        }
        if self.runtime is not None:
            out["runtime"] = self.runtime
        if self.validation is not None:
            out["validation"] = self.validation.to_dict()
        if self.arm64:
            out["arm64"] = {cpu: record.to_dict() for cpu, record in self.arm64.items()}
        if self.quantization is not None:
            out["quantization"] = self.quantization
        if self.seconds:
            out["seconds"] = self.seconds
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_dict(cls, data: Any, *, where: str = MANIFEST_FILE) -> Manifest:
        """The manifest ``data`` (parsed JSON) describes; a ManifestError naming ``where`` when it is unusable."""
        try:
            return cls._from_dict(data, where)
        except _Problem as e:
            raise ManifestError(
                f"{where} is not a manifest written by nafnet-edge convert ({e}); convert again"
            ) from None

    @classmethod
    def _from_dict(cls, data: Any, where: str) -> Manifest:
        if not isinstance(data, dict):
            raise _Problem(f"a JSON {_kind(data)}, not an object")
        version = data.get("manifest_version", 1)
        if not _is_int(version) or not 1 <= version <= MANIFEST_VERSION:
            raise _Problem(
                f"manifest version {_short(version)}; this nafnet-edge reads 1 to {MANIFEST_VERSION} (upgrade it)"
            )
        for key, kind in (("target", str), ("precision", str), ("files", list), ("source", dict)):
            if not isinstance(data.get(key), kind):
                raise _Problem(f"no {key!r} {kind.__name__}")
        names = _target_names()
        if data["target"] not in names:
            raise _Problem(f"unknown target {_short(data['target'])}; this nafnet-edge knows {', '.join(names)}")
        if data["precision"] not in PRECISIONS:
            raise _Problem(f"unknown precision {_short(data['precision'])}; one of {', '.join(PRECISIONS)}")
        files = _files(data["files"])
        source = Source.from_dict(data["source"])
        if "io" not in data and version >= 2:
            raise _Problem("no 'io' dict")
        io = IOSpec.from_dict(data["io"]) if "io" in data else IOSpec.from_v1(data)
        for key in SECTIONS:
            if key in data and data[key] is not None and not isinstance(data[key], dict):
                raise _Problem(f"{key!r} is a JSON {_kind(data[key])}, not an object")
        multiple = data.get("padding_multiple", _padding_multiple(source.config))
        if not _is_int(multiple) or not 1 <= multiple <= MAX_SIDE_PX:
            raise _Problem(f"'padding_multiple' {_short(multiple)} is not a positive integer")
        created = data.get("created", "")
        if not isinstance(created, str):
            raise _Problem(f"'created' is a JSON {_kind(created)}")
        seconds = data.get("seconds") or {}
        if not all(_is_number(v) for v in seconds.values()):
            raise _Problem("'seconds' is not an object of numbers")
        for key in ("tools", "host"):
            if not all(isinstance(v, str) for v in (data.get(key) or {}).values()):
                raise _Problem(f"{key!r} is not an object of strings")
        reference = (
            Reference.from_dict(data["reference"], where)
            if data.get("reference") is not None
            else Reference.from_config(source.config)
        )
        validation = ValidationSummary.from_dict(data["validation"]) if data.get("validation") is not None else None
        arm64 = _arm64_records(data["arm64"]) if data.get("arm64") is not None else {}
        return cls(
            target=data["target"],
            precision=data["precision"],
            files=files,
            io=io,
            padding_multiple=multiple,
            tiling=Tiling.from_dict(data.get("tiling"), io.input_size, multiple),
            tlc=data.get("tlc") or {},
            reference=reference,
            source=source,
            deploy=data.get("deploy") or {},
            export=data.get("export") or {},
            tools=data.get("tools") or {},
            host=data.get("host") or {},
            created=created,
            runtime=data.get("runtime"),
            validation=validation,
            quantization=data.get("quantization"),
            seconds=dict(seconds),
            arm64=arm64,
            manifest_version=version,
            extra={k: v for k, v in data.items() if k not in _KNOWN},
        )


def _target_names() -> list[str]:
    """The registered targets (the registry is imported here, not at the top: it imports this module's users)."""
    from nafnet_edge.converters import target_names

    return target_names()


def _files(files: list[Any]) -> list[str]:
    if not files or len(files) > MAX_FILES or not all(isinstance(f, str) and f for f in files):
        raise _Problem(f"'files' must list file names (1 to {MAX_FILES})")
    for name in files:
        problem = name_problem(name)
        if problem and len(name) <= MAX_PATH_CHARS and ".." in PurePosixPath(name).parts:
            raise _Problem(f"'files' points outside the directory: {_short(name)}")
        if problem:
            raise _Problem(f"'files' holds {problem}")
    return list(files)


def _padding_multiple(config: dict[str, Any]) -> int:
    """NAFNet pads to 2 ** (encoder levels): what a manifest without ``padding_multiple`` implies."""
    levels = config.get("enc_blk_nums")
    return 2 ** len(levels) if isinstance(levels, list) and len(levels) <= 12 else 1


# --- reading and writing -----------------------------------------------------------------------------------------


MAX_SEARCH_DEPTH = 6  # folder levels below the one given that are searched for artifact directories
MAX_SEARCH_DIRS = 10_000  # folders looked into before the search gives up (a home directory is not an OUT)


def find_artifacts(directory: str | Path) -> list[Path]:
    """The artifact directories under ``directory``, sorted: itself when it holds a manifest, else every folder
    below it that does, at any depth up to :data:`MAX_SEARCH_DEPTH` (``convert -o OUT`` writes
    ``OUT/<target>-<precision>/manifest.json``; outputs may be grouped further, ``OUT/phone/coreml-fp16``).

    The search does not look inside an artifact directory, skips hidden folders (staging directories of a
    conversion in progress, ``.<name>.*.partial``, among them) and follows a link only when it resolves inside
    ``directory`` (a link to ``/`` or to another tree holds no artifact of this one), each folder once.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise BadInputError(
            f"{directory} is not a directory: give the output directory of nafnet-edge convert (-o OUT) "
            "or one artifact directory OUT/<target>-<precision>"
        )
    if os.path.lexists(directory / MANIFEST_FILE):  # read_manifest says what is wrong with one that is not a file
        return [directory]
    root = directory.resolve()
    seen = {root}
    found: list[Path] = []
    level = [directory]
    for _ in range(MAX_SEARCH_DEPTH):
        below: list[Path] = []
        for folder in level:
            for sub in _subdirectories(folder, root):
                resolved = sub.resolve()
                if resolved in seen:
                    continue
                seen.add(resolved)
                if len(seen) > MAX_SEARCH_DIRS:
                    raise BadInputError(
                        f"{directory} holds more than {MAX_SEARCH_DIRS:,} folders: point at the output directory of "
                        "nafnet-edge convert (-o OUT) or at one artifact directory"
                    )
                (found if os.path.lexists(sub / MANIFEST_FILE) else below).append(sub)
        level = below
    if not found:
        raise BadInputError(
            f"{directory} has no {MANIFEST_FILE}, nor any folder below it with one: point at the output directory "
            "of nafnet-edge convert (-o OUT) or at one OUT/<target>-<precision>"
        )
    return sorted(found)


def _subdirectories(directory: Path, root: Path) -> list[Path]:
    """The visible subdirectories of ``directory``, folders before links (a folder reached both ways is listed
    under its own name), each by name; a link is followed only when it resolves inside ``root`` (the folder the
    search started from)."""
    found = []
    try:
        with os.scandir(directory) as scan:
            entries = sorted(scan, key=lambda e: (e.is_symlink(), e.name))
    except OSError:  # unreadable folders hold no artifact the user can use
        return []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        if entry.is_symlink():
            with contextlib.suppress(OSError, RuntimeError):  # broken or looping links are no artifacts
                if path.resolve(strict=True).is_relative_to(root) and path.is_dir():
                    found.append(path)
        else:
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    found.append(path)
    return found


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of an artifact directory, checked for what every command reads from it.

    ``manifest.json`` itself must be a regular file of a sane size inside the directory (never a link elsewhere,
    a pipe or a device, which are not opened), and ``files`` must name files inside the directory, so a manifest
    cannot point a runtime at a file elsewhere. A directory without one is a BadInputError; a damaged or
    hand-edited one a :class:`ManifestError` (an ArtifactError) naming the problem.
    """
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not os.path.lexists(path):
        raise BadInputError(f"{directory} has no {MANIFEST_FILE}: point at a directory written by nafnet-edge convert")
    artifact_file(directory, MANIFEST_FILE, max_bytes=MAX_RECORD_BYTES)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ManifestError(f"{path} is not valid JSON ({_one_line(e)}); convert again") from None
    return Manifest.from_dict(data, where=str(path))


def write_manifest(directory: str | Path, manifest: Manifest) -> None:
    """Write ``directory/manifest.json`` atomically (a temporary file renamed into place)."""
    _write_json(Path(directory) / MANIFEST_FILE, manifest.to_dict())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from nafnet_edge.atomic import atomic_path

    text = json.dumps(data, indent=2, default=_json_default) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _json_default(value: Any) -> Any:
    """numpy scalars, tuples and paths as JSON (runtimes and exporters report facts in their own types)."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return value.item()
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


# --- bench.json --------------------------------------------------------------------------------------------------


def normalize_profile(profile: Any, *, limit: int | None = None) -> dict[str, Any] | None:
    """An operator profile in the one schema ``bench.json`` keeps: ``{"source", "total_ms", "top": [{"op",
    "ms", "share", "count"}, ...]}``, the slowest first, at most ``limit`` of them (``Session.profile`` and
    ``converters.base.operator_profile`` produce it). ``bench.json`` version 1 listed them under ``ops``: read
    too. None when ``profile`` is not an object."""
    if not isinstance(profile, dict):
        return None
    rows = profile.get("top", profile.get("ops"))
    top = [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []
    out = {k: v for k, v in profile.items() if k not in ("top", "ops")}
    out["top"] = top[:limit] if limit is not None else top
    return out


@dataclass
class BenchRecord:
    """``bench.json`` of one artifact: what ``nafnet-edge bench --save`` measured, with the machine and settings.

    ``latency_ms`` holds min, median, mean, p90, p99, std and runs (ms); ``throughput`` fps, streams, requests;
    ``profile`` the operator profile (:func:`normalize_profile`); ``baseline`` the PyTorch fp32 median
    (``{"runtime": "pytorch", "median_ms": ...}``) when one was measured. Reading is lenient: a value of the
    wrong type reads as absent, so the report shows what it can of an old or hand-edited record.
    """

    target: str
    precision: str
    runtime: str = ""
    runnable: bool = True
    input: list[int] = field(default_factory=list)
    directory: str = ""
    reason: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    load_s: float | None = None
    first_inference_ms: float | None = None
    latency_ms: dict[str, Any] | None = None
    throughput: dict[str, Any] | None = None
    peak_rss_mb: float | None = None
    added_rss_mb: float | None = None
    macs: int | None = None
    gmacs: float | None = None
    gflops_per_s: float | None = None
    peak_fraction: float | None = None
    frame: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None
    machine: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    baseline: dict[str, Any] | None = None
    bench_version: int = BENCH_VERSION

    @property
    def median_ms(self) -> float | None:
        return _number((self.latency_ms or {}).get("median"))

    @property
    def p90_ms(self) -> float | None:
        return _number((self.latency_ms or {}).get("p90"))

    @property
    def fps(self) -> float | None:
        return _number((self.throughput or {}).get("fps"))

    @property
    def baseline_ms(self) -> float | None:
        return _number((self.baseline or {}).get("median_ms"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "bench_version": BENCH_VERSION,
            "created": self.created,
            "machine": self.machine,
            "settings": self.settings,
            "directory": self.directory,
            "target": self.target,
            "precision": self.precision,
            "runtime": self.runtime,
            "runnable": self.runnable,
            "input": list(self.input),
            "reason": self.reason,
            "info": self.info,
            "load_s": self.load_s,
            "first_inference_ms": self.first_inference_ms,
            "latency_ms": self.latency_ms,
            "throughput": self.throughput,
            "peak_rss_mb": self.peak_rss_mb,
            "added_rss_mb": self.added_rss_mb,
            "macs": self.macs,
            "gmacs": self.gmacs,
            "gflops_per_s": self.gflops_per_s,
            "peak_fraction": self.peak_fraction,
            "frame": self.frame,
            "profile": self.profile,
            **({"baseline": self.baseline} if self.baseline is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Any, *, where: str = BENCH_FILE) -> BenchRecord:
        """The record ``data`` describes; a ManifestError when it is not a benchmark record at all."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where} is not a benchmark record; benchmark again")

        def text(key: str, default: str = "") -> str:
            value = data.get(key)
            return value if isinstance(value, str) else default

        def obj(key: str) -> dict[str, Any] | None:
            value = data.get(key)
            return value if isinstance(value, dict) else None

        shape = data.get("input")
        reason = data.get("reason")
        macs = data.get("macs")
        version = data.get("bench_version")
        return cls(
            target=text("target", "?"),
            precision=text("precision", "?"),
            runtime=text("runtime"),
            runnable=data.get("runnable") is not False,
            input=[v for v in shape if _is_int(v)] if isinstance(shape, list) else [],
            directory=text("directory"),
            reason=reason if isinstance(reason, str) else None,
            info=obj("info") or {},
            load_s=_number(data.get("load_s")),
            first_inference_ms=_number(data.get("first_inference_ms")),
            latency_ms=obj("latency_ms"),
            throughput=obj("throughput"),
            peak_rss_mb=_number(data.get("peak_rss_mb")),
            added_rss_mb=_number(data.get("added_rss_mb")),
            macs=macs if _is_int(macs) else None,
            gmacs=_number(data.get("gmacs")),
            gflops_per_s=_number(data.get("gflops_per_s")),
            peak_fraction=_number(data.get("peak_fraction")),
            frame=obj("frame"),
            profile=normalize_profile(data.get("profile")),
            machine=obj("machine") or {},
            settings=obj("settings") or {},
            created=text("created"),
            baseline=obj("baseline"),
            bench_version=version if _is_int(version) else 1,
        )


def read_bench(directory: str | Path) -> tuple[BenchRecord | None, str | None]:
    """``bench.json`` of an artifact directory, and, when it exists but cannot be used, why (it is then left
    unopened when it is not a regular file inside the directory)."""
    directory = Path(directory)
    path = directory / BENCH_FILE
    if not os.path.lexists(path):
        return None, None
    try:
        artifact_file(directory, BENCH_FILE, max_bytes=MAX_RECORD_BYTES)
        data = json.loads(path.read_text(encoding="utf-8"))
    except ArtifactError as e:
        return None, f"{BENCH_FILE} is not used: {e}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        return None, f"{BENCH_FILE} is unreadable ({_one_line(e)}); benchmark again"
    try:
        return BenchRecord.from_dict(data), None
    except ManifestError as e:
        return None, str(e)


def write_bench(directory: str | Path, record: BenchRecord) -> Path:
    """Write ``directory/bench.json`` atomically; returns its path."""
    path = Path(directory) / BENCH_FILE
    _write_json(path, record.to_dict())
    return path


# --- helpers -------------------------------------------------------------------------------------------------------


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_size(value: Any) -> TypeGuard[list[int] | tuple[int, ...]]:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) and v >= 1 for v in value)


def _number(value: Any) -> float | None:
    """A float from JSON (``Infinity`` and ``NaN`` included), or None for anything else."""
    return float(value) if _is_number(value) else None


def _kind(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "bool", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


__all__ = [
    "BENCH_FILE",
    "BENCH_VERSION",
    "MANIFEST_FILE",
    "MANIFEST_VERSION",
    "MAX_SEARCH_DEPTH",
    "USAGE_FILE",
    "Arm64Validation",
    "BenchRecord",
    "IOSpec",
    "Manifest",
    "ManifestError",
    "Reference",
    "Source",
    "TensorSpec",
    "Tiling",
    "ValidationSummary",
    "artifact_dirname",
    "find_artifacts",
    "normalize_profile",
    "read_bench",
    "read_manifest",
    "write_bench",
    "write_manifest",
]


def source_checkpoint(manifest: Manifest, given: str | Path | None = None) -> str | None:
    """The checkpoint to load for ``manifest``'s reference: ``given`` when the user names one, None for the
    embedded default, else the path the manifest records; ``UsageError`` when that file is gone."""
    from nafnet_edge.errors import UsageError

    if given is not None:
        return str(given)
    source = manifest.source
    if source.embedded_default:
        return None
    if not source.path or not Path(source.path).is_file():
        raise UsageError(f"the source checkpoint is not at {source.path!r} any more: pass --checkpoint CKPT")
    return source.path


def artifact_dirname(target: str, precision: str, io: str = "tensor") -> str:
    """The folder ``convert -o OUT`` writes an artifact into, ``OUT/<target>-<precision>`` (``...-image`` for image
    I/O): one target's fp32, fp16 and int8, tensor- and image-I/O artifacts live side by side."""
    return f"{target}-{precision}" + ("-image" if io == "image" else "")
