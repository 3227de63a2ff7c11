"""Reading and writing images for restoration: 8- and 16-bit PNG/JPEG/TIFF, grayscale and alpha.

Conventions (also in docs/images.md):
- Pixels become float32 RGB in [0, 1] (value / 255 or / 65535); nothing else is done to them (no gamma).
- Grayscale inputs given to a 3-channel model are replicated to RGB and the output is converted back to one
  channel (channel mean); a 1-channel model refuses colour inputs.
- Alpha is not restored: it is carried through unchanged and written back with the output (JPEG cannot hold
  alpha or 16 bits: such inputs are refused for JPEG output).
- The EXIF orientation is applied on reading (JPEG, PNG and TIFF), so outputs are upright and say Orientation 1.
- Outputs keep the input's bit depth, are clamped to [0, 1] and rounded (as the official evaluation does).
- Outputs keep the input's ICC profile (its colour space: Display P3 stays Display P3), EXIF and resolution (dpi),
  whatever the output format. A profile of another colour model than the output's (a CMYK JPEG restored as RGB)
  is dropped, as are the EXIF tags that describe the input file's layout (strips, compression, thumbnail).
  TIFF outputs with 16 bits or alpha keep the main EXIF tags (camera, date, author), not the EXIF and GPS
  sub-directories.
- Single images only: multi-page TIFFs and animated PNGs are refused rather than reduced to their first page.

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
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from nafnet_edge.atomic import atomic_path
from nafnet_edge.errors import ImageError
from nafnet_edge.sniff import looks_like_safetensors

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


@dataclass(frozen=True)
class ImageMetadata:
    """What an image file says beyond its pixels, carried from an input to its output."""

    icc_profile: bytes | None = None  # the colour space of the pixel values (sRGB, Display P3, a camera's)
    exif: bytes | None = None  # EXIF as Pillow writes it: Orientation 1 (pixels are upright), no file-layout tags
    dpi: tuple[float, float] | None = None  # print resolution (x, y) in dots per inch


@dataclass(frozen=True)
class ImageProbe:
    """What :func:`check_image_file` learns from an image file's headers, without decoding a pixel."""

    format: ImageFormat
    width: int  # as stored, before the EXIF orientation turns it
    height: int
    bit_depth: Literal[8, 16]  # of the samples read_image returns
    channels: Literal[1, 3]  # colour channels read_image returns (gray or RGB), alpha not counted
    has_alpha: bool


@dataclass
class RGBImage:
    """An image as the model sees it, plus what is needed to write it back in kind."""

    pixels: np.ndarray  # float32, H x W x C, C = 1 (gray) or 3 (RGB), values in [0, 1]
    alpha: np.ndarray | None  # float32 H x W in [0, 1], carried through untouched
    bit_depth: Literal[8, 16]
    path: Path | None = None  # the file it was read from, named in error messages
    metadata: ImageMetadata = field(default_factory=ImageMetadata)  # written back with the output

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
    data, probe = _read_checked(path)
    fmt, width, height = probe.format, probe.width, probe.height
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
    metadata, orientation = _read_metadata(fmt, data)
    if fmt == "PNG" and orientation in _UPRIGHT:  # OpenCV turns JPEG and TIFF upright itself, not PNG
        arr = _UPRIGHT[orientation](arr)
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
        metadata=metadata,
    )


def check_image_file(path: str | Path, *, write_as: str | None = None) -> ImageProbe:
    """What :func:`read_image` will return, refusing before decoding what it would refuse.

    With ``write_as`` (an output suffix such as ``".jpg"``), also refuses an input whose result that format cannot
    hold (16 bits or alpha in a JPEG). Cheap (no pixel is decoded): call it on every input before starting long
    work, so that a bad file is reported at once and before any output is written.
    """
    path = Path(path)
    probe = _read_checked(path)[1]
    if write_as == ".jpg" and probe.bit_depth == 16:
        raise ImageError(
            f"{path}: a 16-bit image cannot be written as JPEG (8 bits per channel); "
            "use --format png or --format tiff, or keep the input's format (--format auto)"
        )
    if write_as == ".jpg" and probe.has_alpha:
        raise ImageError(
            f"{path}: the image has an alpha channel (transparency), which JPEG cannot hold; "
            "use --format png or keep the input's format (--format auto)"
        )
    return probe


def _read_checked(path: Path) -> tuple[bytes, ImageProbe]:
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


