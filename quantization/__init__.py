"""INT8 per target (installed as ``nafnet_edge.quantization``): one quantizer per runtime, one training loop.

Quantization starts from the deploy graph. PTQ calibrates it; QAT then fine-tunes the fake-quantized graph
against the fp32 teacher (or ground truth) before export. The artifacts run in the same runners as the fp32
converters' (``nafnet_edge.converters``).
"""

from __future__ import annotations

import importlib
from collections.abc import Collection
from typing import Any

from nafnet_edge.errors import OptionError
from nafnet_edge.quantization.base import Quantizer


def quantizer_targets() -> list[str]:
    """The registered targets (``nafnet_edge.converters.TARGETS``) that name an int8 quantizer."""
    from nafnet_edge.converters import target_class, target_names

    return [name for name in target_names() if target_class(name).quantizer]


def get_quantizer(target: str, *, keep_float: Collection[str] = (), **options: Any) -> Quantizer:
    """The int8 quantizer of ``target`` (its ``Target.quantizer``) leaving the deploy-graph units ``keep_float``
    in floating point; ``options`` go to its constructor (``get_quantizer("coreml", mode="weights")``)."""
    from nafnet_edge.converters import target_class, target_names

    path = target_class(target).quantizer if target in target_names() else None
    if path is None:
        raise OptionError(f"int8 is available for --target {' or '.join(quantizer_targets())}, not {target}")
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)(keep_float=keep_float, **options)


__all__ = ["Quantizer", "get_quantizer", "quantizer_targets"]
