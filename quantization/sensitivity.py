"""Which parts of the deploy graph int8 hurts most, and keeping them in floating point.

Units are the deploy graph's top-level pieces: ``intro``, every block (``encoders.I.J``, ``middle_blks.J``,
``decoders.I.J``), the strided downsampling convs (``downs.I``), the transposed-conv upsampling (``ups.I``) and
``ending``. A quantizer with ``keep_float`` set leaves the units named there unquantized: their ops run in
floating point inside the same program (PT2E targets: no annotation inside, so no quantize/dequantize; OpenVINO:
NNCF's quantizers inside disabled, so no FakeQuantize and f32 weights).

``rank_units`` measures each unit's sensitivity in one fake-quantized copy of the graph: the fidelity (PSNR against
the fp32 deploy graph on held-out random crops of the training images) gained by switching off only that unit's
quantizers. ``convert`` uses the ranking when an int8 artifact misses its validation budget (``--max-drift``):
it keeps 1, 2, 4, ... of the most sensitive units in float, quantizes and validates again in the runtime, and
reports which units were kept and what that costs in latency against the all-int8 artifact.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np
import torch

from nafnet_edge.errors import OptionError
from nafnet_edge.quantization.base import Quantizer
from nafnet_edge.validate import psnr

SENSITIVITY_CROPS = 8  # held-out crops the ranking is measured on (``train.held_out_crops``)


def graph_units(graph: torch.nn.Module) -> list[str]:
    """The deploy graph's units in execution order."""
    units = ["intro"]
    for i, encoder in enumerate(graph.encoders):  # type: ignore[arg-type]
        units += [f"encoders.{i}.{j}" for j in range(len(encoder))] + [f"downs.{i}"]
    units += [f"middle_blks.{j}" for j in range(len(graph.middle_blks))]  # type: ignore[arg-type]
    for i, decoder in enumerate(graph.decoders):  # type: ignore[arg-type]
        units += [f"ups.{i}"] + [f"decoders.{i}.{j}" for j in range(len(decoder))]
    return [*units, "ending"]


def check_units(graph: torch.nn.Module, names: Collection[str]) -> None:
    """Raise ``ValueError`` naming the valid units when ``names`` holds one the graph does not have."""
    units = graph_units(graph)
    unknown = sorted(set(names) - set(units))
    if unknown:
        raise OptionError(f"--keep-float {', '.join(unknown)}: no such unit; this model has {', '.join(units)}")


# --- PT2E (ExecuTorch XNNPACK, Core ML W8A8) ---


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

    class KeepFloat(PT2EQuantizer):  # type: ignore[misc, valid-type]
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


def set_pt2e_quantizers(modules: Sequence[Any], enabled: bool) -> None:
    for module in modules:
        if enabled:
            module.enable_fake_quant()
        else:
            module.disable_fake_quant()


# --- ranking ---


def rank_units(
    quantizer: Quantizer,
    graph: torch.nn.Module,
    crops: torch.Tensor,
    calibration: Sequence[torch.Tensor],
    *,
    exclude: Collection[str] = (),
) -> list[tuple[str, float]]:
    """Units of ``graph`` (but ``exclude``, already float through ``quantizer.keep_float``) with the fidelity (dB
    against the fp32 graph on ``crops``) that keeping each one alone in float gains, most sensitive first."""
    units = [u for u in graph_units(graph) if u not in exclude]
    prepared = quantizer.prepare(graph, crops[:1], qat=True, calibration=calibration)
    quantizer.set_training(prepared, False)
    quantizer.freeze_observers(prepared)  # evaluation passes must not move the ranges
    groups = quantizer.unit_quantizers(prepared, units, crops[:1])
    with torch.no_grad():
        teacher = graph(crops)

        def fidelity() -> float:
            return psnr(prepared(crops).numpy(), teacher.numpy())

        base = fidelity()
        gains = []
        for unit in units:
            quantizer.set_quantizers(groups[unit], False)
            gains.append((unit, fidelity() - base))
            quantizer.set_quantizers(groups[unit], True)
    return sorted(gains, key=lambda item: -item[1])


def next_kept(kept: Sequence[str], ranking: Sequence[tuple[str, float]]) -> list[str]:
    """The next round's kept units: ``kept`` plus as many of the most sensitive others again (at least one)."""
    candidates = [unit for unit, _ in ranking if unit not in kept]
    return [*kept, *candidates[: max(1, len(kept))]]


# --- latency cost ---


def interleaved_medians(
    runs: dict[str, Callable[[np.ndarray], Any]], x: np.ndarray, repeats: int = 7
) -> dict[str, float]:
    """Median milliseconds of each runner on ``x``, one warm-up each, then ``repeats`` rounds taking turns (so a
    busy machine slows them alike)."""
    for run in runs.values():
        run(x)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run(x)
            times[name].append((time.perf_counter() - started) * 1e3)
    return {k: round(statistics.median(v), 2) for k, v in times.items()}
