"""``nafnet-edge report``: one self-contained HTML page about a conversion output directory.

What a person needs to choose an artifact, on one page that can be mailed or attached to a ticket:

- a table with one row per artifact: target, precision, runtime, size on disk, fidelity and drift from the
  manifest's validation, and latency, throughput and peak memory from ``bench.json`` when the directory was
  benchmarked (``nafnet-edge bench DIR --save`` or ``convert --bench``);
- charts drawn with matplotlib and inlined as SVG: median latency per artifact, quality against latency;
- for a few validation images, a crop of each artifact's input size seen four ways: the input, the fp32
  reference (the original model in PyTorch), the artifact's output in its own runtime and the absolute
  difference, amplified so that where the artifact differs becomes visible.

Everything is embedded (SVG charts inline, images as base64 PNGs, CSS in the page): no external URL, no
script, so the file opens anywhere, offline, years later. Artifacts that cannot run here keep their row and say
why instead of showing images. An artifact directory whose manifest or files cannot be used (damaged, or a file
that is a link out of the directory, a pipe or a device) is refused naming the file, and nothing of it is opened.
"""

from __future__ import annotations

import base64
import html
import io
import math
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nafnet_edge.artifact_files import artifact_size
from nafnet_edge.atomic import atomic_path
from nafnet_edge.errors import BadInputError, NafnetEdgeError, OutputError
from nafnet_edge.manifest import (
    BENCH_FILE,
    MANIFEST_FILE,
    BenchRecord,
    Manifest,
    ValidationSummary,
    find_artifacts,
    read_bench,
    read_manifest,
)

MANIFEST = MANIFEST_FILE
BENCH = BENCH_FILE
REPORT = "report.html"
DIFF_COLORMAP = "magma"
BASELINE_COLOR = "#9c9c9c"  # the PyTorch baseline; each target's colour is its Target.color
FALLBACK_COLORS = ("#76b7b2", "#edc948", "#ff9da7", "#9c755f")


# --- what one artifact directory holds ---------------------------------------------------------------------------


@dataclass
class Crop:
    """One validation image's crop seen through one artifact: PNG bytes and how far the output is off."""

    artifact_png: bytes
    diff_png: bytes
    max_abs_diff: float
    psnr_db: float


@dataclass
class CropGroup:
    """One validation image cropped to one input size: the input and reference shared by every artifact of that
    size and source checkpoint, and each artifact's output (or why there is none)."""

    image: str
    size: tuple[int, int]  # crop height, width
    origin: tuple[int, int]  # top, left in the image
    tile: tuple[int, int]
    source: str  # the source checkpoint's short name
    input_png: bytes
    reference_png: bytes
    reference: np.ndarray  # HxWxC fp32 output of the original model on the crop
    rows: list[tuple[Artifact, Crop | None, str | None]] = field(default_factory=list)


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
    def runtime(self) -> str | None:
        for info in (self.manifest.runtime, self.runtime_here):
            if isinstance(info, dict) and info.get("runtime"):
                return str(info["runtime"])
        return self.bench.runtime if self.bench is not None and self.bench.runtime else None

    @property
    def validation(self) -> ValidationSummary | None:
        return self.manifest.validation

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


# --- running artifacts on validation crops -----------------------------------------------------------------------


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


