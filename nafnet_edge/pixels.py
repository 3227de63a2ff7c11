"""Image-typed I/O: artifacts that take 8-bit pixels and return 8-bit pixels (``--io image``).

A tensor-I/O artifact takes float32 NCHW in [0, 1] and returns it unclamped; the app converts, clamps and rounds.
An image-I/O artifact does that inside the model, so an app hands it the bytes of its pixel buffer:

- input: uint8, batch 1, height x width x the format's channels (NHWC); ``rgba``/``bgra`` carry an alpha byte that
  is ignored (an Android ``Bitmap`` in ARGB_8888 holds RGBA bytes; an iOS ``CVPixelBuffer`` is often BGRA);
- the model computes on ``pixels / 255`` in its channel order (RGB, or one gray channel);
- output: the same layout and format, ``round(clamp(y, 0, 1) * 255)`` as uint8, alpha 255.

Rounding is half to even (``torch.round``, numpy ``rint``, OpenVINO ``HALF_TO_EVEN``), the rule the official
evaluation's quantizer follows; a runtime whose kernel rounds half away from zero differs by one level on exact ties.

This module holds the numpy conversions validation and ``run`` use to feed such an artifact from float frames, and
the PyTorch wrapper the ExecuTorch and ONNX targets export (Core ML and OpenVINO use their own image types)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Literal

import numpy as np

from nafnet_edge.errors import OptionError

if TYPE_CHECKING:
    import torch

IOKind = Literal["tensor", "image"]
IO_KINDS: Final = ("tensor", "image")
PIXEL_FORMATS: Final = ("rgb", "bgr", "rgba", "bgra", "gray")
LEVELS: Final = 255.0
# The share of output pixels (samples) that must be within one level of the fp32 reference rounded the same way,
# for image-I/O artifacts of each precision; int8 is judged by its PSNR budgets (one level is below its noise).
MIN_WITHIN_ONE_LEVEL: Final = {"fp32": 0.999, "fp16": 0.999}
ROUNDING: Final = float(2**23)  # x + 2**23 - 2**23 is x rounded half to even in float32, for 0 <= x < 2**22
IMAGE_IO_NOTE: Final = "8-bit pixels in and out: clamped to [0, 1], scaled by 255 and rounded inside the model"


def pixel_channels(pixel_format: str) -> int:
    """Bytes per pixel of ``pixel_format`` (``rgba``: 4)."""
    return 1 if pixel_format == "gray" else len(pixel_format)


def model_order(pixel_format: str) -> list[int]:
    """The pixel-buffer channel holding each model channel (R, G, B or gray), in model order."""
    if pixel_format == "gray":
        return [0]
    return [pixel_format.index(c) for c in "rgb"]


def has_alpha(pixel_format: str) -> bool:
    return pixel_format in ("rgba", "bgra")


def check_pixel_format(pixel_format: str, channels: int) -> None:
    """Refuse a format that cannot carry a ``channels``-channel model's pixels (``OptionError``, what to pass)."""
    if pixel_format not in PIXEL_FORMATS:
        raise OptionError(f"--pixel-format {pixel_format!r}: choose one of {', '.join(PIXEL_FORMATS)}")
    if (channels == 1) != (pixel_format == "gray"):
        fit = "gray" if channels == 1 else "rgb, bgr, rgba or bgra"
        raise OptionError(f"a {channels}-channel model takes --pixel-format {fit}, not {pixel_format}")


def output_slots(pixel_format: str) -> list[int]:
    """For each byte of a pixel in ``pixel_format``, the channel of [model channels..., alpha] that fills it (the
    inverse of ``model_order``, alpha after the model's channels): how an output is put back in buffer order."""
    order = model_order(pixel_format)
    return [order.index(slot) if slot in order else len(order) for slot in range(pixel_channels(pixel_format))]


def io_info(pixel_format: str | None) -> dict[str, str]:
    """An artifact's I/O as the manifest's ``export`` section and bench records keep it: ``{"io": "tensor"}`` or
    ``{"io": "image", "pixel_format": "rgba"}``."""
    return {"io": "image", "pixel_format": pixel_format} if pixel_format else {"io": "tensor"}


def to_pixels(x: np.ndarray, pixel_format: str) -> np.ndarray:
    """float (1, C, H, W) -> uint8 (1, H, W, P) in ``pixel_format``: clamp to [0, 1], scale by 255, round half to
    even; alpha 255."""
    levels = np.rint(np.clip(np.asarray(x, np.float32), 0.0, 1.0) * np.float32(LEVELS)).astype(np.uint8)
    n, _, h, w = levels.shape
    out = np.full((n, h, w, pixel_channels(pixel_format)), 255, np.uint8)
    for c, slot in enumerate(model_order(pixel_format)):
        out[..., slot] = levels[:, c]
    return out


