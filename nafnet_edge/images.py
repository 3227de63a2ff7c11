"""Reading and writing images for restoration: 8- and 16-bit PNG/JPEG/TIFF, grayscale and alpha.

Conventions (also in the README):
- Pixels become float32 RGB in [0, 1] (value / 255 or / 65535); nothing else is done to them (no gamma).
- Grayscale inputs given to a 3-channel model are replicated to RGB and the output is converted back to one
  channel (channel mean); a 1-channel model refuses colour inputs.
- Alpha is not restored: it is carried through unchanged and written back with the output.
- JPEG EXIF orientation is applied on reading, so outputs are upright and carry no orientation tag.
- Outputs keep the input's bit depth, are clamped to [0, 1] and rounded (as the official evaluation does).

Files are checked before any pixel is decoded: the format comes from the content (not the name), the size from
the header (empty and absurdly large images are refused before anything is allocated), and the end of the
stream must be present, so a truncated download is refused instead of being restored half grey.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from nafnet_edge.atomic import atomic_path
from nafnet_edge.errors import ImageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
OutputFormat = Literal["auto", "png", "tiff", "jpg"]
# The largest image read, in pixels: OpenCV's own default, which OPENCV_IO_MAX_IMAGE_PIXELS raises for both.
MAX_IMAGE_PIXELS = 1 << 30
ImageFormat = Literal["PNG", "JPEG", "TIFF"]
_SIGNATURES: dict[bytes, ImageFormat] = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"II+\x00": "TIFF",  # BigTIFF
    b"MM\x00+": "TIFF",
}
_OTHER_SIGNATURES = {"GIF": (0, b"GIF8"), "BMP": (0, b"BM"), "WebP": (8, b"WEBP"), "HEIF/AVIF": (4, b"ftyp")}


@dataclass
class RGBImage:
    """An image as the model sees it, plus what is needed to write it back in kind."""

    pixels: np.ndarray  # float32, H x W x C, C = 1 (gray) or 3 (RGB), values in [0, 1]
    alpha: np.ndarray | None  # float32 H x W in [0, 1], carried through untouched
    bit_depth: Literal[8, 16]
    path: Path | None = None  # the file it was read from, named in error messages

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
    data, (fmt, width, height) = _read_checked(path)
    # JPEG: ANYCOLOR applies the EXIF orientation and converts CMYK; others: UNCHANGED keeps 16 bits and alpha.
    flags = cv2.IMREAD_ANYCOLOR if fmt == "JPEG" else cv2.IMREAD_UNCHANGED
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if arr is None or arr.size == 0:
        raise ImageError(
            f"{path}: cannot decode the {fmt} image ({width}x{height}): its data is damaged or uses a variant "
            "OpenCV cannot read; re-save it as PNG"
        )
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
        path=path,
    )


def check_image_file(path: str | Path) -> tuple[ImageFormat, int, int]:
    """Format, width and height of an image file, refusing what :func:`read_image` would refuse before decoding.

    Cheap (no pixel is decoded): call it on every input before starting long work, so that a bad file is
    reported at once.
    """
    return _read_checked(Path(path))[1]


def _read_checked(path: Path) -> tuple[bytes, tuple[ImageFormat, int, int]]:
    if not path.is_file():
        raise ImageError(f"image not found: {path}" if not path.exists() else f"{path} is not a file")
    if not is_image_path(path):
        raise ImageError(f"{path}: unsupported image type; use PNG, JPEG or TIFF ({', '.join(sorted(IMAGE_SUFFIXES))})")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: cannot read the file: {e.strerror}") from None
    return data, _probe_image(path, data)


def max_image_pixels() -> int:
    """The pixel limit of :func:`read_image`: :data:`MAX_IMAGE_PIXELS` unless OPENCV_IO_MAX_IMAGE_PIXELS is set."""
    try:
        return int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS))
    except ValueError:
        return MAX_IMAGE_PIXELS


def _probe_image(path: Path, data: bytes) -> tuple[ImageFormat, int, int]:
    """Format, width and height of an encoded image, from its header and structure alone (nothing is decoded).

    Refuses, with an :class:`ImageError` naming ``path``: empty files, content that is not PNG, JPEG or TIFF
    (whatever the name says), streams cut short (no PNG IEND, no JPEG EOI, TIFF strips past the end of the file),
    images with no pixels and images over :func:`max_image_pixels`.
    """
    if not data:
        raise ImageError(f"{path}: cannot decode the image: the file is empty (0 bytes)")
    fmt = next((f for sig, f in _SIGNATURES.items() if data.startswith(sig)), None)
    if fmt is None:
        if data.startswith(b"PK\x03\x04") and b"data.pkl" in data[:4096] or data[8:9] == b"{":
            raise ImageError(  # a torch.save zip, or safetensors (8-byte length, then a JSON header)
                f"{path}: this is a model checkpoint, not an image; name it .pth or .safetensors (`run` takes "
                "arguments with image extensions for images)"
            )
        other = next((f for f, (at, sig) in _OTHER_SIGNATURES.items() if data.startswith(sig, at)), None)
        content = f"it is a {other} file" if other else "its content is not PNG, JPEG or TIFF"
        raise ImageError(
            f"{path}: cannot decode the image: {content}, whatever its {path.suffix} name says; "
            "convert it to PNG, JPEG or TIFF"
        )
    size = {"PNG": _png_size, "JPEG": _jpeg_size, "TIFF": _tiff_size}[fmt](data)
    if size is None:
        raise ImageError(f"{path}: the {fmt} file is truncated or damaged (it ends early); copy or download it again")
    width, height = size
    if width == 0 or height == 0:
        raise ImageError(f"{path}: the image is {width}x{height} pixels: there is nothing to restore")
    limit = max_image_pixels()
    if width * height > limit:
        raise ImageError(
            f"{path}: the header says {width}x{height} = {width * height / 1e6:,.0f} megapixels, over the limit of "
            f"{limit / 1e6:,.0f} megapixels (a damaged file or a decompression bomb); if it is genuine, crop it "
            f"into parts or raise the limit with OPENCV_IO_MAX_IMAGE_PIXELS={width * height}"
        )
    return fmt, width, height


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from IHDR once the chunks are walked to a complete IEND; None when the file ends early."""
    pos, size = 8, None
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > len(data):
            return None
        if kind == b"IHDR" and length >= 8:
            size = struct.unpack_from(">II", data, pos + 8)
        if kind == b"IEND":
            return size
        pos = end
    return None