def difference_png(output: np.ndarray, reference: np.ndarray) -> tuple[bytes, float]:
    """|output - reference|, the largest over channels per pixel, scaled so that the largest difference in the
    crop is the brightest colour of the colormap (zero stays black); the PNG and that largest difference.
    Scaling to the maximum shows where an artifact differs at any precision; the caption prints the scale."""
    import matplotlib

    diff = np.abs(np.nan_to_num(output, nan=np.inf).astype(np.float64) - reference).max(axis=2)
    diff = np.minimum(diff, 1e6)  # NaN/Inf outputs: brightest
    peak = float(diff.max())
    scaled = diff / peak if peak > 0 else diff
    rgb = matplotlib.colormaps[DIFF_COLORMAP](scaled)[..., :3]
    return png_bytes((rgb * 255.0 + 0.5).astype(np.uint8)), peak


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

        source = manifest.source
        sha = source.sha256
        if self.checkpoint is not None:
            path: str | None = str(self.checkpoint)
        elif source.embedded_default:
            path = None
        else:
            path = source.path
            if not path or not Path(path).is_file():
                return None, f"the source checkpoint is not at {path!r} any more: pass --checkpoint CKPT"
        reference = manifest.reference
        train_size = reference.train_size if reference.arch == "nafnet-local" else None
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


def _load_images(data: str | Path | None, channels: int) -> list[Any]:
    from nafnet_edge.validation import default_images, folder_images

    return folder_images(data, channels=channels) if data is not None else default_images(channels)


def compare_images(
    artifacts: Sequence[Artifact],
    *,
    images: int,
    data: str | Path | None,
    checkpoint: str | Path | None,
    progress: Callable[[str], None] | None = None,
) -> list[CropGroup]:
    """Run each artifact in its runtime and the fp32 original model in PyTorch on a centre crop (the artifact's
    input size) of the first ``images`` validation images. An artifact that cannot run here gets
    ``image_note`` (and a row saying why) instead of images."""
    import torch

    from nafnet_edge.converters import get_target
    from nafnet_edge.validation import apply_tiled, runner_fn

    say = progress or (lambda _: None)
    sources = _Sources(checkpoint)
    image_sets: dict[int, list[Any]] = {}
    groups: dict[tuple[int, int, int, int, int], CropGroup] = {}
    order: list[tuple[int, int, int, int, int]] = []
    for artifact in artifacts:
        size = artifact.input_size
        loaded, why = sources.load(artifact.manifest)
        if loaded is None:
            artifact.image_note = why
            continue
        say(f"{artifact.label}: running {images} crop(s) in its runtime")
        try:
            converter = get_target(artifact.target)
            converter.check_available()
            runner = converter.load_runner(artifact.directory, export=artifact.manifest.export)
            artifact.runtime_here = runner.info
        except Exception as e:  # e.g. a delegate this machine's runtime lacks: the row stays, with the reason
            reason = str(e) if isinstance(e, NafnetEdgeError) else f"{type(e).__name__}: {e}"
            artifact.image_note = f"cannot run here: {reason}"
            continue
        if artifact.channels not in image_sets:
            image_sets[artifact.channels] = _load_images(data, artifact.channels)[:images]
        model = loaded.model.float().cpu().eval()
        multiple = loaded.config.pad_multiple

        def reference_fn(t: torch.Tensor, model: Any = model) -> torch.Tensor:
            with torch.inference_mode():
                return model(t).float()

        artifact_fn = runner_fn(runner.run)
        for index, image in enumerate(image_sets[artifact.channels]):
            key = (id(loaded), artifact.channels, index, *size)  # one loaded reference model per setting
            crop, origin = centre_crop(image.input, size)
            if key not in groups:
                reference, _ = apply_tiled(reference_fn, crop, size, 0, multiple)
                groups[key] = CropGroup(
                    image=image.name,
                    size=(crop.shape[0], crop.shape[1]),
                    origin=origin,
                    tile=size,
                    source=artifact.manifest.source.checkpoint or "checkpoint",
                    input_png=png_bytes(crop),
                    reference_png=png_bytes(reference),
                    reference=reference,
                )
                order.append(key)
            group = groups[key]
            try:
                output, _ = apply_tiled(artifact_fn, crop, size, 0, multiple)
            except Exception as e:  # a runtime failing on one input must not lose the page
                group.rows.append((artifact, None, f"failed here: {type(e).__name__}: {e}"))
                artifact.image_note = artifact.image_note or f"failed here: {type(e).__name__}: {e}"
                continue
            diff, peak = difference_png(output, group.reference)
            crop_result = Crop(png_bytes(output), diff, peak, _psnr(output, group.reference))
            group.rows.append((artifact, crop_result, None))
    return [groups[k] for k in order]