def _probe_image(path: Path, data: bytes) -> ImageProbe:
    """What an encoded image holds, from its header and structure alone (nothing is decoded).

    Refuses, with an :class:`ImageError` naming ``path``: empty files, content that is not PNG, JPEG or TIFF
    (whatever the name says), multi-page TIFFs and animated PNGs, TIFF samples or compressions OpenCV cannot
    decode, streams cut short (no PNG IEND, no JPEG EOI, TIFF strips past the end of the file), images with no
    pixels and images over :func:`max_image_pixels`.
    """
    if not data:
        raise ImageError(f"{path}: cannot decode the image: the file is empty (0 bytes)")
    fmt = next((f for sig, f in _SIGNATURES.items() if data.startswith(sig)), None)
    if fmt is None:
        if data.startswith(b"PK\x03\x04") and b"data.pkl" in data[:4096] or looks_like_safetensors(data, len(data)):
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
    # TIFF first: the size check below opens it with Pillow, which cannot open float samples (a complete file)
    layout = _tiff_layout(path, data) if fmt == "TIFF" else None
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
    if fmt == "PNG":
        layout = _png_layout(path, data)
    elif fmt == "JPEG":
        layout = _jpeg_layout(data)
    elif layout is None:  # the strips were found, but not the tags that say what they hold
        raise ImageError(f"{path}: the TIFF file is damaged (its tags cannot be read); copy or download it again")
    return ImageProbe(fmt, width, height, *layout)


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


# A marker: 0xFF and a code; FF00 is a stuffed data byte inside entropy-coded scans. Fill bytes (more 0xFF
# before the code) need no pattern of their own: the search finds the last 0xFF of a run. A single 0xFF, not
# ``\xff+``, keeps the search linear: ``\xff+`` retried from every byte of a long 0xFF run is quadratic.
_JPEG_MARKER = re.compile(rb"\xff([^\x00\xff])")
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
        if offsets is None or counts is None:
            return None
        complete = max(o + c for o, c in zip(offsets, counts, strict=True)) <= len(data)
        return (int(tags[256]), int(tags[257])) if complete else None
    except Exception:  # any failure to parse a hostile header (missing tags included) means a damaged file
        return None


def _is_gray_alpha_png(data: bytes) -> bool:
    """PNG colour type 4 (gray + alpha), read from the IHDR chunk."""
    return len(data) > 25 and data.startswith(b"\x89PNG\r\n\x1a\n") and data[25] == 4


Layout = tuple[Literal[8, 16], Literal[1, 3], bool]  # bit depth, colour channels, alpha: see ImageProbe

# TIFF compressions the libtiff inside OpenCV decodes (no LZMA, Zstandard, WebP, JPEG XL, LERC or JBIG).
_TIFF_COMPRESSIONS = frozenset({1, 2, 3, 4, 5, 6, 7, 8, 32773, 32809, 32946, 34676, 34677})
_TIFF_SAMPLE_FORMATS = {2: "signed integer", 3: "floating-point", 4: "untyped", 5: "complex", 6: "complex float"}
_TIFF_MAX_IFDS = 16  # directories walked looking for a second page (past preview and mask directories)


