"""ExecuTorch XNNPACK int8: PT2E quantization of the deploy graph, lowered into one XNNPACK partition.

``prepare`` exports the deploy graph (``nafnet_edge.deploy`` with ``target="xnnpack"``), annotates it with
ExecuTorch's ``XNNPACKQuantizer`` (int8 symmetric per-channel weights, int8 per-tensor activations) and inserts
torchao's observers (PTQ) or fake quantizers (QAT). ``export`` converts it to quantize/dequantize form and lowers
it with the XNNPACK partitioner into ``model.pte``, which ``ExecuTorchConverter``'s runner executes.

What runs int8: every convolution outside the norms (3x3 depthwise, 1x1, strided, the transposed-conv
upsampling), the blocks' multiplies (SimpleGate halves, channel attention) and adds (both residuals, the skips,
the global residual), and the pooling. The channel norms stay float inside the same partition (``fp32_norms``):
their statistics span decades per pixel, and one per-tensor int8 scale for the inverse standard deviation
(XNNPACK has no int8 rsqrt, so it gets a scale of its own) rounds high-variance pixels to nothing: int8 norms
cost far more PSNR than the budget allows, float norms a share of latency (docs/int8.md has the figures). Whether
they run fp32 or fp16, and with a centring conv or not, is timed on the CPU at hand (``norm_precision="auto"``,
``nafnet_edge.quantization.norm_kernels``) or asked for; ``Exported.info`` records the choice and the timings.

The deploy graph has no channel slices, so the program avoids the quantized-slice load failure of ExecuTorch
issue 21829. ``Exported.info`` reports the partitions, any op left outside, and the int8/fp32 split of the ops.

Image I/O (``export(..., pixel_format=...)``): the converted graph goes behind ``nafnet_edge.pixels``'
uint8-pixel wrapper, its input quantization set to the 8-bit pixel grid (``pixel_grid_input``: exact on pixels);
``Exported.info["input_quantization"]`` says what the program does with the pixels. The channel moves and scales
run in the XNNPACK partition (in float, on 8-bit values: its slices stay float, so the quantized-slice failure
does not apply); the two conversions (uint8 (de)quantization with scale 1) run on ExecuTorch's quantized kernels
and are listed in ``ops_outside_delegate``, not counted as the network's quantize/dequantize ops.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
from collections import Counter
from collections.abc import Collection
from pathlib import Path
from typing import Any, ClassVar

import torch

from nafnet_edge.converters.base import Exported
from nafnet_edge.converters.executorch import BACKEND, delegation_summary, pixel_conversions, with_io
from nafnet_edge.deploy.modules import ChannelNorm
from nafnet_edge.errors import OptionError
from nafnet_edge.pixels import io_info
from nafnet_edge.quantization import norm_kernels
from nafnet_edge.quantization.norm_kernels import NORM_PRECISIONS, NormPrecision
from nafnet_edge.quantization.pt2e import Pt2eQuantizer, is_qat

SCHEME = "PT2E XNNPACKQuantizer, int8 symmetric per-channel weights, int8 per-tensor activations"
QUANTIZE_OPS = frozenset({"quantize_per_tensor", "quantize_per_channel"})
DEQUANTIZE_OPS = frozenset({"dequantize_per_tensor", "dequantize_per_channel"})
# XNNPACK needs (input scale * weight scale) / output scale >= 2**-32; ExecuTorch floors every scale at 2**-12.
# Activations keep that floor, weights get 2**-18: the bound then holds for outputs up to |508|. The stream scaling
# of the deploy graph (weights writing the residual stream divided by 16) puts a fifth of the trained default
# denoiser's weight rows below 127 * 2**-12, where the coarser floor cost 2.6 dB (PTQ, fp32 vs int8 simulation,
# 44.7 dB with 2**-12, 47.4 dB with 2**-20).
WEIGHT_SCALE_FLOOR = 2.0**-18
QAT_ACTIVATION_OBSERVER: str | None = "HistogramObserver"  # None: the config's moving-average min/max


class XNNPACKQuantizer(Pt2eQuantizer):
    target: ClassVar[str] = "executorch"
    artifact: ClassVar[str] = "model.pte"
    modules: ClassVar[tuple[str, ...]] = ("executorch", "torchao")
    extra: ClassVar[str] = "executorch"

    def __init__(
        self, *, fp32_norms: bool = True, norm_precision: NormPrecision = "auto", keep_float: Collection[str] = ()
    ) -> None:
        super().__init__(keep_float=keep_float)
        self.fp32_norms = fp32_norms  # leave the ChannelNorms unannotated (float inside the XNNPACK partition)
        if norm_precision not in NORM_PRECISIONS:
            raise OptionError(f"norm precision {norm_precision!r} is not one of {', '.join(NORM_PRECISIONS)}")
        self.norm_precision: NormPrecision = norm_precision  # of those float norms: norm_kernels

    def calibrated(self, prepared: torch.nn.Module) -> None:
        fix_activation_ranges(prepared)

    def pt2e_quantizer(self, *, qat: bool) -> Any:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer as PT2EXNNPACKQuantizer,
        )
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

        quantizer = PT2EXNNPACKQuantizer()
        quantizer.set_global(range_safe_config(get_symmetric_quantization_config(is_per_channel=True, is_qat=qat)))
        if qat:  # QAT's per-channel fake quantizer takes axis 0, not a transposed conv's output axis 1: XNNPACK
            # then leaves those convs outside its partition; per-tensor weights keep the upsampling delegated
            per_tensor = range_safe_config(get_symmetric_quantization_config(is_per_channel=False, is_qat=True))
            quantizer.set_module_type(torch.nn.ConvTranspose2d, per_tensor)
        if self.fp32_norms:
            quantizer.set_module_type(ChannelNorm, None)  # None: no annotation inside, excluded from the global
        return quantizer

    def export(
        self, prepared: torch.nn.Module, out_dir: Path, example: torch.Tensor, *, pixel_format: str | None = None
    ) -> Exported:
        """Convert a copy of ``prepared`` (it stays usable) and lower it for ``example``'s size, batch 1; with
        ``pixel_format``, behind 8-bit image I/O (``nafnet_edge.pixels.image_io_module``)."""
        from torchao.quantization.pt2e import allow_exported_model_train_eval

        converted = self.convert(prepared)
        allow_exported_model_train_eval(converted)  # the image-I/O wrapper's .eval() reaches it
        input_grid: dict[str, str] = {}
        if pixel_format is not None:
            input_grid = {"input_quantization": pixel_grid_input(converted)}
        _, channels, h, w = example.shape
        candidates = norm_kernels.variants(converted, self.norm_precision) if self.fp32_norms else {"": {}}
        key = (norm_kernels.choice_key(converted), tuple(candidates), tuple(example.shape), pixel_format)
        timings = None
        if len(candidates) > 1 and key in _CHOSEN:  # timed already in this process (an earlier search round)
            chosen, timings = _CHOSEN[key]
            candidates = {chosen: candidates[chosen]}
        programs = {name: _lower(converted, k, channels, (h, w), pixel_format) for name, k in candidates.items()}
        if len(programs) > 1:
            example_input = programs[norm_kernels.BASELINE].example
            timings = norm_kernels.time_programs({name: p.buffer for name, p in programs.items()}, example_input)
            _CHOSEN[key] = (norm_kernels.pick(timings), timings)
            chosen = _CHOSEN[key][0]
        else:
            chosen = next(iter(programs))
        program = programs[chosen]
        norms = norm_kernels.record(self.norm_precision, candidates[chosen], timings) if self.fp32_norms else {}
        (backends, outside), pixels = program.summary  # the image I/O's two conversions are not the network's
        outside_qdq = {k: v - pixels.get(k, 0) for k, v in outside.items() if _is_quantize_op(k)}
        buffer = program.buffer
        (out_dir / self.artifact).write_bytes(buffer)
        info: dict[str, Any] = {
            "executorch_version": importlib.metadata.version("executorch"),
            "torchao_version": importlib.metadata.version("torchao"),
            "delegate": BACKEND,
            "quantization_scheme": SCHEME,
            "quantization_method": "qat" if is_qat(prepared) else "ptq",
            "fp32_norms": self.fp32_norms,
            **norms,
            "kept_float": sorted(self.keep_float),
            "delegated_partitions": len(backends),
            "delegate_backends": sorted(set(backends)),
            "ops_outside_delegate": {k: n for k, v in outside.items() if (n := v - outside_qdq.get(k, 0))},
            "quantize_dequantize_outside_delegate": sum(outside_qdq.values()),
            **program.precision,
            "program_bytes": len(buffer),
            **io_info(pixel_format),
            **input_grid,
        }
        return Exported(files=[self.artifact], info=info)


_CHOSEN: dict[tuple[Any, ...], tuple[str, dict[str, float]]] = {}  # per process: later search rounds reuse it


@dataclasses.dataclass
class _Program:
    buffer: bytes
    # delegation_summary and pixel_conversions of the lowered edge graph
    summary: tuple[tuple[list[str], dict[str, int]], dict[str, int]]
    precision: dict[str, Any]  # precision_summary of the converted graph
    example: torch.Tensor  # an input of the program's kind (float NCHW, or uint8 NHWC pixels)


def _lower(
    converted: torch.fx.GraphModule,
    kernels: dict[str, str],
    channels: int,
    size: tuple[int, int],
    pixel_format: str | None,
) -> _Program:
    """``converted`` with its norms rewritten to ``kernels`` (a copy), behind the I/O, lowered to XNNPACK."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    graph = copy.deepcopy(converted)
    fp16 = norm_kernels.apply(graph, kernels)
    precision = precision_summary(graph, fp16)
    module, io_example = with_io(graph, channels, size, pixel_format)
    with torch.no_grad():
        exported = torch.export.export(module, (io_example,))
    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    lowered = edge.exported_program().graph_module
    summary = delegation_summary(lowered), pixel_conversions(lowered)  # before to_executorch renames the ops
    return _Program(edge.to_executorch().buffer, summary, precision, io_example)


