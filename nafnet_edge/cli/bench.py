"""``nafnet-edge bench``: latency, memory and profile of artifacts."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from nafnet_edge import defaults
from nafnet_edge.api import FRAME_BYTES_PER_PIXEL as FRAME_BYTES_PER_PIXEL  # nafnet_edge.cli re-exports it
from nafnet_edge.cli import common
from nafnet_edge.cli.common import (
    EPILOG,
    ITERS,
    MAX_FRAME_PIXELS,
    MAX_FRAME_SIDE_PX,
    MAX_ITERS,
    MAX_LISTED,
    SIDE_OR_ZERO,
    TIME_S,
    Parents,
    add_target_options,
    bounded,
    deprecated_alias,
    non_negative_int,
    positive_float,
    positive_int,
    target_options,
    titles,
)
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


def runtime_options(args: argparse.Namespace) -> dict[str, Any]:
    """The targets' runtime options given to ``bench`` (``--compute-units``, ...), by destination."""
    given = vars(args)
    return {option.dest: given[option.dest] for option, _ in target_options("bench") if option.dest in given}


def cmd_bench(args: argparse.Namespace) -> int:
    from nafnet_edge import api
    from nafnet_edge.benchmark import format_table
    from nafnet_edge.errors import EXIT_BUDGET

    report = api.bench(
        *args.directories,
        runs=args.runs,
        time=args.time_s,
        warmup=args.warmup,
        threads=args.threads,
        profile=not args.no_profile,
        top=args.top,
        frame=args.frame,
        overlap=args.bench_overlap,
        baseline=not args.no_baseline,
        checkpoint=args.checkpoint,
        save=args.save,
        options=runtime_options(args),
    )
    over = [
        f"{r.name}: median {r.median_ms:.1f} ms > {args.max_latency_ms:g} ms"
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
    p.add_argument(
        "directories",
        nargs="+",
        type=Path,
        metavar="ARTIFACT_DIR",
        help="an artifact directory (OUT/<target>-<precision>) or a folder holding them",
    )
    runs = p.add_mutually_exclusive_group()
    runs.add_argument(
        "--runs",
        type=ITERS,
        default=defaults.BENCH_RUNS,
        metavar="N",
        help="timed runs per artifact (default: %(default)s)",
    )
    runs.add_argument(
        "--time",
        dest="time_s",
        type=TIME_S,
        metavar="S",
        help="time each artifact for about S seconds (at least 3 runs) instead of a fixed --runs",
    )
    deprecated_alias(runs, "--iters", "--runs", dest="runs", type=ITERS, metavar="N")
    p.add_argument(
        "--warmup",
        type=bounded(non_negative_int, MAX_ITERS),
        default=defaults.BENCH_WARMUP,
        metavar="N",
        help="untimed runs first (default: %(default)s)",
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
        "--overlap",
        dest="bench_overlap",
        type=SIDE_OR_ZERO,
        default=defaults.BENCH_OVERLAP_PX,
        metavar="PX",
        help="tile overlap of the --frame run (default: %(default)s)",
    )
    p.add_argument(
        "--top",
        type=bounded(positive_int, MAX_LISTED),
        default=defaults.BENCH_TOP,
        metavar="N",
        help="operators listed per profile (default: %(default)s)",
    )
    p.add_argument("--no-profile", action="store_true", help="skip the per-operator profile")
    p.add_argument("--no-baseline", action="store_true", help="skip the PyTorch fp32 baseline")
    p.add_argument("--checkpoint", metavar="CKPT", help="source checkpoint for the baseline (default: recorded)")
    p.add_argument("--save", action="store_true", help="write bench.json into each artifact directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_target_options(p, "bench")
    p.set_defaults(func=cmd_bench)
