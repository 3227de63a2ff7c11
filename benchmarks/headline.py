"""The project's headline table in one run: every runtime and precision, deploy graph vs original, same rounds.

Per shape (NAFNet-SIDD-width32 and GoPro-width32 by default, random weights: speed only) at --size x --size,
every variant below is built, run once as a warm-up, then timed in --runs interleaved rounds (one run of every
variant per round, so machine noise hits all alike); medians in ms, each as a ratio to "OpenVINO f32 original"
of the same shape and run (1.00x; below 1 is faster), and GFLOP/s (GMACs x 2 / median) against the best sgemm
probe of the run:

- PyTorch eager fp32 (original graph, ``torch.inference_mode``);
- onnxruntime fp32, original and deploy graph (``nafnet_edge.deploy``);
- OpenVINO f32 (pinned), original and deploy; OpenVINO with the CPU plugin's default precision hint on the
  deploy graph (bf16 on CPUs that have it; labelled with the precision the plugin reports); OpenVINO int8 as
  ``nafnet-edge quantize`` writes it;
- ExecuTorch XNNPACK fp32, original and deploy; XNNPACK int8 as ``nafnet-edge quantize`` writes it.

Then a full frame (default 12 MP, 3000x4000) through --frame-tile tiles (overlap 32) with the project's tiler,
for the first shape only by default, with a smaller set (PyTorch eager, OpenVINO f32 original and int8, XNNPACK
fp32 original and int8) built at the tile size: seconds per frame, MP/s, ratio to OpenVINO f32.

A runtime that is not installed (or fails to build) is skipped with the reason. Writes the rows with every run's
time, the machine and the settings to --json and a bar chart to --png. Progress goes to stderr; building the
int8 variants takes a minute or two each, the 12 MP frame several minutes per variant on 2 cores.

    python benchmarks/headline.py [--runs 5] [--shapes SIDD-width32 GoPro-width32] [--size 256]
        [--frame 12MP|HxW|none] [--frame-tile 512] [--frame-runs 1] [--skip onnxruntime ...]
        [--json benchmarks/results/headline.json] [--png benchmarks/results/headline.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import random_release_shape, versions  # benchmarks/common.py: the script folder is on sys.path
from deploy_speed import Runner, onnxruntime_runner, openvino_runner, time_interleaved, xnnpack_runner

from nafnet_edge.benchmark import BenchSettings, LatencyStats, full_frame, machine, pytorch_session, sgemm_gflops
from nafnet_edge.cli import parse_frame
from nafnet_edge.complexity import count_macs
from nafnet_edge.deploy import deploy
from nafnet_edge.releases import RELEASE_SHAPES
from nafnet_edge.validation import psnr

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = "openvino_f32_original"
FRAME_OVERLAP = 32
EXTRAS = {"onnxruntime": "onnx", "onnx": "onnx", "openvino": "openvino", "nncf": "openvino"}
EXTRAS |= {"executorch": "executorch", "torchao": "executorch"}

Built = tuple[Runner, dict[str, Any]]  # the runner and what it reports (e.g. the label, the runtime precision)


@dataclass(frozen=True)
class Variant:
    key: str  # stable id in the JSON
    label: str
    runtime: str  # what --skip names
    graph: str  # original | deploy
    precision: str
    needs: tuple[str, ...]  # modules it imports
    build: Callable[[torch.nn.Module, torch.Tensor, list[object]], Built]


def _deployed(model: torch.nn.Module, target: str, x: torch.Tensor) -> torch.nn.Module:
    from nafnet_edge.converters import get_target

    converter = get_target({"xnnpack": "executorch"}.get(target, target))
    return deploy(model, norm_form=converter.norm_form, input_size=(x.shape[-2], x.shape[-1]))


def pytorch_eager(model: torch.nn.Module, x: torch.Tensor, keep: list[object]) -> Built:
    session = pytorch_session(model, BenchSettings())
    return session.run, {"threads": session.info["threads"]}


def openvino_default_hint(model: torch.nn.Module, x: torch.Tensor, keep: list[object]) -> Built:
    """The deploy graph compiled with no precision hint: what an app team gets without asking (bf16 where the
    CPU has it); the label says what the plugin reports."""
    import openvino as ov

    from nafnet_edge.converters.openvino import runtime_precisions

    compiled = ov.Core().compile_model(ov.convert_model(_deployed(model, "openvino", x), example_input=x), "CPU")
    hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    request = compiled.create_infer_request()
    reported, activations = runtime_precisions(compiled)
    info = {
        "label": f"OpenVINO {hint} deploy (default hint)",
        "precision": hint,
        "inference_precision_hint": hint,
        "runtime_precisions": reported,
        "activation_precisions": activations,
    }
    return (lambda a: request.infer({0: a})[0]), info


def nafnet_edge_int8(target: str) -> Callable[[torch.nn.Module, torch.Tensor, list[object]], Built]:
    def build(model: torch.nn.Module, x: torch.Tensor, keep: list[object]) -> Built:
        from int8_speed import ours_runner  # imports the quantizers: only when a backend is there

        return ours_runner(target, model, x.shape[-1], 0, keep), {"artifact": "nafnet-edge quantize (PTQ)"}

    return build


def _plain(make: Callable[[torch.nn.Module, torch.Tensor], Runner], target: str | None):
    def build(model: torch.nn.Module, x: torch.Tensor, keep: list[object]) -> Built:
        return make(_deployed(model, target, x) if target else model, x), {}

    return build


VARIANTS = [
    Variant("pytorch_eager", "PyTorch eager fp32", "pytorch", "original", "fp32", (), pytorch_eager),
    Variant(
        "onnxruntime_fp32_original",
        "onnxruntime fp32 original",
        "onnxruntime",
        "original",
        "fp32",
        ("onnx", "onnxruntime"),
        _plain(onnxruntime_runner, None),
    ),
    Variant(
        "onnxruntime_fp32_deploy",
        "onnxruntime fp32 deploy",
        "onnxruntime",
        "deploy",
        "fp32",
        ("onnx", "onnxruntime"),
        _plain(onnxruntime_runner, "onnx"),
    ),
    Variant(
        REFERENCE, "OpenVINO f32 original", "openvino", "original", "f32", ("openvino",), _plain(openvino_runner, None)
    ),
    Variant(
        "openvino_f32_deploy",
        "OpenVINO f32 deploy",
        "openvino",
        "deploy",
        "f32",
        ("openvino",),
        _plain(openvino_runner, "openvino"),
    ),
    Variant(
        "openvino_default_hint_deploy",
        "OpenVINO default hint deploy",
        "openvino",
        "deploy",
        "default hint",
        ("openvino",),
        openvino_default_hint,
    ),
    Variant(
        "openvino_int8",
        "OpenVINO int8 (nafnet-edge)",
        "openvino",
        "deploy",
        "int8",
        ("openvino", "nncf"),
        nafnet_edge_int8("openvino"),
    ),
    Variant(
        "xnnpack_fp32_original",
        "XNNPACK fp32 original",
        "xnnpack",
        "original",
        "fp32",
        ("executorch",),
        _plain(xnnpack_runner, None),
    ),
    Variant(
        "xnnpack_fp32_deploy",
        "XNNPACK fp32 deploy",
        "xnnpack",
        "deploy",
        "fp32",
        ("executorch",),
        _plain(xnnpack_runner, "xnnpack"),
    ),
    Variant(
        "xnnpack_int8",
        "XNNPACK int8 (nafnet-edge)",
        "xnnpack",
        "deploy",
        "int8",
        ("executorch", "torchao"),
        nafnet_edge_int8("executorch"),
    ),
]
BY_KEY = {v.key: v for v in VARIANTS}
FRAME_VARIANTS = ["pytorch_eager", REFERENCE, "openvino_int8", "xnnpack_fp32_original", "xnnpack_int8"]
RUNTIMES = sorted({v.runtime for v in VARIANTS})
COLORS = {"pytorch": "#7f7f7f", "onnxruntime": "#9467bd", "openvino": "#1f77b4", "xnnpack": "#ff7f0e"}
RUNTIME_NAMES = {
    "pytorch": "PyTorch",
    "onnxruntime": "onnxruntime",
    "openvino": "OpenVINO",
    "xnnpack": "ExecuTorch XNNPACK",
}

_STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:6.0f}s] {message}", file=sys.stderr, flush=True)


def missing(variant: Variant) -> str | None:
    for module in variant.needs:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'nafnet-edge[{EXTRAS[module]}]')"
    return None


def build_variants(
    keys: list[str], model: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace, where: str, out: dict
) -> tuple[dict[str, Runner], dict[str, dict[str, Any]]]:
    """Builds the variants that can be built; the others go to ``out["skipped"]`` with the reason."""
    runners: dict[str, Runner] = {}
    infos: dict[str, dict[str, Any]] = {}
    for key in keys:
        variant = BY_KEY[key]
        if variant.runtime in args.skip:
            continue
        reason = missing(variant)
        if reason is None:
            log(f"{where}: building {variant.label} ...")
            started = time.perf_counter()
            try:
                runners[key], infos[key] = variant.build(model, x, out["keep"])
                infos[key]["build_s"] = round(time.perf_counter() - started, 1)
                continue
            except Exception as e:  # a backend that cannot build here: report it, keep the rest of the run
                traceback.print_exc(file=sys.stderr)
                reason = f"failed to build: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log(f"{where}: skipping {variant.label}: {reason}")
        out["skipped"].append({"where": where, "variant": key, "label": variant.label, "reason": reason})
    return runners, infos


def as_array(out: Any) -> np.ndarray:
    if isinstance(out, list | tuple):
        out = out[0]
    if isinstance(out, torch.Tensor):
        return out.detach().numpy()
    return np.asarray(out, dtype=np.float32)


def psnr_or_none(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB (data range 1), None for identical outputs (JSON has no infinity)."""
    db = psnr(a, b)
    return None if math.isinf(db) else db


