"""What the PT2E quantizers (ExecuTorch XNNPACK, Core ML W8A8) share: export, prepare, switch and convert.

Both export the deploy graph with ``torch.export`` for any batch size, let a torchao PT2E quantizer annotate it,
insert observers (PTQ: ``prepare_pt2e``) or fake quantizers (QAT: ``prepare_qat_pt2e``) and, for export, turn
the calibrated or trained module into quantize/dequantize form (``convert_pt2e``). A subclass supplies its
target's PT2E quantizer (``pt2e_quantizer``) and writes its artifact from ``convert``'s result.

Units kept in float (``keep_float``) lose their annotations (``keeping_float``): their ops get no
quantize/dequantize, and values crossing into them are dequantized.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import torch

from nafnet_edge.quantization.base import Quantizer

TRACE_BATCH = 2  # torch.export specializes a batch of 1; tracing with 2 keeps the batch dynamic for training


class Pt2eQuantizer(Quantizer):
    """A quantizer whose prepared module is a torchao PT2E graph; subclasses implement ``pt2e_quantizer`` and
    ``export``."""

    @abstractmethod
    def pt2e_quantizer(self, *, qat: bool) -> Any:
        """The torchao PT2E quantizer that annotates the exported deploy graph (observers for PTQ, fake
        quantizers for QAT); ``prepare`` leaves the ``keep_float`` units out of its annotation."""

    def prepare(
        self,
        graph: torch.nn.Module,
        example: torch.Tensor,
        *,
        qat: bool,
        calibration: Iterable[torch.Tensor] | None = None,
    ) -> torch.nn.Module:
        """A copy of ``graph`` exported with observers (PTQ) or fake quantizers (QAT) for any batch size at
        ``example``'s height and width, in eval mode.

        With QAT, the ``calibration`` batches set the initial ranges in one forward pass over all of them: the
        fake quantizers' ranges are moving averages (1% per step) started from the first batch they see, so
        calibrating batch by batch leaves the ranges of the first crop (19 dB against fp32 on the tiny test
        model, 41.6 dB this way; PTQ's histograms give 42.5 dB). PTQ's observers take the loop's passes.
        """
        from torchao.quantization.pt2e import allow_exported_model_train_eval
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

        self.check_available()
        trace = example[:1].expand(TRACE_BATCH, *example.shape[1:]).contiguous()
        batch = torch.export.Dim("batch", min=1)
        # a copy: the exported module shares the graph's parameters, and QAT must not train the caller's graph
        exported = torch.export.export(_copy(graph), (trace,), dynamic_shapes=({0: batch},)).module()
        quantizer = keeping_float(self.pt2e_quantizer(qat=qat), self.keep_float)
        prepared = prepare_qat_pt2e(exported, quantizer) if qat else prepare_pt2e(exported, quantizer)
        prepared.requires_grad_(qat)  # the deploy graph comes frozen; QAT trains every weight and bias
        allow_exported_model_train_eval(prepared)  # .train()/.eval() work (and mean set_training)
        self.set_training(prepared, False)
        batches = list(calibration or ())
        if qat and batches:
            with torch.no_grad():
                prepared(torch.cat(batches))
            self.calibrated(prepared)
        return prepared

    def calibrated(self, prepared: torch.nn.Module) -> None:  # noqa: B027 - optional for a target
        """Called after a QAT-prepared module has seen its calibration batches; the default does nothing."""

    def set_training(self, prepared: torch.nn.Module, training: bool) -> None:
        from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

        if training:
            move_exported_model_to_train(prepared)
        else:
            move_exported_model_to_eval(prepared)

    def freeze_observers(self, prepared: torch.nn.Module) -> None:
        """Fix every range: the fake quantizers keep quantizing with the ranges observed so far."""
        from torchao.quantization.pt2e import disable_observer

        prepared.apply(disable_observer)

    def unit_quantizers(
        self, prepared: torch.nn.Module, units: Sequence[str], example: torch.Tensor
    ) -> dict[str, list[torch.nn.Module]]:
        return pt2e_unit_quantizers(prepared, units)  # type: ignore[arg-type]

    def set_quantizers(self, modules: Sequence[torch.nn.Module], enabled: bool) -> None:
        for module in modules:
            if enabled:
                module.enable_fake_quant()  # type: ignore[operator]
            else:
                module.disable_fake_quant()  # type: ignore[operator]

    def convert(self, prepared: torch.nn.Module) -> torch.fx.GraphModule:
        """A quantize/dequantize copy of ``prepared`` (which stays usable), its trained weights frozen so they
        fold like constants."""
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        model = copy.deepcopy(prepared).requires_grad_(False)
        self.set_training(model, False)
        return convert_pt2e(model)


def is_qat(prepared: torch.nn.Module) -> bool:
    """Whether ``prepared`` holds fake quantizers (QAT) rather than observers (PTQ)."""
    from torchao.quantization.pt2e import FakeQuantizeBase

    return any(isinstance(m, FakeQuantizeBase) for m in prepared.modules())


def _copy(graph: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``graph`` to export; a stereo graph's views get their own weights (``deploy.sr.unshared``)."""
    from nafnet_edge.deploy.sr import DeploySR, unshared

    return unshared(graph) if isinstance(graph, DeploySR) else copy.deepcopy(graph)


def node_units(node: torch.fx.Node, units: Collection[str]) -> set[str]:
    """The units among ``units`` that ``node`` of an exported graph belongs to (by its module stack)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = {entry[0] for entry in stack.values()}
    return {u for u in units if u in paths}


def keeping_float(quantizer: Any, units: Collection[str]) -> Any:
    """A PT2E quantizer that annotates like ``quantizer`` except inside ``units``, which stay floating point:
    their ops get no quantize/dequantize, and values crossing into them are dequantized."""
    if not units:
        return quantizer
    from torchao.quantization.pt2e.quantizer import Quantizer as PT2EQuantizer

    kept = frozenset(units)

    class KeepFloat(PT2EQuantizer):
        def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            return quantizer.transform_for_annotation(model)

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = quantizer.annotate(model)
            for node in model.graph.nodes:
                if node_units(node, kept):
                    node.meta.pop("quantization_annotation", None)
            return model

        def validate(self, model: torch.fx.GraphModule) -> None:
            quantizer.validate(model)

    return KeepFloat()


def pt2e_unit_quantizers(prepared: torch.fx.GraphModule, units: Sequence[str]) -> dict[str, list[Any]]:
    """The fake quantizers of a QAT-prepared graph inside each unit: on its weights and on values both made and
    used there. Values crossing a unit's boundary stay quantized when the unit is kept float (the ops outside
    still take and give int8), so switching their quantizers off would promise more than keeping it gains."""
    from torchao.quantization.pt2e import FakeQuantizeBase

    found: dict[str, list[Any]] = {u: [] for u in units}
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        module = prepared.get_submodule(node.target)
        if not isinstance(module, FakeQuantizeBase):
            continue
        neighbours = [n for n in [*node.all_input_nodes, *node.users] if n.op != "get_attr"]  # weights: no stack
        inside = set.intersection(*(node_units(n, units) for n in neighbours)) if neighbours else set()
        for unit in inside:
            found[unit].append(module)
    return found
