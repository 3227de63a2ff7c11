"""Validation of an exported artifact in its own runtime against fp32 PyTorch outputs of the original model.

- Reference: the original (not reparameterized) model in fp32, on CUDA when there is one, through the same
  tiler as the artifact (tile = the artifact's input size), so fidelity measures the artifact's drift alone.
  Tiling drift (tiled vs whole-image reference) is reported on its own line. References are cached on disk,
  keyed by everything that decides them (see ``cache_key``); an entry is used only when its HMAC, made with a
  private per-user key, checks out, so nothing planted in the cache can turn a failure into a pass.
- Images: the Kodak photos shipped with the package with seeded Gaussian noise (sigma 25/255) as inputs and
  the clean photos as ground truth, or the user's folder (``--data``), or input/target folder pairs
  (``--data-pairs``). Super-resolution models (``scale`` > 1) get the same photos cropped to a multiple of the
  scale as ground truth and their bicubic downscale (Pillow's antialiased BICUBIC, rounded to 8 bits) as input;
  stereo models (2 views) a synthetic pair with real parallax: two crops of one photo shifted horizontally by
  ``STEREO_SHIFT_PX``, stacked on the channel axis (left first).
- Metrics per image and overall: fidelity PSNR (artifact vs reference, data range 1.0, outputs clamped to
  [0, 1]), max abs error (unclamped), NaN/Inf count; with ground truth, task PSNR and SSIM of reference and
  artifact and their difference (drift, dB).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import os
import secrets
import stat
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from nafnet_edge import __version__, progress
from nafnet_edge.defaults import VALIDATION_OVERLAP_PX
from nafnet_edge.errors import BadInputError, CheckpointError
from nafnet_edge.images import is_image_path, read_image
from nafnet_edge.manifest import ValidationSummary
from nafnet_edge.pixels import MIN_WITHIN_ONE_LEVEL, level_agreement, quantized
from nafnet_edge.tiling import make_grid, padded_size, run_tiled

if TYPE_CHECKING:
    from nafnet_edge.model import RestorationNet

DEFAULT_NOISE_SIGMA = 25.0 / 255.0
DEFAULT_NOISE_SEED = 2022
DEFAULT_OVERLAP_PX = VALIDATION_OVERLAP_PX
STEREO_SHIFT_PX = 12  # horizontal offset of the right view's crop in the synthetic stereo pairs (ground-truth px)
MIN_FIDELITY_DB = {"fp32": 60.0, "fp16": 45.0, "int8": 35.0}
MAX_DRIFT_DB = {"fp32": 0.01, "fp16": 0.05, "int8": 0.1}


@dataclass(frozen=True)
class ValidationImage:
    name: str
    input: np.ndarray  # float32 HxWxC in [0, 1] (C: channels times views, views stacked left first)
    target: np.ndarray | None = None  # ground truth: the output's shape (scale times the input's size)

    @property
    def digest(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.input).tobytes()).hexdigest()


@dataclass(frozen=True)
class Budgets:
    min_fidelity_db: float
    max_drift_db: float
    # Image I/O: the least share of output samples within one 8-bit level of the reference rounded the same way
    # (None: no such budget; tensor I/O and int8, whose PSNR budgets judge them).
    min_within_one_level: float | None = None

    @property
    def pixels(self) -> bool:
        """Scored as 8-bit pixels (image I/O): outputs and references are rounded to 8 bits before comparing."""
        return self.min_within_one_level is not None

    @classmethod
    def for_precision(
        cls,
        precision: str,
        *,
        min_fidelity_db: float | None = None,
        max_drift_db: float | None = None,
        pixels: bool = False,
    ) -> Budgets:
        return cls(
            min_fidelity_db=MIN_FIDELITY_DB.get(precision, 60.0) if min_fidelity_db is None else min_fidelity_db,
            max_drift_db=MAX_DRIFT_DB.get(precision, 0.05) if max_drift_db is None else max_drift_db,
            # int8 image I/O is scored on 8-bit pixels too, with 0.0: no share required beyond the PSNR budgets
            min_within_one_level=MIN_WITHIN_ONE_LEVEL.get(precision, 0.0) if pixels else None,
        )


@dataclass
class ImageResult:
    name: str
    size: tuple[int, int]
    tiles: int
    fidelity_db: float
    max_abs_error: float
    nonfinite: int
    tiling_db: float | None = None  # tiled reference vs whole-image reference
    reference_psnr_db: float | None = None
    artifact_psnr_db: float | None = None
    drift_db: float | None = None
    reference_ssim: float | None = None
    artifact_ssim: float | None = None
    # 8-bit agreement with the reference (both clamped and rounded): share of samples equal, within one level
    exact_share: float | None = None
    within_one_level_share: float | None = None
    max_level_diff: int | None = None


@dataclass
class ValidationReport:
    images: list[ImageResult]
    budgets: Budgets
    reference_device: str
    data: str
    failures: list[str] = field(default_factory=list)
    reference_settings: dict[str, Any] | None = None  # how the reference model was loaded and run

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> dict[str, Any]:
        fid = [r.fidelity_db for r in self.images]
        drift = [r.drift_db for r in self.images if r.drift_db is not None]
        out: dict[str, Any] = {
            "images": len(self.images),
            "fidelity_db_min": float(np.min(fid)),  # NaN if any is: a verdict must not skip an image
            "fidelity_db_mean": float(np.mean(fid)),
            "max_abs_error": max(r.max_abs_error for r in self.images),
            "nonfinite": sum(r.nonfinite for r in self.images),
        }
        within = [r.within_one_level_share for r in self.images if r.within_one_level_share is not None]
        if within:
            out["within_one_level_share_min"] = float(np.min(within))
            out["exact_share_mean"] = float(np.mean([r.exact_share for r in self.images]))
            out["max_level_diff"] = max(int(r.max_level_diff or 0) for r in self.images)
        if drift:
            out["drift_db_mean"] = float(np.mean(drift))
            out["reference_psnr_db_mean"] = float(np.mean([r.reference_psnr_db for r in self.images]))
            out["artifact_psnr_db_mean"] = float(np.mean([r.artifact_psnr_db for r in self.images]))
            out["reference_ssim_mean"] = float(np.mean([r.reference_ssim for r in self.images]))
            out["artifact_ssim_mean"] = float(np.mean([r.artifact_ssim for r in self.images]))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "failures": self.failures,
            "budgets": asdict(self.budgets),
            "reference": f"original model, fp32 PyTorch on {self.reference_device}, same tiling as the artifact",
            "reference_settings": self.reference_settings,
            "data": self.data,
            "summary": self.summary(),
            "per_image": [asdict(r) for r in self.images],
        }

    def to_summary(self) -> ValidationSummary:
        """The manifest's ``validation`` section."""
        return ValidationSummary(**self.to_dict())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB with data range 1.0 (inputs are floats in [0, 1]); inf for identical inputs."""
    from skimage.metrics import peak_signal_noise_ratio

    with np.errstate(divide="ignore"):  # identical inputs: MSE 0 gives inf, which is the answer
        return float(peak_signal_noise_ratio(a.astype(np.float64), b.astype(np.float64), data_range=1.0))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5))


# --- data ------------------------------------------------------------------------------------------------------


def default_images(channels: int = 3, *, scale: int = 1, views: int = 1) -> list[ValidationImage]:
    """The shipped Kodak photos with seeded Gaussian noise (sigma 25/255) and the clean photos as targets; for a
    super-resolution model (``scale`` > 1 or a stereo one) :func:`sr_images` instead."""
    if scale > 1 or views > 1:
        return sr_images(channels, scale=scale, views=views)
    folder = Path(str(resources.files("nafnet_edge") / "data" / "kodak"))
    rng = np.random.default_rng(DEFAULT_NOISE_SEED)
    images = []
    for path in sorted(folder.glob("*.png")):
        clean = _channels(read_image(path).pixels, channels)
        noisy = clean + rng.normal(0.0, DEFAULT_NOISE_SIGMA, clean.shape).astype(np.float32)
        images.append(ValidationImage(f"{path.stem}-sigma25", noisy.astype(np.float32), clean))
    return images


def sr_images(channels: int = 3, *, scale: int, views: int = 1) -> list[ValidationImage]:
    """Super-resolution validation data from the shipped photos: the clean photo cropped to a multiple of
    ``scale`` is the ground truth, its bicubic downscale by ``scale`` (Pillow BICUBIC, antialiased, rounded to 8
    bits like a saved file) the input. With ``views`` = 2 (stereo) the pair is synthetic but has real parallax:
    the left view is the photo without its right ``STEREO_SHIFT_PX`` columns, the right view the same crop moved
    that far right, each downscaled on its own, stacked on the channel axis (left first)."""
    from PIL import Image

    folder = Path(str(resources.files("nafnet_edge") / "data" / "kodak"))
    shift = STEREO_SHIFT_PX if views > 1 else 0
    images = []
    for path in sorted(folder.glob("*.png")):
        clean = _channels(read_image(path).pixels, channels)
        h, w = clean.shape[0] // scale * scale, (clean.shape[1] - shift) // scale * scale
        crops = [clean[:h, v * shift : v * shift + w] for v in range(views)]
        lows = []
        for crop in crops:
            levels = np.clip(np.rint(crop * 255.0), 0, 255).astype(np.uint8)
            planes = [Image.fromarray(levels[:, :, i]) for i in range(channels)]  # per channel: gray or RGB alike
            small = [np.asarray(p.resize((w // scale, h // scale), Image.Resampling.BICUBIC)) for p in planes]
            lows.append(np.stack(small, axis=2).astype(np.float32) / np.float32(255.0))
        label = f"{path.stem}-bicubic-x{scale}" + (f"-stereo-shift{shift}" if views > 1 else "")
        target = np.concatenate(crops, axis=2).astype(np.float32)
        images.append(ValidationImage(label, np.concatenate(lows, axis=2), target))
    return images


def sr_data_note(scale: int, views: int) -> str:
    """How :func:`sr_images` made the data, for the manifest and the report."""
    pair = (
        f"; stereo pairs are synthetic: two crops of one photo {STEREO_SHIFT_PX} px apart horizontally"
        if views > 1
        else ""
    )
    return (
        f"shipped Kodak photos: ground truth cropped to a multiple of {scale}, input its x{scale} bicubic "
        f"downscale{pair}"
    )


def folder_images(folder: str | Path, channels: int = 3) -> list[ValidationImage]:
    """Every image in ``folder`` (no ground truth)."""
    return [ValidationImage(p.name, _channels(read_image(p).pixels, channels)) for p in _list_images(folder)]


def paired_images(
    inputs: str | Path, targets: str | Path, channels: int = 3, *, scale: int = 1
) -> list[ValidationImage]:
    """Degraded images in ``inputs`` and their ground truth, with the same file names, in ``targets`` (``scale``
    times the input's size for a super-resolution model)."""
    images = []
    target_dir = Path(targets)
    for p in _list_images(inputs):
        match = [t for t in target_dir.glob(f"{p.stem}.*") if is_image_path(t)]
        if not match:
            raise BadInputError(f"no ground truth for {p.name} in {target_dir}: name targets like their inputs")
        x, y = _channels(read_image(p).pixels, channels), _channels(read_image(match[0]).pixels, channels)
        if (x.shape[0] * scale, x.shape[1] * scale, x.shape[2]) != y.shape:
            times = f" (the target must be {scale} times the input's size)" if scale > 1 else ""
            raise BadInputError(
                f"{p.name}: input is {x.shape[1]}x{x.shape[0]}, target {y.shape[1]}x{y.shape[0]}{times}"
            )
        images.append(ValidationImage(p.name, x, y))
    return images


def _list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(f"{folder} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if is_image_path(p))
    if not files:
        raise BadInputError(f"{folder} holds no PNG, JPEG or TIFF images")
    return files


def _channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    if pixels.shape[2] == channels:
        return pixels
    if pixels.shape[2] == 1 and channels == 3:
        return np.repeat(pixels, 3, axis=2)
    if channels == 1:
        return pixels.mean(axis=2, keepdims=True)
    raise BadInputError(f"cannot use a {pixels.shape[2]}-channel image with a {channels}-channel model")


# --- running ---------------------------------------------------------------------------------------------------


def _padded(shape: tuple[int, ...], tile: tuple[int, int] | None, multiple: int) -> tuple[int, int, int, int]:
    """The padded image size and the tile ``apply_tiled`` uses for an HxW(xC) image."""
    ph, pw = padded_size(shape[0], shape[1], tile, multiple)
    th, tw = tile or (ph, pw)
    return ph, pw, th, tw


def tile_count(shape: tuple[int, ...], tile: tuple[int, int] | None, overlap: int, multiple: int) -> int:
    """How many calls :func:`apply_tiled` makes for an HxW(xC) image."""
    ph, pw, th, tw = _padded(shape, tile, multiple)
    if (ph, pw) == (th, tw):
        return 1
    return len(make_grid(ph, pw, tile_px=(th, tw), overlap_px=overlap, align_px=multiple))


def apply_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    pixels: np.ndarray,
    tile: tuple[int, int] | None,
    overlap: int,
    multiple: int,
    scale: int = 1,
) -> tuple[np.ndarray, int]:
    """``fn`` (fixed-size NCHW -> NCHW, ``scale`` times the size) over an HxWxC image: zero-pad to the tile (or,
    with ``tile=None``, to the multiple for one whole-image call), tile, crop back; returns the output
    (``scale`` H x ``scale`` W x C) and the number of calls."""
    x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]
    h, w = x.shape[-2:]
    ph, pw, th, tw = _padded(pixels.shape, tile, multiple)
    x = F.pad(x, (0, pw - w, 0, ph - h))
    calls = []

    def counted(t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return fn(t)

    if (ph, pw) == (th, tw):
        y = counted(x)
    else:
        y = run_tiled(counted, x, tile_px=(th, tw), overlap_px=overlap, align_px=multiple, scale=scale)
    return y[0, :, : h * scale, : w * scale].permute(1, 2, 0).numpy(), len(calls)


def runner_fn(run: Callable[[np.ndarray], np.ndarray]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A numpy runner (one image at a time) as a tensor function for the tiler."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.from_numpy(np.asarray(run(t[i : i + 1].numpy()), np.float32)) for i in range(len(t))])

    return fn


# --- reference cache -------------------------------------------------------------------------------------------
#
# One file per (reference settings, image, tiling): a fixed header, the output as raw little-endian float32 and an
# HMAC-SHA256 over the key material, header and payload. The file name is the SHA-256 of the key material, so an
# entry written for other settings is never found; its size is known from the image before anything is read, and
# its HMAC needs a key only this user can read, so neither a planted nor a stale entry can change a verdict.

CACHE_FORMAT = 2
_ENTRY_SUFFIX = ".ref"
_ENTRY_MAGIC = b"NEREF\x00\x02\x00"
_ENTRY_HEADER = struct.Struct("<8s3IB3xd")  # magic, height, width, channels, has tiling_db, tiling_db
_MAC_BYTES = 32
_SECRET_NAME = "hmac.key"
_SECRET_BYTES = 32
# Never follow a link, never block on a FIFO: a cache file is opened as what it is, then checked with fstat.
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def cache_dir() -> Path:
    root = os.environ.get("NAFNET_EDGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nafnet-edge"
    )
    return Path(root) / "reference"


def reference_identity(
    model: torch.nn.Module, *, checkpoint_sha256: str, param_key: str | None, device: torch.device
) -> dict[str, Any]:
    """Everything besides the image and the tiling that decides the fp32 reference outputs: the tool versions,
    the checkpoint and the entry read from it, the class and configuration (TLC settings included), the module
    structure, the weights themselves, and where and at which precision the reference runs."""
    weights = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        weights.update(f"{name}:{list(t.shape)};".encode())
        weights.update(t.numpy().tobytes())
    config: Any = getattr(model, "config", None)
    identity: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "nafnet_edge": __version__,
        "torch": torch.__version__,
        "checkpoint_sha256": checkpoint_sha256,
        "param_key": param_key,
        "class": type(model).__name__,
        "config": config.to_dict() if hasattr(config, "to_dict") else None,
        "structure": hashlib.sha256(str(model).encode()).hexdigest(),
        "weights": weights.hexdigest(),
        "device": device.type,
        "precision": "fp32",
    }
    if device.type == "cuda":
        identity["device_name"] = torch.cuda.get_device_name(device)
        identity["tf32"] = [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32]
    return identity


def cache_key(
    identity: dict[str, Any],
    image: ValidationImage,
    *,
    tile: tuple[int, int],
    overlap: int,
    scale: int = 1,
    views: int = 1,
) -> tuple[str, bytes]:
    """The entry's file name and the key material its HMAC covers, for one image and tiling; the output scale and
    the views are in it too, so super-resolution and restoration references never share an entry."""
    pixels = np.ascontiguousarray(image.input)
    material = json.dumps(
        {
            **identity,
            "image": hashlib.sha256(pixels.tobytes()).hexdigest(),
            "image_shape": list(pixels.shape),
            "image_dtype": pixels.dtype.str,
            "tile": list(tile),
            "overlap": overlap,
            "scale": scale,
            "views": views,
        },
        sort_keys=True,
    ).encode()
    return hashlib.sha256(material).hexdigest() + _ENTRY_SUFFIX, material


def reference_outputs(
    model: RestorationNet,
    checkpoint_sha256: str,
    images: Sequence[ValidationImage],
    *,
    tile: tuple[int, int],
    overlap: int,
    device: torch.device,
    use_cache: bool = True,
    param_key: str | None = None,
    label: str = "fp32 reference",
) -> list[tuple[np.ndarray, float | None]]:
    """fp32 outputs of the original model, tiled like the artifact, and the tiling drift (tiled vs whole, dB);
    ``label`` names the task in the progress lines."""
    secret = _cache_secret(cache_dir()) if use_cache else None
    identity = None
    if secret is not None:  # hashing the weights is worth it only when there is a cache to look in
        identity = reference_identity(model, checkpoint_sha256=checkpoint_sha256, param_key=param_key, device=device)
    model = model.float().to(device).eval()
    multiple = model.pad_multiple
    geometry = _geometry(model)

    @torch.inference_mode()
    def fn(t: torch.Tensor) -> torch.Tensor:
        return model(t.to(device)).float().cpu()

    results = []
    with progress.task(label, total=len(images), unit="image") as advance:
        for image in images:
            results.append(_reference_output(fn, image, tile, overlap, multiple, secret, identity, geometry))
            advance(1)
    return results


def _reference_output(
    fn: Callable[[torch.Tensor], torch.Tensor],
    image: ValidationImage,
    tile: tuple[int, int],
    overlap: int,
    multiple: int,
    secret: bytes | None,
    identity: dict[str, Any] | None,
    geometry: tuple[int, int] = (1, 1),
) -> tuple[np.ndarray, float | None]:
    """One image's reference output and tiling drift, from the cache when it holds them (and into it if not);
    ``geometry`` is the model's (scale, views)."""
    scale, views = geometry
    path: Path | None = None
    material = b""
    if secret is not None and identity is not None:
        name, material = cache_key(identity, image, tile=tile, overlap=overlap, scale=scale, views=views)
        path = cache_dir() / name
        h, w, c = image.input.shape
        cached = _read_cached(path, (h * scale, w * scale, c), secret, material)
        if cached is not None:
            return cached
    tiled, calls = apply_tiled(fn, image.input, tile, overlap, multiple, scale)
    if not np.isfinite(tiled).all():  # nothing to score against: no verdict rather than a meaningless one
        raise CheckpointError(
            f"{image.name}: the source checkpoint itself (the fp32 reference) produces non-finite values (NaN "
            f"or Inf) on this image, so no artifact of it can be validated; its weights overflow float32: use "
            "another checkpoint"
        )
    tiling_db = None
    if calls > 1:
        whole, _ = apply_tiled(fn, image.input, None, overlap, multiple, scale)
        tiling_db = psnr(np.clip(tiled, 0, 1), np.clip(whole, 0, 1))
    if secret is not None and path is not None:
        _write_cached(path, tiled, tiling_db, secret, material)
    return tiled, tiling_db


def _geometry(model: torch.nn.Module) -> tuple[int, int]:
    """The model's output scale and views (1, 1 for the restoration U-Nets)."""
    config: Any = getattr(model, "config", None)
    return int(getattr(config, "up_scale", 1)), int(getattr(config, "views", 1))


def _entry_bytes(shape: tuple[int, ...]) -> int:
    return _ENTRY_HEADER.size + 4 * math.prod(shape) + _MAC_BYTES


def _read_cached(
    path: Path, shape: tuple[int, ...], secret: bytes, material: bytes
) -> tuple[np.ndarray, float | None] | None:
    """A cached reference, or None when absent or not exactly what this image needs: not a regular file, not the
    size the image implies (checked before reading a byte), not authenticated by ``secret`` over ``material``,
    or not finite. A damaged, stale or planted entry costs a recomputation, never a wrong verdict; reading one
    costs no more memory than the image's own output."""
    if len(shape) != 3:
        return None
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError:
        return None
    with open(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != _entry_bytes(shape):
            return None
        header = _read_exactly(f, bytearray(_ENTRY_HEADER.size))
        if header is None:
            return None
        magic, h, w, c, has_db, db = _ENTRY_HEADER.unpack(header)
        if magic != _ENTRY_MAGIC or (h, w, c) != tuple(shape) or has_db not in (0, 1):
            return None
        tiled = np.empty(shape, "<f4")
        mac = bytearray(_MAC_BYTES)
        if _read_exactly(f, tiled.data.cast("B")) is None or _read_exactly(f, mac) is None:
            return None
    expected = hmac.new(secret, material, hashlib.sha256)
    expected.update(header)
    expected.update(tiled.data.cast("B"))
    if not hmac.compare_digest(expected.digest(), bytes(mac)):
        return None
    if not np.isfinite(tiled).all() or math.isnan(db):
        return None
    return tiled.astype(np.float32, copy=False), float(db) if has_db else None


def _read_exactly(f: Any, buffer: bytearray | memoryview) -> bytearray | memoryview | None:
    view = memoryview(buffer)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            return None
        done += n
    return buffer


def _write_cached(path: Path, tiled: np.ndarray, tiling_db: float | None, secret: bytes, material: bytes) -> None:
    """Best effort: a cache that cannot be written (read-only home, full disk) is said once, never an error."""
    payload = np.ascontiguousarray(tiled, "<f4")
    header = _ENTRY_HEADER.pack(_ENTRY_MAGIC, *payload.shape, tiling_db is not None, tiling_db or 0.0)
    mac = hmac.new(secret, material, hashlib.sha256)
    mac.update(header)
    mac.update(payload.data.cast("B"))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".partial", dir=path.parent)  # private (0600) from the start
        try:
            with open(fd, "wb") as f:
                f.write(header)
                f.write(payload.data.cast("B"))
                f.write(mac.digest())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        _warn_uncached(str(e))


_cache_warned = False


def _warn_uncached(reason: str, advice: str = "set NAFNET_EDGE_CACHE to a folder you can write") -> None:
    global _cache_warned
    if not _cache_warned:
        _cache_warned = True
        progress.warning(f"reference outputs not cached ({reason}); {advice}")


def _cache_secret(directory: Path) -> bytes | None:
    """The HMAC key of this user's cache in ``directory``, created on first use; None (said once) when the folder
    or the key cannot be trusted or made: then references are computed without the cache.

    The folder must be a real folder (not a link) owned by this user; the key a regular file (not a link) of 32
    bytes owned by this user with mode 0600, checked on the open file itself. A new key is written to a private
    temporary file and linked into place, which fails when a key exists, so concurrent first runs agree on one
    key and no one ever reads a partial key."""
    path = directory / _SECRET_NAME
    secret = b""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        problem = _not_private(os.lstat(directory), directory, is_dir=True)
        if problem:
            _warn_uncached(problem, "set NAFNET_EDGE_CACHE to a folder of yours")
            return None
        if not os.path.lexists(path):
            _create_secret(path)
        problem = _not_private(os.lstat(path), path, is_dir=False)  # names a link for what it is
        if not problem:
            fd = os.open(path, _READ_FLAGS)
            with open(fd, "rb", buffering=0) as f:
                problem = _not_private(os.fstat(fd), path, is_dir=False)  # the file read, not what the name was
                secret = b"" if problem else f.read(_SECRET_BYTES + 1)
    except OSError as e:
        _warn_uncached(f"{e.strerror or e}: {e.filename or directory}")
        return None
    if not problem and len(secret) != _SECRET_BYTES:
        problem = f"{path} is not a {_SECRET_BYTES}-byte key"
    if problem:
        _warn_uncached(problem, "remove it to make a new one")
        return None
    return secret


def _not_private(st: os.stat_result, path: Path, *, is_dir: bool) -> str | None:
    """Why ``st`` (of ``path``) cannot hold or be the cache's key, or None."""
    if not (stat.S_ISDIR(st.st_mode) if is_dir else stat.S_ISREG(st.st_mode)):
        return f"{path} is not a {'folder' if is_dir else 'regular file'}"
    if os.name != "posix":
        return None
    if st.st_uid != os.getuid():
        return f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})"
    if not is_dir and stat.S_IMODE(st.st_mode) != 0o600:
        return f"{path} has mode {stat.S_IMODE(st.st_mode):04o}, not 0600"
    return None


