"""Validation of an exported artifact in its own runtime against fp32 PyTorch outputs of the original model.

- Reference: the original (not reparameterized) model in fp32, on CUDA when there is one, through the same
  tiler as the artifact (tile = the artifact's input size), so fidelity measures the artifact's drift alone.
  Tiling drift (tiled vs whole-image reference) is reported on its own line. References are cached on disk,
  keyed by checkpoint, image and tiling.
- Images: the Kodak photos shipped with the package with seeded Gaussian noise (sigma 25/255) as inputs and
  the clean photos as ground truth, or the user's folder (``--data``), or input/target folder pairs
  (``--data-pairs``).
- Metrics per image and overall: fidelity PSNR (artifact vs reference, data range 1.0, outputs clamped to
  [0, 1]), max abs error (unclamped), NaN/Inf count; with ground truth, task PSNR and SSIM of reference and
  artifact and their difference (drift, dB).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nafnet_edge.atomic import atomic_path
from nafnet_edge.errors import BadInputError, NafnetEdgeError
from nafnet_edge.images import is_image_path, read_image
from nafnet_edge.tiling import run_tiled

DEFAULT_NOISE_SIGMA = 25.0 / 255.0
DEFAULT_NOISE_SEED = 2022
DEFAULT_OVERLAP_PX = 32
MIN_FIDELITY_DB = {"fp32": 60.0, "fp16": 45.0, "int8": 35.0}
MAX_DRIFT_DB = {"fp32": 0.01, "fp16": 0.05, "int8": 0.1}


@dataclass(frozen=True)
class ValidationImage:
    name: str
    input: np.ndarray  # float32 HxWxC in [0, 1]
    target: np.ndarray | None = None  # ground truth, same shape

    @property
    def digest(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.input).tobytes()).hexdigest()


@dataclass(frozen=True)
class Budgets:
    min_fidelity_db: float
    max_drift_db: float

    @classmethod
    def for_precision(
        cls, precision: str, *, min_fidelity_db: float | None = None, max_drift_db: float | None = None
    ) -> Budgets:
        return cls(
            min_fidelity_db=MIN_FIDELITY_DB.get(precision, 60.0) if min_fidelity_db is None else min_fidelity_db,
            max_drift_db=MAX_DRIFT_DB.get(precision, 0.05) if max_drift_db is None else max_drift_db,
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


@dataclass
class ValidationReport:
    images: list[ImageResult]
    budgets: Budgets
    reference_device: str
    data: str
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> dict[str, Any]:
        fid = [r.fidelity_db for r in self.images]
        drift = [r.drift_db for r in self.images if r.drift_db is not None]
        out: dict[str, Any] = {
            "images": len(self.images),
            "fidelity_db_min": min(fid),
            "fidelity_db_mean": float(np.mean(fid)),
            "max_abs_error": max(r.max_abs_error for r in self.images),
            "nonfinite": sum(r.nonfinite for r in self.images),
        }
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
            "data": self.data,
            "summary": self.summary(),
            "per_image": [asdict(r) for r in self.images],
        }


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB with data range 1.0 (inputs are floats in [0, 1])."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5))


# --- data ------------------------------------------------------------------------------------------------------


def default_images(channels: int = 3) -> list[ValidationImage]:
    """The shipped Kodak photos with seeded Gaussian noise (sigma 25/255) and the clean photos as targets."""
    folder = Path(str(resources.files("nafnet_edge") / "data" / "kodak"))
    rng = np.random.default_rng(DEFAULT_NOISE_SEED)
    images = []
    for path in sorted(folder.glob("*.png")):
        clean = _channels(read_image(path).pixels, channels)
        noisy = clean + rng.normal(0.0, DEFAULT_NOISE_SIGMA, clean.shape).astype(np.float32)
        images.append(ValidationImage(f"{path.stem}-sigma25", noisy.astype(np.float32), clean))
    return images


def folder_images(folder: str | Path, channels: int = 3) -> list[ValidationImage]:
    """Every image in ``folder`` (no ground truth)."""
    return [ValidationImage(p.name, _channels(read_image(p).pixels, channels)) for p in _list_images(folder)]


def paired_images(inputs: str | Path, targets: str | Path, channels: int = 3) -> list[ValidationImage]:
    """Degraded images in ``inputs`` and their ground truth, with the same file names, in ``targets``."""
    images = []
    target_dir = Path(targets)
    for p in _list_images(inputs):
        match = [t for t in target_dir.glob(f"{p.stem}.*") if is_image_path(t)]
        if not match:
            raise BadInputError(f"no ground truth for {p.name} in {target_dir}: name targets like their inputs")
        x, y = _channels(read_image(p).pixels, channels), _channels(read_image(match[0]).pixels, channels)
        if x.shape != y.shape:
            raise BadInputError(f"{p.name}: input is {x.shape[1]}x{x.shape[0]}, target {y.shape[1]}x{y.shape[0]}")
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


def apply_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    pixels: np.ndarray,
    tile: tuple[int, int] | None,
    overlap: int,
    multiple: int,
) -> tuple[np.ndarray, int]:
    """``fn`` (fixed-size NCHW -> NCHW) over an HxWxC image: zero-pad to the tile (or, with ``tile=None``, to
    the multiple for one whole-image call), tile, crop back; returns the output and the number of calls."""
    x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]
    h, w = x.shape[-2:]
    ph, pw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    th, tw = tile or (ph, pw)
    ph, pw = max(th, ph), max(tw, pw)
    x = F.pad(x, (0, pw - w, 0, ph - h))
    calls = []

    def counted(t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return fn(t)

    if (ph, pw) == (th, tw):
        y = counted(x)
    else:
        if th != tw:
            raise ValueError("tiling needs a square artifact input size")
        y = run_tiled(counted, x, tile_px=th, overlap_px=overlap, align_px=multiple)
    return y[0, :, :h, :w].permute(1, 2, 0).numpy(), len(calls)


def runner_fn(run: Callable[[np.ndarray], np.ndarray]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A numpy runner (one image at a time) as a tensor function for the tiler."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.from_numpy(np.asarray(run(t[i : i + 1].numpy()), np.float32)) for i in range(len(t))])

    return fn


def cache_dir() -> Path:
    root = os.environ.get("NAFNET_EDGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nafnet-edge"
    )
    return Path(root) / "reference"


def reference_outputs(
    model: torch.nn.Module,
    checkpoint_sha256: str,
    images: Sequence[ValidationImage],
    *,
    tile: tuple[int, int],
    overlap: int,
    device: torch.device,
    use_cache: bool = True,
) -> list[tuple[np.ndarray, float | None]]:
    """fp32 outputs of the original model, tiled like the artifact, and the tiling drift (tiled vs whole, dB)."""
    model = model.float().to(device).eval()
    multiple = model.pad_multiple

    @torch.inference_mode()
    def fn(t: torch.Tensor) -> torch.Tensor:
        return model(t.to(device)).float().cpu()

    results = []
    for image in images:
        key = f"{checkpoint_sha256[:16]}-{image.digest[:16]}-{tile[0]}x{tile[1]}-o{overlap}"
        path = cache_dir() / f"{key}.npz"
        cached = _read_cached(path, image.input.shape) if use_cache else None
        if cached is not None:
            results.append(cached)
            continue
        tiled, calls = apply_tiled(fn, image.input, tile, overlap, multiple)
        tiling_db = None
        if calls > 1:
            whole, _ = apply_tiled(fn, image.input, None, overlap, multiple)
            tiling_db = psnr(np.clip(tiled, 0, 1), np.clip(whole, 0, 1))
        if use_cache:
            _write_cached(path, tiled, tiling_db)
        results.append((tiled, tiling_db))
    return results


def _read_cached(path: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, float | None] | None:
    """A cached reference, or None when absent, unreadable, or not what this image needs (then it is recomputed):
    a damaged or edited cache file can cost time, never a wrong verdict or a crash."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            tiled, db = np.asarray(z["tiled"]), np.asarray(z["tiling_db"], np.float64)
    except Exception:
        return None
    if tiled.shape != shape or tiled.dtype != np.float32 or not np.isfinite(tiled).all() or db.size > 1:
        return None
    return tiled, float(db.reshape(-1)[0]) if db.size else None


