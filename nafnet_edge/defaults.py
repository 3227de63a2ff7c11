"""The defaults the ``nafnet-edge`` command and the Python API share: one named constant each, so a parser and a
function never disagree. Imports nothing heavy (no torch): the parser reads it at start-up."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Final

from nafnet_edge.errors import UsageError

# models shipped inside the package, by the name every command and ``api.load`` accept in place of a checkpoint path
SHIPPED_MODELS: Final = {
    "denoise-s": "nafnet-edge-denoise-s.safetensors",  # the embedded default (docs/model-card.md)
    "sr-x2": "nafnet-edge-sr-x2.safetensors",  # NAFNet-SR x2, bicubic degradation (docs/model-card-sr.md)
}

# convert / quantize
INPUT_SIZE: Final = (256, 256)  # fixed model input (tile) of an artifact, height x width; int8 trains on crops of it
OUTPUT_DIR: Final = Path("artifacts")  # where convert/quantize write OUT/<target>-<precision>/
REFERENCE_DEVICE: Final = "auto"  # where the fp32 reference of validation runs: CUDA when present, else CPU
PARAM_KEY: Final = "auto"  # entry of a wrapped checkpoint: 'params' first, as in the official files

# validation
VALIDATION_OVERLAP_PX: Final = 32  # tile overlap of validation (and of convert's manifest); smaller than the tile
VALIDATION_DATA_NOTE: Final = "shipped Kodak photos, Gaussian noise sigma 25/255 (seeded)"  # the default validation set

# int8 training (quantize, convert --precision int8)
METHOD: Final = "qat"  # quantization-aware fine-tuning; "ptq" calibrates only
STEPS: Final = 300  # QAT optimisation steps
TRAIN_BATCH: Final = 4  # crops per QAT step
LR: Final = 1e-3  # AdamW step relative to each tensor's RMS, cosine schedule
SEED: Final = 0  # seed of the training crops and their order
SEARCH_ROUNDS: Final = 4  # rounds keeping the most sensitive units float when the artifact misses its drift budget

# bench (and convert/quantize --bench)
BENCH_RUNS: Final = 20  # timed runs per artifact
BENCH_WARMUP: Final = 3  # untimed runs first
BENCH_TOP: Final = 8  # operators listed per profile
BENCH_OVERLAP_PX: Final = 32  # tile overlap of bench --frame

# run
RUN_TILE_PX: Final = 512  # tile side of full-resolution restoration, 0 = whole image
RUN_OVERLAP_PX: Final = 64  # tile overlap of run
TILE_BATCH: Final = 1  # tiles per forward pass

# report
REPORT_IMAGES: Final = 3  # validation images cropped into the page

# inspect / reparam
GMACS_SIZE: Final = (256, 256)  # input size inspect counts multiply-accumulates at
STREAM_SCALE: Final = 16.0  # power of two dividing the residual stream so fp16 norms cannot overflow


def shipped_model_path(name: str) -> str:
    """The file of the shipped model ``name`` (see ``SHIPPED_MODELS``), or ``name`` itself, a checkpoint path. A
    name that is also a file here is refused as ambiguous: ``./NAME`` is the file."""
    if name not in SHIPPED_MODELS:
        return name
    if os.path.lexists(name):
        raise UsageError(
            f"{name!r} is both a file here and the name of a model shipped with nafnet-edge: write ./{name} for the "
            "file, or run from another folder for the shipped model"
        )
    return str(resources.files("nafnet_edge") / "weights" / SHIPPED_MODELS[name])