def _psnr(output: np.ndarray, reference: np.ndarray) -> float:
    from nafnet_edge.validation import psnr

    return psnr(np.clip(np.nan_to_num(output, nan=0.0), 0, 1), np.clip(reference, 0, 1))


# --- charts ---------------------------------------------------------------------------------------------------


def _color(target: str, index: int) -> str:
    """The target's own chart colour (``Target.color``); a fallback by position for one without (or unknown)."""
    from nafnet_edge.converters import target_class

    try:
        color = target_class(target).color
    except (NafnetEdgeError, ImportError, AttributeError):
        color = ""
    return color or FALLBACK_COLORS[index % len(FALLBACK_COLORS)]


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
    ax.grid(True, axis="x", color="#e4e4e4", linewidth=0.8)
    ax.set_axisbelow(True)


def latency_chart(artifacts: Sequence[Artifact]) -> str | None:
    """Horizontal bars: median latency of one input-size call per benchmarked artifact (and the PyTorch fp32
    baseline when ``bench.json`` records it); None when nothing was benchmarked."""
    bars = [(f"{a.label} · {a.precision}", a.median_ms, _color(a.target, i)) for i, a in enumerate(artifacts)]
    bars = [b for b in bars if b[1] is not None]
    if not bars:
        return None
    baselines = [a.bench.baseline_ms for a in artifacts if a.bench is not None]
    baseline = next((b for b in baselines if b is not None), None)
    if baseline is not None:
        bars.append(("PyTorch fp32 (baseline)", baseline, BASELINE_COLOR))
    fig = _figure(6.4, 0.42 * len(bars) + 1.1)
    ax = fig.add_subplot()
    labels = [b[0] for b in bars][::-1]
    values = [float(b[1]) for b in bars][::-1]  # type: ignore[arg-type]
    ax.barh(labels, values, color=[b[2] for b in bars][::-1], height=0.6)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.1f} ms", va="center", fontsize=9)
    ax.set_xlim(0, max(values) * 1.22)
    ax.set_xlabel("median latency per call (ms), lower is better", fontsize=9)
    _style(ax)
    return _svg(fig, "latency")


def _quality_points(artifacts: Sequence[Artifact]) -> list[Artifact]:
    return [a for a in artifacts if a.median_ms is not None and a.fidelity_db is not None]


def _quality_measure(artifacts: Sequence[Artifact]) -> str:
    """What the quality chart's vertical axis shows, in words."""
    if all(a.drift_db is not None for a in _quality_points(artifacts)):
        return "Drift: mean PSNR loss against ground truth, fp32 reference minus artifact; lower is better."
    return (
        "Fidelity: lowest PSNR of the artifact against the fp32 reference (no ground truth for drift); higher is "
        "better, bit-exact artifacts are drawn at the top."
    )