def run_shape(shape: str, args: argparse.Namespace, out: dict) -> None:
    """The --size table of one shape: every variant in the same interleaved rounds."""
    size = args.size
    model = random_release_shape(shape)
    x = torch.rand(1, 3, size, size)
    a = x.numpy()
    macs = count_macs(model.config, size, size)
    where = f"{shape} {size}x{size}"
    runners, infos = build_variants([v.key for v in VARIANTS], model, x, args, where, out)
    log(f"{where}: warm-up, then {args.runs} interleaved rounds of {len(runners)} variants")
    outputs = {k: as_array(run(a)) for k, run in runners.items()}  # the warm-up
    reference_out = outputs.get("pytorch_eager")
    times: dict[str, list[float]] = {k: [] for k in runners}
    out["peak"] = time_interleaved(runners, a, args.runs, times, out["peak"])
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med.get(REFERENCE)
    for key in runners:
        variant, info = BY_KEY[key], infos[key]
        stats = LatencyStats.from_ms(times[key])
        drift = psnr_or_none(outputs[key], reference_out) if reference_out is not None else None
        out["rows"].append(
            {
                "shape": shape,
                "size": [size, size],
                "variant": key,
                "label": info.pop("label", variant.label),
                "runtime": variant.runtime,
                "graph": variant.graph,
                "precision": info.pop("precision", variant.precision),
                "median_ms": med[key],
                "ms_runs": times[key],
                "stats_ms": dataclasses.asdict(stats),
                "vs_openvino_f32": med[key] / ref if ref else None,
                "macs": macs,
                "gflops_per_s": 2 * macs / (med[key] / 1e3) / 1e9,
                "psnr_vs_pytorch_db": drift,
                "max_abs_diff_vs_pytorch": (
                    float(np.abs(outputs[key] - reference_out).max()) if reference_out is not None else None
                ),
                "info": info,
            }
        )
    for runtime, precision in (("onnxruntime", "fp32"), ("openvino", "f32"), ("xnnpack", "fp32")):
        original, deployed = med.get(f"{runtime}_{precision}_original"), med.get(f"{runtime}_{precision}_deploy")
        if original and deployed:
            out["deploy_vs_original"].append(
                {
                    "shape": shape,
                    "runtime": runtime,
                    "original_ms": original,
                    "deploy_ms": deployed,
                    "ratio": deployed / original,
                }
            )
    log(f"{where}: " + ", ".join(f"{BY_KEY[k].key} {v:.1f} ms" for k, v in med.items()))


