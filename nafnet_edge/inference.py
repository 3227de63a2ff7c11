"""Inference on whole images, tiled when they are large: with a loaded model, or with an exported artifact.

The model path is the fp32 PyTorch reference that every exported artifact is compared against; with
``device="auto"`` it runs on CUDA when there is one. Before a forward pass that would not fit in the memory
available (a whole camera frame with tiling off, say) it refuses with the option that fixes it, instead of being
killed half way. The artifact path (:func:`restore_image_with`) runs an artifact's runtime session on its fixed
input size, tiled and padded exactly as validation ran it.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from nafnet_edge.errors import ArtifactError, CheckpointError, ImageError, UsageError
from nafnet_edge.images import RGBImage
from nafnet_edge.model import NAFNetConfig, RestorationNet
from nafnet_edge.tiling import DEFAULT_OVERLAP_PX, DEFAULT_TILE_PX, TileSize, make_grid, run_tiled

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
# The NAFNet-SR family: the per-pixel part counts once per output pixel (up_scale**2 per input pixel), the channel
# part once per view; NAFSSR's cross-attention adds W x W float32 maps per row (scores, scaled scores, the two
# softmaxes), whatever the width of the model. Measured as above (1 thread) for NAFNetSR widths 16 and 32 and
# NAFSSR widths 16 and 48, x2 and x4, at 64x512 to 512x768 per view: the estimate is 1.6-2.8x the measurement.
_ATTENTION_MAPS = 4
# Peak memory of `run` for one image besides the forward passes, per pixel, is at writing: the float32 input
# (colour and alpha) and result, the quantizer's float32 temporaries (two per output channel), the 8/16-bit
# samples and copies of the encoded file; reading (the decoded samples and two float32 copies) and restoring (the
# input and the tiler's output accumulator, filled in place) stay under it. Measured as the rise of the peak RSS
# (VmHWM) over read_image, restore_image and write_image of noise images (incompressible) of 3 to 12 megapixels,
# with an RGB model, against the estimate: RGB 8-bit PNG 52 (72), JPEG 62 (72), RGB 16-bit PNG 75 (96), RGBA
# 8-bit PNG 68 (84), RGBA 16-bit PNG 100 (116) and TIFF 74 (116), gray 8-bit PNG 24 (48) bytes per pixel.
_FRAME_BYTES = {"per_input_channel": 4, "per_output_channel": 12, "per_sample_byte": 8}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
    return torch.device(name)


def tile_count(
    height: int, width: int, *, tile_px: int, overlap_px: int, pad_multiple: int = 16, full_width: bool = False
) -> int:
    """How many model calls an image of this size needs (1 when tiling is off or the image fits one tile);
    ``full_width``: tiles are row bands ``tile_px`` high (the stereo models, see :func:`tile_size`)."""
    if whole_image(height, width, tile_px=tile_px, full_width=full_width):
        return 1
    ph, pw = -(-height // pad_multiple) * pad_multiple, -(-width // pad_multiple) * pad_multiple
    tile = (tile_px, pw) if full_width else tile_px
    return len(make_grid(ph, pw, tile_px=tile, overlap_px=overlap_px, align_px=pad_multiple))


def whole_image(height: int, width: int, *, tile_px: int, full_width: bool = False) -> bool:
    """True when one model call covers the image: tiling off (``tile_px`` 0) or the image within one tile."""
    return tile_px == 0 or (height <= tile_px and (full_width or width <= tile_px))


def full_width_tiles(config: NAFNetConfig) -> bool:
    """Whether ``config``'s model is tiled in full-width row bands: the stereo models (NAFSSR), whose
    cross-attention matches every pixel against its whole row of the other view (the disparity search), so a tile
    that cuts the width cuts the search; see docs/tiling.md."""
    return config.views > 1


def tile_size(config: NAFNetConfig, tile_px: int, width: int) -> TileSize:
    """The tile :func:`restore_tensor` runs ``config``'s model on for an image ``width`` px wide (padded)."""
    return (tile_px, width) if full_width_tiles(config) else tile_px


