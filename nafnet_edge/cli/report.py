"""``nafnet-edge report``: one HTML page for a convert output."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from nafnet_edge.cli.common import EPILOG, MAX_LISTED, Parents, bounded, non_negative_int
from nafnet_edge.errors import (
    printable,
)


def cmd_report(args: argparse.Namespace) -> int:
    from nafnet_edge.reporting import write_report

    path = write_report(
        args.directory,
        args.output,
        images=args.images,
        data=args.data,
        checkpoint=args.checkpoint,
        progress=lambda text: print(printable(text), file=sys.stderr),
    )
    from nafnet_edge.errors import display_path

    print(f"wrote {display_path(path)} ({path.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    return 0


def add_parser(sub: Any, parents: Parents) -> None:
    p = sub.add_parser(
        "report",
        help="one self-contained HTML page for a convert output directory: table, charts, image differences",
        description="Write a single HTML file (no external resources) for a directory written by convert, or one "
        "OUT/<target>: one row per artifact (target, precision, runtime, size, fidelity, drift, latency and "
        "throughput from bench.json), charts of latency and of quality against latency, and for a few validation "
        "images the input, the fp32 reference, each artifact's output in its runtime and the amplified difference.",
        epilog=EPILOG,
    )
    p.add_argument("directory", type=Path, metavar="DIR", help="OUT (or OUT/<target>) written by convert")
    p.add_argument("-o", "--output", type=Path, metavar="HTML", help="the page to write (DIR/report.html)")
    p.add_argument(
        "--images",
        type=bounded(non_negative_int, MAX_LISTED),
        default=3,
        metavar="N",
        help="validation images to crop, 0 = none (3)",
    )
    p.add_argument("--data", type=Path, metavar="DIR", help="your images to crop (default: shipped Kodak + noise)")
    p.add_argument("--checkpoint", metavar="CKPT", help="source checkpoint for the reference (default: recorded)")
    p.set_defaults(func=cmd_report)
