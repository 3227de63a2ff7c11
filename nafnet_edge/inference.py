"""Reference inference: a loaded model applied to whole images, tiled when they are large.

This is the fp32 PyTorch path that every exported artifact is compared against; with ``device="auto"`` it
runs on CUDA when there is one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from nafnet_edge.errors import ImageError, UsageError
from nafnet_edge.images import RGBImage
from nafnet_edge.model import NAFNet
from nafnet_edge.tiling import DEFAULT_OVERLAP_PX, DEFAULT_TILE_PX, make_grid, run_tiled

DeviceName = Literal["auto", "cpu", "cuda"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
    return torch.device(name)


def tile_count(height: int, width: int, *, tile_px: int, overlap_px: int, pad_multiple: int = 16) -> int:
    """How many model calls an image of this size needs (1 when tiling is off or the image fits one tile)."""
    if tile_px == 0 or (height <= tile_px and width <= tile_px):
        return 1
    ph, pw = -(-height // pad_multiple) * pad_multiple, -(-width // pad_multiple) * pad_multiple
    return len(make_grid(ph, pw, tile_px=tile_px, overlap_px=overlap_px, align_px=pad_multiple))


@torch.inference_mode()
def restore_tensor(
    model: NAFNet,
    image: torch.Tensor,
    *,
    tile_px: int = DEFAULT_TILE_PX,
    overlap_px: int = DEFAULT_OVERLAP_PX,
    batch: int = 1,
    on_tile: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run ``model`` on a 1xCxHxW CPU float tensor; ``tile_px=0`` runs the whole image at once.

    Tiled runs first zero-pad the frame to the model's multiple, as the whole-image run does, and place tiles
    on that multiple, so tiles see the same padding and downsampling grid and follow whole-image output closely.
    Returns the raw (unclamped) float32 CPU output, as the official code does before saving.
    """
    device = next(model.parameters()).device
    h, w = image.shape[-2:]
    if tile_px == 0 or (h <= tile_px and w <= tile_px):
        out = model(image.to(device)).float().cpu()
        if on_tile is not None:
            on_tile(1)
        return out
    m = model.pad_multiple
    padded = F.pad(image, (0, (m - w % m) % m, 0, (m - h % m) % m))
    out = run_tiled(
        model, padded, tile_px=tile_px, overlap_px=overlap_px, batch=batch, device=device, on_tile=on_tile, align_px=m
    )
    return out[..., :h, :w]


def restore_image(
    model: NAFNet,
    image: RGBImage,
    *,
    tile_px: int = DEFAULT_TILE_PX,
    overlap_px: int = DEFAULT_OVERLAP_PX,
    batch: int = 1,
    on_tile: Callable[[int], None] | None = None,
) -> RGBImage:
    """Restore an image read by :func:`nafnet_edge.images.read_image`; the result is clamped to [0, 1].

    Grayscale images given to an RGB model are replicated to three channels and averaged back; alpha is
    carried over unchanged.
    """
    model_channels = model.config.img_channels
    pixels = image.pixels
    gray_in = pixels.shape[2] == 1
    if pixels.shape[2] != model_channels:
        if gray_in and model_channels == 3:
            pixels = np.repeat(pixels, 3, axis=2)
        else:
            raise ImageError(
                f"this checkpoint restores {model_channels}-channel images and the input has {pixels.shape[2]}; "
                "convert the input to grayscale first"
            )
    x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]
    y = restore_tensor(model, x, tile_px=tile_px, overlap_px=overlap_px, batch=batch, on_tile=on_tile)
    out = y[0].clamp(0.0, 1.0).permute(1, 2, 0).numpy()
    if gray_in and out.shape[2] == 3:
        out = out.mean(axis=2, keepdims=True)
    return RGBImage(pixels=np.ascontiguousarray(out, dtype=np.float32), alpha=image.alpha, bit_depth=image.bit_depth)