def run_frame(shape: str, args: argparse.Namespace, out: dict) -> None:
    """One full frame per round through fixed-size tiles, for the smaller set of variants."""
    tile = args.frame_tile
    model = random_release_shape(shape)
    x = torch.rand(1, 3, tile, tile)
    frame = args.frame
    where = f"{shape} frame {frame[0]}x{frame[1]} via {tile}px tiles"
    runners, infos = build_variants(FRAME_VARIANTS, model, x, args, where, out)
    for run in runners.values():  # the warm-up: one tile
        run(x.numpy())
    macs_tile = count_macs(model.config, tile, tile)
    seconds: dict[str, list[float]] = {k: [] for k in runners}
    details: dict[str, dict[str, Any]] = {}
    for i in range(args.frame_runs):
        out["peak"] = max(out["peak"], sgemm_gflops(repeats=1))
        for key, run in runners.items():
            log(f"{where}: round {i + 1}/{args.frame_runs}, {BY_KEY[key].label} ...")
            details[key] = full_frame(run, frame, (tile, tile), FRAME_OVERLAP, 3)
            seconds[key].append(details[key]["seconds"])
    med = {k: statistics.median(v) for k, v in seconds.items()}
    ref = med.get(REFERENCE)
    for key in runners:
        variant, info, d = BY_KEY[key], infos[key], details[key]
        info.pop("label", None)
        out["frame_rows"].append(
            {
                "shape": shape,
                "variant": key,
                "label": variant.label,
                "runtime": variant.runtime,
                "graph": variant.graph,
                "precision": info.pop("precision", variant.precision),
                "frame": [d["height"], d["width"]],
                "megapixels": d["megapixels"],
                "tile": d["tile"],
                "overlap": d["overlap"],
                "tiles": d["tiles"],
                "median_s": med[key],
                "seconds_runs": seconds[key],
                "mp_per_s": d["megapixels"] / med[key],
                "vs_openvino_f32": med[key] / ref if ref else None,
                "gflops_per_s": 2 * macs_tile * d["tiles"] / med[key] / 1e9,
                "info": info,
            }
        )
    log(f"{where}: " + ", ".join(f"{k} {v:.1f} s" for k, v in med.items()))


