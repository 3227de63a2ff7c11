"""``nafnet-edge bench``: latency, memory and profile of artifacts."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from nafnet_edge.cli import common
from nafnet_edge.cli.common import (
    EPILOG,
    ITERS,
    MAX_FRAME_PIXELS,
    MAX_FRAME_SIDE_PX,
    MAX_ITERS,
    MAX_LISTED,
    SIDE_OR_ZERO,
    Parents,
    add_target_options,
    bounded,
    non_negative_int,
    positive_float,
    positive_int,
    target_options,
    titles,
)
from nafnet_edge.errors import (
    UsageError,
)
from nafnet_edge.manifest import Manifest
from nafnet_edge.sizes import parse_size


def parse_frame(text: str) -> tuple[int, int]:
    """'12MP' -> a 4:3 frame of about 12 megapixels (3000x4000); '3000x4000' -> (3000, 4000) as height x width."""
    if text.upper().endswith("MP"):
        try:
            megapixels = float(text[:-2])
        except ValueError:
            megapixels = 0.0
        if not 0 < megapixels <= 200:
            raise argparse.ArgumentTypeError(f"expected megapixels like 12MP (at most 200), got {text!r}")
        height = max(1, round((megapixels * 1e6 * 3 / 4) ** 0.5))
        return height, max(1, round(height * 4 / 3))
    height, width = parse_size(text, max_side=MAX_FRAME_SIDE_PX)
    if height * width > MAX_FRAME_PIXELS:
        raise argparse.ArgumentTypeError(
            f"expected at most {MAX_FRAME_PIXELS / 1e6:.0f} megapixels (the image reader's limit), got {text!r}"
        )
    return height, width


def _baseline_loader(args: argparse.Namespace) -> Any:
    """Loads the source model of a manifest for the PyTorch baseline (None when it cannot be found)."""

    def load(manifest: Manifest) -> Any:
        source = manifest.source
        checkpoint = args.checkpoint
        if checkpoint is None and not source.embedded_default:
            checkpoint = source.path
            if not checkpoint or not Path(checkpoint).is_file():
                return None
        from nafnet_edge.checkpoint import load_checkpoint

        config = source.config
        return load_checkpoint(checkpoint, arch=config["arch"], train_size=tuple(config["train_size"])).model

    return load


def run_bench(args: argparse.Namespace, directories: list[Path], *, save: bool) -> Any:
    """Benchmark ``directories`` with the bench options in ``args``; saves bench.json into each when asked."""
    from nafnet_edge.benchmark import BenchSettings, bench_artifacts
    from nafnet_edge.benchmark import save as save_bench

    settings = BenchSettings(
        iters=args.bench_iters,
        warmup=args.warmup,
        threads=args.threads,
        profile=not args.no_profile,
        top=args.top,
        frame=args.frame,
        overlap_px=args.bench_overlap,
        hints=bench_hints(args),
    )
    loader = None if args.no_baseline else _baseline_loader(args)
    report = bench_artifacts(directories, settings, baseline_model=loader)
    if save:
        save_bench(report)
    return report


def bench_hints(args: argparse.Namespace) -> dict[str, Any]:
    """The targets' runtime options given to ``bench`` (``SessionSettings.hints``): each artifact's target reads its
    own and takes its option's default for the others."""
    given = vars(args)
    return {option.dest: given[option.dest] for option, _ in target_options("bench") if option.dest in given}


def bench_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``bench``'s defaults for the options convert/quantize --bench do not expose."""
    return argparse.Namespace(
        bench_iters=args.bench_iters,
        warmup=3,
        threads=None,
        no_profile=False,
        top=8,
        frame=None,
        bench_overlap=32,
        no_baseline=False,
        checkpoint=args.checkpoint,
    )


# bench --frame holds three float32 copies of an RGB frame (the random input, its padded copy and the output):
# 36 bytes per pixel measured (peak RSS at 6 MP); one more copy for the runtime's own buffers and slack.
FRAME_BYTES_PER_PIXEL = 4 * 3 * 4


