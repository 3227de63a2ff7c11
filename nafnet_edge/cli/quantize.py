"""``nafnet-edge quantize``: int8 artifacts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nafnet_edge import defaults
from nafnet_edge.cli.common import (
    CHECKPOINT_HELP,
    EPILOG,
    Parents,
    add_bench_options,
    add_io_options,
    add_target_options,
    deprecated_alias,
)
from nafnet_edge.cli.convert import cmd_convert
from nafnet_edge.errors import UsageError
from nafnet_edge.sizes import parse_size


def cmd_quantize(args: argparse.Namespace) -> int:
    if args.train_data is None:  # not required=True: the deprecated --data also gives it
        raise UsageError("quantize needs images to train on: --train-data DIR")
    args.precision = "int8"
    return cmd_convert(args)


def add_parser(sub: Any, parents: Parents) -> None:
    p = sub.add_parser(
        "quantize",
        parents=[parents.ckpt, parents.int8, parents.validation_only],
        help="int8 artifact by PTQ or quantization-aware fine-tuning, validated like convert",
        description="Quantize the deploy graph for a target's int8 runtime: calibrate (ptq) or fine-tune with "
        "fake quantization (qat, the default) on your images (--train-data), distilling from the fp32 model (or "
        "against --train-pairs ground truth), export, and validate in the runtime. Runs data-parallel under "
        "torchrun.",
        epilog=EPILOG,
    )
    p.add_argument("checkpoint", nargs="?", metavar="CKPT", help=CHECKPOINT_HELP)
    p.add_argument("--target", required=True, choices=parents.int8_names, help="int8 runtime")
    p.add_argument(
        "--train-data", type=Path, metavar="DIR", help="training images: what the app feeds the model (required)"
    )
    deprecated_alias(p, "--data", "--train-data", dest="train_data", type=Path, metavar="DIR")
    p.add_argument(
        "--train-pairs",
        type=Path,
        metavar="CLEAN",
        help="ground truth for --train-data (default: distil from the fp32 model)",
    )
    deprecated_alias(p, "--pairs", "--train-pairs", dest="train_pairs", type=Path, metavar="CLEAN")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=defaults.OUTPUT_DIR,
        metavar="OUT",
        help="parent folder of the artifact, OUT/<target>-int8/ (default: %(default)s)",
    )
    deprecated_alias(p, "--out", "--output", dest="output", type=Path, metavar="OUT")
    p.add_argument(
        "--input-size",
        type=parse_size,
        default=defaults.INPUT_SIZE,
        metavar="PX",
        help="the artifact's fixed input size (its tile) and the training crop (default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="replace OUT/<target>-int8 when it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object: artifacts, metrics, skipped")
    add_io_options(p)
    add_bench_options(p)
    add_target_options(p, "quantize")
    p.set_defaults(func=cmd_quantize, no_validate=False)