PIXEL_GRID = (1.0 / 255.0, -128)  # int8 scale and zero point whose codes are 8-bit pixels minus 128


def pixel_grid_input(converted: torch.fx.GraphModule) -> str:
    """Put the graph input's int8 quantization of a converted module on the 8-bit pixel grid (scale 1/255, zero
    point -128, in place), and say what the image-I/O program then does with the pixels.

    Calibration on [0, 1] inputs gives nearly that grid (scale 0.00392 within 0.1% of 1/255, zero point -128 on
    the tiny test model), so the codes of 8-bit pixels are already distinct; on the exact grid ``quantize(p /
    255)`` is ``p - 128`` for every byte ``p`` and the dequantized input is ``p / 255`` itself: the program's
    input quantization loses nothing. It still computes in float on the way: ExecuTorch's dequantize kernel (scale
    1; XNNPACK converts no dtypes) turns the uint8 pixels into floats, XNNPACK moves the channels, multiplies by
    1/255 and quantizes to int8. Graphs whose input is not quantized per tensor to int8 stay as they are."""
    inputs = [n for n in converted.graph.nodes if n.op == "placeholder"]
    quantizes = [
        q
        for x in inputs
        for q in x.users
        if _op_name(q) == "quantize_per_tensor" and tuple(q.args[3:6]) == (-128, 127, torch.int8)
    ]
    for q in quantizes:
        for n in [q, *[u for u in q.users if _op_name(u) == "dequantize_per_tensor"]]:
            n.args = (n.args[0], *PIXEL_GRID, *n.args[3:])
    converted.recompile()
    rewired = len(quantizes)
    if not rewired:
        return "uint8 -> float (dequantize kernel, scale 1) -> x / 255 inside XNNPACK; the network's input is not int8"
    return (
        "uint8 -> float (dequantize kernel, scale 1) -> x / 255 -> int8 with scale 1/255, zero point -128 inside "
        "XNNPACK: exactly pixel - 128"
    )


