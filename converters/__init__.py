"""Exporters to Core ML, ExecuTorch, OpenVINO and ONNX, one module per target, and the runners that execute
their artifacts (installed as ``nafnet_edge.converters``). Modules are imported only when their target is
asked for, so a missing backend never breaks the others."""

from __future__ import annotations

import importlib

from nafnet_edge.converters.base import (
    INPUT_NAME,
    OUTPUT_NAME,
    Converter,
    Exported,
    ExportOptions,
    LoadedRunner,
    Precision,
    Runner,
)
from nafnet_edge.errors import OptionError

TARGETS = {
    "coreml": "nafnet_edge.converters.coreml:CoreMLConverter",
    "executorch": "nafnet_edge.converters.executorch:ExecuTorchConverter",
    "executorch-coreml": "nafnet_edge.converters.coreml:ExecuTorchCoreMLConverter",
    "openvino": "nafnet_edge.converters.openvino:OpenVINOConverter",
    "onnx": "nafnet_edge.converters.onnx:ONNXConverter",
}


def get_converter(target: str) -> Converter:
    """The converter for ``target`` (one of ``TARGETS``)."""
    if target not in TARGETS:
        raise OptionError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)} or all")
    module, name = TARGETS[target].split(":")
    return getattr(importlib.import_module(module), name)()


__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "TARGETS",
    "Converter",
    "ExportOptions",
    "Exported",
    "LoadedRunner",
    "Precision",
    "Runner",
    "get_converter",
]