# --- output ---------------------------------------------------------------------------------------------------


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def machine_line(result: dict) -> str:
    m = result["machine"]
    load = m.get("loadavg_start")
    load_text = f", load avg {load[0]:.1f} at start" if load else ""
    return (
        f"{m['cpu']}, {m['cores']} cores, sgemm {result['sgemm_gflops']:.0f} GFLOP/s fp32 (best probe of the run), "
        f"{result['date'][:10]}{load_text}"
    )


def format_tables(result: dict) -> str:
    s = result["settings"]
    peak = result["sgemm_gflops"]
    lines = [f"machine: {machine_line(result)}", ""]
    lines.append(
        f"{s['size']}x{s['size']}, random weights, {s['runs']} interleaved rounds after one warm-up, medians; "
        "ratio = median / OpenVINO f32 original of the same shape (below 1 is faster)"
    )
    header = (
        f"{'shape':<15}{'variant':<36}{'median ms':>10}{'min':>9}{'max':>9}{'x OV f32':>10}"
        f"{'GFLOP/s':>9}{'% sgemm':>9}{'PSNR vs eager':>15}"
    )
    lines += [header, "-" * len(header)]
    for row in result["rows"]:
        st = row["stats_ms"]
        p = row["psnr_vs_pytorch_db"]
        lines.append(
            f"{row['shape']:<15}{row['label']:<36}{row['median_ms']:>10.1f}{st['min']:>9.1f}{max(st['runs']):>9.1f}"
            f"{_ratio(row['vs_openvino_f32']):>10}{row['gflops_per_s']:>9.1f}{100 * row['gflops_per_s'] / peak:>8.0f}%"
            f"{('exact' if p is None else f'{p:.1f} dB'):>15}"
        )
    lines.append("(random weights: the PSNR column only shows which variants round differently, not their quality)")
    if result["deploy_vs_original"]:
        lines += ["", "deploy graph / original graph, fp32, same runtime and rounds:"]
        for d in result["deploy_vs_original"]:
            lines.append(
                f"  {d['shape']:<15}{RUNTIME_NAMES[d['runtime']]:<20}{d['original_ms']:>8.1f} -> "
                f"{d['deploy_ms']:>7.1f} ms ({d['ratio']:.2f}x)"
            )
    if result["frame_rows"]:
        first = result["frame_rows"][0]
        lines += [
            "",
            f"full frame {first['frame'][0]}x{first['frame'][1]} ({first['megapixels']:.1f} MP) through "
            f"{first['tile']}px tiles, overlap {first['overlap']} ({first['tiles']} tiles), "
            f"median of {s['frame_runs']} frame(s), variants built at the tile size",
        ]
        header = f"{'shape':<15}{'variant':<36}{'s/frame':>10}{'MP/s':>9}{'x OV f32':>10}{'GFLOP/s':>9}"
        lines += [header, "-" * len(header)]
        for row in result["frame_rows"]:
            lines.append(
                f"{row['shape']:<15}{row['label']:<36}{row['median_s']:>10.2f}{row['mp_per_s']:>9.3f}"
                f"{_ratio(row['vs_openvino_f32']):>10}{row['gflops_per_s']:>9.1f}"
            )
    for skipped in result["skipped"]:
        lines.append(f"skipped {skipped['label']} ({skipped['where']}): {skipped['reason']}")
    return "\n".join(lines)


