"""INT8 per target (installed as ``nafnet_edge.quantization``): one quantizer per runtime, one training loop.

Quantization starts from the deploy graph. PTQ calibrates it; QAT then fine-tunes the fake-quantized graph
against the fp32 teacher (or ground truth) before export. The artifacts run in the same runners as the fp32
converters' (``nafnet_edge.converters``).
"""

from __future__ import annotations

import importlib
from typing import Any

from nafnet_edge.errors import OptionError
from nafnet_edge.quantization.base import Quantizer

QUANTIZERS = {
    "coreml": "nafnet_edge.quantization.coreml:CoreMLQuantizer",
    "executorch": "nafnet_edge.quantization.xnnpack:XNNPACKQuantizer",
    "openvino": "nafnet_edge.quantization.openvino:OpenVINOQuantizer",
}


def get_quantizer(target: str, **options: Any) -> Quantizer:
    """The int8 quantizer for ``target`` (one of ``QUANTIZERS``); ``options`` go to its constructor
    (``get_quantizer("coreml", mode="weights")``)."""
    if target not in QUANTIZERS:
        raise OptionError(f"int8 is available for --target {' or '.join(QUANTIZERS)}, not {target}")
    module, name = QUANTIZERS[target].split(":")
    return getattr(importlib.import_module(module), name)(**options)


__all__ = ["QUANTIZERS", "Quantizer", "get_quantizer"]