def forward_peak_bytes(config: NAFNetConfig, height: int, width: int, *, batch: int = 1) -> int:
    """Estimated peak memory of ``batch`` forward passes at once on ``height`` x ``width`` inputs (errs high)."""
    k = _FORWARD_BYTES_PER_CHANNEL
    m = config.pad_multiple
    ph, pw = -(-height // m) * m, -(-width // m) * m
    pixels = batch * ph * pw
    per_channel = k["per_dw_expand"] * config.dw_expand + k["per_ffn_expand"] * config.ffn_expand + k["base"]
    if config.local:
        per_channel += k["tlc_per_dw_expand"] * config.dw_expand
    per_pixel = config.views * (config.width * per_channel + _FORWARD_BYTES_PER_PIXEL * config.up_scale**2)
    attention = batch * ph * pw * pw * 4 * _ATTENTION_MAPS if config.fusion else 0
    return _FORWARD_BYTES_FIXED + pixels * per_pixel + attention


def frame_peak_bytes(
    height: int,
    width: int,
    *,
    channels: int = 3,
    alpha: bool = True,
    bit_depth: int = 16,
    model_channels: int = 3,
    up_scale: int = 1,
) -> int:
    """Estimated peak memory of reading, restoring and writing a ``height`` x ``width`` image besides the forward
    passes: the whole-image buffers, which tiling does not shrink. ``channels``, ``alpha`` and ``bit_depth`` are
    the image's (:class:`nafnet_edge.images.ImageProbe` has them); the defaults are the largest (errs high). A
    super-resolution model's output and what is written are ``up_scale``**2 times the input's pixels."""
    k = _FRAME_BYTES
    stored = channels + alpha
    per_pixel = k["per_input_channel"] * stored + up_scale**2 * (
        k["per_output_channel"] * max(channels, model_channels) + k["per_sample_byte"] * stored * bit_depth // 8
    )
    return height * width * per_pixel


def check_tiling(tile_px: int, overlap_px: int, *, pad_multiple: int) -> None:
    """Refuse tiles that make no useful progress: smaller than the model's padding multiple (the model pads each
    to it anyway) or advancing by less than it (a 64-pixel tile with 63 pixels of overlap costs 64 model calls
    per tile width). ``tile_px=0`` (the whole image at once) is always fine."""
    if tile_px == 0:
        return
    if overlap_px >= tile_px:
        raise UsageError(f"--overlap ({overlap_px}) must be smaller than --tile ({tile_px})")
    if tile_px < pad_multiple:
        raise UsageError(
            f"--tile {tile_px} is smaller than this model's padding multiple ({pad_multiple} px): "
            f"use --tile {max(pad_multiple, DEFAULT_TILE_PX)} or --tile 0 (the whole image)"
        )
    if tile_px - overlap_px < pad_multiple:
        raise UsageError(
            f"--tile {tile_px} with --overlap {overlap_px} advances by {tile_px - overlap_px} px, less than this "
            f"model's padding multiple ({pad_multiple} px): use --overlap {tile_px - pad_multiple} or less"
        )


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a forward pass on ``device`` can still use; None where this cannot be told (then nothing is checked).

    CUDA: free device memory plus what PyTorch's cache holds unused. CPU on Linux: MemAvailable, capped by a
    cgroup v2 memory limit (containers) and by the address space left under ``ulimit -v`` when there is one.
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
    for limit in (cgroup_available_bytes(), address_space_left_bytes()):
        available = available if limit is None else min(available, limit)
    return available


def address_space_left_bytes() -> int | None:
    """The soft RLIMIT_AS (``ulimit -v``) minus this process's virtual size; None when unlimited."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        size = int(next(line for line in status if line.startswith("VmSize:")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return None
    return max(0, limit - size)


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
    frame: tuple[int, int] | None = None,
    frame_bytes: int = 0,
) -> None:
    """Refuse, saying which option fixes it, a forward pass on ``height`` x ``width`` (``batch`` tiles of that
    size when ``tiled``) that cannot fit in the memory available on ``device`` next to ``frame_bytes`` of
    whole-image buffers (of a ``frame`` = (height, width) image). The advice is only ever something that fits."""
    available = available_memory_bytes(device)
    needed = frame_bytes + forward_peak_bytes(config, height, width, batch=batch)
    if available is None or needed <= available:
        return
    if not tiled:
        what = f"{height}x{width} in one pass"
    elif batch > 1:
        what = f"{batch} tiles of {height}x{width} per pass"
    else:
        what = f"{height}x{width} tiles"
    if tiled and frame is not None:
        what = f"{frame[0]}x{frame[1]} in {what}"
    need = _size_text(needed) + (f" ({_size_text(frame_bytes)} of it for the whole image)" if frame_bytes else "")
    message = f"{name}: restoring {what} needs about {need}, {_size_text(available)} are available"

    def fits(tile_h: int, tile_w: int, n: int = 1) -> bool:
        return frame_bytes + forward_peak_bytes(config, tile_h, tile_w, batch=n) <= available

    if tiled and batch > 1 and fits(height, width):
        raise ImageError(f"{message}; fewer tiles per pass: --tile-batch 1")
    m = config.pad_multiple

    def tile_options(tile: int) -> str:
        text = f"--tile {tile}" + (" (the default)" if tile == DEFAULT_TILE_PX else "")
        text += f" --overlap {min(tile // 4, tile - m)}" if tile - overlap_px < m else ""
        return text + (" --tile-batch 1" if batch > 1 else "")

    if full_width_tiles(config):  # row bands: only their height can shrink
        for tile in (DEFAULT_TILE_PX, 256, 128, 64, 32):
            if m <= tile < height and fits(tile, width):
                raise ImageError(f"{message}; {'lower row bands' if tiled else 'tile it'}: {tile_options(tile)}")
        raise ImageError(
            f"{message}; the views are too wide for this machine's memory (the stereo attention compares every "
            "pixel with its whole row in the other view, so tiles cannot cut the width): crop both views the same "
            "way to a narrower width, or use a machine with more memory"
        )
    for tile in (DEFAULT_TILE_PX, 256, 128, 64):
        if m <= tile < max(height, width) and fits(min(tile, height), min(tile, width)):
            raise ImageError(f"{message}; {'smaller tiles' if tiled else 'tile it'}: {tile_options(tile)}")
    per_pixel = frame_bytes / (frame[0] * frame[1]) if frame is not None else 0
    for tile in (DEFAULT_TILE_PX, 256, 128, 64) if per_pixel else ():
        room = available - forward_peak_bytes(config, tile, tile)
        if tile >= m and room >= 1e6 * per_pixel:  # parts of a megapixel or more, in tiles of this size, fit
            raise ImageError(
                f"{message}; the image is too large for this machine's memory: crop it into parts of at most "
                f"{int(room / per_pixel / 1e6)} megapixels, with {tile_options(tile)}"
            )
    raise ImageError(f"{message}; free some memory or use a smaller model")


def check_restore_memory(
    model: RestorationNet,
    height: int,
    width: int,
    *,
    tile_px: int,
    overlap_px: int,
    batch: int,
    name: str,
    channels: int = 3,
    alpha: bool = True,
    bit_depth: int = 16,
    in_memory: bool = False,
) -> None:
    """Refuse, before anything is decoded or run, restoring a ``height`` x ``width`` image that does not fit in
    memory: the whole-image buffers of :func:`frame_peak_bytes` (for an image of ``channels``, ``alpha`` and
    ``bit_depth``; with ``in_memory``, the image is already decoded and only the output is still to come) plus
    the forward passes :func:`restore_tensor` would run. Tile settings that make no progress are refused first
    (:func:`check_tiling`); ``batch`` counts only the tiles there are."""
    config = model.config
    check_tiling(tile_px, overlap_px, pad_multiple=config.pad_multiple)
    rows = full_width_tiles(config)
    whole = whole_image(height, width, tile_px=tile_px, full_width=rows)
    tiles = tile_count(
        height, width, tile_px=tile_px, overlap_px=overlap_px, pad_multiple=config.pad_multiple, full_width=rows
    )
    device = next(model.parameters()).device
    if in_memory:  # the input is there already; the output accumulator (float32) is still to come
        frame_bytes = height * width * 4 * config.in_channels * config.up_scale**2
    else:
        frame_bytes = config.views * frame_peak_bytes(
            height,
            width,
            channels=channels,
            alpha=alpha,
            bit_depth=bit_depth,
            model_channels=config.img_channels,
            up_scale=config.up_scale,
        )
    if device.type != "cpu":  # the whole image stays in host memory; only the tiles go to the device
        host = available_memory_bytes(torch.device("cpu"))
        if host is not None and frame_bytes > host:
            raise ImageError(
                f"{name}: restoring {height}x{width} needs about {_size_text(frame_bytes)} of host memory for the "
                f"whole image, {_size_text(host)} are available; the image is too large for this machine's memory: "
                f"crop it into parts of at most {int(host / (frame_bytes / (height * width)) / 1e6)} megapixels"
            )
        frame_bytes = 0
    check_forward_memory(
        config,
        height if whole else min(tile_px, height),
        width if whole or rows else min(tile_px, width),
        tiled=not whole,
        batch=1 if whole else min(batch, tiles),
        overlap_px=overlap_px,
        device=device,
        name=name,
        frame=(height, width),
        frame_bytes=frame_bytes,
    )


def check_input_size_memory(
    config: NAFNetConfig, sizes: Iterable[tuple[int, int]], *, option: str = "--input-size"
) -> None:
    """Refuse, as a usage error naming the largest square size that fits, fixed model input sizes (height, width)
    whose forward pass cannot fit in the memory here: exporting traces one, validating runs them."""
    available = available_memory_bytes(torch.device("cpu"))
    m = config.pad_multiple
    for height, width in sizes:
        needed = forward_peak_bytes(config, height, width)
        if available is None or needed <= available:
            continue
        per_pixel = (forward_peak_bytes(config, m, m) - _FORWARD_BYTES_FIXED) / (m * m)
        side = int(math.sqrt(max(0, available - _FORWARD_BYTES_FIXED) / per_pixel)) // m * m
        advice = f"use {option} {side} or smaller" if side >= m else "free some memory or use a smaller model"
        raise UsageError(
            f"{option} {height}x{width}: one forward pass of this model at that size needs about "
            f"{_size_text(needed)}, {_size_text(available)} are available; {advice}"
        )


@torch.inference_mode()
def restore_tensor(
    model: RestorationNet,
    image: torch.Tensor,
    *,
    tile_px: int = DEFAULT_TILE_PX,
    overlap_px: int = DEFAULT_OVERLAP_PX,
    batch: int = 1,
    on_tile: Callable[[int], None] | None = None,
    name: str = "the image",
) -> torch.Tensor:
    """Run ``model`` on a 1xCxHxW CPU float tensor; ``tile_px=0`` runs the whole image at once.

    Tiled runs tile the frame as if zero-padded to the model's multiple, as the whole-image run pads it, and place
    tiles on that multiple, so tiles see the same padding and downsampling grid and follow whole-image output
    closely; no padded copy of the frame is made. Super-resolution models are tiled in input pixels (their tiles
    come back ``up_scale`` times larger), the stereo models in full-width row bands (:func:`tile_size`). Returns
    the raw (unclamped) float32 CPU output, ``up_scale`` times the input's size, as the official code does before
    saving (tiled: its memory in HxWxC order, see :func:`run_tiled`). Raises an
    :class:`ImageError` starting with ``name``, before any work, when a forward pass would not fit in memory,
    and a :class:`CheckpointError` starting with ``name`` when the output holds NaN or Inf.
    """
    device = next(model.parameters()).device
    config = model.config
    if image.shape[1] != config.in_channels:
        raise ImageError(f"{name}: this model takes {config.in_channels} channels, the input has {image.shape[1]}")
    h, w = image.shape[-2:]
    whole = whole_image(h, w, tile_px=tile_px, full_width=full_width_tiles(config))
    check_restore_memory(model, h, w, tile_px=tile_px, overlap_px=overlap_px, batch=batch, name=name, in_memory=True)
    if whole:
        out = model(image.to(device).contiguous()).float().cpu()
        if on_tile is not None:
            on_tile(1)
    else:
        m = model.pad_multiple
        out = run_tiled(
            model,
            image,
            tile_px=tile_size(config, tile_px, -(-w // m) * m),
            overlap_px=overlap_px,
            batch=batch,
            device=device,
            on_tile=on_tile,
            align_px=m,
            pad_multiple=m,
            scale=config.up_scale,
        )
    check_finite_output(out, name=name)
    return out


def check_finite_output(output: torch.Tensor, *, name: str) -> None:
    """Refuse an output holding NaN or Inf: the weights overflow float32 on this input, and clamped to [0, 1]
    such an output would become a black or saturated image that looks like a result."""
    # Row by row: torch.isfinite over a whole frame allocates about 20 bytes per pixel of temporaries.
    if all(bool(torch.isfinite(rows).all()) for rows in output.split(64, dim=-2)):
        return
    bad = int((~torch.isfinite(output)).sum())
    raise CheckpointError(
        f"{name}: the checkpoint produced non-finite values (NaN or Inf) in {bad:,} of {output.numel():,} output "
        "values, so no image was written for it; its weights overflow float32 on this input: use another checkpoint"
    )


def restore_image(
    model: RestorationNet,
    image: RGBImage,
    *,
    tile_px: int = DEFAULT_TILE_PX,
    overlap_px: int = DEFAULT_OVERLAP_PX,
    batch: int = 1,
    on_tile: Callable[[int], None] | None = None,
) -> RGBImage:
    """Restore an image read by :func:`nafnet_edge.images.read_image`; the result is clamped to [0, 1].

    Grayscale images given to an RGB model are replicated to three channels and averaged back; alpha and the
    file metadata (ICC profile, EXIF, dpi) are carried over unchanged. A super-resolution model's result is
    ``up_scale`` times larger: alpha is upsampled bilinearly (as the model's own residual) and the dpi multiplied,
    so the print size stays. A stereo model takes a pair: see :func:`restore_stereo`.
    """
    if model.config.views != 1:
        raise UsageError(f"{model.config.class_name} restores stereo pairs: use restore_stereo(model, left, right)")
    model_channels = model.config.img_channels
    pixels = image.pixels
    check_channels(pixels.shape[2], model_channels, "this checkpoint")
    # A view of the pixels (the tiler copies tiles out of it); gray is replicated to RGB as a view, too.
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].expand(-1, model_channels, -1, -1)
    name = str(image.path) if image.path is not None else "the image"
    y = restore_tensor(model, x, tile_px=tile_px, overlap_px=overlap_px, batch=batch, on_tile=on_tile, name=name)
    # a view of the tiler's HxWxC accumulator
    return _restored(image, y[0].permute(1, 2, 0).numpy(), up_scale=model.config.up_scale)


def restore_stereo(
    model: RestorationNet,
    left: RGBImage,
    right: RGBImage,
    *,
    tile_px: int = DEFAULT_TILE_PX,
    overlap_px: int = DEFAULT_OVERLAP_PX,
    batch: int = 1,
    on_tile: Callable[[int], None] | None = None,
) -> tuple[RGBImage, RGBImage]:
    """Restore a stereo pair (rectified: matching points on the same row) with a stereo model (NAFSSR): both views
    go through the network together, left first; tiles are full-width row bands ``tile_px`` high. The two images
    must have the same size; each result keeps its own alpha and metadata as :func:`restore_image` does."""
    config = model.config
    if config.views != 2:
        raise UsageError(f"{config.class_name} restores single images, not stereo pairs: use restore_image")
    name = " and ".join(str(v.path) if v.path is not None else view for v, view in ((left, "left"), (right, "right")))
    if (left.height, left.width) != (right.height, right.width):
        raise ImageError(
            f"{name}: the views of a stereo pair must have the same size, got {left.width}x{left.height} and "
            f"{right.width}x{right.height} (width x height)"
        )
    c = config.img_channels
    views = []
    for view in (left, right):
        check_channels(view.pixels.shape[2], c, "this checkpoint")
        views.append(torch.from_numpy(np.ascontiguousarray(view.pixels)).permute(2, 0, 1)[None].expand(-1, c, -1, -1))
    x = torch.cat(views, dim=1)
    y = restore_tensor(model, x, tile_px=tile_px, overlap_px=overlap_px, batch=batch, on_tile=on_tile, name=name)
    hwc = y[0].permute(1, 2, 0).numpy()
    return (
        _restored(left, hwc[:, :, :c], up_scale=config.up_scale),
        _restored(right, hwc[:, :, c:], up_scale=config.up_scale),
    )


def restore_image_with(
    run: Callable[[np.ndarray], np.ndarray],
    image: RGBImage,
    *,
    channels: int,
    tile: tuple[int, int],
    overlap_px: int,
    multiple: int,
    on_tile: Callable[[int], None] | None = None,
    scale: int = 1,
) -> RGBImage:
    """Restore an image with an artifact's runner (``Session.run``: a float32 (1, ``channels``, *``tile``) array
    in, the same channels and ``scale`` times the size out), the way validation ran it
    (:func:`nafnet_edge.validation.apply_tiled`): an image within the tile is zero-padded to it, a larger one
    padded to ``multiple`` and cut into tiles overlapping by ``overlap_px`` whose starts are multiples of
    ``multiple``. Channels, clamping, alpha and metadata as :func:`restore_image`; an :class:`ArtifactError` when
    the runtime returns NaN or Inf."""
    from nafnet_edge.validation import apply_tiled, runner_fn

    pixels = image.pixels
    check_channels(pixels.shape[2], channels, "this artifact")
    name = str(image.path) if image.path is not None else "the image"
    if tile[0] != tile[1] and (pixels.shape[0] > tile[0] or pixels.shape[1] > tile[1]):
        raise ImageError(
            f"{name} is larger than this artifact's {tile[0]}x{tile[1]} input, and tiles must be square: convert "
            "with a square --input-size to restore larger images"
        )
    if pixels.shape[2] != channels:  # gray into an RGB model
        pixels = np.repeat(pixels, channels, axis=2)

    def counted(x: np.ndarray) -> np.ndarray:
        out = run(x)
        if on_tile is not None:
            on_tile(1)
        return out

    out, _ = apply_tiled(runner_fn(counted), pixels, tile, overlap_px, multiple, scale)
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).sum())
        raise ArtifactError(
            f"{name}: the artifact produced non-finite values (NaN or Inf) in {bad:,} of {out.size:,} output values, "
            "so no image was written for it; check it with nafnet-edge validate, or convert again"
        )
    return _restored(image, np.array(out, dtype=np.float32), up_scale=scale)


def split_side_by_side(image: RGBImage) -> tuple[RGBImage, RGBImage]:
    """The left and right views of a side-by-side stereo image (left view in the left half), each with its half of
    the alpha and the image's metadata; an :class:`ImageError` when the width is odd."""
    name = str(image.path) if image.path is not None else "the image"
    if image.width % 2:
        raise ImageError(
            f"{name} is {image.width} px wide (upright): a side-by-side stereo image holds two views of equal width, "
            "so its width must be even; crop one column"
        )
    half = image.width // 2
    return tuple(  # type: ignore[return-value]
        RGBImage(
            pixels=image.pixels[:, cols],
            alpha=None if image.alpha is None else image.alpha[:, cols],
            bit_depth=image.bit_depth,
            path=image.path,
            metadata=image.metadata,
        )
        for cols in (slice(0, half), slice(half, None))
    )


def join_side_by_side(left: RGBImage, right: RGBImage) -> RGBImage:
    """The inverse of :func:`split_side_by_side`: one image, ``left`` in the left half (metadata of ``left``)."""
    alpha = None
    if left.alpha is not None and right.alpha is not None:
        alpha = np.concatenate([left.alpha, right.alpha], axis=1)
    return RGBImage(
        pixels=np.concatenate([left.pixels, right.pixels], axis=1),
        alpha=alpha,
        bit_depth=left.bit_depth,
        path=left.path,
        metadata=left.metadata,
    )


def check_channels(image_channels: int, model_channels: int, what: str) -> None:
    """Refuse (``ImageError``) an image whose channels ``what`` (the model) cannot restore; gray into RGB is fine."""
    if image_channels != model_channels and not (image_channels == 1 and model_channels == 3):
        raise ImageError(
            f"{what} restores {model_channels}-channel images and the input has {image_channels}; "
            "convert the input to grayscale first"
        )


def _restored(image: RGBImage, out: np.ndarray, *, up_scale: int = 1) -> RGBImage:
    """``out`` (HxWxC float32, the model's channels; clamped in place) as the restored ``image``: averaged back to
    gray for a gray input, with the input's alpha, bit depth and metadata (alpha and dpi scaled by ``up_scale``)."""
    np.clip(out, 0.0, 1.0, out=out)
    if image.pixels.shape[2] == 1 and out.shape[2] == 3:
        out = out.mean(axis=2, keepdims=True)
    alpha, metadata = image.alpha, image.metadata
    if up_scale != 1:
        if alpha is not None:
            a = torch.from_numpy(np.ascontiguousarray(alpha))[None, None]
            a = torch.nn.functional.interpolate(a, scale_factor=up_scale, mode="bilinear", align_corners=False)
            alpha = a[0, 0].clamp_(0, 1).numpy()
        if metadata.dpi is not None:
            metadata = dataclasses.replace(metadata, dpi=(metadata.dpi[0] * up_scale, metadata.dpi[1] * up_scale))
    return RGBImage(
        pixels=np.ascontiguousarray(out, dtype=np.float32),
        alpha=alpha,
        bit_depth=image.bit_depth,
        metadata=metadata,
    )