def _create_secret(path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with open(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o600)  # exactly 0600, whatever the umask
            f.write(secrets.token_bytes(_SECRET_BYTES))
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):  # a key exists: the first one made stays
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def validate_runner(
    run: Callable[[np.ndarray], np.ndarray],
    references: Sequence[tuple[np.ndarray, float | None]],
    images: Sequence[ValidationImage],
    *,
    tile: tuple[int, int],
    overlap: int,
    multiple: int,
    budgets: Budgets,
    reference_device: str,
    data: str,
    on_image: Callable[[ImageResult], None] | None = None,
    label: str = "run in its runtime",
    scale: int = 1,
) -> ValidationReport:
    """Run the artifact over ``images`` and score it against the references and any ground truth; ``label``
    names the task (counted in tiles) in the progress lines."""
    results = []
    tiles = sum(tile_count(image.input.shape, tile, overlap, multiple) for image in images)
    with progress.task(label, total=tiles, unit="tile") as advance:

        def counted(x: np.ndarray) -> np.ndarray:
            out = run(x)
            advance(1)
            return out

        fn = runner_fn(counted)
        for image, (ref, tiling_db) in zip(images, references, strict=True):
            results.append(
                _score(fn, image, ref, tiling_db, tile, overlap, multiple, pixels=budgets.pixels, scale=scale)
            )
            if on_image is not None:
                on_image(results[-1])
    report = ValidationReport(results, budgets, reference_device, data)
    summary = report.summary()
    if summary["nonfinite"]:
        report.failures.append(f"{summary['nonfinite']} NaN/Inf output values")
    if not summary["fidelity_db_min"] >= budgets.min_fidelity_db:  # NaN fails
        report.failures.append(
            f"fidelity {summary['fidelity_db_min']:.2f} dB < budget {budgets.min_fidelity_db:g} dB (--min-fidelity)"
        )
    share = budgets.min_within_one_level
    if share is not None and not summary["within_one_level_share_min"] >= share:
        report.failures.append(
            f"{summary['within_one_level_share_min']:.4%} of 8-bit output samples within one level of the "
            f"reference < budget {share:.1%}"
        )
    if "drift_db_mean" in summary and not summary["drift_db_mean"] <= budgets.max_drift_db:  # NaN fails
        report.failures.append(
            f"drift {summary['drift_db_mean']:.3f} dB > budget {budgets.max_drift_db:g} dB (--max-drift)"
        )
    return report