def _tiff_layout(path: Path, data: bytes) -> Layout | None:
    """The layout of a TIFF's first page from its tags (read by Pillow), refusing what OpenCV cannot decode.

    None when the tags cannot be read (the size check then calls the file damaged). A second page is refused:
    reduced-resolution previews and transparency masks (NewSubfileType bits 0 and 2) are not pages.
    """
    from PIL import TiffImagePlugin

    header = data[:16] if data[2:3] == b"+" or data[3:4] == b"+" else data[:8]  # BigTIFF or classic
    try:
        offset = TiffImagePlugin.ImageFileDirectory_v2(header).next
    except Exception:
        return None
    pages: list[TiffImagePlugin.ImageFileDirectory_v2] = []
    offsets: set[int] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while offset and offset not in offsets and len(offsets) < _TIFF_MAX_IFDS and len(pages) < 2:
            offsets.add(offset)
            ifd = TiffImagePlugin.ImageFileDirectory_v2(header)
            try:
                ifd.load(_seeked(data, offset))
            except Exception:  # a hostile or damaged directory; the first one is required, later ones are not
                if not pages:
                    return None
                break
            if 256 in ifd and 257 in ifd and not int(ifd.get(254, 0)) & 0b101:
                pages.append(ifd)
            offset = ifd.next
    if not pages:
        return None
    if len(pages) > 1:
        raise ImageError(
            f"{path}: the TIFF has several pages; nafnet-edge restores single images only: split it into one "
            "file per page first (`tiffsplit FILE page-` or `magick FILE page-%d.tif`)"
        )
    tags = pages[0]
    bits = tuple(tags.get(258) or (1,))
    sample_format = max(tags.get(339) or (1,))
    if sample_format != 1:
        kind = _TIFF_SAMPLE_FORMATS.get(sample_format, f"sample format {sample_format}")
        raise ImageError(
            f"{path}: the TIFF holds {bits[0]}-bit {kind} samples, which are not supported; "
            "convert it to 8- or 16-bit integer TIFF"
        )
    if not set(bits) <= {1, 2, 4, 8, 16} or len(set(bits)) > 1:
        depth = "/".join(map(str, bits))
        raise ImageError(
            f"{path}: the TIFF holds {depth}-bit samples, which are not supported; convert it to 8- or 16-bit "
            "integer TIFF"
        )
    compression = int(tags.get(259, 1))
    if compression not in _TIFF_COMPRESSIONS:
        name = TiffImagePlugin.COMPRESSION_INFO.get(compression, f"code {compression}")
        raise ImageError(
            f"{path}: the TIFF uses {name} compression, which cannot be decoded here; convert it to 8- or 16-bit "
            "integer TIFF without compression or with LZW or Deflate"
        )
    photometric = int(tags.get(262, 1))
    gray = photometric in (0, 1)  # min-is-white or min-is-black
    colour_samples = {0: 1, 1: 1, 3: 1, 5: 4}.get(photometric, 3)  # 3: palette, 5: CMYK
    return (16 if bits[0] == 16 else 8), (1 if gray else 3), int(tags.get(277, 1)) > colour_samples


def _seeked(data: bytes, offset: int) -> io.BytesIO:
    stream = io.BytesIO(data)
    stream.seek(offset)
    return stream


def _png_layout(path: Path, data: bytes) -> Layout:
    """The layout of a PNG from its IHDR and, through Pillow, its transparency and animation chunks."""
    from PIL import PngImagePlugin

    bit_depth, color_type = data[24], data[25]
    frames, transparent = 1, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with PngImagePlugin.PngImageFile(io.BytesIO(data)) as png:
                frames, transparent = int(getattr(png, "n_frames", 1)), "transparency" in png.info
    except Exception:  # Pillow is stricter than libpng about ancillary chunks; the header above is enough
        pass
    if frames > 1:
        raise ImageError(
            f"{path}: the PNG is animated ({frames} frames); nafnet-edge restores single images only: extract "
            "the frames as separate files first (`ffmpeg -i FILE frame-%03d.png`)"
        )
    # OpenCV adds alpha for colour types 4 and 6, and for a tRNS chunk on RGB (2) or palette (3) images only.
    alpha = color_type in (4, 6) or (transparent and color_type in (2, 3))
    return (16 if bit_depth == 16 else 8), (1 if color_type in (0, 4) else 3), alpha


def _jpeg_layout(data: bytes) -> Layout:
    """8-bit, no alpha; gray when Pillow reads a single-component frame header, else colour (YCbCr, CMYK)."""
    from PIL import JpegImagePlugin

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with JpegImagePlugin.JpegImageFile(io.BytesIO(data)) as jpeg:
                gray = jpeg.mode == "L"
    except Exception:  # an unusual header Pillow refuses; OpenCV still decodes it to colour
        gray = False
    return 8, (1 if gray else 3), False


# EXIF Orientation -> the array operation that turns the stored rows and columns upright (ImageOps.exif_transpose).
_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}
_ORIENTATION = 0x0112
# TIFF tags that describe how the input file stores its pixels (or its thumbnail, or metadata carried on its own):
# never copied to an output. Resolution travels as dpi, the ICC profile as itself.
_FILE_LAYOUT_TAGS = frozenset(
    {254, 255, 256, 257, 258, 259, 262, 263, 264, 265, 266, 273, 277, 278, 279, 280, 281, 282, 283, 284, 290, 291}
    | {292, 293, 296, 301, 317, 320, 322, 323, 324, 325, 330, 332, 338, 339, 340, 341, 347, 513, 514, 529, 530}
    | {531, 532, 700, 33723, 34377, 34675, 37724}
)


