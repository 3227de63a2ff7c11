"""The targets: one module per runtime (Core ML, ExecuTorch, OpenVINO, ONNX, LiteRT), each holding everything
nafnet-edge knows about it: export, the runtime session used by validation and ``bench``, its options, its int8
quantizer, its usage note (installed as ``nafnet_edge.converters``).

``TARGETS`` is the registry: adding a target is one module with a ``Target`` subclass and one line here (or
``register(cls)`` at run time). Modules are imported only when their target is asked for; they import their
backend inside methods, so a missing backend never breaks the others.
"""

from __future__ import annotations

import importlib

from nafnet_edge.converters.base import (
    INPUT_NAME,
    OUTPUT_NAME,
    Exported,
    ExportOptions,
    NotRunnable,
    Precision,
    Runner,
    Session,
    SessionSettings,
    Target,
    TargetOption,
    pixel_format_of,
    pixel_session,
)
from nafnet_edge.errors import OptionError

TARGETS: dict[str, str | type[Target]] = {
    "coreml": "nafnet_edge.converters.coreml:CoreMLTarget",
    "executorch": "nafnet_edge.converters.executorch:ExecuTorchTarget",
    "executorch-coreml": "nafnet_edge.converters.coreml:ExecuTorchCoreMLTarget",
    "openvino": "nafnet_edge.converters.openvino:OpenVINOTarget",
    "onnx": "nafnet_edge.converters.onnx:ONNXTarget",
    "litert": "nafnet_edge.converters.litert:LiteRTTarget",
}


def register(cls: type[Target]) -> type[Target]:
    """Add a target at run time (usable as a class decorator); its ``name`` must be new."""
    if cls.name in TARGETS and TARGETS[cls.name] is not cls:
        raise ValueError(f"a target named {cls.name!r} is already registered")
    TARGETS[cls.name] = cls
    return cls


def target_names() -> list[str]:
    """Every registered target, in registration order."""
    return list(TARGETS)


def target_class(name: str) -> type[Target]:
    """The ``Target`` subclass registered as ``name`` (importing its module on first use)."""
    if name not in TARGETS:
        raise OptionError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)} or all")
    entry = TARGETS[name]
    if isinstance(entry, str):
        module, attr = entry.split(":")
        entry = TARGETS[name] = getattr(importlib.import_module(module), attr)
    return entry


def get_target(name: str) -> Target:
    """A ``Target`` instance for ``name``."""
    return target_class(name)()


def all_options() -> list[tuple[type[Target], TargetOption]]:
    """Every registered target's own options, with their owner."""
    return [(cls, option) for cls in map(target_class, TARGETS) for option in cls.options]


__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "TARGETS",
    "ExportOptions",
    "Exported",
    "NotRunnable",
    "Precision",
    "Runner",
    "Session",
    "SessionSettings",
    "Target",
    "TargetOption",
    "all_options",
    "get_target",
    "register",
    "target_class",
    "pixel_format_of",
    "pixel_session",
    "target_names",
]
