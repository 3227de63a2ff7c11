"""``nafnet-edge report``: one HTML page that says which artifact of a convert output to ship."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from nafnet_edge import defaults
from nafnet_edge.cli.common import EPILOG, MAX_LISTED, Parents, bounded, deprecated_alias, non_negative_int
from nafnet_edge.errors import display_path

IMAGES = bounded(non_negative_int, MAX_LISTED)


def cmd_report(args: argparse.Namespace) -> int:
    from nafnet_edge.api import report

    path = report(
        args.directory, output=args.output, images=args.images, val_data=args.val_data, checkpoint=args.checkpoint
    )
    print(f"wrote {display_path(path)} ({path.stat().st_size / 1e3:.0f} kB)", file=sys.stderr)
    return 0


def add_parser(sub: Any, parents: Parents) -> None:
    p = sub.add_parser(
        "report",
        help="one self-contained HTML page for a convert output directory: what to ship, charts, differences",
        description="Write a single HTML file (no external resources) for a directory written by convert, or one "
        "artifact directory in it: per target the fastest artifact that passed validation and why the others lost, "
        "the precisions of each target side by side, charts of latency and of quality against latency (latency "
        "from bench.json), a table of every artifact, and for a few validation images a zoomed crop where the "
        "artifacts differ most from the fp32 reference, every difference on one printed scale.",
        epilog=EPILOG,
    )
    p.add_argument("directory", type=Path, metavar="DIR", help="OUT (or one OUT/<target>-<precision>) from convert")
    p.add_argument("-o", "--output", type=Path, metavar="HTML", help="the page to write (default: DIR/report.html)")
    p.add_argument(
        "--images",
        type=IMAGES,
        default=defaults.REPORT_IMAGES,
        metavar="N",
        help="validation images to compare, 0 = none (default: %(default)s)",
    )
    p.add_argument(
        "--val-data", type=Path, metavar="DIR", help="validation images to compare on (default: shipped Kodak + noise)"
    )
    deprecated_alias(p, "--data", "--val-data", dest="val_data", type=Path, metavar="DIR")
    p.add_argument("--checkpoint", metavar="CKPT", help="source checkpoint for the reference (default: recorded)")
    p.set_defaults(func=cmd_report)
