"""The official releases of the NAFNet family (megvii-research/NAFNet): recognised by the sha256 of the file where
this table has it, by shape otherwise."""

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
_NAFSSR_SIZES = {"T": (48, 16), "S": (64, 32), "B": (96, 64), "L": (128, 128)}  # width, blocks


def _nafssr(size: str, scale: int) -> NAFNetConfig:
    """A released NAFSSR shape: SCAM after every block, TLC from one 30 x 90 view (the family's default)."""
    width, blocks = _NAFSSR_SIZES[size]
    return NAFNetConfig(
        arch="nafssr", width=width, enc_blk_nums=(), middle_blk_num=blocks, dec_blk_nums=(), up_scale=scale, fusion=True
    )


@dataclass(frozen=True)
class Release:
    name: str  # the official file's name without its extension
    task: str  # what it restores and the benchmark it was trained for
    config: NAFNetConfig  # includes the arch it is evaluated with upstream (TLC for GoPro/REDS and NAFSSR)
    file_bytes: int
    sha256: str
    psnr_ssim: tuple[float, float] | None = None  # upstream's reported benchmark scores, where this table has them


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
    Release(
        "NAFSSR-L_2x",
        "stereo super-resolution x2 (Flickr1024)",
        _nafssr("L", 2),
        96438421,
        "29d22ff966a6c069ef0db4fa2cb7a22d96f68a05f85c02d3255d55c30cc415f6",
    ),
    Release(
        "NAFSSR-L_4x",
        "stereo super-resolution x4 (Flickr1024)",
        _nafssr("L", 4),
        96604501,
        "7298e608e689449cb4408b9caf7aeb587c5a39e7c95514808821111e1daa17f4",
    ),
)

RELEASE_SHAPES: dict[str, NAFNetConfig] = {
    "SIDD-width32": NAFNetConfig(width=32, **_SIDD),
    "SIDD-width64": NAFNetConfig(width=64, **_SIDD),
    "GoPro-width32": NAFNetConfig(width=32, arch="nafnet-local", **_GOPRO),
    "GoPro-width64": NAFNetConfig(width=64, arch="nafnet-local", **_GOPRO),
    "Baseline-SIDD-width32": NAFNetConfig(width=32, arch="baseline", dw_expand=1, **_SIDD),
    "Baseline-SIDD-width64": NAFNetConfig(width=64, arch="baseline", dw_expand=1, **_SIDD),
    "Baseline-GoPro-width32": NAFNetConfig(width=32, arch="baseline-local", dw_expand=1, **_GOPRO),
    "Baseline-GoPro-width64": NAFNetConfig(width=64, arch="baseline-local", dw_expand=1, **_GOPRO),
    **{f"NAFSSR-{size}-x{scale}": _nafssr(size, scale) for size in _NAFSSR_SIZES for scale in (2, 4)},
}
"""Named configurations of the released shapes, with the arch each is evaluated with upstream: for benchmarks and
tests with random weights, and to name the shape of a file whose sha256 this table lacks."""


def release_by_sha256(sha256: str) -> Release | None:
    return next((r for r in RELEASES if r.sha256 == sha256.lower()), None)


def same_shape(a: NAFNetConfig, b: NAFNetConfig) -> bool:
    """True when ``a`` and ``b`` have the same tensors: the same family and layout, whatever their TLC settings
    (a NAFNet and a Baseline of one layout differ, a NAFSSR and a NAFNetSR with fusion do not)."""
    return a.family == b.family and a.replace(arch=a.family, train_size=None) == b.replace(
        arch=b.family, train_size=None
    )


def releases_with_shape(config: NAFNetConfig) -> list[Release]:
    """Releases (with a sha256 in this table) whose tensors have the shapes of ``config``'s, within its family."""
    return [r for r in RELEASES if same_shape(r.config, config)]


def shapes_like(config: NAFNetConfig) -> list[str]:
    """Names in RELEASE_SHAPES whose tensors have the shapes of ``config``'s, within its family."""
    return [name for name, shape in RELEASE_SHAPES.items() if same_shape(shape, config)]
