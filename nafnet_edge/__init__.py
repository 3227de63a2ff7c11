"""nafnet-edge: take a trained NAFNet checkpoint to Core ML, ExecuTorch, OpenVINO and ONNX, measured.

The public API is imported lazily so that ``import nafnet_edge`` (and ``nafnet-edge --help``) stays fast.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# In a source checkout ``converters/`` and ``quantization/`` sit beside this folder; installed, setuptools'
# package-dir puts them inside it (nafnet_edge.converters, nafnet_edge.quantization). So that ``python -m
# nafnet_edge`` run in the checkout (where this folder shadows the installed package) finds them too, the checkout
# root joins this package's search path. Installed copies have no pyproject.toml beside them and are left alone.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "converters" / "__init__.py").is_file():
    __path__.append(str(_checkout))

_EXPORTS = {
    "NAFNet": "nafnet_edge.model",
    "NAFNetLocal": "nafnet_edge.model",
    "Baseline": "nafnet_edge.model",
    "BaselineLocal": "nafnet_edge.model",
    "NAFNetSR": "nafnet_edge.model",
    "NAFSSR": "nafnet_edge.model",
    "NAFNetConfig": "nafnet_edge.model",
    "build_model": "nafnet_edge.model",
    "load_checkpoint": "nafnet_edge.checkpoint",
    "infer_config": "nafnet_edge.checkpoint",
    "default_checkpoint_path": "nafnet_edge.checkpoint",
    "LoadedCheckpoint": "nafnet_edge.checkpoint",
    "RELEASES": "nafnet_edge.releases",
    "RELEASE_SHAPES": "nafnet_edge.releases",
    "read_image": "nafnet_edge.images",
    "write_image": "nafnet_edge.images",
    "restore_image": "nafnet_edge.inference",
    "restore_tensor": "nafnet_edge.inference",
    "restore_stereo": "nafnet_edge.inference",
    "run_tiled": "nafnet_edge.tiling",
    "tile_plan": "nafnet_edge.tiling",
    "TilePlan": "nafnet_edge.tiling",
    "count_macs": "nafnet_edge.complexity",
    # the pipeline, one function per step (nafnet_edge.api), and what they return
    "load": "nafnet_edge.api",
    "convert": "nafnet_edge.api",
    "quantize": "nafnet_edge.api",
    "validate": "nafnet_edge.api",
    "bench": "nafnet_edge.api",
    "report": "nafnet_edge.api",
    "ValidationResult": "nafnet_edge.api",
    "ConvertResult": "nafnet_edge.conversion",
    "BenchReport": "nafnet_edge.benchmark",
    "BenchResult": "nafnet_edge.benchmark",
    "Manifest": "nafnet_edge.manifest",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nafnet_edge' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