def _read_metadata(fmt: ImageFormat, data: bytes) -> tuple[ImageMetadata, int]:
    """The ICC profile, EXIF and dpi of an encoded image, read by Pillow, and its EXIF orientation (1 if none).

    Pillow's format classes are used directly: they read the headers only (``Image.open`` would also refuse sizes
    over Pillow's own pixel limit, lower than ours). A PNG's EXIF is read where writers put it, before the pixels.
    Metadata Pillow cannot parse is left behind: the pixels, read by OpenCV, are what matters.
    """
    from PIL import Image, JpegImagePlugin, PngImagePlugin, TiffImagePlugin

    opener = {"PNG": PngImagePlugin.PngImageFile, "JPEG": JpegImagePlugin.JpegImageFile}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with opener.get(fmt, TiffImagePlugin.TiffImageFile)(io.BytesIO(data)) as im:
                info = dict(im.info)
                exif = im.getexif() if fmt != "PNG" or "exif" in info else Image.Exif()  # PNG: else it decodes
                orientation = exif.get(_ORIENTATION, 1)
                for tag in _FILE_LAYOUT_TAGS & set(exif):
                    del exif[tag]
                if _ORIENTATION in exif:
                    exif[_ORIENTATION] = 1
                exif_bytes = exif.tobytes() if len(exif) else None  # inside: sub-directories are read lazily
    except Exception:
        return ImageMetadata(), 1
    icc = info.get("icc_profile") or None
    return (
        ImageMetadata(icc_profile=icc if icc and _icc_color_space(icc) else None, exif=exif_bytes, dpi=_dpi(info)),
        orientation if orientation in _UPRIGHT else 1,
    )


def _icc_color_space(icc: bytes) -> str | None:
    """The colour model of an ICC profile ("RGB", "GRAY", "CMYK", ...), None when Pillow cannot parse it."""
    from PIL import ImageCms

    try:
        return str(ImageCms.ImageCmsProfile(io.BytesIO(icc)).profile.xcolor_space).strip()
    except Exception:  # a damaged profile is not carried
        return None


