"""The official NAFNet releases (megvii-research/NAFNet), recognised by the sha256 of the file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

from nafnet_edge.model import NAFNetConfig


class _Blocks(TypedDict):
    enc_blk_nums: tuple[int, ...]
    middle_blk_num: int
    dec_blk_nums: tuple[int, ...]


_SIDD: _Blocks = {"enc_blk_nums": (2, 2, 4, 8), "middle_blk_num": 12, "dec_blk_nums": (2, 2, 2, 2)}
_GOPRO: _Blocks = {"enc_blk_nums": (1, 1, 1, 28), "middle_blk_num": 1, "dec_blk_nums": (1, 1, 1, 1)}


@dataclass(frozen=True)
class Release:
    name: str
    task: str  # what it restores and the benchmark it was trained for
    config: NAFNetConfig  # includes the arch it is evaluated with upstream (TLC for GoPro/REDS)
    file_bytes: int
    sha256: str
    psnr_ssim: tuple[float, float]  # upstream's reported benchmark scores


RELEASES: tuple[Release, ...] = (
    Release(
        "NAFNet-GoPro-width32",
        "deblurring (GoPro)",
        NAFNetConfig(width=32, arch="nafnet-local", **_GOPRO),
        68671121,
        "19394e6155d12ef6371d1d57496f87f0ec88f92bdffa27c0792690722d5d1a5c",
        (32.8705, 0.9606),
    ),
    Release(
        "NAFNet-GoPro-width64",
        "deblurring (GoPro)",
        NAFNetConfig(width=64, arch="nafnet-local", **_GOPRO),
        271778961,
        "329d3ab4077b8d6b7ff61de376e483714667960bf85be027bf4335cda701196f",
        (33.7103, 0.9668),
    ),
    Release(
        "NAFNet-SIDD-width32",
        "real-noise denoising (SIDD)",
        NAFNetConfig(width=32, arch="nafnet", **_SIDD),
        116861841,
        "89c70e808d1783b6c07911306e106aaf0d4f7f3da8c61078b99ff7f8929a26f4",
        (39.9672, 0.9599),
    ),
    Release(
        "NAFNet-SIDD-width64",
        "real-noise denoising (SIDD)",
        NAFNetConfig(width=64, arch="nafnet", **_SIDD),
        464154961,
        "cd685efaae01f7c4e9951f2deab05780079c8eb1e49ed664b72f6db04dabb445",
        (40.3045, 0.9614),
    ),
    Release(
        "NAFNet-REDS-width64",
        "deblurring with JPEG artifacts (REDS)",
        NAFNetConfig(width=64, arch="nafnet-local", **_GOPRO),
        271756689,
        "175fe8b3cdf3abedfbc87769779c3d9f491e05bb2e73ea9d627883f90a4b2df3",
        (29.0903, 0.8671),
    ),
)

RELEASE_SHAPES = {
    "SIDD-width32": NAFNetConfig(width=32, **_SIDD),
    "SIDD-width64": NAFNetConfig(width=64, **_SIDD),
    "GoPro-width32": NAFNetConfig(width=32, arch="nafnet-local", **_GOPRO),
    "GoPro-width64": NAFNetConfig(width=64, arch="nafnet-local", **_GOPRO),
}
"""Named configurations of the released shapes, for benchmarks and tests with random weights."""


def release_by_sha256(sha256: str) -> Release | None:
    return next((r for r in RELEASES if r.sha256 == sha256.lower()), None)


def releases_with_shape(config: NAFNetConfig) -> list[Release]:
    """Releases whose architecture matches ``config`` (ignoring arch and train_size)."""
    key = config.replace(arch="nafnet", train_size=(256, 256))
    return [r for r in RELEASES if r.config.replace(arch="nafnet") == key]
