"""Tiled inference for camera-size frames with bounded memory.

The frame is cut into a grid of overlapping tiles; each tile is restored on its own (the model pads it to
its multiple of 16 and crops back) and the results are blended with a raised-cosine window over the
overlaps. The window is separable and normalised per axis, so the weights at every pixel sum to one and
no full-size weight map is kept: memory is the input, the output and one batch of tiles.

NAFNet's channel attention averages over whatever it sees, so a tile's statistics differ from the whole
frame's: tiled output is close to, not equal to, whole-frame output (measured in docs/tiling.md). With TLC
(NAFNetLocal) the pooling is already local, so tiles larger than the TLC kernel change less.

Super-resolution models (``scale`` > 1) are tiled in input pixels: each tile's output, ``scale`` times larger, is
placed at ``scale`` times its input position and blended with the window stretched by ``scale``. Tiles may be
rectangular (a (height, width) tile): the stereo models run in full-width row bands.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_TILE_PX = 512
DEFAULT_OVERLAP_PX = 64


@dataclass(frozen=True)
class TileGrid:
    height: int
    width: int
    tile_h: int
    tile_w: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((y, x) for y in self.ys for x in self.xs)


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> tuple[int, ...]:
    """Start offsets of tiles covering [0, length): evenly spaced, overlapping by at least ``overlap``.

    With ``align`` > 1 (and tile and length multiples of it), starts are multiples of ``align``: tiles then sit
    on the same stride-2 grid as the whole frame at every U-Net depth, which keeps tiled output closest to it.
    """
    if tile >= length:
        return (0,)
    step = tile - overlap
    if tile % align or length % align or step < align:
        align = 1  # cannot align; with align <= step the loop below ends at the latest at gaps of one align
    n = math.ceil((length - tile) / step) + 1
    while True:  # spread evenly instead of leaving a thin last tile; every overlap >= the requested one
        starts = tuple(align * round(i * (length - tile) / (n - 1) / align) for i in range(n))
        if all(b - a <= step for a, b in zip(starts, starts[1:], strict=False)):
            return starts
        n += 1


TileSize = int | tuple[int, int]  # a square side, or (height, width)


def make_grid(height: int, width: int, *, tile_px: TileSize, overlap_px: int, align_px: int = 1) -> TileGrid:
    tile_h, tile_w = (tile_px, tile_px) if isinstance(tile_px, int) else tile_px
    if min(tile_h, tile_w) < 1:
        raise ValueError(f"tile size must be positive, got {tile_px}")
    if not 0 <= overlap_px < min(tile_h, tile_w):
        raise ValueError(f"overlap must be in [0, tile size), got overlap {overlap_px} for tile {tile_px}")
    th, tw = min(tile_h, height), min(tile_w, width)
    ys = tile_starts(height, th, overlap_px, align_px)
    xs = tile_starts(width, tw, overlap_px, align_px)
    return TileGrid(height, width, th, tw, ys, xs)


def _ramp(n: int) -> torch.Tensor:
    """Raised-cosine ramp of n samples rising from just above 0 to just below 1."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    return 0.5 - 0.5 * torch.cos(math.pi * i / n)


def _rise(overlap: int) -> torch.Tensor:
    """Weights of a tile over its overlap with the tile before it.

    The outer quarter of the overlap gets weight 0: a tile's border pixels are the least reliable (the
    convolutions see zero padding there), and the neighbour covers them with weight 1. The middle half ramps
    smoothly; the inner quarter is 1. Mirrored, it is the fall towards the next tile; rise + fall = 1.
    """
    margin = overlap // 4
    w = torch.ones(overlap, dtype=torch.float64)
    w[:margin] = 0.0
    w[margin : overlap - margin] = _ramp(overlap - 2 * margin)
    return w


def axis_weights(length: int, tile: int, starts: tuple[int, ...]) -> list[torch.Tensor]:
    """Per-tile 1-D blending weights along one axis, normalised so that they sum to one at every position."""
    raw = []
    for k, s in enumerate(starts):
        w = torch.ones(tile, dtype=torch.float64)
        if k > 0:
            r = starts[k - 1] + tile - s
            w[:r] = _rise(r)
        if k < len(starts) - 1:
            r = s + tile - starts[k + 1]
            w[tile - r :] = torch.minimum(w[tile - r :], _rise(r).flip(0))
        raw.append(w)
    total = torch.zeros(length, dtype=torch.float64)
    for s, w in zip(starts, raw, strict=True):
        total[s : s + tile] += w
    return [(w / total[s : s + tile]).float() for s, w in zip(starts, raw, strict=True)]