def quality_chart(artifacts: Sequence[Artifact]) -> str | None:
    """Scatter: quality against median latency for the benchmarked, validated artifacts. Drift against ground
    truth when every point has it (the task-level measure), else fidelity to the fp32 reference."""
    points = _quality_points(artifacts)
    if not points:
        return None
    use_drift = all(a.drift_db is not None for a in points)
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot()
    finite = [a.fidelity_db for a in points if a.fidelity_db is not None and math.isfinite(a.fidelity_db)]
    cap = (max(finite) + 10.0) if finite else 200.0  # bit-exact (infinite PSNR) drawn at the top
    for i, a in enumerate(points):
        y = a.drift_db if use_drift else min(a.fidelity_db or 0.0, cap)
        ax.scatter([a.median_ms], [y], s=60, color=_color(a.target, i), edgecolor="white", linewidth=0.8, zorder=3)
        ax.annotate(
            f"{a.label} · {a.precision}",
            (a.median_ms, y),
            textcoords="offset points",
            xytext=(6, 5),
            fontsize=8.5,
        )
    ax.set_xlabel("median latency per call (ms)", fontsize=9)
    if use_drift:
        ax.set_ylabel("drift (dB), lower is better", fontsize=9)
        ax.axhline(0.0, color="#bbbbbb", linewidth=0.8)
        drifts = [a.drift_db or 0.0 for a in points]
        lo, hi = min(min(drifts), -0.01), max(max(drifts), 0.01)  # at least +-0.01 dB: the fp32 budget
        ax.set_ylim(lo - 0.2 * (hi - lo), hi + 0.2 * (hi - lo))
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    else:
        ax.set_ylabel("fidelity (dB), higher is better", fontsize=9)
    ax.set_xlim(left=0, right=max(a.median_ms or 0.0 for a in points) * 1.35)
    if not use_drift:
        ax.margins(y=0.25)
    _style(ax)
    ax.grid(True, axis="y", color="#e4e4e4", linewidth=0.8)
    return _svg(fig, "quality")


# --- HTML ----------------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(png: bytes, alt: str, *, pixelated: bool = True) -> str:
    data = base64.b64encode(png).decode("ascii")
    cls = ' class="px"' if pixelated else ""
    return f'<img{cls} alt="{_e(alt)}" src="data:image/png;base64,{data}">'


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


def _bench_command(root: Path) -> str:
    return f"nafnet-edge bench {shlex.quote(str(root))} --save"


def _not_benchmarked(root: Path) -> str:
    return f"not benchmarked (run {_bench_command(root)})"


def _status_cell(a: Artifact) -> str:
    v = a.validation
    if v is None:
        return '<span class="badge none">not validated</span>'
    if v.passed:
        return '<span class="badge ok">pass</span>'
    failures = "; ".join(v.failures)
    return f'<span class="badge fail" title="{_e(failures)}">fail</span><div class="small">{_e(failures)}</div>'


def _latency_cell(a: Artifact, root: Path) -> str:
    if a.bench is None:
        if a.bench_note:
            return f'<td class="muted small">{_e(a.bench_note)}</td>'
        where = shlex.quote(str(root))
        command = f"nafnet-edge bench {where if len(where) <= 24 else 'DIR'} --save"  # DIR: spelled out below
        return f'<td class="muted small">not benchmarked (run <code>{_e(command)}</code>)</td>'
    if a.median_ms is None:
        reason = a.bench.reason or "no latency recorded"
        return f'<td class="muted small">not runnable here: {_e(reason)}</td>'
    p90 = a.bench.p90_ms
    extra = f'<div class="small muted">p90 {p90:.1f} ms</div>' if p90 is not None else ""
    return f'<td class="num">{a.median_ms:.1f} ms{extra}</td>'


def _throughput_cell(a: Artifact) -> str:
    if a.bench is None or a.median_ms is None:
        return '<td class="num muted">—</td>'
    t = a.bench.throughput or {}
    if a.fps is not None:
        streams = t.get("streams")
        extra = f'<div class="small muted">{_e(streams)} streams</div>' if streams else ""
        return f'<td class="num">{a.fps:.1f} fps{extra}</td>'
    return f'<td class="num">{1000.0 / a.median_ms:.1f} fps<div class="small muted">1 / latency</div></td>'


