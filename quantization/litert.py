"""LiteRT int8: PT2E quantization of the deploy graph with litert-torch's quantizer, converted to a ``.tflite``.

``prepare`` exports the deploy graph (``nafnet_edge.deploy`` in the LiteRT target's norm form, ``mvn``), annotates
it with litert-torch's ``PT2EQuantizer`` (int8 symmetric per-channel weights, int8 per-tensor
activations) and inserts torchao's observers (PTQ) or fake quantizers (QAT). ``export`` converts it to
quantize/dequantize form and hands that graph to ``litert_torch.convert`` in static quantize/dequantize mode
(``QuantConfig(pt2e_quantizer=...)``), which folds each quantize/dequantize pair around an op into the op's int8
kernel. ``LiteRTTarget``'s session runs ``model.tflite`` in the LiteRT interpreter (XNNPACK on CPU).

What runs int8 is what litert-torch's quantizer annotates: the 3x3 depthwise, 1x1 and strided convolutions, the
blocks' multiplies (SimpleGate halves, channel attention) and the attention pooling. What stays float32: the
channel norms (``fp32_norms``, for the reason ``nafnet_edge.quantization.xnnpack`` gives; ``in_channel_norm`` says
why they are cleared after annotation), the residual, skip and global adds (litert-torch 0.10.0's add pattern
matches ``torch.add`` / ``operator.add`` sources only, which ``torch.export`` in torch 2.13 no longer records, so
it annotates no add), the transposed-conv upsampling (its quantizer has no transposed-conv pattern) and the
NCHW/NHWC transposes at the ends. The residual stream is therefore float32 between blocks. ``Exported.info``
reports the split, counted in the converted file (``precision_summary``).

Ranges as ExecuTorch's int8: weight scales floored at 2**-18 instead of the config's 2**-12, QAT fake quantizers
that take their scale from the observer (the conversion's), activation ranges from PTQ's histograms kept fixed
during QAT (``nafnet_edge.quantization.xnnpack`` has the measurements).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
from collections import Counter
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from nafnet_edge.converters.base import Exported
from nafnet_edge.converters.litert import (
    SIGNATURE,
    TfliteGraph,
    convert_to_tflite,
    gpu_delegate_readiness,
    image_io,
    op_histogram,
)
from nafnet_edge.deploy.modules import ChannelNorm
from nafnet_edge.pixels import check_pixel_format, io_info, pixel_channels
from nafnet_edge.quantization.pt2e import Pt2eQuantizer, is_qat
from nafnet_edge.quantization.xnnpack import PIXEL_GRID, fix_activation_ranges, pixel_grid_input, range_safe_config

SCHEME = "PT2E litert-torch PT2EQuantizer, int8 symmetric per-channel weights, int8 per-tensor activations"
CONVERSION_OPS = frozenset({"QUANTIZE", "DEQUANTIZE"})


class LiteRTQuantizer(Pt2eQuantizer):
    target: ClassVar[str] = "litert"
    artifact: ClassVar[str] = "model.tflite"
    modules: ClassVar[tuple[str, ...]] = ("litert_torch", "ai_edge_litert", "torchao")
    extra: ClassVar[str] = "litert"

    def __init__(self, *, fp32_norms: bool = True, keep_float: Collection[str] = ()) -> None:
        super().__init__(keep_float=keep_float)
        self.fp32_norms = fp32_norms  # leave the ChannelNorms unannotated (float32 between int8 ops)

    def calibrated(self, prepared: torch.nn.Module) -> None:
        fix_activation_ranges(prepared)

    def pt2e_quantizer(self, *, qat: bool) -> Any:
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config

        fp32_norms = self.fp32_norms

        class DeployGraphQuantizer(PT2EQuantizer):
            # no conv + batch-norm patterns: the deploy graph has none, and tracing them fails in litert-torch
            # 0.10.0 with torchao 0.18 (it hands torch.export a function), which broke every QAT prepare
            STATIC_QAT_ONLY_OPS: ClassVar[list[str]] = []

            def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
                model = super().annotate(model)
                if fp32_norms:  # its module-type filter misses torch.export's stacks, which name types as strings
                    for node in model.graph.nodes:
                        if in_channel_norm(node):
                            node.meta.pop("quantization_annotation", None)
                return model

        quantizer = DeployGraphQuantizer()
        quantizer.set_global(range_safe_config(get_symmetric_quantization_config(is_per_channel=True, is_qat=qat)))
        return quantizer

    def convert(self, prepared: torch.nn.Module) -> torch.fx.GraphModule:
        """A quantize/dequantize copy of ``prepared`` (which stays usable) with its weights left as float constants
        behind quantize ops: litert-torch folds those itself and refuses torchao's pre-folded int8 weights."""
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        model = copy.deepcopy(prepared).requires_grad_(False)
        self.set_training(model, False)
        return convert_pt2e(model, fold_quantize=False)

    def export(
        self, prepared: torch.nn.Module, out_dir: Path, example: torch.Tensor, *, pixel_format: str | None = None
    ) -> Exported:
        """Convert a copy of ``prepared`` (it stays usable) to ``model.tflite`` for ``example``'s size, batch 1;
        with ``pixel_format``, behind LiteRT's 8-bit image I/O (``nafnet_edge.converters.litert.image_io``)."""
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e import allow_exported_model_train_eval

        converted = self.convert(prepared)
        allow_exported_model_train_eval(converted)
        converted.eval()  # the converter warns about modules left in training mode
        _, channels, h, w = example.shape
        module: torch.nn.Module = converted
        sample = torch.zeros(1, channels, h, w)
        input_grid: dict[str, str] = {}
        if pixel_format is not None:
            check_pixel_format(pixel_format, channels)
            input_grid = {"input_quantization": _pixel_input(converted)}
            module = image_io(converted, pixel_format)
            sample = torch.zeros(1, h, w, pixel_channels(pixel_format), dtype=torch.uint8)
        path = out_dir / self.artifact
        # the quantizer only tells the converter that the graph is static int8 quantize/dequantize
        static = QuantConfig(pt2e_quantizer=self.pt2e_quantizer(qat=False))
        with strict_qdq():
            convert_to_tflite(module, sample, path, quant_config=static)
        _check_io(path, sample.dtype)
        info: dict[str, Any] = {
            "litert_torch_version": importlib.metadata.version("litert-torch"),
            "ai_edge_litert_version": importlib.metadata.version("ai-edge-litert"),
            "torchao_version": importlib.metadata.version("torchao"),
            "signature": SIGNATURE,
            "quantization_scheme": SCHEME,
            "quantization_method": "qat" if is_qat(prepared) else "ptq",
            "fp32_norms": self.fp32_norms,
            "kept_float": sorted(self.keep_float),
            **precision_summary(path),
            "op_histogram": op_histogram(path),
            "gpu_delegate": gpu_delegate_readiness(path),
            "file_bytes": path.stat().st_size,
            **io_info(pixel_format),
            **input_grid,
        }
        return Exported(files=[self.artifact], info=info)