def _dpi(info: dict) -> tuple[float, float] | None:
    try:
        x, y = (float(v) for v in info["dpi"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return (x, y) if 0 < x < 1e6 and 0 < y < 1e6 else None


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
    """``image`` encoded as ``suffix`` (.png, .jpg, .jpeg, .tif, .tiff) with its alpha and metadata.

    8-bit images are written by Pillow, which writes ICC, EXIF and dpi in every format; 16-bit PNGs by OpenCV
    with the metadata chunks added; TIFFs with 16 bits or alpha by tifffile (no EXIF sub-directories).
    """
    suffix = {".jpeg": ".jpg", ".tiff": ".tif"}.get(suffix, suffix)
    if suffix not in (".png", ".jpg", ".tif"):
        raise ImageError(f"cannot write {suffix} images; use .png, .jpg or .tif")
    if suffix == ".jpg" and image.bit_depth == 16:
        raise ImageError("JPEG holds only 8 bits per channel; write 16-bit results as PNG or TIFF (--format png)")
    if suffix == ".jpg" and image.alpha is not None:
        raise ImageError("JPEG cannot hold the alpha channel (transparency); write the result as PNG (--format png)")
    samples = quantize(image.pixels, image.bit_depth)
    if image.alpha is not None:
        samples = np.concatenate([samples, quantize(image.alpha, image.bit_depth)[:, :, None]], axis=2)
    samples = np.ascontiguousarray(samples[:, :, 0] if samples.shape[2] == 1 else samples)
    meta = image.metadata
    icc = meta.icc_profile
    if icc and _icc_color_space(icc) != ("GRAY" if image.pixels.shape[2] == 1 else "RGB"):
        icc = None  # a CMYK profile does not describe the RGB result
    if image.bit_depth == 8 and not (suffix == ".tif" and image.alpha is not None):
        return _encode_pillow(samples, suffix, icc, meta, jpeg_quality=jpeg_quality)
    if suffix == ".png":
        return _encode_png16(samples, icc, meta)
    return _encode_tifffile(samples, icc, meta)


def _encode_pillow(
    samples: np.ndarray, suffix: str, icc: bytes | None, meta: ImageMetadata, *, jpeg_quality: int
) -> bytes:
    from PIL import Image

    options: dict[str, object] = {"icc_profile": icc, "exif": meta.exif or b"", "dpi": meta.dpi}
    if suffix == ".jpg":
        options["quality"] = jpeg_quality
    elif suffix == ".tif" and not _exif_has_subdirectories(meta.exif):
        options["compression"] = "tiff_lzw"  # through libtiff, which cannot write EXIF sub-directories
    buf = io.BytesIO()
    Image.fromarray(samples).save(
        buf, {".png": "PNG", ".jpg": "JPEG", ".tif": "TIFF"}[suffix], **{k: v for k, v in options.items() if v}
    )
    return buf.getvalue()


def _exif_has_subdirectories(exif: bytes | None) -> bool:
    from PIL import Image, TiffTags

    if not exif:
        return False
    tags = Image.Exif()
    tags.load(exif)
    return any(tag in TiffTags.TAGS_V2_GROUPS for tag in tags)


def _encode_png16(samples: np.ndarray, icc: bytes | None, meta: ImageMetadata) -> bytes:
    """OpenCV's 16-bit PNG with iCCP, pHYs and eXIf chunks (written by Pillow's chunk writer) after its IHDR."""
    import cv2
    from PIL import PngImagePlugin

    if samples.ndim == 3 and samples.shape[2] == 2:  # OpenCV writes no gray + alpha: RGBA with equal R, G, B
        samples = samples[:, :, [0, 0, 0, 1]]
        icc = None if icc and _icc_color_space(icc) == "GRAY" else icc
    if samples.ndim == 3 and samples.shape[2] >= 3:  # RGB(A) to OpenCV's BGR(A)
        samples = samples[:, :, [2, 1, 0, 3][: samples.shape[2]]]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(samples))
    if not ok:
        raise ImageError("could not encode the result as .png")
    chunks = io.BytesIO()
    if icc:
        PngImagePlugin.putchunk(chunks, b"iCCP", b"ICC Profile\0\0", zlib.compress(icc))
    if meta.dpi:
        ppm = (round(v / 0.0254) for v in meta.dpi)
        PngImagePlugin.putchunk(chunks, b"pHYs", struct.pack(">IIB", *ppm, 1))
    if meta.exif:
        PngImagePlugin.putchunk(chunks, b"eXIf", meta.exif.removeprefix(b"Exif\0\0"))
    png = buf.tobytes()
    ihdr_end = 8 + 8 + 13 + 4  # signature, then IHDR (always first, 13 bytes) with its length, type and CRC
    return png[:ihdr_end] + chunks.getvalue() + png[ihdr_end:]


def _encode_tifffile(samples: np.ndarray, icc: bytes | None, meta: ImageMetadata) -> bytes:
    """A TIFF by tifffile (16 bits, or 8 with alpha), with the ICC profile, dpi and the main directory's EXIF tags.

    8-bit alpha is marked "unspecified", as OpenCV writes it: OpenCV reads 8-bit "unassociated alpha" through
    libtiff's RGBA path, which changes the colours.
    """
    import tifffile
    from PIL import Image, TiffImagePlugin, TiffTags

    channels = 1 if samples.ndim == 2 else samples.shape[2]
    extratags: list[tuple[int, str, int, object, bool]] = []  # (code, dtype, count, value, writeonce)
    exif = Image.Exif()
    if meta.exif:
        exif.load(meta.exif)
    for tag, value in exif.items():
        if tag in TiffTags.TAGS_V2_GROUPS:
            continue  # a sub-directory (EXIF, GPS, Interop): tifffile cannot write one
        if isinstance(value, str):
            extratags.append((tag, "s", 0, value, True))
        elif isinstance(value, bytes):
            extratags.append((tag, "B", len(value), value, True))
        elif isinstance(value, int) and 0 <= value < 1 << 32:
            extratags.append((tag, "H" if value < 1 << 16 else "I", 1, value, True))
        elif isinstance(value, TiffImagePlugin.IFDRational):
            extratags.append((tag, "2I", 1, (value.numerator, value.denominator), True))
    buf = io.BytesIO()
    tifffile.imwrite(
        buf,
        samples,
        photometric="minisblack" if channels <= 2 else "rgb",
        extrasamples=(("unassalpha" if samples.dtype == np.uint16 else "unspecified"),) if channels in (2, 4) else None,
        compression="zlib",
        iccprofile=icc,
        resolution=meta.dpi,
        resolutionunit="INCH" if meta.dpi else None,
        software=None,
        metadata=None,
        extratags=extratags,
    )
    return buf.getvalue()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` so that no partial file is ever seen at ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_image(path: str | Path, image: RGBImage, *, jpeg_quality: int = 95) -> None:
    path = Path(path)
    write_bytes_atomic(path, encode_image(image, path.suffix.lower(), jpeg_quality=jpeg_quality))