def _table(artifacts: Sequence[Artifact], root: Path) -> str:
    rows = []
    for a in artifacts:
        size = f"{a.input_size[0]}×{a.input_size[1]}" if a.input_size else "?"
        where = "" if a.label == a.target else f"{a.label} · "
        drift = (
            _db(a.drift_db, signed=True)
            if a.drift_db is not None
            else '<span class="muted" title="needs ground truth">—</span>'
        )
        memory = _fmt(a.bench.peak_rss_mb, "MB", 0) if a.bench is not None and a.median_ms is not None else "—"
        rows.append(
            f'<tr class="artifact" data-target="{_e(a.target)}">'
            f'<td><a href="#{_e(a.anchor)}">{_e(a.target)}</a>'
            f'<div class="small muted">{_e(where)}{_e(size)} input</div></td>'
            f"<td>{_e(a.precision)}</td><td>{_e(a.runtime or '—')}</td>"
            f'<td class="num">{_e(human_bytes(a.size_bytes))}</td>'
            f'<td class="num">{_e(_db(a.fidelity_db))}</td><td class="num">{drift}</td>'
            f"<td>{_status_cell(a)}</td>{_latency_cell(a, root)}{_throughput_cell(a)}"
            f'<td class="num">{_e(memory)}</td></tr>'
        )
    head = "".join(
        f"<th{' class=num' if num else ''}>{_e(h)}</th>"
        for h, num in [
            ("Target", False),
            ("Precision", False),
            ("Runtime", False),
            ("Size", True),
            ("Fidelity", True),
            ("Drift", True),
            ("Validation", False),
            ("Latency", True),
            ("Throughput", True),
            ("Peak RSS", True),
        ]
    )
    return (
        f'<div class="scroll"><table class="artifacts" id="artifacts"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _charts(artifacts: Sequence[Artifact], root: Path) -> str:
    latency, quality = latency_chart(artifacts), quality_chart(artifacts)
    if latency is None:
        return f'<p class="note">No latency chart: {_e(_not_benchmarked(root))}.</p>'
    parts = [
        f'<figure class="chart">{latency}<figcaption>Median latency of one call at the artifact\'s '
        "input size, from each <code>bench.json</code>.</figcaption></figure>"
    ]
    if quality is not None:
        parts.append(
            f'<figure class="chart">{quality}<figcaption>Quality against latency. {_e(_quality_measure(artifacts))}'
            "</figcaption></figure>"
        )
    return f'<div class="charts">{"".join(parts)}</div>'


def _comparisons(groups: Sequence[CropGroup], artifacts: Sequence[Artifact], images: int) -> str:
    if images == 0:
        return '<p class="note">Image comparison turned off (<code>--images 0</code>).</p>'
    notes = [a for a in artifacts if a.image_note and not any(a is r[0] for g in groups for r in g.rows)]
    out = [
        '<p class="lead">A centre crop of the artifact\'s input size from each validation image: the input, the '
        "fp32 reference (the original model in PyTorch), and per artifact its output in its own runtime and the "
        "difference |artifact − reference| (largest over the colour channels), <strong>scaled to its own "
        "maximum</strong>: black is 0, the brightest colour is the maximum printed under it, and the gain says "
        "how much it was amplified.</p>"
    ]
    for group in groups:
        px = min(max(group.size[1], 150), 256)  # small tiles enlarged (pixelated), large ones shrunk
        fixed = (
            f'<div class="cell">{_img(group.input_png, "input " + group.image)}<span>input</span></div>'
            f'<div class="cell">{_img(group.reference_png, "reference " + group.image)}'
            "<span>fp32 reference (PyTorch)</span></div>"
        )
        pairs = []
        for artifact, crop, note in group.rows:
            name = f"{artifact.label} · {artifact.precision}"
            if crop is None:
                pairs.append(f'<div class="pair note"><strong>{_e(name)}</strong>: {_e(note)}</div>')
                continue
            gain = f"×{1.0 / crop.max_abs_diff:.3g}" if crop.max_abs_diff > 0 else "identical"
            pairs.append(
                f'<div class="pair"><div class="cell">{_img(crop.artifact_png, name + " output")}'
                f"<span><strong>{_e(name)}</strong> · {_e(_db(crop.psnr_db))}</span></div>"
                f'<div class="cell">{_img(crop.diff_png, name + " difference")}'
                f"<span>difference {_e(gain)} (max {crop.max_abs_diff:.2g})</span></div></div>"
            )
        h, w = group.size
        out.append(
            f'<figure class="compare" style="--px: {px}px"><figcaption><strong>{_e(group.image)}</strong> · '
            f"{h}×{w} crop at y {group.origin[0]}, x {group.origin[1]} · source {_e(group.source)} · "
            "PSNR of each output against the reference</figcaption>"
            f'<div class="rows"><div class="fixed">{fixed}</div><div class="pairs">{"".join(pairs)}</div></div>'
            "</figure>"
        )
    for a in notes:
        out.append(f'<p class="note"><strong>{_e(a.label)}</strong>: no images, {_e(a.image_note)}</p>')
    return "".join(out)


def _facts(rows: Sequence[tuple[str, Any]]) -> str:
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows if v not in (None, "")) + "</dl>"