def _unfused(config: Any) -> Any:
    """``config`` with ``FakeQuantize`` in place of ``FusedMovingAvgObsFakeQuantize`` (same observers and eps).

    The fused kernel computes its scale without the observer's ``eps`` floor (2**-12 in XNNPACK's configs), while
    ``convert_pt2e`` takes the observer's scale, floor included: every range below 127 * 2**-12 ~ 0.031 (small
    weight rows, quiet activations) trained on a finer grid than the program runs. On the tiny test model after
    80 QAT steps the fused quantizers gave 36.8 dB against fp32 and their conversion 24.1 dB. ``FakeQuantize``
    asks the observer for its scale, so training and the program agree.
    """
    from torchao.quantization.pt2e import FakeQuantize, FusedMovingAvgObsFakeQuantize

    def unfuse(spec: Any) -> Any:
        ctr = getattr(spec, "observer_or_fake_quant_ctr", None)
        partial = getattr(ctr, "p", None)
        if partial is None or partial.func is not FusedMovingAvgObsFakeQuantize:
            return spec
        return dataclasses.replace(spec, observer_or_fake_quant_ctr=FakeQuantize.with_args(**partial.keywords))

    return dataclasses.replace(
        config,
        input_activation=unfuse(config.input_activation),
        output_activation=unfuse(config.output_activation),
        weight=unfuse(config.weight),
    )


def _with_weight_eps(config: Any, eps: float) -> Any:
    """``config`` with its weight observer's scale floor set to ``eps``."""
    partial = config.weight.observer_or_fake_quant_ctr.p
    ctr = partial.func.with_args(**{**partial.keywords, "eps": eps})
    return dataclasses.replace(config, weight=dataclasses.replace(config.weight, observer_or_fake_quant_ctr=ctr))


