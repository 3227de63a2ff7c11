"""Tiled inference: coverage, blending weights, exactness for pointwise models, agreement on real photos."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nafnet_edge.checkpoint import load_checkpoint
from nafnet_edge.images import read_image
from nafnet_edge.inference import restore_tensor, tile_count
from nafnet_edge.tiling import DEFAULT_OVERLAP_PX, DEFAULT_TILE_PX, axis_weights, make_grid, run_tiled

KODAK = sorted(Path(str(resources.files("nafnet_edge") / "data" / "kodak")).glob("*.png"))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / ((a.double() - b.double()) ** 2).mean()))


@settings(max_examples=200, deadline=None)
@given(
    length=st.integers(1, 3000),
    tile=st.integers(1, 700),
    overlap_frac=st.floats(0, 0.9),
    align=st.sampled_from([1, 16]),
)
def test_grid_covers_and_weights_sum_to_one(length: int, tile: int, overlap_frac: float, align: int) -> None:
    if align > 1:  # the aligned case as the tiler uses it: padded frame and tile on the multiple
        length, tile = -(-length // align) * align, max(align, tile // align * align)
    overlap = min(int(tile * overlap_frac), tile - 1)
    grid = make_grid(length, 1, tile_px=tile, overlap_px=overlap, align_px=align)
    th = grid.tile_h
    assert grid.ys[0] == 0 and grid.ys[-1] + th == length
    if tile - overlap >= align:  # otherwise alignment is impossible and the tiler falls back to align 1
        assert all(y % align == 0 for y in grid.ys)
    assert all(b - a <= th - overlap for a, b in zip(grid.ys, grid.ys[1:], strict=False))  # overlap >= requested
    weights = axis_weights(length, th, grid.ys)
    total = torch.zeros(length, dtype=torch.float64)
    for y, w in zip(grid.ys, weights, strict=True):
        assert float(w.min()) >= 0 and float(w.max()) <= 1 + 1e-6
        total[y : y + th] += w.double()
    torch.testing.assert_close(total, torch.ones(length, dtype=torch.float64), atol=1e-6, rtol=0)


def test_pointwise_function_is_reproduced_exactly_and_batching_changes_nothing() -> None:
    image = torch.rand(1, 3, 301, 517, generator=torch.Generator().manual_seed(0))
    fn = lambda t: 2 * t + 1  # noqa: E731
    for batch in (1, 3):
        out = run_tiled(fn, image, tile_px=128, overlap_px=32, batch=batch)
        torch.testing.assert_close(out, fn(image), atol=2e-6, rtol=0)


geometries = {
    "height": st.integers(1, 200),
    "width": st.integers(1, 200),
    "tile": st.integers(8, 96),  # tiles of 1-7 px: the 1-D grid test above; here they only cost time
    "overlap_frac": st.floats(0, 0.9),
    "batch": st.integers(1, 4),
    "align": st.sampled_from([1, 16]),
}


def _geometry(height: int, width: int, tile: int, overlap_frac: float, align: int) -> tuple[int, int, int, int]:
    if align > 1:  # as restore_tensor calls it: the frame padded and the tile on the multiple
        height, width, tile = (-(-v // align) * align for v in (height, width, max(tile, align)))
    return height, width, tile, min(int(tile * overlap_frac), tile - 1)


@settings(max_examples=60, deadline=None)
@given(**geometries)
def test_any_geometry_gives_the_input_shape_and_weights_summing_to_one(height, width, tile, overlap_frac, batch, align):
    """A pointwise function comes back exactly: at every pixel the 2-D blending weights sum to one."""
    h, w, tile, overlap = _geometry(height, width, tile, overlap_frac, align)
    image = torch.rand(1, 2, h, w, generator=torch.Generator().manual_seed(h * 1000 + w))
    fn = lambda t: torch.sin(3 * t) + t * t  # noqa: E731
    out = run_tiled(fn, image, tile_px=tile, overlap_px=overlap, batch=batch, align_px=align)
    assert out.shape == image.shape
    torch.testing.assert_close(out, fn(image), atol=1e-5, rtol=0)


@settings(max_examples=60, deadline=None)
@given(**geometries)
def test_no_seams_when_the_overlap_covers_the_receptive_field(height, width, tile, overlap_frac, batch, align):
    """A zero-padded 3x3 convolution sees wrong values in the outer pixel of every tile. With an overlap of 4 px or
    more the tiler gives that pixel weight 0 and the neighbour weight 1, so the tiled result equals the whole-frame
    one: on a constant image (where any seam would show) and on noise."""
    h, w, tile, overlap = _geometry(height, width, tile, overlap_frac, align)
    overlap = max(min(overlap, tile // 2), 4)  # steps of half a tile or more keep the example fast
    tile = max(tile, 32, 2 * overlap)
    conv = torch.nn.Conv2d(2, 2, 3, padding=1)
    torch.nn.init.normal_(conv.weight, std=0.3, generator=torch.Generator().manual_seed(1))
    fn = lambda t: torch.tanh(conv(t))  # noqa: E731
    for image in (torch.full((1, 2, h, w), 0.4), torch.rand(1, 2, h, w, generator=torch.Generator().manual_seed(2))):
        with torch.no_grad():
            whole = fn(image)
        out = run_tiled(fn, image, tile_px=tile, overlap_px=overlap, batch=batch, align_px=align)
        torch.testing.assert_close(out, whole, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def default_model():
    return load_checkpoint().model


def test_tiles_of_a_constant_image_show_no_seams(default_model) -> None:
    flat = torch.full((1, 3, 1000, 1500), 0.4)  # 3 x 4 tiles at the defaults, padded to 1008 x 1504
    tiled = restore_tensor(default_model, flat, batch=2)
    whole = restore_tensor(default_model, flat, tile_px=0)
    assert float((tiled - whole).abs().max()) <= 1e-3  # a quarter of an 8-bit level: no visible seam


def test_tiled_matches_whole_image_on_kodak_at_defaults(default_model) -> None:
    """The four shipped Kodak crops as one 1000x1000 photo with sigma-25 noise, so the default tile splits it."""
    rows = [np.concatenate([read_image(p).pixels for p in KODAK[i : i + 2]], axis=1) for i in (0, 2)]
    clean = np.concatenate(rows, axis=0)
    noisy = (clean + np.random.default_rng(0).normal(0, 25 / 255, clean.shape)).astype(np.float32)
    x = torch.from_numpy(noisy.transpose(2, 0, 1).copy())[None]
    n = tile_count(x.shape[2], x.shape[3], tile_px=DEFAULT_TILE_PX, overlap_px=DEFAULT_OVERLAP_PX)
    assert n == 9  # padded to 1008: tiles at 0, 256 and 496 on both axes
    whole = restore_tensor(default_model, x, tile_px=0).clamp(0, 1)
    tiled = restore_tensor(default_model, x).clamp(0, 1)
    assert psnr(tiled, whole) >= 50.0  # 58.1 dB measured; the requirement is 45