def _artifact_section(a: Artifact, root: Path) -> str:
    m = a.manifest
    files = ", ".join(m.files)
    runtime = m.runtime or a.runtime_here or {}
    facts: list[tuple[str, Any]] = [
        ("directory", str(a.directory)),
        ("files", f"{files} ({human_bytes(a.size_bytes)})"),
        ("input", " × ".join(str(d) for d in m.io.input.shape)),
        ("runtime", _runtime_text(runtime)),
        ("created", m.created),
        ("seconds", ", ".join(f"{k} {v}" for k, v in m.seconds.items())),
    ]
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
        quality.append(
            f"budgets ≥ {budgets.get('min_fidelity_db', '?')} dB fidelity, "
            f"≤ {budgets.get('max_drift_db', '?')} dB drift"
        )
        facts.append(("validation", "; ".join(quality)))
        for failure in v.failures:
            facts.append(("failure", failure))
    b = a.bench
    if b is not None:
        lat = b.latency_ms or {}
        frame = b.frame or {}
        machine = b.machine
        facts += [
            (
                "benchmarked",
                f"{b.created or '?'} on {machine.get('cpu', '?')} ({machine.get('cores', '?')} cores)",
            ),
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
        facts.append(("latency", a.bench_note or _not_benchmarked(root)))
    if a.image_note:
        facts.append(("images", a.image_note))
    note = runtime.get("note") if isinstance(runtime, dict) else None
    if note:
        facts.append(("note", note))
    profile = (b.profile if b is not None else None) or {}
    top = profile.get("top") or []
    ops = ""
    if top:
        rows = "".join(
            f"<tr><td>{_e(t.get('op', '?'))}</td><td class=num>{_e(_fmt(t.get('ms'), 'ms', 2))}</td>"
            f"<td class=num>{_e(_fmt((_number(t.get('share')) or 0) * 100, '%', 1))}</td>"
            f"<td class=num>{_e(t.get('count', ''))}</td></tr>"
            for t in top[:10]
        )
        ops = (
            f"<h4>Top operators ({_e(profile.get('source', 'profiler'))}, "
            f"total {_e(_fmt(profile.get('total_ms'), 'ms'))})</h4>"
            f'<table class="ops"><thead><tr><th>operator</th><th class=num>time</th><th class=num>share</th>'
            f"<th class=num>count</th></tr></thead><tbody>{rows}</tbody></table>"
        )
    return (
        f'<section class="artifact-details" id="{_e(a.anchor)}"><h3>{_e(a.label)} <span class="muted">'
        f"{_e('' if a.label == a.target else a.target + ' · ')}{_e(a.precision)}</span> {_status_cell(a)}</h3>"
        f"{_facts(facts)}{ops}</section>"
    )


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
            f"{'NAFNetLocal' if config.get('arch') == 'nafnet-local' else 'NAFNet'} width {config.get('width', '?')}"
            f"{f' · {params / 1e6:.2f} M params' if params else ''} · sha256 {s.sha256[:12]}…"
        )
    return "; ".join(seen.values())