# A marker: 0xFF (plus fill bytes) and a code; FF00 is a stuffed data byte inside entropy-coded scans.
_JPEG_MARKER = re.compile(rb"\xff+([^\x00\xff])")
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start of frame; C4/C8/CC are DHT, JPG, DAC


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the frame header once the markers are walked to EOI; None when the file ends early.

    Segments are skipped by their length, so an EXIF thumbnail's own EOI is never mistaken for the end, and data
    after the first EOI (padding, a multi-picture trailer) is ignored.
    """
    pos, size = 2, None
    while match := _JPEG_MARKER.search(data, pos):
        code, pos = match[1][0], match.end()
        if code == 0xD9:  # EOI
            return size
        if 0xD0 <= code <= 0xD7 or code == 0x01:  # restart markers and TEM have no payload
            continue
        if pos + 2 > len(data):
            return None
        if code in _JPEG_SOF and size is None and pos + 7 <= len(data):
            height, width = struct.unpack_from(">HH", data, pos + 3)
            size = (width, height)
        pos += struct.unpack_from(">H", data, pos)[0]
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of the first page once its strips or tiles are known to lie inside the file, else None."""
    from PIL import TiffImagePlugin

    try:  # the plugin class directly: Image.open would refuse sizes over Pillow's own, lower limit
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Truncated File Read" and friends: this function says it
            tags = TiffImagePlugin.TiffImageFile(io.BytesIO(data)).tag_v2
        offsets, counts = tags.get(273) or tags.get(324), tags.get(279) or tags.get(325)
        complete = max(o + c for o, c in zip(offsets, counts, strict=True)) <= len(data)
        return (int(tags[256]), int(tags[257])) if complete else None
    except Exception:  # any failure to parse a hostile header (missing tags included) means a damaged file
        return None


def _is_gray_alpha_png(data: bytes) -> bool:
    """PNG colour type 4 (gray + alpha), read from the IHDR chunk."""
    return len(data) > 25 and data.startswith(b"\x89PNG\r\n\x1a\n") and data[25] == 4


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
