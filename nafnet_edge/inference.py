"""Reference inference: a loaded model applied to whole images, tiled when they are large.

This is the fp32 PyTorch path that every exported artifact is compared against; with ``device="auto"`` it
runs on CUDA when there is one. Before a forward pass that would not fit in the memory available (a whole camera
frame with tiling off, say) it refuses with the option that fixes it, instead of being killed half way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from nafnet_edge.errors import CheckpointError, ImageError, UsageError
from nafnet_edge.images import RGBImage
from nafnet_edge.model import NAFNet, NAFNetConfig
from nafnet_edge.tiling import DEFAULT_OVERLAP_PX, DEFAULT_TILE_PX, make_grid, run_tiled

DeviceName = Literal["auto", "cpu", "cuda"]

# Peak memory of a forward pass in inference mode: a fixed part (runtime scratch, allocator slack), then per
# padded input pixel a part for the image tensors and, per channel of ``width``, bytes per unit of dw_expand and
# ffn_expand plus a base (TLC's local pooling adds two maps per attention). Measured as the rise of the peak RSS
# (ru_maxrss) of a fresh process over one CPU forward (torch 2.13, 2 and 8 threads) for widths 8 and 16 (4 levels,
# one block each), 32 and 64 (the official layouts), expansions 4, one image channel and TLC, at 256x256 to
# 2048x1024: 0.5 GB (width 8) to 2.7 GB (width 64) at 1024x1024 and 1024x768. Every measurement is under the
# estimate: 1.07-1.2x for the official layouts, up to 1.8x for the tiny test models at 512x512.
_FORWARD_BYTES_FIXED = 128 << 20
_FORWARD_BYTES_PER_PIXEL = 80
_FORWARD_BYTES_PER_CHANNEL = {"per_dw_expand": 10, "per_ffn_expand": 10, "base": 14, "tlc_per_dw_expand": 4}


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


def forward_peak_bytes(config: NAFNetConfig, height: int, width: int, *, batch: int = 1) -> int:
    """Estimated peak memory of ``batch`` forward passes at once on ``height`` x ``width`` inputs (errs high)."""
    k = _FORWARD_BYTES_PER_CHANNEL
    m = config.pad_multiple
    pixels = batch * (-(-height // m) * m) * (-(-width // m) * m)
    per_channel = k["per_dw_expand"] * config.dw_expand + k["per_ffn_expand"] * config.ffn_expand + k["base"]
    if config.arch == "nafnet-local":
        per_channel += k["tlc_per_dw_expand"] * config.dw_expand
    return _FORWARD_BYTES_FIXED + pixels * (config.width * per_channel + _FORWARD_BYTES_PER_PIXEL)


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a forward pass on ``device`` can still use; None where this cannot be told (then nothing is checked).

    CUDA: free device memory plus what PyTorch's cache holds unused. CPU on Linux: MemAvailable, capped by a
    cgroup v2 memory limit (containers) when there is one.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return None
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        available = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    limit = cgroup_available_bytes()
    return available if limit is None else min(available, limit)


def cgroup_available_bytes(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """memory.max minus the memory in use (reclaimable file cache excepted) of a cgroup v2; None when unlimited."""
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        stat = dict(line.split() for line in (root / "memory.stat").read_text().splitlines() if line.strip())
        used = int((root / "memory.current").read_text()) - int(stat.get("inactive_file", 0))
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def _size_text(n_bytes: int) -> str:
    if n_bytes < 1e9:
        return f"{n_bytes / 1e6:.0f} MB"
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes < 10e9 else f"{n_bytes / 1e9:.0f} GB"


def check_forward_memory(
    config: NAFNetConfig,
    height: int,
    width: int,
    *,
    tiled: bool,
    batch: int,
    overlap_px: int,
    device: torch.device,
    name: str,
) -> None:
    """Refuse, saying which option fixes it, a forward pass on ``height`` x ``width`` (``batch`` tiles of that
    size when ``tiled``) that cannot fit in the memory available on ``device``."""
    available = available_memory_bytes(device)
    needed = forward_peak_bytes(config, height, width, batch=batch)
    if available is None or needed <= available:
        return
    if not tiled:
        what = f"{height}x{width} in one pass"
    elif batch > 1:
        what = f"{batch} tiles of {height}x{width} per pass"
    else:
        what = f"{height}x{width} tiles"
    message = f"{name}: restoring {what} needs about {_size_text(needed)}, {_size_text(available)} are available"
    if tiled and batch > 1 and forward_peak_bytes(config, height, width) <= available:
        raise ImageError(f"{message}; fewer tiles per pass: --batch 1")
    for tile in (DEFAULT_TILE_PX, 256, 128, 64):
        if tile < max(height, width) and forward_peak_bytes(config, min(tile, height), min(tile, width)) <= available:
            advice = f"--tile {tile}" + (" (the default)" if tile == DEFAULT_TILE_PX else "")
            advice += f" --overlap {tile // 4}" if overlap_px >= tile else ""
            advice += " --batch 1" if batch > 1 else ""
            raise ImageError(f"{message}; {'smaller tiles' if tiled else 'tile it'}: {advice}")
    raise ImageError(f"{message}; free some memory or use a smaller model")


def check_restore_memory(
    model: NAFNet, height: int, width: int, *, tile_px: int, overlap_px: int, batch: int, name: str
) -> None:
    """:func:`check_forward_memory` for what :func:`restore_tensor` would run on a ``height`` x ``width`` image."""
    whole = tile_px == 0 or (height <= tile_px and width <= tile_px)
    check_forward_memory(
        model.config,
        height if whole else min(tile_px, height),
        width if whole else min(tile_px, width),
        tiled=not whole,
        batch=1 if whole else batch,
        overlap_px=overlap_px,
        device=next(model.parameters()).device,
        name=name,
    )


@torch.inference_mode()
def restore_tensor(
    model: NAFNet,
    image: torch.Tensor,
    *,
    tile_px: int = DEFAULT_TILE_PX,
    overlap_px: int = DEFAULT_OVERLAP_PX,
    batch: int = 1,
    on_tile: Callable[[int], None] | None = None,
    name: str = "the image",
) -> torch.Tensor:
    """Run ``model`` on a 1xCxHxW CPU float tensor; ``tile_px=0`` runs the whole image at once.

    Tiled runs first zero-pad the frame to the model's multiple, as the whole-image run does, and place tiles
    on that multiple, so tiles see the same padding and downsampling grid and follow whole-image output closely.
    Returns the raw (unclamped) float32 CPU output, as the official code does before saving. Raises an
    :class:`ImageError` starting with ``name``, before any work, when a forward pass would not fit in memory,
    and a :class:`CheckpointError` starting with ``name`` when the output holds NaN or Inf.
    """
    device = next(model.parameters()).device
    h, w = image.shape[-2:]
    whole = tile_px == 0 or (h <= tile_px and w <= tile_px)
    check_restore_memory(model, h, w, tile_px=tile_px, overlap_px=overlap_px, batch=batch, name=name)
    if whole:
        out = model(image.to(device)).float().cpu()
        if on_tile is not None:
            on_tile(1)
    else:
        m = model.pad_multiple
        padded = F.pad(image, (0, (m - w % m) % m, 0, (m - h % m) % m))
        out = run_tiled(
            model, padded, tile_px=tile_px, overlap_px=overlap_px, batch=batch, device=device, on_tile=on_tile,
            align_px=m,
        )[..., :h, :w]
    check_finite_output(out, name=name)
    return out


def check_finite_output(output: torch.Tensor, *, name: str) -> None:
    """Refuse an output holding NaN or Inf: the weights overflow float32 on this input, and clamped to [0, 1]
    such an output would become a black or saturated image that looks like a result."""
    if bool(torch.isfinite(output).all()):
        return
    bad = int((~torch.isfinite(output)).sum())
    raise CheckpointError(
        f"{name}: the checkpoint produced non-finite values (NaN or Inf) in {bad:,} of {output.numel():,} output "
        "values, so no image was written for it; its weights overflow float32 on this input: use another checkpoint"
    )


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

    Grayscale images given to an RGB model are replicated to three channels and averaged back; alpha and the
    file metadata (ICC profile, EXIF, dpi) are carried over unchanged.
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
    name = str(image.path) if image.path is not None else "the image"
    y = restore_tensor(model, x, tile_px=tile_px, overlap_px=overlap_px, batch=batch, on_tile=on_tile, name=name)
    out = y[0].clamp(0.0, 1.0).permute(1, 2, 0).numpy()
    if gray_in and out.shape[2] == 3:
        out = out.mean(axis=2, keepdims=True)
    return RGBImage(
        pixels=np.ascontiguousarray(out, dtype=np.float32),
        alpha=image.alpha,
        bit_depth=image.bit_depth,
        metadata=image.metadata,
    )
