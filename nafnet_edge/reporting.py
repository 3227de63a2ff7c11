"""``nafnet-edge report``: one self-contained HTML page that says which artifact to ship.

The page, top to bottom:

- **What to ship**: per target, the fastest artifact that met its validation budget (latency from ``bench.json``;
  without one, the smallest, and the page says it was not benchmarked), its precision, latency, fidelity, drift
  and size, and why each other precision of that target lost (failed its budget, slower, larger). The precisions
  of one target stand side by side.
- charts drawn with matplotlib and inlined as SVG: median latency per artifact with the PyTorch baseline as a
  reference line (never a bar that squashes the artifacts), and quality against latency (drift when the
  artifacts drift apart, else fidelity to the fp32 reference), told apart by colour (target) and marker
  (precision) in a legend rather than by labels that overlap;
- a table with one row per artifact, grouped by target, with its I/O (tensor, or image and its pixel format) and
  how its 8-bit output agrees with the reference rounded the same way (the budget image I/O is held to);
- for a few validation images, a zoomed crop where the artifacts differ most from the fp32 reference: the input,
  the reference and each artifact's output and difference, every difference on ONE scale that the page prints,
  so an fp32 artifact looks black where an int8 one shows its error;
- the details of each artifact (manifest, validation, bench settings, top operators), folded.

Everything is embedded (SVG charts inline, images as small base64 PNGs, the CSS of ``templates/report.css`` in
the page): no external URL, no script, so the file opens anywhere, offline, years later. The HTML comes from
``templates/report.html.j2`` (Jinja2, autoescaped). Artifacts that cannot run here keep their row and say why
instead of showing images. An artifact directory whose manifest or files cannot be used (damaged, or a file that
is a link out of the directory, a pipe or a device) is refused naming the file, and nothing of it is opened.
"""

from __future__ import annotations

import base64
import io
import math
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from nafnet_edge import progress
from nafnet_edge.archs import CLASS_NAMES, LOCAL_ARCHS
from nafnet_edge.artifact_files import artifact_size
from nafnet_edge.atomic import atomic_path
from nafnet_edge.errors import BadInputError, NafnetEdgeError, OutputError, UsageError, printable
from nafnet_edge.manifest import (
    BENCH_FILE,
    MANIFEST_FILE,
    PRECISIONS,
    BenchRecord,
    Manifest,
    ValidationSummary,
    find_artifacts,
    read_bench,
    read_manifest,
    source_checkpoint,
)

MANIFEST = MANIFEST_FILE
BENCH = BENCH_FILE
REPORT = "report.html"
TEMPLATE = "report.html.j2"
STYLESHEET = "report.css"
DIFF_COLORMAP = "magma"
BASELINE_COLOR = "#6b6b6b"  # the PyTorch baseline; each target's colour is its Target.color
FALLBACK_COLORS = ("#76b7b2", "#edc948", "#ff9da7", "#9c755f")
MARKERS = {"fp32": "o", "fp16": "s", "int8": "^"}  # one marker per precision in the quality chart
ZOOM_PX = 32  # side of the crop shown where the artifacts differ most
MAX_DIFF_GAIN = 4096  # the largest amplification of differences (below 1/255/16 nothing matters for 8-bit output)
FLAT_DRIFT_DB = 0.01  # when every artifact's drift is smaller, the quality chart shows fidelity instead
BASELINE_ON_SCALE = 3.0  # the baseline is drawn as a line when within this factor of the slowest artifact


# --- what one artifact directory holds ---------------------------------------------------------------------------


@dataclass
class Artifact:
    """An artifact directory with its manifest, optional ``bench.json`` and what the report learned running it."""

    directory: Path
    manifest: Manifest
    bench: BenchRecord | None = None
    bench_note: str | None = None  # why bench.json could not be used
    size_bytes: int | None = None
    image_note: str | None = None  # why there are no comparison images
    runtime_here: dict[str, Any] | None = None  # the runner's facts when the report ran it

    @property
    def label(self) -> str:
        return self.directory.name

    @property
    def anchor(self) -> str:
        return "artifact-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in self.label)

    @property
    def target(self) -> str:
        return self.manifest.target

    @property
    def precision(self) -> str:
        return self.manifest.precision

    @property
    def input_size(self) -> tuple[int, int]:
        return self.manifest.io.input_size

    @property
    def channels(self) -> int:
        return self.manifest.io.channels

    @property
    def io(self) -> str:
        """``tensor``, or ``image`` with its pixel format (``image rgba``)."""
        io = self.manifest.io
        return f"image {io.pixel_format}" if io.kind == "image" else "tensor"

    @property
    def image_io(self) -> bool:
        return self.manifest.io.kind == "image"

    @property
    def runtime(self) -> str | None:
        for info in (self.manifest.runtime, self.runtime_here):
            if isinstance(info, dict) and info.get("runtime"):
                return str(info["runtime"])
        return self.bench.runtime if self.bench is not None and self.bench.runtime else None

    @property
    def validation(self) -> ValidationSummary | None:
        return self.manifest.validation

    @property
    def passed(self) -> bool:
        """Validated and within its budgets (an artifact never validated does not count as passing)."""
        return self.validation is not None and self.validation.passed

    @property
    def summary(self) -> dict[str, Any]:
        return self.validation.summary if self.validation is not None else {}

    @property
    def fidelity_db(self) -> float | None:
        return self.validation.fidelity_db_min if self.validation is not None else None

    @property
    def drift_db(self) -> float | None:
        return self.validation.drift_db_mean if self.validation is not None else None

    @property
    def median_ms(self) -> float | None:
        return self.bench.median_ms if self.bench is not None else None

    @property
    def fps(self) -> float | None:
        return self.bench.fps if self.bench is not None else None