@contextlib.contextmanager
def strict_qdq() -> Iterator[None]:
    """litert-torch conversions in strict quantize/dequantize mode while inside: the converter keeps the graph's
    quantize and dequantize ops where they are (fusing each pair around an op into its int8 kernel) instead of
    moving them. Its default mode may move a quantize onto the graph input and then read the input as int8
    everywhere: with the ``ending`` unit kept float, the file's input became int8 and its global residual added a
    dequantized (8-bit) copy of the input. litert-torch 0.10.0 turns the mode on in its V2 converter only, which
    takes no quantization config; its V1 converter builds its config inside ``litert_torch.convert``, so the
    config class is swapped for one with the mode on."""
    from unittest import mock

    from litert_torch._convert import litert_converter

    api = litert_converter.converter_api_ext
    config_class = api.ConvertToTFLConfig

    def strict_config() -> Any:
        config = config_class()
        config.strict_qdq_mode = True
        return config

    with mock.patch.object(api, "ConvertToTFLConfig", strict_config):
        yield


def _check_io(path: Path, dtype: torch.dtype) -> None:
    """Refuse a converted file whose input or output is not of ``dtype`` (float32 tensors, uint8 pixels)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    wanted = np.dtype(str(dtype).removeprefix("torch."))
    found = [np.dtype(d["dtype"]) for d in [*interpreter.get_input_details(), *interpreter.get_output_details()]]
    if any(d != wanted for d in found):
        raise RuntimeError(f"litert-torch wrote {path.name} with I/O of types {found}, not {wanted}")


def in_channel_norm(node: torch.fx.Node) -> bool:
    """Whether ``node`` of an exported deploy graph computes part of a ``ChannelNorm``.

    litert-torch's quantizer gives mean ops the quantization of their input (``propagate_annotation``), the
    norms' channel means included: a norm's first mean would run int8 on its input's grid, and a unit kept float
    would leave the next unit's mean sharing a quantization that no longer exists (torchao's prepare then fails)."""
    name = f"{ChannelNorm.__module__}.{ChannelNorm.__qualname__}"
    stack = node.meta.get("nn_module_stack") or {}
    return any(t is ChannelNorm or t == name for _, t in stack.values())


def _pixel_input(converted: torch.fx.GraphModule) -> str:
    """Put the int8 input quantization of ``converted`` on the 8-bit pixel grid (``pixel_grid_input``) and say
    what the image-I/O file then does with the pixels."""
    pixel_grid_input(converted)
    inputs = [n for n in converted.graph.nodes if n.op == "placeholder"]
    if not any(tuple(q.args[1:3]) == PIXEL_GRID for x in inputs for q in x.users):
        return "uint8 -> float32 (CAST) -> x / 255; the network's input is not int8"
    return "uint8 -> float32 (CAST) -> x / 255 -> int8 with scale 1/255, zero point -128: exactly pixel - 128"


def precision_summary(path: Path) -> dict[str, Any]:
    """Which operators of the ``.tflite`` at ``path`` compute in int8 and which in float32 (by their output
    tensor's type), and how many QUANTIZE/DEQUANTIZE operators convert activations between the two (graph input
    and output included). The image I/O's CASTs and pixel arithmetic count as float32."""
    graph = TfliteGraph(path)
    int8: Counter[str] = Counter()
    fp32: Counter[str] = Counter()
    conversions = 0
    for op in graph.operators:
        name = graph.op_name(op)
        if name in CONVERSION_OPS:
            conversions += 1
        else:
            (int8 if graph.outputs(op)[0].dtype == "INT8" else fp32)[name] += 1
    return {
        "int8_ops": dict(sorted(int8.items())),
        "fp32_ops": dict(sorted(fp32.items())),
        "int8_fp32_conversions": conversions,
    }
