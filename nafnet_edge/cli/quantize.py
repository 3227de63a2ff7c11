"""``nafnet-edge quantize``: int8 artifacts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nafnet_edge.cli.common import EPILOG, Parents, add_target_options
from nafnet_edge.cli.convert import cmd_convert
from nafnet_edge.sizes import parse_size


def cmd_quantize(args: argparse.Namespace) -> int:
    args.precision = "int8"
    return cmd_convert(args)


def add_parser(sub: Any, parents: Parents) -> None:
    ckpt = parents.ckpt
    int8 = parents.int8
    validation_only = parents.validation_only
    bench = parents.bench
    int8_names = parents.int8_names
    p = sub.add_parser(
        "quantize",
        parents=[ckpt, int8, validation_only, bench],
        help="int8 artifact by PTQ or quantization-aware fine-tuning, validated like convert",
        description="Quantize the deploy graph for a target's int8 runtime: calibrate (ptq) or fine-tune with "
        "fake quantization (qat, the default) on your images, distilling from the fp32 model (or against "
        "--pairs ground truth), export, and validate in the runtime. Runs data-parallel under torchrun.",
        epilog=EPILOG,
    )
    p.add_argument("checkpoint", nargs="?", metavar="CKPT", help="checkpoint file (default: the embedded model)")
    p.add_argument("--target", required=True, choices=int8_names, help="int8 runtime")
    p.add_argument("--data", dest="train_data", required=True, type=Path, metavar="DIR", help="training images")
    p.add_argument("--pairs", dest="train_pairs", type=Path, metavar="CLEAN", help="ground truth for --data")
    p.add_argument(
        "-o",
        "--out",
        "--output",
        dest="output",
        type=Path,
        default=Path("artifacts"),
        metavar="OUT",
        help="(./artifacts)",
    )
    p.add_argument("--input-size", type=parse_size, default=(256, 256), metavar="PX", help="tile and crop (256)")
    p.add_argument("--force", action="store_true", help="replace OUT/<target> when it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_target_options(p, "quantize")
    p.set_defaults(func=cmd_quantize, no_validate=False)