def _number(value: Any) -> float | None:
    """A float from JSON (``Infinity`` included), or None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def read_artifact(directory: Path) -> Artifact:
    """Manifest, size on disk and ``bench.json`` of one artifact directory."""
    manifest = read_manifest(directory)
    artifact = Artifact(directory, manifest)
    artifact.size_bytes = disk_size(directory, manifest.files)
    artifact.bench, artifact.bench_note = read_bench(directory)
    return artifact


def disk_size(directory: Path, files: Sequence[str]) -> int | None:
    """Bytes on disk of the artifact's files (bundles such as ``.mlpackage`` summed over their contents, walked
    without following links); None when none of them is there. A file that is not a regular file inside the
    directory (a link elsewhere, a pipe, a device) is refused with an ArtifactError, never opened or walked."""
    sizes = [artifact_size(directory, name) for name in files]
    present = [size for size in sizes if size is not None]
    return sum(present) if present else None


def human_bytes(n: int | None) -> str:
    """1536 -> '1.5 KiB'."""
    if n is None:
        return "missing"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _precision_rank(precision: str) -> int:
    return PRECISIONS.index(precision) if precision in PRECISIONS else len(PRECISIONS)


def by_target(artifacts: Sequence[Artifact]) -> dict[str, list[Artifact]]:
    """Artifacts grouped by target (targets in name order), each target's precisions fp32, fp16, int8."""
    groups: dict[str, list[Artifact]] = {}
    for a in sorted(artifacts, key=lambda a: (a.target, _precision_rank(a.precision), a.label)):
        groups.setdefault(a.target, []).append(a)
    return groups


# --- what to ship ------------------------------------------------------------------------------------------------


@dataclass
class Choice:
    """One target's recommendation: the artifact to ship (None when none passed), what it was ranked by
    (``"latency"`` from bench.json, or ``"size"`` when the passing artifacts were not benchmarked) and, for each
    other artifact of the target, why it lost."""

    target: str
    artifacts: list[Artifact]
    chosen: Artifact | None
    ranked_by: str
    lost: dict[str, str] = field(default_factory=dict)  # artifact label -> why not


def choose(artifacts: Sequence[Artifact]) -> list[Choice]:
    """Per target, the fastest artifact that passed validation; by size where none of those was benchmarked."""
    choices = []
    for target, group in by_target(artifacts).items():
        passing = [a for a in group if a.passed]
        timed = [a for a in passing if a.median_ms is not None]
        chosen: Artifact | None
        if timed:
            chosen, ranked_by = min(timed, key=lambda a: (a.median_ms, a.size_bytes or math.inf)), "latency"
        else:
            chosen = min(passing, key=lambda a: a.size_bytes or math.inf) if passing else None
            ranked_by = "size"
        choice = Choice(target, group, chosen, ranked_by)
        for a in group:
            if a is not chosen:
                choice.lost[a.label] = _why_not(a, chosen, ranked_by)
        choices.append(choice)
    return choices


def _why_not(a: Artifact, chosen: Artifact | None, ranked_by: str) -> str:
    if a.validation is None:
        return "not validated (run nafnet-edge validate on it)"
    if not a.validation.passed:
        return "failed its budget: " + ("; ".join(a.validation.failures) or "see details")
    if chosen is None:
        return ""
    if ranked_by == "latency":
        if a.median_ms is None:
            return "passed, but not benchmarked"
        chosen_ms = chosen.median_ms or 0.0
        slower = f" ({_ratio(a.median_ms / chosen_ms)}× as long)" if chosen_ms > 0 else ""
        return f"slower: {a.median_ms:.2f} ms against {chosen_ms:.2f} ms{slower}"
    return f"larger: {human_bytes(a.size_bytes)} against {human_bytes(chosen.size_bytes)}"


# --- running artifacts on validation crops -----------------------------------------------------------------------


@dataclass
class Output:
    """One artifact's output on one image's tile (or why there is none)."""

    artifact: Artifact
    pixels: np.ndarray | None = None  # HxWxC, the whole tile
    difference: np.ndarray | None = None  # HxW, |output - reference| largest over channels
    psnr_db: float | None = None
    max_abs_diff: float | None = None
    note: str | None = None


@dataclass
class Comparison:
    """One validation image's tile of one input size: the input and reference shared by the artifacts of that
    size and source checkpoint, each artifact's output, and the zoom box where they differ most."""

    image: str
    size: tuple[int, int]  # tile height, width
    origin: tuple[int, int]  # top, left of the tile in the image
    source: str  # the source checkpoint's short name
    input: np.ndarray
    reference: np.ndarray
    outputs: list[Output] = field(default_factory=list)
    zoom: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, height, width in the tile