CSS = """
:root { color-scheme: light; --fg: #1d232b; --muted: #66707c; --line: #e3e6ea; --bg: #ffffff; --soft: #f6f7f9;
  --ok: #1a7f37; --fail: #c62828; --accent: #2f6fb3; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--soft); color: var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 28px 28px 60px; }
header h1 { font-size: 26px; margin: 0 0 4px; letter-spacing: -0.01em; }
header p { margin: 2px 0; color: var(--muted); }
h2 { font-size: 19px; margin: 36px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 0 0 10px; }
h4 { font-size: 14px; margin: 14px 0 6px; }
a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #eef0f3;
  padding: 1px 4px; border-radius: 4px; }
.card, .artifact-details, figure.compare { background: var(--bg); border: 1px solid var(--line); border-radius: 10px; }
.scroll { overflow-x: auto; background: var(--bg); border: 1px solid var(--line); border-radius: 10px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: 9px 12px; text-align: left; vertical-align: top; border-bottom: 1px solid var(--line); }
thead th { font-size: 12px; text-transform: uppercase; letter-spacing: 0.04em; color: var(--muted);
  background: #fafbfc; white-space: nowrap; }
tbody tr:last-child td { border-bottom: 0; }
tbody tr:hover { background: #f8fafc; }
.num { text-align: right; white-space: nowrap; }
table.artifacts td.small { max-width: 210px; white-space: normal; }
table.artifacts td code { white-space: nowrap; }
.small { font-size: 12.5px; } .muted { color: var(--muted); }
.badge { display: inline-block; padding: 1px 9px; border-radius: 999px; font-size: 12px; font-weight: 600; }
.badge.ok { background: #dcf3e3; color: var(--ok); } .badge.fail { background: #fde2e1; color: var(--fail); }
.badge.none { background: #eceff3; color: var(--muted); }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(440px, 1fr)); gap: 16px; align-items: start; }
figure { margin: 0; }
figure.chart { background: var(--bg); border: 1px solid var(--line); border-radius: 10px; padding: 14px; }
figure.chart svg { width: 100%; height: auto; display: block; }
figcaption { font-size: 13px; color: var(--muted); margin-top: 6px; }
figure.compare { padding: 14px; margin-bottom: 16px; }
figure.compare > figcaption { margin: 0 0 10px; color: var(--fg); }
.rows { display: flex; gap: 14px 28px; align-items: flex-start; flex-wrap: wrap; }
.fixed, .pair { display: flex; gap: 10px; flex: none; }
.fixed { padding-right: 28px; border-right: 1px solid var(--line); }
.pairs { display: flex; flex-wrap: wrap; gap: 14px 28px; flex: 1 1 0; min-width: calc(2 * var(--px) + 10px); }
.cell { width: var(--px); }
.cell img { width: 100%; height: auto; display: block; border-radius: 4px; background: #000; }
img.px { image-rendering: pixelated; }
.cell span { display: block; font-size: 12.5px; color: var(--muted); margin-top: 4px; }
.pair.note { width: calc(2 * var(--px) + 10px); margin: 0; }
.note { background: #fff8e6; border: 1px solid #f3e0a8; border-radius: 8px; padding: 8px 12px; font-size: 14px; }
p.lead { color: var(--muted); max-width: 900px; }
.artifact-details { padding: 16px 18px; margin-bottom: 14px; }
.artifact-details h3 .badge { margin-left: 6px; vertical-align: 2px; }
dl { display: grid; grid-template-columns: 130px 1fr; gap: 4px 14px; margin: 0; font-size: 14px; }
dt { color: var(--muted); } dd { margin: 0; overflow-wrap: anywhere; }
table.ops { width: auto; font-size: 13px; } table.ops td, table.ops th { padding: 4px 10px; }
footer { margin-top: 40px; color: var(--muted); font-size: 13px; }
"""