_cache_warned = False


def _write_cached(path: Path, tiled: np.ndarray, tiling_db: float | None) -> None:
    """Best effort: a cache that cannot be written (read-only home, full disk) is said once, never an error."""
    global _cache_warned
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, tiled=tiled, tiling_db=np.array([] if tiling_db is None else tiling_db))
    except (OSError, NafnetEdgeError) as e:
        if not _cache_warned:
            _cache_warned = True
            print(f"nafnet-edge: warning: reference outputs not cached ({e}); set NAFNET_EDGE_CACHE", file=sys.stderr)


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
) -> ValidationReport:
    """Run the artifact over ``images`` and score it against the references and any ground truth."""
    results = []
    fn = runner_fn(run)
    for image, (ref, tiling_db) in zip(images, references, strict=True):
        out, calls = apply_tiled(fn, image.input, tile, overlap, multiple)
        nonfinite = int((~np.isfinite(out)).sum())
        out_c, ref_c = np.clip(np.nan_to_num(out, nan=0.0), 0, 1), np.clip(ref, 0, 1)
        r = ImageResult(
            name=image.name,
            size=(image.input.shape[0], image.input.shape[1]),
            tiles=calls,
            fidelity_db=psnr(out_c, ref_c),
            max_abs_error=float(np.nanmax(np.abs(out - ref))) if nonfinite < out.size else math.inf,
            nonfinite=nonfinite,
            tiling_db=tiling_db,
        )
        if image.target is not None:
            r.reference_psnr_db = psnr(ref_c, image.target)
            r.artifact_psnr_db = psnr(out_c, image.target)
            r.drift_db = r.reference_psnr_db - r.artifact_psnr_db
            r.reference_ssim = ssim(ref_c, image.target)
            r.artifact_ssim = ssim(out_c, image.target)
        results.append(r)
        if on_image is not None:
            on_image(r)
    report = ValidationReport(results, budgets, reference_device, data)
    summary = report.summary()
    if summary["nonfinite"]:
        report.failures.append(f"{summary['nonfinite']} NaN/Inf output values")
    if summary["fidelity_db_min"] < budgets.min_fidelity_db:
        report.failures.append(
            f"fidelity {summary['fidelity_db_min']:.2f} dB < budget {budgets.min_fidelity_db:g} dB (--min-fidelity)"
        )
    if "drift_db_mean" in summary and summary["drift_db_mean"] > budgets.max_drift_db:
        report.failures.append(
            f"drift {summary['drift_db_mean']:.3f} dB > budget {budgets.max_drift_db:g} dB (--max-drift)"
        )
    return report
