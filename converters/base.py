"""The one small interface every target implements: export a deploy graph, and load a runner for the artifact.

A converter never sees checkpoints, manifests on disk or validation images: ``nafnet_edge.conversion`` builds the
deploy graph (``nafnet_edge.deploy``), calls ``export`` into an empty temporary directory, writes the manifest,
validates through ``load_runner`` and only then moves the directory into place.

Conventions shared by all targets (the usage notes and the manifest repeat them):
- one input named ``image`` and one output named ``restored``, NCHW, RGB (or the model's channels), float in
  [0, 1], batch 1, height and width fixed to ``ExportOptions.input_size`` (a multiple of the model's padding
  multiple; callers zero-pad to it and crop back, or tile larger images);
- the output is not clamped (the caller clamps to [0, 1] and rounds, like the official evaluation).
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from nafnet_edge.artifact_files import artifact_file, loading, runtime_reason
from nafnet_edge.errors import MissingBackendError, OptionError

if TYPE_CHECKING:  # torch is imported by the targets that export; the registry and file checks need none of it
    from nafnet_edge.deploy import DeployNAFNet, NormForm

Precision = Literal["fp32", "fp16", "int8"]
Runner = Callable[[np.ndarray], np.ndarray]
"""float32 array (1, C, H, W) in [0, 1] at the artifact's input size -> float32 array of the same shape (a
``Session.native`` call of an image-I/O artifact: uint8 (1, H, W, P) pixels -> the same)."""

INPUT_NAME = "image"
OUTPUT_NAME = "restored"


OptionKind = Literal["flag", "value", "values"]
Command = Literal["convert", "quantize", "validate", "bench"]


@dataclass(frozen=True)
class TargetOption:
    """One command-line option a target owns (``--dynamic`` belongs to ONNX). The CLI adds every registered
    target's options to the commands listed and refuses them, naming the owner, for any other target; the value
    reaches the target as ``ExportOptions.settings[dest]`` (export) or ``SessionSettings.hints[dest]`` (running)."""

    flag: str  # "--dynamic"
    dest: str  # "dynamic": the key in ExportOptions.settings / SessionSettings.hints
    help: str  # without the owner: the CLI shows it after the target's title ("Core ML: more sizes")
    default: Any = None
    kind: OptionKind = "value"  # flag: store_true; value: one value; values: one or more values
    type: Callable[[str], Any] | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    commands: tuple[Command, ...] = ("convert",)


@dataclass(frozen=True)
class ExportOptions:
    """What the user asked for. ``settings`` holds the exporting target's own options by ``TargetOption.dest``
    (absent keys take the option's default: ``Target.setting``)."""

    input_size: tuple[int, int]  # padded height, width: the graph's fixed input size
    precision: Precision = "fp32"
    settings: Mapping[str, Any] = field(default_factory=dict)
    test_inputs: tuple[np.ndarray, ...] = ()  # for targets that embed test I/O: inputs at ``input_size``
    test_outputs: tuple[np.ndarray, ...] = ()  # and the reference outputs for them
    # Image I/O (``--io image``): uint8 NHWC pixels in this format in and out (``nafnet_edge.pixels``), the scale,
    # clamp and round inside the artifact; None: tensor I/O (float32 NCHW, unclamped output).
    pixel_format: str | None = None


@dataclass(frozen=True)
class SessionSettings:
    """How to run an artifact: shared knobs and the target's own runtime hints by ``TargetOption.dest``."""

    threads: int | None = None  # runtime threads (None: the runtime's default, all cores)
    hints: Mapping[str, Any] = field(default_factory=dict)
    # The session is for timing (bench): where this machine can only emulate the runtime (Core ML's ML program
    # evaluated in numpy off Apple platforms), raise ``NotRunnable`` instead of opening the emulation.
    timing: bool = False


@dataclass
class Session:
    """A loaded artifact in its runtime: ``run`` for validation and timing, and what else the runtime offers
    (a per-operator profile, a throughput mode). Validation and ``bench`` open artifacts through the same
    ``Target.open_session``."""

    run: Runner
    runtime: str
    info: dict[str, Any]
    # ``profile`` and ``throughput`` take the artifact's own input (``native``'s: uint8 pixels for image I/O).
    profile: Callable[[np.ndarray, int], dict[str, Any]] | None = None
    throughput: Callable[[np.ndarray, int], dict[str, Any]] | None = None
    keep: Any = None  # objects the runner needs alive
    # The runtime call on the artifact's own input and output types (uint8 NHWC pixels for image I/O), which
    # ``bench`` times; None: ``run`` is that call (tensor I/O).
    native: Runner | None = None

    @property
    def call(self) -> Runner:
        """The runtime call on the artifact's own input (what an app calls, and what ``bench`` times)."""
        return self.native or self.run


def pixel_session(session: Session, pixel_format: str) -> Session:
    """``session`` runs an image-I/O artifact on uint8 NHWC pixels (its ``run``); the same session with ``run``
    taking and returning float32 NCHW in [0, 1] (rounded to 8 bits on the way in, as a camera frame is), for
    validation and tiled restoration, and ``native`` the pixel call."""
    from nafnet_edge.pixels import from_pixels, to_pixels

    native = session.run

    def run(x: np.ndarray) -> np.ndarray:
        return from_pixels(native(to_pixels(x, pixel_format)), pixel_format)

    session.run, session.native = run, native
    session.info = {**session.info, "io": "image", "pixel_format": pixel_format}
    return session


def checked_input(a: np.ndarray, shape: tuple[int, ...], dtype: np.dtype, file: str) -> np.ndarray:
    """``a`` as an artifact's input of ``shape`` and ``dtype`` (float32 tensors, or uint8 pixels for image I/O);
    ``ValueError`` saying what to do otherwise. ``file`` names the artifact in the message (".pte")."""
    a = np.asarray(a)
    if tuple(a.shape) != shape:
        raise ValueError(
            f"the {file} takes input {shape}, got {tuple(a.shape)}: zero-pad to the input size and crop back, or "
            "tile larger images"
        )
    if dtype == np.uint8 and a.dtype != np.uint8:
        raise ValueError(f"the {file} takes uint8 pixels, got {a.dtype}: pass the pixel buffer's bytes")
    return a


def input_channels(graph: DeployNAFNet) -> int:
    """Channels of a deploy graph's input tensor: the image's, times the views of a stereo graph (NAFSSR's 6)."""
    return int(getattr(graph, "in_channels", None) or graph.intro.in_channels)


def pixel_format_of(export: Mapping[str, Any] | None) -> str | None:
    """The pixel format an image-I/O artifact's ``export`` section records (``Exported.info["pixel_format"]``);
    None for tensor I/O."""
    value = (export or {}).get("pixel_format")
    return value if isinstance(value, str) else None


@dataclass
class Exported:
    """What ``export`` wrote (paths relative to the artifact directory) and target facts for the manifest."""

    files: list[str]
    info: dict[str, Any] = field(default_factory=dict)


class Target(ABC):
    """One runtime: everything nafnet-edge knows about it lives in its subclass, registered by one line in
    ``nafnet_edge.converters.TARGETS`` (or ``register`` at run time). Subclasses set the class attributes and
    implement ``export`` and ``open_session``; backends are imported inside methods, so the CLI can read every
    target's options without importing torch or a runtime."""

    name: ClassVar[str]  # what users type: --target NAME
    extra: ClassVar[str] = ""  # the pip extra that installs ``modules``: nafnet-edge[EXTRA]
    modules: ClassVar[tuple[str, ...]] = ()  # Python modules needed to export and run
    runtime_packages: ClassVar[tuple[str, ...]] = ()  # distributions whose versions the manifest records
    norm_form: ClassVar[NormForm] = "reference"  # the deploy graph's channel-norm form
    artifact: ClassVar[str]  # main file or bundle in the artifact directory, e.g. "model.mlpackage"
    file_kind: ClassVar[str] = "model"  # what the artifact is, in error messages: "ONNX model"
    precisions: ClassVar[tuple[Precision, ...]] = ("fp32",)
    default_precision: ClassVar[Precision] = "fp32"
    quantizer: ClassVar[str | None] = None  # "module:Class" of its int8 quantizer; None: no int8
    options: ClassVar[tuple[TargetOption, ...]] = ()  # its own command-line options
    color: ClassVar[str] = ""  # its colour in report charts, "#rrggbb" (empty: the report picks one)
    usage_title: ClassVar[str] = ""  # USAGE.md: title and body template (``nafnet_edge.usage`` fills the fields)
    helpers: ClassVar[tuple[str, ...]] = ()  # source files of nafnet_edge copied beside the artifact (app helpers)
    # Image I/O (``--io image``): the pixel formats this target can take, the first the default for 3-channel
    # models ("gray" is 1-channel models'); empty: tensor I/O only.
    pixel_formats: ClassVar[tuple[str, ...]] = ()
    usage_body: ClassVar[str] = ""
    usage_image_body: ClassVar[str] = ""  # the body for image-I/O artifacts, when it differs (empty: usage_body)

    @classmethod
    def setting(cls, options: ExportOptions, dest: str) -> Any:
        """The value of this target's option ``dest`` in ``options`` (its default when not given)."""
        return cls._value(options.settings, dest)

    @classmethod
    def hint(cls, settings: SessionSettings, dest: str) -> Any:
        """The value of this target's runtime option ``dest`` in ``settings`` (its default when not given)."""
        return cls._value(settings.hints, dest)

    @classmethod
    def _value(cls, given: Mapping[str, Any], dest: str) -> Any:
        for option in cls.options:
            if option.dest == dest:
                return given.get(dest, option.default)
        raise KeyError(f"{cls.name} has no option {dest!r}")

    def needs_test_io(self, options: ExportOptions) -> bool:
        """Whether ``export`` embeds test inputs and expected outputs (``ExportOptions.test_inputs``), which the
        pipeline then fills from the validation images (ExecuTorch's ``--bundle``)."""
        return False

    def quantizer_options(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments for this target's quantizer from its own option values (``--weights-only`` is Core
        ML's ``mode="weights"``); none by default."""
        return {}

    def check_available(self) -> None:
        """Raise ``MissingBackendError`` (exit code 4) naming the extra to install when a module is missing."""
        missing = [m for m in self.modules if importlib.util.find_spec(m) is None]
        if missing:
            raise MissingBackendError(
                f"--target {self.name} needs {', '.join(missing)}: pip install 'nafnet-edge[{self.extra}]'"
            )

    def check_options(self, options: ExportOptions) -> None:
        """Refuse options this target cannot honour (``OptionError`` with what to do instead)."""
        if options.precision not in self.precisions:
            raise OptionError(
                f"--target {self.name} supports precision {', '.join(self.precisions)}, not {options.precision}"
            )
        self.check_pixel_format(options.pixel_format)

    @staticmethod
    def export_summary(export: Mapping[str, Any]) -> str:
        """What ``convert``'s result line adds for an artifact of this target, from its manifest's ``export``
        section (empty: nothing)."""
        return ""

    def check_pixel_format(self, pixel_format: str | None) -> None:
        """Refuse image I/O this target cannot export (``OptionError`` naming what it can)."""
        if pixel_format is None:
            return
        if not self.pixel_formats:
            raise OptionError(f"--target {self.name} has tensor I/O only: drop --io image")
        if pixel_format not in self.pixel_formats:
            raise OptionError(
                f"--target {self.name} takes --pixel-format {', '.join(self.pixel_formats)}, not {pixel_format}"
            )

    def default_pixel_format(self, channels: int) -> str:
        """The pixel format ``--io image`` means when none is given: gray for 1-channel models, else the first of
        ``pixel_formats``."""
        return "gray" if channels == 1 else self.pixel_formats[0] if self.pixel_formats else "rgb"

    @abstractmethod
    def export(self, graph: DeployNAFNet, out_dir: Path, options: ExportOptions) -> Exported:
        """Write the artifact for ``graph`` (a deploy graph fixed for ``options.input_size``) into ``out_dir``."""

    @abstractmethod
    def open_session(
        self, out_dir: Path, *, export: Mapping[str, Any] | None = None, settings: SessionSettings | None = None
    ) -> Session:
        """Load the artifact in ``out_dir`` in its own runtime (never PyTorch). ``export`` is the manifest's
        ``export`` section this target wrote; ``settings`` the runtime knobs. ``run`` maps a float32 (1, C, H, W)
        array to the float32 output. Raise ``NotRunnable`` when this machine cannot run it (Core ML off macOS)."""

    def load_runner(self, out_dir: Path, *, export: Mapping[str, Any] | None = None) -> Session:
        """The session validation uses: the runtime's defaults."""
        return self.open_session(out_dir, export=export)

    def artifact_path(self, out_dir: Path) -> Path:
        """The artifact in ``out_dir``, once every file its runtime will read is known to be a regular file (or
        bundle) inside ``out_dir`` of a sane size (``nafnet_edge.artifact_files``); ``ArtifactError`` otherwise.
        Targets whose runtime reads more than ``artifact`` check those files too."""
        return artifact_file(out_dir, self.artifact)

    def load_errors(self) -> tuple[type[BaseException], ...]:
        """The exceptions this target's runtime raises for a file it cannot load."""
        return (RuntimeError,)

    @staticmethod
    def load_reason(error: BaseException) -> str:
        """The informative part of this runtime's load error, for a one-line message."""
        return runtime_reason(error)

    @contextmanager
    def loading(self, path: Path) -> Iterator[None]:
        """Around a runtime loading ``path``: its refusal becomes an ``ArtifactError`` naming the file (exit 5)."""
        with loading(path, self.file_kind, self.load_errors(), self.load_reason):
            yield


class NotRunnable(Exception):
    """This artifact cannot run on this machine (the message says why and where it can)."""


def operator_profile(source: str, ops: Counter[str], counts: Counter[str], runs: int) -> dict[str, Any]:
    """A session's per-operator profile: ``ops`` maps an operator to its milliseconds per inference, ``counts`` to
    how often it ran over ``runs`` inferences; operators are listed slowest first with their share of the total."""
    total = sum(ops.values())
    top = [
        {
            "op": op,
            "ms": round(float(ms), 3),
            "share": round(ms / total, 4) if total else 0.0,
            "count": counts[op] // max(runs, 1),
        }
        for op, ms in ops.most_common()
    ]
    return {"source": source, "total_ms": round(float(total), 3), "top": top}
