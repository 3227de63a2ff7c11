"""Which parts of the deploy graph int8 hurts most, and keeping them in floating point.

Units are the deploy graph's top-level pieces: ``intro``, every block (``encoders.I.J``, ``middle_blks.J``,
``decoders.I.J``), the strided downsampling convs (``downs.I``), the transposed-conv upsampling (``ups.I``) and
``ending``; in a super-resolution graph ``intro``, the blocks (``body.J.blk``), NAFSSR's stereo attention
(``body.J.fusion``) and ``up``. A quantizer with ``keep_float`` set leaves the units named there unquantized:
their ops run in floating point inside the same program (PT2E targets: no annotation inside, so no
quantize/dequantize; OpenVINO: NNCF's quantizers inside disabled, so no FakeQuantize and f32 weights).

``rank_units`` measures each unit's sensitivity in one fake-quantized copy of the graph: the fidelity (PSNR against
the fp32 deploy graph on held-out random crops of the training images) gained by switching off only that unit's
quantizers. The search (``nafnet_edge.quantization.search``) uses the ranking when an int8 artifact misses its
validation budget (``--max-drift``): it keeps 1, 2, 4, ... of the most sensitive units in float, quantizes and
validates again in the runtime, and reports which units were kept and what that costs in latency against the
all-int8 artifact.
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
from nafnet_edge.validation import psnr

SENSITIVITY_CROPS = 8  # held-out crops the ranking is measured on (``train.held_out_crops``)


def graph_units(graph: torch.nn.Module) -> list[str]:
    """The deploy graph's units in execution order: a U-Net's levels, or a super-resolution graph's ``intro``,
    body blocks (``body.J.blk``, with their stereo attention ``body.J.fusion`` in NAFSSR) and ``up``."""
    if hasattr(graph, "body"):
        units = ["intro"]
        for j, block in enumerate(graph.body):  # type: ignore[arg-type]
            units += [f"body.{j}.blk"] + ([f"body.{j}.fusion"] if block.fusion is not None else [])
        return [*units, "up"]
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
