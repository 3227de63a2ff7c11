"""``nafnet-edge validate``: re-validate an artifact directory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from nafnet_edge.cli.common import EPILOG, Parents, load_model
from nafnet_edge.cli.convert import print_result, result_json, validation_settings
from nafnet_edge.errors import (
    UsageError,
)
from nafnet_edge.manifest import Manifest


def cmd_validate(args: argparse.Namespace) -> int:
    from nafnet_edge.atomic import output_lock
    from nafnet_edge.manifest import read_manifest

    if not args.directory.is_dir():
        read_manifest(args.directory)  # its one-line "not an artifact directory" error, before any lock file
    with output_lock(args.directory.resolve()):  # convert's lock: a concurrent convert --force is refused
        return _validate_locked(args)


def _validate_locked(args: argparse.Namespace) -> int:
    from nafnet_edge.conversion import ConvertResult, validate_directory
    from nafnet_edge.errors import EXIT_BUDGET
    from nafnet_edge.manifest import read_manifest
    from nafnet_edge.validation import DEFAULT_OVERLAP_PX

    manifest = read_manifest(args.directory)
    tile = manifest.io.input_size
    if args.overlap is None:  # the overlap the artifact was validated with when it was converted
        recorded_overlap = manifest.tiling.overlap_px
        args.overlap = recorded_overlap if recorded_overlap < min(tile) else DEFAULT_OVERLAP_PX
    if args.overlap >= min(tile):
        raise UsageError(f"--overlap {args.overlap} must be smaller than the artifact's {tile[0]}x{tile[1]} tile")
    checkpoint = args.checkpoint
    if checkpoint is None and not manifest.source.embedded_default:
        recorded = manifest.source.path
        if not recorded or not Path(recorded).is_file():
            raise UsageError(f"the source checkpoint is not at {recorded!r} any more: pass --checkpoint CKPT")
        checkpoint = recorded
    _recorded_reference_defaults(args, manifest)
    loaded = load_model(args, checkpoint)
    settings = validation_settings(args, loaded.config.img_channels)
    manifest, report = validate_directory(args.directory, loaded, settings)
    result = ConvertResult(manifest.target, Path(args.directory), manifest)
    if args.json:
        print(json.dumps(result_json(result), indent=2))
    else:
        print_result(result)
    return 0 if report.passed else EXIT_BUDGET


def _recorded_reference_defaults(args: argparse.Namespace, manifest: Manifest) -> None:
    """Validate against the reference convert used: the class, TLC training size, checkpoint entry and device the
    manifest records fill in the flags not given. A flag given with another value wins, and a note says so."""
    import torch

    reference = manifest.reference
    recorded: dict[str, Any] = {
        "arch": reference.arch,
        "train_size": reference.train_size,
        "param_key": reference.param_key,
        "device": reference.device,
    }
    given = {
        "arch": args.arch,
        "train_size": args.train_size,
        "param_key": None if args.param_key == "auto" else args.param_key,
        "device": None if args.reference_device == "auto" else args.reference_device,
    }
    flags = {"arch": "--arch", "train_size": "--train-size", "param_key": "--param-key", "device": "--reference-device"}

    def shown(value: Any) -> str:
        return f"{value[0]}x{value[1]}" if isinstance(value, tuple) else str(value)

    for key, flag in flags.items():
        if given[key] is not None and recorded[key] is not None and given[key] != recorded[key]:
            print(
                f"nafnet-edge: note: {flag} {shown(given[key])} differs from the manifest's reference "
                f"({shown(recorded[key])}); validating with {flag} {shown(given[key])}",
                file=sys.stderr,
            )
    args.arch = args.arch or recorded["arch"]
    if args.train_size is None and args.arch == "nafnet-local":
        args.train_size = recorded["train_size"]
    if given["param_key"] is None and recorded["param_key"] is not None:
        args.param_key = recorded["param_key"]
    if given["device"] is None and recorded["device"] is not None:
        if recorded["device"] == "cuda" and not torch.cuda.is_available():
            print(
                "nafnet-edge: note: the manifest's reference ran on cuda; no CUDA device here, so it runs on cpu",
                file=sys.stderr,
            )
        else:
            args.reference_device = recorded["device"]


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
    p.add_argument("directory", type=Path, metavar="ARTIFACT_DIR", help="OUT/<target> written by convert")
    p.add_argument("--checkpoint", dest="checkpoint", metavar="CKPT", help="source checkpoint (default: recorded)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the metrics")
    p.set_defaults(func=cmd_validate)
