"""``nafnet-edge validate``: re-validate an artifact directory (``nafnet_edge.api.validate``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from nafnet_edge.cli.common import EPILOG, Parents, validation_options
from nafnet_edge.cli.convert import print_result, result_json


def cmd_validate(args: argparse.Namespace) -> int:
    from nafnet_edge import api
    from nafnet_edge.errors import EXIT_BUDGET

    result = api.validate(
        args.directory,
        checkpoint=args.checkpoint,
        **validation_options(args, overlap=args.overlap),
        param_key=args.param_key,
        arch=args.arch,
        train_size=args.train_size,
    )
    if args.json:
        print(json.dumps(result_json(result), indent=2))
    else:
        print_result(result)
    return 0 if result.passed else EXIT_BUDGET


def add_parser(sub: Any, parents: Parents) -> None:
    ckpt = parents.ckpt
    validation = parents.validation
    p = sub.add_parser(
        "validate",
        parents=[ckpt, validation],
        help="validate an artifact directory in its runtime against the fp32 reference",
        description="Run an artifact written by convert in its own runtime on validation images and compare it "
        "with fp32 PyTorch outputs of the original model; updates the manifest. Exit code 3 on a missed budget.",
        epilog=EPILOG,
    )
    p.add_argument(
        "directory", type=Path, metavar="ARTIFACT_DIR", help="OUT/<target>-<precision> written by convert or quantize"
    )
    p.add_argument("--checkpoint", dest="checkpoint", metavar="CKPT", help="source checkpoint (default: recorded)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the metrics")
    p.set_defaults(func=cmd_validate)