def write_png(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    s = result["settings"]
    panels: list[tuple[str, list[dict], str, str]] = []
    for shape in s["shapes"]:
        rows = [r for r in result["rows"] if r["shape"] == shape]
        if rows:
            title = f"{shape}, {s['size']}x{s['size']}: median ms of {s['runs']} interleaved run(s)"
            panels.append((title, rows, "median_ms", "ms"))
    for shape in dict.fromkeys(r["shape"] for r in result["frame_rows"]):
        rows = [r for r in result["frame_rows"] if r["shape"] == shape]
        h, w = rows[0]["frame"]
        title = f"{shape}, {rows[0]['megapixels']:.1f} MP frame ({h}x{w}) in {rows[0]['tile']}px tiles, s/frame"
        panels.append((title, rows, "median_s", "s"))
    if not panels:
        return
    heights = [len(rows) * 0.42 + 1.0 for _, rows, _, _ in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(11, sum(heights) + 0.9), gridspec_kw={"height_ratios": heights}, squeeze=False
    )
    for ax, (title, rows, field, unit) in zip(axes[:, 0], panels, strict=True):
        values = [r[field] for r in rows]
        # an outlier (PyTorch eager on a loaded machine can be 50x) would flatten the others: cut the axis there
        cut = 3 * statistics.median(values)
        cut = cut if max(values) > cut * 1.15 else max(values)
        shown = [min(v, cut) for v in values]
        bars = ax.barh(range(len(rows)), shown, color=[COLORS[r["runtime"]] for r in rows], height=0.7)
        for bar, row in zip(bars, rows, strict=True):
            if row["graph"] == "original" and row["runtime"] != "pytorch":
                bar.set_alpha(0.55)
            if row["precision"] == "int8":
                bar.set_hatch("//")
                bar.set_edgecolor("white")
            if row["variant"] == REFERENCE:
                bar.set_edgecolor("black")
                bar.set_linewidth(1.5)
        for i, row in enumerate(rows):
            value = row[field]
            text = f"{value:.0f} ms" if unit == "ms" else f"{value:.1f} s, {row['mp_per_s']:.3g} MP/s"
            text = ("axis cut: " if value > cut else "") + text + f"   {_ratio(row['vs_openvino_f32'])}"
            weight = "bold" if row["variant"] == REFERENCE else "normal"
            ax.text(shown[i] + cut * 0.01, i, text, va="center", fontsize=8.5, fontweight=weight)
        ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=9)
        ax.invert_yaxis()
        ax.set_xlim(0, cut * 1.6)
        ax.set_xlabel(unit, fontsize=8, loc="right")
        ax.set_title(title, fontsize=10, loc="left")
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    legend = [Patch(color=COLORS[r], label=name) for r, name in RUNTIME_NAMES.items()]
    legend += [Patch(facecolor="#bbbbbb", alpha=0.55, label="original graph (lighter)")]
    legend += [Patch(facecolor="#bbbbbb", hatch="//", edgecolor="white", label="int8")]
    legend += [Patch(facecolor="white", edgecolor="black", label="reference (1.00x)")]
    fig.legend(handles=legend, loc="lower center", ncol=7, fontsize=8, frameon=False)
    fig.suptitle(
        "nafnet-edge headline: lower is better; ratio = time / OpenVINO f32 original, same run\n"
        + machine_line(result),
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def frame_arg(text: str) -> tuple[int, int] | None:
    return None if text.lower() == "none" else parse_frame(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="interleaved timed rounds per shape (after one warm-up)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--shapes", nargs="+", default=["SIDD-width32", "GoPro-width32"], choices=list(RELEASE_SHAPES))
    ap.add_argument("--skip", nargs="*", default=[], choices=RUNTIMES, help="runtimes to leave out")
    ap.add_argument("--frame", type=frame_arg, default="12MP", metavar="12MP|HxW|none", help="full frame size")
    ap.add_argument("--frame-tile", type=int, default=512, help="tile the full-frame variants are built at")
    ap.add_argument("--frame-runs", type=int, default=1, help="full frames per variant (median)")
    ap.add_argument(
        "--frame-shapes", nargs="+", choices=list(RELEASE_SHAPES), help="shapes for the full frame (the first one)"
    )
    ap.add_argument("--frame-only", action="store_true", help="only the full frame (no 256x256 table)")
    ap.add_argument("--json", type=Path, default=RESULTS / "headline.json")
    ap.add_argument("--png", type=Path, default=RESULTS / "headline.png")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    frame_shapes = (args.frame_shapes or args.shapes[:1]) if args.frame else []
    log("probing the machine (sgemm)")
    result: dict[str, Any] = {
        "script": "benchmarks/headline.py",
        "command": " ".join(["python", "benchmarks/headline.py", *sys.argv[1:]]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {**machine(), "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "versions": versions(),
        "settings": {
            "runs": args.runs,
            "warmup": 1,
            "size": args.size,
            "shapes": args.shapes,
            "skip": args.skip,
            "frame": list(args.frame) if args.frame else None,
            "frame_tile": args.frame_tile,
            "frame_overlap": FRAME_OVERLAP,
            "frame_runs": args.frame_runs,
            "frame_shapes": frame_shapes,
            "frame_only": args.frame_only,
            "weights": "random (speed only)",
            "reference": REFERENCE,
        },
        "rows": [],
        "deploy_vs_original": [],
        "frame_rows": [],
        "skipped": [],
    }
    state = {**result, "peak": result["machine"]["sgemm_gflops"], "keep": []}
    for shape in [] if args.frame_only else args.shapes:
        run_shape(shape, args, state)
        gc.collect()
    for shape in frame_shapes:
        run_frame(shape, args, state)
        gc.collect()
    result["sgemm_gflops"] = state["peak"]
    result["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["elapsed_s"] = round(time.perf_counter() - _STARTED, 1)
    for row in result["rows"] + result["frame_rows"]:
        row["sgemm_fraction"] = row["gflops_per_s"] / state["peak"]
    print(format_tables(result), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.json}")
    try:
        write_png(result, args.png)
        log(f"wrote {args.png}")
    except ImportError as e:
        log(f"no chart: {e} (pip install matplotlib)")
    log(f"done in {result['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