def png_bytes(pixels: np.ndarray) -> bytes:
    """An HxWxC float image in [0, 1] (clamped) or an HxWx3 uint8 image as PNG bytes."""
    from PIL import Image

    if pixels.dtype != np.uint8:
        pixels = (np.clip(np.nan_to_num(pixels, nan=0.0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def difference(output: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """|output - reference|, the largest over channels per pixel; NaN and Inf outputs count as far off."""
    diff = np.abs(np.nan_to_num(output, nan=np.inf).astype(np.float64) - reference).max(axis=2)
    return np.minimum(diff, 1e6)


def difference_gain(peak: float) -> int:
    """The power of two that amplifies the largest difference ``peak`` to between half and all of the display
    range (1 when nothing differs, at most ``MAX_DIFF_GAIN``)."""
    if not peak > 0:
        return 1
    return int(min(max(2 ** math.floor(math.log2(1.0 / peak)), 1), MAX_DIFF_GAIN))


def difference_png(diff: np.ndarray, gain: int) -> bytes:
    """A difference map times ``gain`` through the colormap: black is 0, the brightest colour 1/gain or more."""
    import matplotlib

    rgb = matplotlib.colormaps[DIFF_COLORMAP](np.clip(diff * gain, 0.0, 1.0))[..., :3]
    return png_bytes((rgb * 255.0 + 0.5).astype(np.uint8))


def largest_difference_box(diffs: Sequence[np.ndarray], side: int) -> tuple[int, int, int, int]:
    """The ``side`` x ``side`` window (clamped to the tile) with the largest summed difference of the artifact
    that differs most there: top, left, height, width."""
    h, w = diffs[0].shape
    bh, bw = min(side, h), min(side, w)
    worst = np.max(np.stack(diffs), axis=0)
    integral = np.pad(worst.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = integral[bh:, bw:] - integral[:-bh, bw:] - integral[bh:, :-bw] + integral[:-bh, :-bw]
    top, left = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(top), int(left), bh, bw


def centre_crop(pixels: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """The centre ``size`` crop (or the whole image where it is smaller) and its top-left corner."""
    h, w = min(size[0], pixels.shape[0]), min(size[1], pixels.shape[1])
    top, left = (pixels.shape[0] - h) // 2, (pixels.shape[1] - w) // 2
    return pixels[top : top + h, left : left + w], (top, left)


class _Sources:
    """Source checkpoints, each loaded once: the fp32 original model that references are computed with."""

    def __init__(self, checkpoint: str | Path | None) -> None:
        self.checkpoint = checkpoint
        self._loaded: dict[tuple[Any, ...], Any] = {}

    def load(self, manifest: Manifest) -> tuple[Any | None, str | None]:
        """(loaded checkpoint, None) or (None, why the reference cannot be computed). The checkpoint is loaded as
        the manifest's reference was (class, TLC training size, checkpoint entry), once per such setting."""
        from nafnet_edge.checkpoint import load_checkpoint

        sha = manifest.source.sha256
        try:
            path = source_checkpoint(manifest, self.checkpoint)
        except UsageError as e:  # the recorded file is gone: this artifact's images cannot be compared
            return None, str(e)
        reference = manifest.reference
        train_size = reference.train_size if reference.arch in LOCAL_ARCHS else None
        param_key = reference.param_key or "auto"
        key = (path or "<embedded>", reference.arch, train_size, param_key)
        if key not in self._loaded:
            try:
                self._loaded[key] = load_checkpoint(
                    path,
                    arch=reference.arch,  # type: ignore[arg-type]
                    train_size=train_size,
                    param_key=param_key,  # type: ignore[arg-type]
                )
            except NafnetEdgeError as e:
                if self.checkpoint is not None:
                    raise  # the user's own --checkpoint: their input to fix
                self._loaded[key] = e
        loaded = self._loaded[key]
        if isinstance(loaded, NafnetEdgeError):
            return None, f"the recorded source checkpoint cannot be loaded ({loaded}): pass --checkpoint CKPT"
        if sha and loaded.sha256 != sha:
            return None, (
                f"converted from a checkpoint with sha256 {sha[:12]}..., not {loaded.sha256[:12]}...: "
                "pass the checkpoint it came from with --checkpoint"
            )
        return loaded, None


def _load_images(val_data: str | Path | None, channels: int, scale: int = 1, views: int = 1) -> list[Any]:
    """The validation images an artifact of ``channels`` (all views) takes: a folder's as they are (low-resolution
    inputs for super-resolution), or the shipped photos as validation prepares them (bicubic-downscaled for
    ``scale`` > 1, synthetic stereo pairs for two ``views``)."""
    from nafnet_edge.validation import default_images, folder_images

    if val_data is not None:
        return folder_images(val_data, channels=channels)
    return default_images(channels // views, scale=scale, views=views)


def viewable(pixels: np.ndarray, views: int) -> np.ndarray:
    """An HxWx(views x C) image as one picture: a stereo pair's views side by side (left, then right)."""
    if views == 1:
        return pixels
    return np.concatenate(np.split(pixels, views, axis=2), axis=1)


def compare_images(
    artifacts: Sequence[Artifact],
    *,
    images: int,
    val_data: str | Path | None,
    checkpoint: str | Path | None,
) -> list[Comparison]:
    """Run each artifact in its runtime and the fp32 original model in PyTorch on a centre tile (the artifact's
    input size) of the first ``images`` validation images, and find per image the box where the artifacts differ
    most. Where an image-I/O artifact is among them, every tile is rounded to 8 bits first (what such an artifact
    takes, and what its validation fed the reference), so all artifacts and the reference see the same pixels. An
    artifact that cannot run here gets ``image_note`` (and an entry saying why) instead of images."""
    import torch

    from nafnet_edge.converters import get_target
    from nafnet_edge.pixels import quantized
    from nafnet_edge.validation import apply_tiled, psnr, runner_fn

    eight_bit = any(a.image_io for a in artifacts)

    sources = _Sources(checkpoint)
    image_sets: dict[tuple[int, int], list[Any]] = {}
    comparisons: dict[tuple[int, int, int, int, int], Comparison] = {}
    for artifact in artifacts:
        size = artifact.input_size
        loaded, why = sources.load(artifact.manifest)
        if loaded is None:
            artifact.image_note = why
            continue
        progress.phase(printable(f"{artifact.label}: running {images} validation image(s) in its runtime"))
        try:
            converter = get_target(artifact.target)
            converter.check_available()
            with progress.backend_output():
                runner = converter.load_runner(artifact.directory, export=artifact.manifest.export)
            artifact.runtime_here = runner.info
        except Exception as e:  # e.g. a delegate this machine's runtime lacks: the row stays, with the reason
            reason = str(e) if isinstance(e, NafnetEdgeError) else f"{type(e).__name__}: {e}"
            artifact.image_note = f"cannot run here: {reason}"
            continue
        scale, views = loaded.config.up_scale, loaded.config.views
        if (artifact.channels, scale) not in image_sets:
            image_sets[artifact.channels, scale] = _load_images(val_data, artifact.channels, scale, views)[:images]
        model = loaded.model.float().cpu().eval()
        multiple = loaded.config.pad_multiple

        def reference_fn(t: torch.Tensor, model: Any = model) -> torch.Tensor:
            with torch.inference_mode():
                return model(t).float()

        artifact_fn = runner_fn(runner.run)
        for index, image in enumerate(image_sets[artifact.channels, scale]):
            key = (id(loaded), artifact.channels, index, *size)  # one loaded reference model per setting
            tile, origin = centre_crop(image.input, size)
            if eight_bit:
                tile = quantized(tile)
            if key not in comparisons:
                reference, _ = apply_tiled(reference_fn, tile, size, 0, multiple, scale)
                shown = tile.repeat(scale, axis=0).repeat(scale, axis=1)  # the input at the output's size
                comparisons[key] = Comparison(
                    image=image.name,
                    size=(reference.shape[0], reference.shape[1] * views),
                    origin=(origin[0] * scale, origin[1] * scale),
                    source=artifact.manifest.source.checkpoint or "checkpoint",
                    input=viewable(shown, views),
                    reference=viewable(reference, views),
                )
            comparison = comparisons[key]
            try:
                with progress.backend_output():
                    output, _ = apply_tiled(artifact_fn, tile, size, 0, multiple, scale)
                output = viewable(output, views)
            except Exception as e:  # a runtime failing on one input must not lose the page
                note = f"failed here: {type(e).__name__}: {e}"
                comparison.outputs.append(Output(artifact, note=note))
                artifact.image_note = artifact.image_note or note
                continue
            diff = difference(output, comparison.reference)
            fidelity = psnr(np.clip(np.nan_to_num(output, nan=0.0), 0, 1), np.clip(comparison.reference, 0, 1))
            comparison.outputs.append(Output(artifact, output, diff, fidelity, float(diff.max())))
    for comparison in comparisons.values():
        diffs = [o.difference for o in comparison.outputs if o.difference is not None]
        h, w = comparison.size
        comparison.zoom = largest_difference_box(diffs, ZOOM_PX) if diffs else (0, 0, min(ZOOM_PX, h), min(ZOOM_PX, w))
    return list(comparisons.values())


def shared_gain(comparisons: Sequence[Comparison]) -> int:
    """One amplification for every difference on the page, from the largest difference of any artifact."""
    peaks = [o.max_abs_diff for c in comparisons for o in c.outputs if o.max_abs_diff is not None]
    return difference_gain(max(peaks, default=0.0))


# --- charts ------------------------------------------------------------------------------------------------------


def _color(target: str, index: int) -> str:
    """The target's own chart colour (``Target.color``); a fallback by position for one without (or unknown)."""
    from nafnet_edge.converters import target_class

    try:
        color = target_class(target).color
    except (NafnetEdgeError, ImportError, AttributeError):
        color = ""
    return color or FALLBACK_COLORS[index % len(FALLBACK_COLORS)]


def _colors(artifacts: Sequence[Artifact]) -> dict[str, str]:
    return {target: _color(target, i) for i, target in enumerate(by_target(artifacts))}


def _svg(fig: Any, salt: str) -> str:
    """The figure as an inline ``<svg>`` element: text kept as text, no XML prologue, no metadata block, ids
    salted per chart so two charts on one page never share one."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(
            buf,
            format="svg",
            bbox_inches="tight",
            metadata={"Date": None, "Creator": None, "Format": None, "Type": None},
        )
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    fig.set_facecolor("white")
    return fig


def _style(ax: Any) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=9)
    ax.grid(True, color="#e4e4e4", linewidth=0.8)
    ax.set_axisbelow(True)


def _baseline_ms(artifacts: Sequence[Artifact]) -> float | None:
    return next((a.bench.baseline_ms for a in artifacts if a.bench is not None and a.bench.baseline_ms), None)


def _draw_baseline(ax: Any, baseline: float | None, slowest: float, *, text_y: float) -> float:
    """The PyTorch baseline as a dashed line when near the artifacts, else a note at the right edge; returns the
    right end of the x axis."""
    right = slowest * 1.3
    if baseline is None:
        return right
    if baseline <= slowest * BASELINE_ON_SCALE:
        right = max(right, baseline * 1.15)
        ax.axvline(baseline, color=BASELINE_COLOR, linestyle="--", linewidth=1.2, zorder=1)
        ax.text(  # left of the line: to its right it would run into the legend beside the axes
            baseline,
            text_y,
            f"PyTorch fp32 {baseline:.3g} ms ",
            color=BASELINE_COLOR,
            fontsize=8.5,
            ha="right",
            va="bottom",
        )
    else:
        ax.text(
            right,
            text_y,
            f"PyTorch fp32: {baseline:.4g} ms, off the scale →",
            color=BASELINE_COLOR,
            fontsize=8.5,
            ha="right",
            va="bottom",
        )
    return right


def latency_chart(artifacts: Sequence[Artifact]) -> str | None:
    """Horizontal bars: median latency of one input-size call per benchmarked artifact, grouped by target; the
    PyTorch fp32 baseline from ``bench.json`` as a reference line (or a note when far off the scale), with each
    artifact's speed-up against it. None when nothing was benchmarked."""
    colors = _colors(artifacts)
    bars = [a for group in by_target(artifacts).values() for a in group if a.median_ms is not None]
    if not bars:
        return None
    baseline = _baseline_ms(artifacts)
    fig = _figure(6.4, 0.42 * len(bars) + 1.3)
    ax = fig.add_subplot()
    values = [float(a.median_ms or 0.0) for a in bars]
    positions = list(range(len(bars)))[::-1]  # first artifact at the top
    hatches = {"fp16": "//", "int8": "xx"}
    for y, a, v in zip(positions, bars, values, strict=True):
        ax.barh(y, v, color=colors[a.target], height=0.6, hatch=hatches.get(a.precision, ""), edgecolor="white")
        speedup = f" · {_ratio(baseline / v)}× PyTorch" if baseline and v > 0 else ""
        ax.text(v, y, f" {v:.2f} ms{speedup}", va="center", fontsize=8.5)
    ax.set_yticks(positions, [a.label for a in bars])
    right = _draw_baseline(ax, baseline, max(values) * 1.35, text_y=len(bars) - 0.45)
    ax.set_xlim(0, right)
    ax.set_ylim(-0.6, len(bars) - 0.1)
    ax.set_xlabel("median latency per call (ms), lower is better", fontsize=9)
    _style(ax)
    ax.grid(False, axis="y")
    return _svg(fig, "latency")


def _quality_points(artifacts: Sequence[Artifact]) -> list[Artifact]:
    return [a for a in artifacts if a.median_ms is not None and a.fidelity_db is not None]


def quality_uses_drift(artifacts: Sequence[Artifact]) -> bool:
    """Drift (against ground truth) when every point has it and the artifacts drift apart; fidelity to the fp32
    reference otherwise (where every drift is ~0 it would put every point on one line)."""
    points = _quality_points(artifacts)
    drifts = [a.drift_db for a in points]
    return bool(points) and all(d is not None for d in drifts) and max(abs(d or 0.0) for d in drifts) >= FLAT_DRIFT_DB


def quality_measure(artifacts: Sequence[Artifact]) -> str:
    """What the quality chart's vertical axis shows, in words."""
    if quality_uses_drift(artifacts):
        return "Drift: mean PSNR loss against ground truth, fp32 reference minus artifact; lower is better."
    return (
        "Fidelity: lowest PSNR of the artifact against the fp32 reference (shown instead of drift, which is about "
        "zero for every artifact or was not measured); higher is better, bit-exact artifacts are drawn at the top."
    )


def quality_chart(artifacts: Sequence[Artifact]) -> str | None:
    """Scatter: quality against median latency for the benchmarked, validated artifacts; colour by target,
    marker by precision, named in a legend (no labels to overlap)."""
    points = sorted(_quality_points(artifacts), key=lambda a: (a.target, _precision_rank(a.precision), a.label))
    if not points:
        return None
    colors = _colors(artifacts)
    use_drift = quality_uses_drift(artifacts)
    fig = _figure(6.4, 3.8)
    ax = fig.add_subplot()
    finite = [a.fidelity_db for a in points if a.fidelity_db is not None and math.isfinite(a.fidelity_db)]
    cap = (max(finite) + 10.0) if finite else 200.0  # bit-exact (infinite PSNR) drawn at the top
    ys = []
    for a in points:
        y = (a.drift_db or 0.0) if use_drift else min(a.fidelity_db or 0.0, cap)
        ys.append(y)
        bit_exact = "" if use_drift or math.isfinite(a.fidelity_db or 0.0) else " (bit-exact)"
        ax.scatter(
            [a.median_ms],
            [y],
            s=70,
            marker=MARKERS.get(a.precision, "D"),
            color=colors[a.target],
            edgecolor="#222222",
            linewidth=0.6,
            zorder=3,
            label=f"{a.label}{bit_exact}",
        )
    lo, hi = min(ys), max(ys)
    pad = max(0.15 * (hi - lo), 0.02 if use_drift else 1.0)
    ax.set_ylim(lo - pad, hi + 2 * pad)
    slowest = max(a.median_ms or 0.0 for a in points)
    ax.set_xlim(0, _draw_baseline(ax, _baseline_ms(artifacts), slowest * 1.2, text_y=hi + pad))
    ax.set_xlabel("median latency per call (ms), lower is better", fontsize=9)
    if use_drift:
        ax.set_ylabel("drift (dB), lower is better", fontsize=9)
        ax.axhline(0.0, color="#bbbbbb", linewidth=0.8)
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    else:
        ax.set_ylabel("fidelity to fp32 (dB), higher is better", fontsize=9)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    _style(ax)
    return _svg(fig, "quality")


# --- the page ----------------------------------------------------------------------------------------------------


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _db(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "—"
    if math.isinf(value):
        return "∞ (bit-exact)" if value > 0 else "−∞"
    if signed:
        text = f"{value:+.3f}"
        return ("0.000" if text in ("+0.000", "-0.000") else text) + " dB"
    return f"{value:.1f} dB"


def _fmt(value: Any, unit: str = "", digits: int = 1) -> str:
    number = _number(value)
    if number is None:
        return "—"
    return f"{number:.{digits}f}{(' ' + unit) if unit else ''}"


def _ratio(value: float) -> str:
    """A speed-up for people: 0.53, 3.2, 19, 6,110."""
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


def _level(value: float) -> str:
    """A difference in 8-bit levels: 0.0236 -> '6/255'."""
    return f"{value * 255:.2g}/255"


def _bench_command(root: Path) -> str:
    return f"nafnet-edge bench {shlex.quote(str(root))} --save"


def _short_bench_command(root: Path) -> str:
    where = shlex.quote(str(root))
    return f"nafnet-edge bench {where if len(where) <= 24 else 'DIR'} --save"  # DIR: spelled out below the table


def _latency_text(a: Artifact) -> str:
    if a.median_ms is not None:
        return f"{a.median_ms:.1f} ms"
    if a.bench is not None:
        return "not runnable here"
    return "not benchmarked"


def _row(a: Artifact, root: Path) -> dict[str, Any]:
    """One table row's values, formatted."""
    throughput = None
    if a.bench is not None and a.median_ms is not None:
        t = a.bench.throughput or {}
        if a.fps is not None:
            streams = t.get("streams")
            throughput = (f"{a.fps:.1f} fps", f"{streams} stream{'s' * (streams != 1)}" if streams else "")
        else:
            throughput = (f"{1000.0 / a.median_ms:.1f} fps", "1 / latency")
    v = a.validation
    return {
        "a": a,
        "input": f"{a.input_size[0]}×{a.input_size[1]}",
        "io": a.io,
        "agreement": level_agreement_text(a),
        "size": human_bytes(a.size_bytes),
        "fidelity": _db(a.fidelity_db),
        "drift": _db(a.drift_db, signed=True) if a.drift_db is not None else None,
        "status": "none" if v is None else ("ok" if v.passed else "fail"),
        "failures": "; ".join(v.failures) if v is not None else "",
        "latency": f"{a.median_ms:.1f} ms" if a.median_ms is not None else None,
        "p90": f"p90 {a.bench.p90_ms:.1f} ms" if a.bench is not None and a.bench.p90_ms is not None else "",
        "latency_note": (
            a.bench_note
            if a.bench is None and a.bench_note
            else (f"not runnable here: {a.bench.reason or 'no latency recorded'}" if a.bench is not None else None)
        ),
        "bench_command": _short_bench_command(root),
        "throughput": throughput,
        "memory": _fmt(a.bench.peak_rss_mb, "MB", 0) if a.bench is not None and a.median_ms is not None else "—",
    }


def _share(value: float) -> str:
    """A share as a percentage, rounded down (a minimum never reads higher than it is): 0.99996 -> '99.99%'."""
    return f"{math.floor(value * 10000) / 100:.2f}".rstrip("0").rstrip(".") + "%"


def level_agreement_text(a: Artifact) -> str | None:
    """A validated artifact's 8-bit agreement in one line: the least share of output samples within one level of
    the reference when both are rounded to 8 bits, with its budget where there is one (image I/O), and the largest
    difference in levels; None when the validation did not record it."""
    within = _number(a.summary.get("within_one_level_share_min"))
    if within is None or a.validation is None:
        return None
    text = f"{_share(within)} within 1 level"
    budget = _number(a.validation.budgets.get("min_within_one_level"))
    if budget:
        text += f" (≥ {_share(budget)})"
    worst = _number(a.summary.get("max_level_diff"))
    if worst is not None:
        text += f" · max {worst:.0f} level{'s' * (worst != 1)}"
    return text


def _summary(choice: Choice, baseline: float | None) -> dict[str, Any]:
    """A 'what to ship' card: the choice in one sentence and the target's precisions side by side."""
    c = choice.chosen
    headline = ""
    if c is not None:
        facts = [c.precision, *([c.io] if c.image_io else []), _latency_text(c)]
        if c.median_ms and baseline:
            facts.append(f"{_ratio(baseline / c.median_ms)}× the speed of PyTorch fp32")
        facts += [f"fidelity {_db(c.fidelity_db)}"]
        if c.drift_db is not None:
            facts.append(f"drift {_db(c.drift_db, signed=True)}")
        facts.append(human_bytes(c.size_bytes))
        headline = " · ".join(facts)
    columns = []
    for a in choice.artifacts:
        columns.append(
            {
                "a": a,
                "heading": a.precision + (" image" if a.image_io else ""),
                "chosen": a is c,
                "status": "none" if a.validation is None else ("ok" if a.validation.passed else "fail"),
                "latency": _latency_text(a),
                "fidelity": _db(a.fidelity_db),
                "drift": _db(a.drift_db, signed=True) if a.drift_db is not None else "—",
                "size": human_bytes(a.size_bytes),
                "verdict": "ship this" if a is c else choice.lost.get(a.label, ""),
            }
        )
    return {"choice": choice, "headline": headline, "columns": columns}


def _comparison_view(c: Comparison, gain: int) -> dict[str, Any]:
    t, x, h, w = c.zoom

    def zoom(pixels: np.ndarray) -> np.ndarray:
        return pixels[t : t + h, x : x + w]

    outputs = []
    for o in c.outputs:
        if o.pixels is None or o.difference is None:
            outputs.append({"a": o.artifact, "note": o.note})
            continue
        outputs.append(
            {
                "a": o.artifact,
                "output": _data_uri(png_bytes(zoom(o.pixels))),
                "diff": _data_uri(difference_png(zoom(o.difference), gain)),
                "psnr": _db(o.psnr_db),
                "peak": _level(o.max_abs_diff or 0.0),
                "note": None,
            }
        )
    return {
        "c": c,
        "where": f"{h}×{w} px at y {c.origin[0] + t}, x {c.origin[1] + x} of the image",
        "input": _data_uri(png_bytes(zoom(c.input))),
        "reference": _data_uri(png_bytes(zoom(c.reference))),
        "outputs": outputs,
    }


def _gradient() -> str:
    """The difference colormap as a CSS gradient, for the scale bar."""
    import matplotlib
    from matplotlib.colors import to_hex

    cmap = matplotlib.colormaps[DIFF_COLORMAP]
    return "linear-gradient(to right, " + ", ".join(f"{to_hex(cmap(i / 8))} {i * 12.5:g}%" for i in range(9)) + ")"


def _scale_text(gain: int, comparisons: Sequence[Comparison]) -> str:
    if not any(o.difference is not None and o.max_abs_diff for c in comparisons for o in c.outputs):
        return "no artifact differs from the reference: every difference is black"
    return (
        f"difference ×{gain}, one scale for every artifact: 1 colour step = {1 / gain:.2g}/255 of error, "
        f"the brightest colour = {_level(1.0 / gain)} or more"
    )


def _arm64_facts(m: Manifest) -> list[tuple[str, str]]:
    """One line per emulated ARM64 CPU the artifact was validated on (``validate --arm64``): scores, the
    difference from x86's outputs of the same tiles and the arithmetic that ran; never a time."""
    facts = []
    for cpu, record in m.arm64.items():
        s = record.validation.summary
        parts = [f"fidelity min {_db(_number(s.get('fidelity_db_min')))}"]
        drift = _number(s.get("drift_db_mean"))
        if drift is not None:
            parts.append(f"drift {_db(drift, signed=True)}")
        parts.append(f"max abs error {_number(s.get('max_abs_error')) or 0:.2g}")
        if record.vs_x86_max_abs is not None:
            share = record.vs_x86_differing_share
            parts.append(
                f"vs x86 max {record.vs_x86_max_abs:.2g}"
                + (f" ({_share(share)} of samples differ)" if share is not None else "")
            )
        compute = record.runtime.get("compute")
        if compute:
            parts.append(f"compute {compute}")
        parts.append("passed" if record.passed else "FAILED: " + "; ".join(record.validation.failures))
        facts.append((f"ARM64 {cpu}", f"{'; '.join(parts)} ({record.runner}, emulated)"))
    return facts


def _target_summary(m: Manifest) -> str:
    """What the target adds about its export (LiteRT: the GPU delegate's share of the operators)."""
    from nafnet_edge.converters import target_class, target_names

    return target_class(m.target).export_summary(m.export) if m.target in target_names() else ""


def _details(a: Artifact, root: Path) -> dict[str, Any]:
    """The audit record of one artifact: manifest, validation, bench and its top operators."""
    m = a.manifest
    runtime = m.runtime or a.runtime_here or {}
    facts: list[tuple[str, Any]] = [
        ("directory", str(a.directory)),
        ("files", f"{', '.join(m.files)} ({human_bytes(a.size_bytes)})"),
        ("input", m.io.input.describe()),
        ("runtime", _runtime_text(runtime)),
        ("created", m.created),
        ("seconds", ", ".join(f"{k} {v}" for k, v in m.seconds.items())),
    ]
    if m.quantization:
        q = m.quantization
        kept = q.get("kept_float") or []
        facts.append(("int8", f"{q.get('method', '?')}{'; kept float: ' + ', '.join(kept) if kept else ''}"))
    v = a.validation
    if v is not None:
        s = a.summary
        quality = [
            f"{_number(s.get('images')) or 0:.0f} images ({v.data or '?'})",
            f"fidelity min {_db(a.fidelity_db)}, mean {_db(_number(s.get('fidelity_db_mean')))}",
            f"max abs error {_number(s.get('max_abs_error')) or 0:.2g}",
        ]
        if a.drift_db is not None:
            quality.append(
                f"drift {_db(a.drift_db, signed=True)} (PSNR {_fmt(s.get('reference_psnr_db_mean'), 'dB', 2)} → "
                f"{_fmt(s.get('artifact_psnr_db_mean'), 'dB', 2)}, SSIM {_fmt(s.get('artifact_ssim_mean'), '', 4)})"
            )
        budgets = v.budgets
        within = _number(budgets.get("min_within_one_level"))
        quality.append(
            f"budgets ≥ {budgets.get('min_fidelity_db', '?')} dB fidelity, "
            f"≤ {budgets.get('max_drift_db', '?')} dB drift"
            + (f", ≥ {_share(within)} of 8-bit samples within one level" if within else "")
        )
        facts.append(("validation", "; ".join(quality)))
        agreement = level_agreement_text(a)
        if agreement is not None:
            exact = _number(s.get("exact_share_mean"))
            if exact is not None:
                agreement += f"; equal to the reference in {_share(exact)} of samples (mean)"
            facts.append(("8-bit agreement", agreement))
        facts += [("failure", failure) for failure in v.failures]
    facts += _arm64_facts(m)
    gpu = _target_summary(m)
    if gpu:
        facts.append(("export", gpu))
    b = a.bench
    if b is not None:
        lat = b.latency_ms or {}
        frame = b.frame or {}
        machine = b.machine
        facts += [
            ("benchmarked", f"{b.created or '?'} on {machine.get('cpu', '?')} ({machine.get('cores', '?')} cores)"),
            (
                "latency",
                f"min {_fmt(lat.get('min'), 'ms')}, median {_fmt(lat.get('median'), 'ms')}, p90 "
                f"{_fmt(lat.get('p90'), 'ms')}, p99 {_fmt(lat.get('p99'), 'ms')}; first call "
                f"{_fmt(b.first_inference_ms, 'ms')}; load {_fmt(b.load_s, 's', 2)}",
            ),
            ("compute", f"{_fmt(b.gflops_per_s, 'GFLOP/s', 1)} ({_fmt(b.peak_fraction, '', 2)}× sgemm)"),
            ("peak memory", _fmt(b.peak_rss_mb, "MB", 0)),
        ]
        if frame:
            facts.append(
                (
                    "full frame",
                    f"{frame.get('width', '?')}×{frame.get('height', '?')} in {frame.get('tiles', '?')} tiles: "
                    f"{_fmt(frame.get('seconds'), 's', 2)}, {_fmt(frame.get('mp_per_s'), 'MP/s', 2)}",
                )
            )
        if not b.runnable:
            facts.append(("not runnable", b.reason or "?"))
    else:
        facts.append(("latency", a.bench_note or f"not benchmarked (run {_bench_command(root)})"))
    if a.image_note:
        facts.append(("images", a.image_note))
    note = runtime.get("note") if isinstance(runtime, dict) else None
    if note:
        facts.append(("note", note))
    profile = (b.profile if b is not None else None) or {}
    ops = [
        {
            "op": t.get("op", "?"),
            "ms": _fmt(t.get("ms"), "ms", 2),
            "share": _fmt((_number(t.get("share")) or 0) * 100, "%", 1),
            "count": t.get("count", ""),
        }
        for t in (profile.get("top") or [])[:10]
    ]
    return {
        "a": a,
        "facts": [(k, v) for k, v in facts if v not in (None, "")],
        "status": "none" if v is None else ("ok" if v.passed else "fail"),
        "failures": "; ".join(v.failures) if v is not None else "",
        "ops": ops,
        "ops_source": profile.get("source", "profiler"),
        "ops_total": _fmt(profile.get("total_ms"), "ms"),
    }


def _runtime_text(info: dict[str, Any]) -> str:
    """'openvino; device: CPU; inference_precision: f32' from a runner's facts (nested values and the note,
    shown on its own line, left out)."""
    if not isinstance(info, dict):
        return ""
    parts = [str(info.get("runtime", "?"))]
    for key, value in info.items():
        if key in ("runtime", "note") or isinstance(value, dict):
            continue
        text = ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)
        parts.append(f"{key.replace('_', ' ')}: {text}")
    return "; ".join(parts)


def _sr_note(scale: int, channels: str) -> str:
    """What the page shows of a super-resolution artifact (`` · super-resolution x2 ...``); empty otherwise."""
    if scale == 1:
        return ""
    stereo = ", stereo pair (left and right views side by side)" if "+" in channels else ""
    return f" · super-resolution x{scale} (images at the output size){stereo}"


def _sources(artifacts: Sequence[Artifact]) -> str:
    seen: dict[str, str] = {}
    for a in artifacts:
        s = a.manifest.source
        if s.sha256 in seen:
            continue
        config = s.config
        params = s.params
        seen[s.sha256] = (
            f"{s.checkpoint}{' (embedded default)' if s.embedded_default else ''}"
            f"{' · release ' + s.release if s.release else ''} · "
            f"{CLASS_NAMES.get(str(config.get('arch')), 'NAFNet')} width {config.get('width', '?')}"
            f"{_sr_note(a.manifest.io.scale, a.manifest.io.input.channels)}"
            f"{f' · {params / 1e6:.2f} M params' if params else ''} · sha256 {s.sha256[:12]}…"
        )
    return "; ".join(seen.values())


def _environment() -> Any:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("nafnet_edge", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_html(artifacts: Sequence[Artifact], comparisons: Sequence[Comparison], root: Path, images: int) -> str:
    """The page, from ``templates/report.html.j2`` with ``templates/report.css`` inlined."""
    from markupsafe import Markup

    from nafnet_edge import __version__

    ordered = [a for group in by_target(artifacts).values() for a in group]
    baseline = _baseline_ms(artifacts)
    gain = shared_gain(comparisons)
    latency, quality = latency_chart(artifacts), quality_chart(artifacts)
    machine = next((a.bench.machine for a in ordered if a.bench is not None and a.bench.machine), None)
    css = (resources.files("nafnet_edge") / "templates" / STYLESHEET).read_text(encoding="utf-8")
    context = {
        "title": f"nafnet-edge report · {root.resolve().name}",
        "css": Markup(css),  # our own file, not user data; escaping would break selectors such as "a > b"
        "root": str(root),
        "count": len(artifacts),
        "sources": _sources(artifacts),
        "machine": machine if isinstance(machine, dict) else None,
        "sgemm": _fmt(machine.get("sgemm_gflops"), "GFLOP/s", 0) if isinstance(machine, dict) else "—",
        "baseline": f"{baseline:.4g} ms" if baseline else None,
        "summaries": [_summary(c, baseline) for c in choose(artifacts)],
        "rows": [_row(a, root) for a in ordered],
        "unbenchmarked": any(a.bench is None for a in artifacts),
        "bench_command": _bench_command(root),
        "latency_chart": Markup(latency) if latency else None,  # matplotlib's SVG, its text escaped by matplotlib
        "quality_chart": Markup(quality) if quality else None,
        "quality_measure": quality_measure(artifacts),
        "images": images,
        "gain": gain,
        "scale": _scale_text(gain, comparisons),
        "top_level": _level(1.0 / gain),
        "zoom_px": ZOOM_PX,
        "gradient": _gradient(),
        "comparisons": [_comparison_view(c, gain) for c in comparisons],
        "eight_bit": any(a.image_io for a in artifacts),
        "image_notes": [
            a for a in ordered if a.image_note and not any(a is o.artifact for c in comparisons for o in c.outputs)
        ],
        "details": [_details(a, root) for a in ordered],
        "version": __version__,
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    return _environment().get_template(TEMPLATE).render(context)


def write_report(
    directory: str | Path,
    output: str | Path | None = None,
    *,
    images: int = 3,
    val_data: str | Path | None = None,
    checkpoint: str | Path | None = None,
) -> Path:
    """Write the HTML report of ``directory`` (a ``convert -o OUT`` directory or one artifact directory in it) to
    ``output`` (default ``directory/report.html``), atomically; returns its path.

    ``images``: how many validation images to compare (0: none, and no model is loaded).
    ``val_data``: a folder of images to compare on instead of the shipped Kodak photos with seeded noise.
    ``checkpoint``: the source checkpoint for the fp32 reference when the one recorded in the manifests moved.
    Progress goes through :mod:`nafnet_edge.progress` (a line per slow step).
    Raises ``BadInputError`` when ``directory`` is missing or holds no manifest (``ArtifactError`` when one is
    damaged or a file in it is not a regular file inside it), ``OutputError`` when ``output`` is a directory.
    """
    if images < 0:
        raise ValueError("images must be 0 or more")
    root = Path(directory)
    if val_data is not None and not Path(val_data).is_dir():
        raise BadInputError(f"--val-data {val_data} is not a folder of images")
    path = Path(output) if output is not None else root / REPORT
    if path.is_dir():
        raise OutputError(
            f"cannot write the report to {path}: it is a directory; give a file name, e.g. -o {path / REPORT}"
        )
    artifacts = [read_artifact(p) for p in find_artifacts(root)]
    comparisons = compare_images(artifacts, images=images, val_data=val_data, checkpoint=checkpoint) if images else []
    page = render_html(artifacts, comparisons, root, images)
    with atomic_path(path) as tmp:
        # A name that is not UTF-8 on disk (its bytes held as surrogates) is shown with escapes, e.g. \udcff.
        tmp.write_text(page, encoding="utf-8", errors="backslashreplace")
    return path