def _score(
    fn: Callable[[torch.Tensor], torch.Tensor],
    image: ValidationImage,
    ref: np.ndarray,
    tiling_db: float | None,
    tile: tuple[int, int],
    overlap: int,
    multiple: int,
    *,
    pixels: bool = False,
    scale: int = 1,
) -> ImageResult:
    """Run ``fn`` over one image, tiled like its reference ``ref``, and score the output; with ``pixels`` (image
    I/O) the output and the reference are both rounded to 8 bits first, as an app gets them."""
    out, calls = apply_tiled(fn, image.input, tile, overlap, multiple, scale)
    nonfinite = int((~np.isfinite(out)).sum())
    out_c, ref_c = np.clip(np.nan_to_num(out, nan=0.0), 0, 1), np.clip(ref, 0, 1)
    agreement = level_agreement(out_c, ref_c)
    error = np.abs(out - ref)  # tensor I/O: unclamped, as the artifact returns it
    if pixels:
        out_c, ref_c = quantized(out_c), quantized(ref_c)
        error = np.abs(out_c - ref_c) + np.where(np.isfinite(out), 0.0, np.nan)  # what an app gets: 8-bit values
    r = ImageResult(
        name=image.name,
        size=(image.input.shape[0], image.input.shape[1]),
        tiles=calls,
        fidelity_db=psnr(out_c, ref_c),
        max_abs_error=float(np.nanmax(error)) if nonfinite < out.size else math.inf,
        nonfinite=nonfinite,
        tiling_db=tiling_db,
        exact_share=float(agreement["exact_share"]),
        within_one_level_share=float(agreement["within_one_level_share"]),
        max_level_diff=int(agreement["max_level_diff"]),
    )
    if image.target is not None:
        r.reference_psnr_db = psnr(ref_c, image.target)
        r.artifact_psnr_db = psnr(out_c, image.target)
        r.drift_db = r.reference_psnr_db - r.artifact_psnr_db
        r.reference_ssim = ssim(ref_c, image.target)
        r.artifact_ssim = ssim(out_c, image.target)
    return r