def from_pixels(p: np.ndarray, pixel_format: str) -> np.ndarray:
    """uint8 (1, H, W, P) in ``pixel_format`` -> float32 (1, C, H, W) in [0, 1] (alpha dropped)."""
    p = np.asarray(p)
    if p.dtype != np.uint8 or p.ndim != 4 or p.shape[3] != pixel_channels(pixel_format):
        raise ValueError(f"expected uint8 (1, H, W, {pixel_channels(pixel_format)}), got {p.dtype} {p.shape}")
    chosen = p[..., model_order(pixel_format)].transpose(0, 3, 1, 2)
    return np.ascontiguousarray(chosen, dtype=np.float32) / np.float32(LEVELS)


def quantized(x: np.ndarray) -> np.ndarray:
    """``x`` clamped and rounded to 8-bit levels, as float in [0, 1] (what an 8-bit camera frame holds)."""
    return (np.rint(np.clip(np.asarray(x, np.float32), 0.0, 1.0) * np.float32(LEVELS)) / np.float32(LEVELS)).astype(
        np.float32
    )


def levels(x: np.ndarray) -> np.ndarray:
    """``x`` in [0, 1] (clamped) as integer levels 0..255 (int16, so differences do not wrap)."""
    return np.rint(np.clip(np.nan_to_num(np.asarray(x, np.float32), nan=0.0), 0.0, 1.0) * LEVELS).astype(np.int16)


def level_agreement(out: np.ndarray, ref: np.ndarray) -> dict[str, float | int]:
    """How the 8-bit rounding of ``out`` compares with the 8-bit rounding of ``ref``: the share of samples equal,
    within one level, and the largest difference in levels."""
    diff = np.abs(levels(out) - levels(ref))
    return {
        "exact_share": float(np.mean(diff == 0)),
        "within_one_level_share": float(np.mean(diff <= 1)),
        "max_level_diff": int(diff.max()) if diff.size else 0,
    }


def example_input(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    """A random input of an artifact's own type: uint8 pixels or float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    if dtype == "uint8":
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return rng.random(shape, dtype=np.float32)


def image_io_module(
    model: torch.nn.Module, pixel_format: str, *, integer_kernels: bool = False, round_op: bool = False
) -> torch.nn.Module:
    """``model`` (float NCHW in [0, 1] -> float NCHW) behind 8-bit pixel I/O in ``pixel_format`` (NHWC uint8 in,
    same out), for targets exported from PyTorch.

    Written for delegates: the only ops a float backend cannot take (XNNPACK in ExecuTorch) are the two dtype
    casts at the ends; the channel moves are slices, a concat and a pad rather than a gather, and the rounding is
    ``(v + 2**23) - 2**23``, which float32 addition rounds half to even exactly for 0 <= v < 2**22 (an add and a
    subtract the delegate runs, where ``round`` would fall back to a slower portable kernel); the final cast then
    truncates a whole number.

    ``integer_kernels``: the two casts as ``quantized_decomposed`` (de)quantization with scale 1 and zero point 0,
    which converts exactly the same whole numbers; ExecuTorch runs those with its quantized kernels, several times
    faster than its portable dtype casts (uint8 out especially).

    ``round_op``: the rounding as ``torch.round`` (half to even) instead, for runtimes that may compute in half
    precision, where 2**23 is out of range (float16 ends at 65504) but ``round`` of 0..255 is exact."""
    import torch

    order = model_order(pixel_format)
    width = pixel_channels(pixel_format)
    alpha = has_alpha(pixel_format)
    inverse = output_slots(pixel_format)

    def channels(t: torch.Tensor, slots: list[int], depth: int) -> torch.Tensor:
        """``t[..., slots]`` (``t`` has ``depth`` channels, last) as itself, one slice or a concat of slices."""
        if slots == list(range(depth)):
            return t
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return t[..., slots[0] : slots[0] + len(slots)]
        return torch.cat([t[..., s : s + 1] for s in slots], dim=3)

    if integer_kernels:
        from torch.ao.quantization.fx._decomposed import quantized_decomposed_lib  # noqa: F401 - the ops

        decomposed = torch.ops.quantized_decomposed

        def to_float(t: torch.Tensor) -> torch.Tensor:
            return decomposed.dequantize_per_tensor(t, 1.0, 0, 0, 255, torch.uint8)

        def to_uint8(t: torch.Tensor) -> torch.Tensor:
            return decomposed.quantize_per_tensor(t, 1.0, 0, 0, 255, torch.uint8)

    else:

        def to_float(t: torch.Tensor) -> torch.Tensor:
            return t.to(torch.float32)

        def to_uint8(t: torch.Tensor) -> torch.Tensor:
            return t.to(torch.uint8)

    class ImageIO(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            x = channels(to_float(pixels), order, width).permute(0, 3, 1, 2) * (1.0 / LEVELS)
            y = (torch.clamp(self.model(x), 0.0, 1.0) * LEVELS).permute(0, 2, 3, 1)
            if alpha:
                y = torch.nn.functional.pad(y, (0, 1), value=LEVELS)
            y = channels(y, inverse, len(order) + int(alpha))
            return to_uint8(torch.round(y) if round_op else (y + ROUNDING) - ROUNDING)

    return ImageIO().eval()
