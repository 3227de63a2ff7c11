"""The one small interface every target implements: export a deploy graph, and load a runner for the artifact.

A converter never sees checkpoints, manifests on disk or validation images: ``nafnet_edge.convert`` builds the
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from nafnet_edge.artifact_files import artifact_file, loading
from nafnet_edge.errors import MissingBackendError, OptionError

if TYPE_CHECKING:  # torch is imported by the targets that export; the registry and file checks need none of it
    import torch

Precision = Literal["fp32", "fp16", "int8"]
Runner = Callable[[np.ndarray], np.ndarray]
"""float32 array (1, C, H, W) in [0, 1] at the artifact's input size -> float32 array of the same shape."""

INPUT_NAME = "image"
OUTPUT_NAME = "restored"


@dataclass(frozen=True)
class ExportOptions:
    """What the user asked for; each converter reads the fields that concern it and refuses what it cannot do."""

    input_size: tuple[int, int]  # padded height, width: the graph's fixed input size
    precision: Precision = "fp32"
    extra_sizes: tuple[tuple[int, int], ...] = ()  # Core ML: more enumerated input sizes
    dynamic: bool = False  # ONNX: symbolic height and width
    minimum_target: str = "iOS17"  # Core ML: iOS17 (macOS 14) or later
    bundle: bool = False  # ExecuTorch: a bundled program carrying test inputs and expected outputs
    test_inputs: tuple[np.ndarray, ...] = ()  # for bundled programs: inputs at ``input_size``
    test_outputs: tuple[np.ndarray, ...] = ()  # and the reference outputs for them


@dataclass
class Exported:
    """What ``export`` wrote (paths relative to the artifact directory) and target facts for the manifest."""

    files: list[str]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedRunner:
    """A runner and facts about how it runs (runtime, device, the precision actually used)."""

    run: Runner
    info: dict[str, Any] = field(default_factory=dict)


class Converter(ABC):
    """One export target. Subclasses set the class attributes and implement ``export`` and ``load_runner``."""

    target: ClassVar[str]  # the name users type: --target coreml
    deploy_target: ClassVar[str]  # the norm form for nafnet_edge.deploy: xnnpack, coreml, openvino, onnx
    artifact: ClassVar[str]  # main file or bundle written into the artifact directory, e.g. "model.mlpackage"
    precisions: ClassVar[tuple[Precision, ...]] = ("fp32",)
    default_precision: ClassVar[Precision] = "fp32"
    modules: ClassVar[tuple[str, ...]] = ()  # Python modules needed to export
    extra: ClassVar[str] = ""  # the pip extra that installs them: nafnet-edge[coreml]
    file_kind: ClassVar[str] = "model"  # what the artifact is, in error messages: "ONNX model"

    def check_available(self) -> None:
        """Raise ``MissingBackendError`` (exit code 4) naming the extra to install when a module is missing."""
        missing = [m for m in self.modules if importlib.util.find_spec(m) is None]
        if missing:
            raise MissingBackendError(
                f"--target {self.target} needs {', '.join(missing)}: pip install 'nafnet-edge[{self.extra}]'"
            )

    def check_options(self, options: ExportOptions) -> None:
        """Refuse options this target cannot honour (``OptionError`` with what to do instead)."""
        if options.precision not in self.precisions:
            raise OptionError(
                f"--target {self.target} supports precision {', '.join(self.precisions)}, not {options.precision}"
            )

    @abstractmethod
    def export(self, graph: torch.nn.Module, out_dir: Path, options: ExportOptions) -> Exported:
        """Write the artifact for ``graph`` (a deploy graph fixed for ``options.input_size``) into ``out_dir``."""

    @abstractmethod
    def load_runner(self, out_dir: Path, manifest: dict[str, Any]) -> LoadedRunner:
        """A runner executing the artifact in ``out_dir`` in its own runtime (never PyTorch)."""

    def artifact_path(self, out_dir: Path) -> Path:
        """The artifact in ``out_dir``, once every file its runtime will read is known to be a regular file (or
        bundle) inside ``out_dir`` of a sane size (``nafnet_edge.artifact_files``); ``ArtifactError`` otherwise.
        Targets whose runtime reads more than ``artifact`` check those files too."""
        return artifact_file(out_dir, self.artifact)

    def load_errors(self) -> tuple[type[BaseException], ...]:
        """The exceptions this target's runtime raises for a file it cannot load."""
        return (RuntimeError,)

    @contextmanager
    def loading(self, path: Path) -> Iterator[None]:
        """Around a runtime loading ``path``: its refusal becomes an ``ArtifactError`` naming the file (exit 5)."""
        with loading(path, self.file_kind, self.load_errors()):
            yield