def fix_activation_ranges(prepared: torch.nn.Module) -> None:
    """Stop the activation fake quantizers' observers: the calibration's histogram ranges (PTQ's) stay, and QAT
    adapts the weights to them; the weight ranges follow the weights until the loop freezes them. Ranges left to
    move during training (moving averages of 4-crop batches) shrank toward single batches and cost the trained
    default denoiser 1.8 dB of int8 fidelity in 150 steps, before the learning rate was made relative."""
    from torchao.quantization.pt2e import FakeQuantizeBase
    from torchao.quantization.pt2e.observer import HistogramObserver

    for m in prepared.modules():
        observer = getattr(m, "activation_post_process", None)
        if isinstance(m, FakeQuantizeBase) and isinstance(observer, HistogramObserver):
            m.disable_observer()


def _with_activation_observer(config: Any, observer: Any) -> Any:
    """``config`` with its activation fake quantizers ranged by ``observer`` (a class) instead of their default."""

    def replace(spec: Any) -> Any:
        partial = spec.observer_or_fake_quant_ctr.p
        ctr = partial.func.with_args(**{**partial.keywords, "observer": observer})
        return dataclasses.replace(spec, observer_or_fake_quant_ctr=ctr)

    return dataclasses.replace(
        config, input_activation=replace(config.input_activation), output_activation=replace(config.output_activation)
    )


def range_safe_config(config: Any) -> Any:
    """A PT2E config (ExecuTorch's or LiteRT's) with fake quantizers that agree with the conversion and a finer
    weight-scale floor."""
    config = _with_weight_eps(_unfused(config), WEIGHT_SCALE_FLOOR)
    if config.is_qat and QAT_ACTIVATION_OBSERVER is not None:
        from torchao.quantization.pt2e import observer

        config = _with_activation_observer(config, getattr(observer, QAT_ACTIVATION_OBSERVER))
    return config


def _is_quantize_op(name: str) -> bool:
    """Quantize or dequantize, under any of the names the graphs give them."""
    return any(op in name for op in QUANTIZE_OPS | DEQUANTIZE_OPS)


def _op_name(node: torch.fx.Node) -> str:
    """The operator without namespace and overload: ``conv2d``, ``dequantize_per_tensor``."""
    packet = getattr(node.target, "overloadpacket", None)
    return packet.__name__ if packet is not None else getattr(node.target, "__name__", str(node.target))


def precision_summary(converted: torch.fx.GraphModule, fp16: Collection[torch.fx.Node] = ()) -> dict[str, Any]:
    """Which compute ops of a converted (quantize/dequantize) graph run int8, which fp32 and which fp16 (``fp16``:
    the nodes ``norm_kernels.apply`` made fp16), and how many int8<->float conversions the runtime performs (graph
    input and output included).

    An op runs int8 when each of its activation inputs comes through a dequantize and its output goes only
    into quantizes; XNNPACK fuses those into one int8 kernel. Every other dequantize or quantize is a conversion.
    """
    int8: Counter[str] = Counter()
    fp32: Counter[str] = Counter()
    half: Counter[str] = Counter()
    is_int8: dict[torch.fx.Node, bool] = {}
    fp16 = set(fp16)
    for node in converted.graph.nodes:
        if node.op != "call_function" or _op_name(node) in QUANTIZE_OPS | DEQUANTIZE_OPS | {"getitem"}:
            continue
        activations = [a for a in node.all_input_nodes if a.op != "get_attr"]
        quantized_in = all(_op_name(a) in DEQUANTIZE_OPS for a in activations if a.op == "call_function")
        quantized_in = quantized_in and all(a.op == "call_function" for a in activations)
        quantized_out = bool(node.users) and all(_op_name(u) in QUANTIZE_OPS for u in node.users)
        is_int8[node] = quantized_in and quantized_out
        (int8 if is_int8[node] else half if node in fp16 else fp32)[_op_name(node)] += 1
    conversions = 0
    for node in converted.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node)
        if name in DEQUANTIZE_OPS and node.args[0].op != "get_attr":  # weights are not activations
            conversions += sum(1 for u in node.users if not is_int8.get(u, False))
        elif name in QUANTIZE_OPS:
            source = node.args[0]
            conversions += int(not is_int8.get(source, False))
    return {
        "int8_ops": dict(sorted(int8.items())),
        "fp32_ops": dict(sorted(fp32.items())),
        **({"fp16_ops": dict(sorted(half.items()))} if half else {}),
        "int8_fp32_conversions": conversions,
    }
