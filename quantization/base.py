"""The interface every INT8 quantizer implements, so one training loop serves all targets.

A quantizer starts from the deploy graph (never the raw model) and turns it into a *prepared* module: a
PyTorch module with fake quantization that the shared loop (``nafnet_edge.quantization.train``) can calibrate
(PTQ: forward passes only) and fine-tune (QAT: gradients through the fake quantizers). ``export`` then writes
the real int8 artifact of its target, which the target's converter runner (``nafnet_edge.converters``) executes.

    quantizer = get_quantizer("executorch", keep_float={"ending"})
    prepared = quantizer.prepare(graph, example, qat=True)
    ...  # calibrate / train prepared (same call signature as the graph: NCHW float in, NCHW float out)
    exported = quantizer.export(prepared, out_dir, example)
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from nafnet_edge.converters.base import Exported
from nafnet_edge.errors import MissingBackendError

if TYPE_CHECKING:
    from nafnet_edge.deploy import NormForm


class Quantizer(ABC):
    """One target's int8 path. Subclasses set the class attributes and implement the three methods."""

    target: ClassVar[str]  # the converter whose runner executes the artifact: executorch, openvino, coreml
    artifact: ClassVar[str]
    modules: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str] = ""

    def __init__(self, *, keep_float: Collection[str] = ()) -> None:
        # deploy-graph units (``nafnet_edge.quantization.sensitivity.graph_units``) that ``prepare`` leaves float
        self.keep_float: frozenset[str] = frozenset(keep_float)

    @property
    def norm_form(self) -> NormForm:
        """The deploy graph's norm form: its target's (``nafnet_edge.converters``)."""
        from nafnet_edge.converters import target_class

        return target_class(self.target).norm_form

    def check_available(self) -> None:
        missing = [m for m in self.modules if importlib.util.find_spec(m) is None]
        if missing:
            raise MissingBackendError(
                f"int8 for {self.target} needs {', '.join(missing)}: pip install 'nafnet-edge[{self.extra}]'"
            )

    @abstractmethod
    def prepare(
        self,
        graph: torch.nn.Module,
        example: torch.Tensor,
        *,
        qat: bool,
        calibration: Iterable[torch.Tensor] | None = None,
    ) -> torch.nn.Module:
        """A fake-quantized module computing ``graph``'s function (observers enabled), trainable when ``qat``.
        ``calibration`` batches are for quantizers that calibrate inside ``prepare``; the loop also runs them
        through the prepared module afterwards."""

    def set_training(self, prepared: torch.nn.Module, training: bool) -> None:
        """Switch the prepared module between training (QAT steps) and evaluation (calibration, export)."""
        prepared.train(training)

    def freeze_observers(self, prepared: torch.nn.Module) -> None:  # noqa: B027 - optional for a target
        """Stop updating quantization ranges (late in QAT); the default does nothing."""

    @property
    def trains(self) -> bool:
        """Whether ``prepare(qat=True)`` has something to fine-tune; False for a post-training-only mode, which
        the CLI then runs as PTQ."""
        return True

    @property
    def switches_units(self) -> bool:
        """Whether ``unit_quantizers`` and ``set_quantizers`` work, as the sensitivity ranking needs."""
        return type(self).unit_quantizers is not Quantizer.unit_quantizers

    def unit_quantizers(
        self, prepared: torch.nn.Module, units: Sequence[str], example: torch.Tensor
    ) -> dict[str, list[torch.nn.Module]]:
        """The quantizers of a QAT-prepared module that belong to each of ``units`` (for ``set_quantizers``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot switch quantizers per unit")

    def set_quantizers(self, modules: Sequence[torch.nn.Module], enabled: bool) -> None:
        """Switch fake quantization of ``modules`` (from ``unit_quantizers``) on or off."""
        raise NotImplementedError(f"{type(self).__name__} cannot switch quantizers per unit")

    @abstractmethod
    def export(
        self, prepared: torch.nn.Module, out_dir: Path, example: torch.Tensor, *, pixel_format: str | None = None
    ) -> Exported:
        """Convert the calibrated/trained module to the target's int8 artifact inside ``out_dir``; with
        ``pixel_format``, behind 8-bit image I/O (``ExportOptions.pixel_format``)."""