def _check_frame_memory(frame: tuple[int, int]) -> None:
    """Refuse (exit 2) a --frame whose buffers do not fit in this machine's memory, naming the largest that does."""
    import torch

    from nafnet_edge.inference import available_memory_bytes

    available = available_memory_bytes(torch.device("cpu"))
    needed = frame[0] * frame[1] * FRAME_BYTES_PER_PIXEL
    if available is not None and needed > available:
        height = int(math.sqrt(available / FRAME_BYTES_PER_PIXEL * 3 / 4))  # the largest 4:3 frame that fits
        raise UsageError(
            f"--frame {frame[0]}x{frame[1]} needs about {needed / 1e9:.1f} GB for the frame, {available / 1e9:.1f} GB "
            f"are available; use --frame {height}x{height * 4 // 3} or smaller"
        )


def cmd_bench(args: argparse.Namespace) -> int:
    from nafnet_edge.benchmark import artifact_directories, format_table
    from nafnet_edge.errors import EXIT_BUDGET

    if args.frame is not None:
        _check_frame_memory(args.frame)
    report = run_bench(args, artifact_directories(args.directories), save=args.save)
    over = [
        f"{r.target} {r.precision}: median {r.median_ms:.1f} ms > {args.max_latency_ms:g} ms"
        for r in report.artifacts
        if args.max_latency_ms is not None and r.median_ms is not None and r.median_ms > args.max_latency_ms
    ]
    if args.json:
        print(json.dumps({**report.to_dict(), "failures": over}, indent=2))
    else:
        print(format_table(report))
    for line in over:
        print(f"nafnet-edge: latency budget missed: {line}", file=sys.stderr)
    return EXIT_BUDGET if over else 0


def add_parser(sub: Any, parents: Parents) -> None:
    targets = parents.targets
    p = sub.add_parser(
        "bench",
        help="latency, throughput, memory and per-operator profile of artifacts in their runtimes",
        description="Run artifact directories written by convert/quantize in their own runtimes on this machine "
        f"({titles(targets, 'and')}) and the "
        "original PyTorch fp32 model as the baseline: load and first-inference time, min/median/mean/p90/p99/std "
        "latency after warm-up, frames/s, peak memory, GFLOP/s against this machine's matmul rate, the top "
        "operators by time. Exit code 3 when a median exceeds --max-latency-ms.",
        epilog=EPILOG,
    )
    p.add_argument("directories", nargs="+", type=Path, metavar="ARTIFACT_DIR", help="OUT/<target> or OUT")
    p.add_argument(
        "--iters", dest="bench_iters", type=ITERS, default=20, metavar="N", help="timed runs per artifact (20)"
    )
    p.add_argument(
        "--warmup", type=bounded(non_negative_int, MAX_ITERS), default=3, metavar="N", help="untimed runs first (3)"
    )
    p.add_argument(
        "--threads",
        type=bounded(positive_int, lambda: common.cpu_count(), "the CPU cores here"),
        metavar="N",
        help="runtime threads (default: the runtime's)",
    )
    p.add_argument(
        "--max-latency-ms", type=positive_float, metavar="MS", help="exit 3 when an artifact's median exceeds MS"
    )
    p.add_argument(
        "--frame",
        type=parse_frame,
        metavar="HxW|12MP",
        help="also run one full frame through the artifact's tile, e.g. 3000x4000 or 12MP (4:3)",
    )
    p.add_argument(
        "--overlap", dest="bench_overlap", type=SIDE_OR_ZERO, default=32, metavar="PX", help="full-frame overlap"
    )
    p.add_argument(
        "--top", type=bounded(positive_int, MAX_LISTED), default=8, metavar="N", help="operators listed per profile (8)"
    )
    p.add_argument("--no-profile", action="store_true", help="skip the per-operator profile")
    p.add_argument("--no-baseline", action="store_true", help="skip the PyTorch fp32 baseline")
    p.add_argument("--checkpoint", metavar="CKPT", help="source checkpoint for the baseline (default: recorded)")
    p.add_argument("--save", action="store_true", help="write bench.json into each artifact directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_target_options(p, "bench")
    p.set_defaults(func=cmd_bench)