def render_html(artifacts: Sequence[Artifact], groups: Sequence[CropGroup], root: Path, images: int) -> str:
    """The page: header, table, charts, image comparison, one details section per artifact."""
    from nafnet_edge import __version__

    created = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    unbenchmarked = any(a.bench is None for a in artifacts)
    machine = next((a.bench.machine for a in artifacts if a.bench is not None and a.bench.machine), None)
    header = [
        f"<p>Directory <code>{_e(root)}</code> · {len(artifacts)} artifact{'s' * (len(artifacts) != 1)}</p>",
        f"<p>Source: {_e(_sources(artifacts))}</p>",
    ]
    if isinstance(machine, dict):
        header.append(
            f"<p>Benchmarked on {_e(machine.get('cpu', '?'))}, {_e(machine.get('cores', '?'))} cores"
            f"{', sgemm ' + _fmt(machine.get('sgemm_gflops'), 'GFLOP/s', 0) if machine.get('sgemm_gflops') else ''}"
            "</p>"
        )
    body = [
        "<header><h1>nafnet-edge report</h1>",
        *header,
        "</header>",
        "<h2>Artifacts</h2>",
        _table(artifacts, root),
        '<p class="small muted">Fidelity: lowest PSNR of the artifact against the fp32 reference over the validation '
        "images (data range 1.0). Drift: mean PSNR loss against ground truth, reference minus artifact (only with "
        "ground truth). Latency: median of one call at the artifact's input size"
        + (f"; to benchmark, run <code>{_e(_bench_command(root))}</code>" if unbenchmarked else "")
        + ".</p>",
        "<h2>Charts</h2>",
        _charts(artifacts, root),
        "<h2>Where the artifacts differ</h2>",
        _comparisons(groups, artifacts, images),
        "<h2>Details</h2>",
        *(_artifact_section(a, root) for a in artifacts),
        f"<footer>Written by nafnet-edge {_e(__version__)} on {_e(created)}. Self-contained: charts are inline SVG, "
        "images are embedded PNGs.</footer>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>nafnet-edge report · {_e(root.resolve().name)}</title><style>{CSS}</style></head>"
        f"<body><main>{''.join(body)}</main></body></html>\n"
    )


def write_report(
    directory: str | Path,
    output: str | Path | None = None,
    *,
    images: int = 3,
    data: str | Path | None = None,
    checkpoint: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the HTML report of ``directory`` (a ``convert -o OUT`` directory or one ``OUT/<target>``) to
    ``output`` (default ``directory/report.html``), atomically; returns its path.

    ``images``: how many validation images to crop for the image comparison (0: none, and no model is loaded).
    ``data``: a folder of images to crop instead of the shipped Kodak photos with seeded noise.
    ``checkpoint``: the source checkpoint for the fp32 reference when the one recorded in the manifests moved.
    ``progress``: called with a line of text before each slow step.
    Raises ``BadInputError`` when ``directory`` is missing or holds no manifest (``ArtifactError`` when one is
    damaged or a file in it is not a regular file inside it), ``OutputError`` when ``output`` is a directory.
    """
    if images < 0:
        raise ValueError("images must be 0 or more")
    root = Path(directory)
    if data is not None and not Path(data).is_dir():
        raise BadInputError(f"--data {data} is not a folder of images")
    path = Path(output) if output is not None else root / REPORT
    if path.is_dir():
        raise OutputError(
            f"cannot write the report to {path}: it is a directory; give a file name, e.g. -o {path / REPORT}"
        )
    artifacts = [read_artifact(p) for p in find_artifacts(root)]
    groups = (
        compare_images(artifacts, images=images, data=data, checkpoint=checkpoint, progress=progress) if images else []
    )
    page = render_html(artifacts, groups, root, images)
    with atomic_path(path) as tmp:
        # A name that is not UTF-8 on disk (its bytes held as surrogates) is shown with escapes, e.g. \udcff.
        tmp.write_text(page, encoding="utf-8", errors="backslashreplace")
    return path
