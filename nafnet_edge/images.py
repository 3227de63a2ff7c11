"""Reading and writing images for restoration: 8- and 16-bit PNG/JPEG/TIFF, grayscale and alpha.

Conventions (also in the README):
- Pixels become float32 RGB in [0, 1] (value / 255 or / 65535); nothing else is done to them (no gamma).
- Grayscale inputs given to a 3-channel model are replicated to RGB and the output is converted back to one
  channel (channel mean); a 1-channel model refuses colour inputs.
- Alpha is not restored: it is carried through unchanged and written back with the output.
- JPEG EXIF orientation is applied on reading, so outputs are upright and carry no orientation tag.
- Outputs keep the input's bit depth, are clamped to [0, 1] and rounded (as the official evaluation does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from nafnet_edge.atomic import atomic_path
from nafnet_edge.errors import ImageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
OutputFormat = Literal["auto", "png", "tiff", "jpg"]


@dataclass
class RGBImage:
    """An image as the model sees it, plus what is needed to write it back in kind."""

    pixels: np.ndarray  # float32, H x W x C, C = 1 (gray) or 3 (RGB), values in [0, 1]
    alpha: np.ndarray | None  # float32 H x W in [0, 1], carried through untouched
    bit_depth: Literal[8, 16]

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def is_image_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def read_image(path: str | Path) -> RGBImage:
    import cv2

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}" if not path.exists() else f"{path} is not a file")
    if not is_image_path(path):
        raise ImageError(f"{path}: unsupported image type; use PNG, JPEG or TIFF ({', '.join(sorted(IMAGE_SUFFIXES))})")
    data = np.fromfile(path, dtype=np.uint8)
    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    # JPEG: ANYCOLOR applies the EXIF orientation and converts CMYK; others: UNCHANGED keeps 16 bits and alpha.
    flags = cv2.IMREAD_ANYCOLOR if jpeg else cv2.IMREAD_UNCHANGED
    arr = cv2.imdecode(data, flags) if data.size else None
    if arr is None or arr.size == 0:
        raise ImageError(f"{path}: cannot decode the image (empty, truncated or not really {path.suffix[1:]})")
    if arr.dtype == np.uint8:
        bit_depth: Literal[8, 16] = 8
    elif arr.dtype == np.uint16:
        bit_depth = 16
    else:
        raise ImageError(f"{path}: {arr.dtype} samples are not supported; save it as 8- or 16-bit PNG or TIFF")
    scale = np.float32(255.0 if bit_depth == 8 else 65535.0)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == 4 and _is_gray_alpha_png(data):  # OpenCV expands gray+alpha to BGRA; undo it
        arr = arr[:, :, [0, 3]]
    channels = arr.shape[2]
    if channels == 2:  # gray + alpha
        pixels, alpha = arr[:, :, :1], arr[:, :, 1]
    elif channels == 3:
        pixels, alpha = arr[:, :, ::-1], None
    elif channels == 4:
        pixels, alpha = arr[:, :, 2::-1], arr[:, :, 3]
    elif channels == 1:
        pixels, alpha = arr, None
    else:
        raise ImageError(f"{path}: {channels}-channel images are not supported; convert it to RGB")
    return RGBImage(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32) / scale,
        alpha=None if alpha is None else alpha.astype(np.float32) / scale,
        bit_depth=bit_depth,
    )


def _is_gray_alpha_png(data: np.ndarray) -> bool:
    """PNG colour type 4 (gray + alpha), read from the IHDR chunk."""
    return data.size > 25 and bytes(data[:8]) == b"\x89PNG\r\n\x1a\n" and int(data[25]) == 4


def quantize(values: np.ndarray, bit_depth: Literal[8, 16]) -> np.ndarray:
    """Clamp to [0, 1] and round to integers of the given depth, as the official evaluation does."""
    top = 255.0 if bit_depth == 8 else 65535.0
    out = np.rint(np.clip(values, 0.0, 1.0) * top)
    return out.astype(np.uint8 if bit_depth == 8 else np.uint16)


def output_suffix(input_path: Path, fmt: OutputFormat) -> str:
    if fmt == "auto":
        return ".tif" if input_path.suffix.lower() in (".tif", ".tiff") else ".png"
    return {"png": ".png", "tiff": ".tif", "jpg": ".jpg"}[fmt]


def encode_image(image: RGBImage, suffix: str, *, jpeg_quality: int = 95) -> bytes:
    import cv2

    if suffix == ".jpg" and image.bit_depth == 16:
        raise ImageError("JPEG holds only 8 bits per channel; write 16-bit results as PNG or TIFF (--format png)")
    pixels = quantize(image.pixels, image.bit_depth)
    if pixels.shape[2] == 3:
        pixels = pixels[:, :, ::-1]
    if image.alpha is not None and suffix != ".jpg":
        pixels = np.concatenate([pixels, quantize(image.alpha, image.bit_depth)[:, :, None]], axis=2)
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if suffix == ".jpg" else []
    ok, buf = cv2.imencode(suffix, np.ascontiguousarray(pixels), params)
    if not ok:
        raise ImageError(f"could not encode the result as {suffix}")
    return buf.tobytes()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` so that no partial file is ever seen at ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_image(path: str | Path, image: RGBImage, *, jpeg_quality: int = 95) -> None:
    path = Path(path)
    write_bytes_atomic(path, encode_image(image, path.suffix.lower(), jpeg_quality=jpeg_quality))