@torch.inference_mode()
def run_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    tile_px: TileSize = DEFAULT_TILE_PX,
    overlap_px: int = DEFAULT_OVERLAP_PX,
    batch: int = 1,
    device: torch.device | str = "cpu",
    on_tile: Callable[[int], None] | None = None,
    align_px: int = 1,
    pad_multiple: int = 1,
    scale: int = 1,
) -> torch.Tensor:
    """Apply ``fn`` (NCHW -> NCHW, the same channels, ``scale`` times the size) to a 1xCxHxW CPU image tile by
    tile and blend the results.

    With ``pad_multiple`` > 1 the frame is tiled as if zero-padded on the right and bottom to that multiple; only
    the tiles at the border are padded, the frame is never copied. Tiles are sent to ``device`` ``batch`` at a time.
    The result is a float32 CPU tensor of shape 1 x C x (``scale`` H) x (``scale`` W) whose memory is in HxWxC
    order (an image array is a view of it); besides the input, it is the only full-frame buffer.
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected a 1xCxHxW image, got {tuple(image.shape)}")
    if scale < 1:
        raise ValueError(f"scale must be positive, got {scale}")
    _, c, h, w = image.shape
    ph, pw = -(-h // pad_multiple) * pad_multiple, -(-w // pad_multiple) * pad_multiple
    grid = make_grid(ph, pw, tile_px=tile_px, overlap_px=overlap_px, align_px=align_px)
    th, tw = grid.tile_h, grid.tile_w
    s = scale
    wy = axis_weights(ph * s, th * s, tuple(y * s for y in grid.ys))
    wx = axis_weights(pw * s, tw * s, tuple(x * s for x in grid.xs))
    out = torch.zeros(h * s, w * s, c, dtype=torch.float32)
    positions = [(iy, ix) for iy in range(len(grid.ys)) for ix in range(len(grid.xs))]
    for first in range(0, len(positions), max(1, batch)):
        chunk = positions[first : first + max(1, batch)]
        tiles = []
        for iy, ix in chunk:
            tile = image[:, :, grid.ys[iy] : grid.ys[iy] + th, grid.xs[ix] : grid.xs[ix] + tw]
            tiles.append(F.pad(tile, (0, tw - tile.shape[3], 0, th - tile.shape[2])))
        result = fn(torch.cat(tiles).to(device)).float().cpu()
        if tuple(result.shape[1:]) != (c, th * s, tw * s):
            raise ValueError(f"expected tiles of {(c, th * s, tw * s)} from {(c, th, tw)}, got {tuple(result.shape)}")
        for k, (iy, ix) in enumerate(chunk):
            y, x = grid.ys[iy] * s, grid.xs[ix] * s
            vh, vw = min(th * s, h * s - y), min(tw * s, w * s - x)  # the part of the tile inside the frame
            if vh <= 0 or vw <= 0:
                continue
            weight = wy[iy][:vh, None] * wx[ix][None, :vw]
            out[y : y + vh, x : x + vw] += (result[k, :, :vh, :vw] * weight).permute(1, 2, 0)
        if on_tile is not None:
            on_tile(len(chunk))
    return out.permute(2, 0, 1)[None]


@dataclass(frozen=True)
class TilePlan:
    """Everything an app needs to restore a frame of any size through a fixed-size artifact exactly as
    nafnet-edge validates it: pad the frame with zeros on the right and bottom to ``padded``, run the artifact on
    the ``tile``-sized window at every origin (``ys`` x ``xs``, row-major), multiply each output by
    ``weights_y[row][i] * weights_x[col][j]``, add them up, and crop to ``frame``."""

    frame: tuple[int, int]
    padded: tuple[int, int]
    tile: tuple[int, int]
    overlap_px: int
    align_px: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    weights_y: tuple[tuple[float, ...], ...]
    weights_x: tuple[tuple[float, ...], ...]
    scale: int = 1

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def to_dict(self, *, weights: bool = True) -> dict[str, object]:
        data: dict[str, object] = {
            "frame": list(self.frame),
            "padded": list(self.padded),
            "tile": list(self.tile),
            "overlap_px": self.overlap_px,
            "align_px": self.align_px,
            "tiles": len(self),
            "ys": list(self.ys),
            "xs": list(self.xs),
            "scale": self.scale,
        }
        if weights:
            data["weights_y"] = [list(w) for w in self.weights_y]
            data["weights_x"] = [list(w) for w in self.weights_x]
        return data


def padded_size(height: int, width: int, tile: tuple[int, int] | None, multiple: int) -> tuple[int, int]:
    """The frame an artifact of fixed input size ``tile`` runs on: zero-padded right and bottom to a multiple of
    ``multiple`` and at least to the tile (``tile=None``: one whole-image call, padded to the multiple)."""
    ph, pw = -(-height // multiple) * multiple, -(-width // multiple) * multiple
    return (ph, pw) if tile is None else (max(tile[0], ph), max(tile[1], pw))


def tile_plan(
    height: int, width: int, *, tile: tuple[int, int], overlap_px: int, align_px: int, scale: int = 1
) -> TilePlan:
    """The plan :func:`run_tiled` follows for an artifact of fixed input size ``tile`` on an ``height`` x ``width``
    frame, after the frame is zero-padded to a multiple of ``align_px`` and at least to the tile (what validation,
    ``run`` through an artifact and the report do). A frame that fits in one tile is one call at origin (0, 0).
    ``scale``: the artifact's output scale (weights in output pixels, as :func:`run_tiled` blends)."""
    th, tw = tile
    if scale < 1:
        raise ValueError(f"scale must be positive, got {scale}")
    if not 0 <= overlap_px < min(th, tw):
        raise ValueError(f"overlap must be in [0, tile size), got overlap {overlap_px} for tile {th}x{tw}")
    ph, pw = padded_size(height, width, tile, align_px)
    ys = tile_starts(ph, th, overlap_px, align_px)
    xs = tile_starts(pw, tw, overlap_px, align_px)
    wy = axis_weights(ph * scale, th * scale, tuple(y * scale for y in ys))
    wx = axis_weights(pw * scale, tw * scale, tuple(x * scale for x in xs))
    return TilePlan(
        frame=(height, width),
        padded=(ph, pw),
        tile=(th, tw),
        overlap_px=overlap_px,
        align_px=align_px,
        ys=ys,
        xs=xs,
        weights_y=tuple(tuple(float(v) for v in w) for w in wy),
        weights_x=tuple(tuple(float(v) for v in w) for w in wx),
        scale=scale,
    )
