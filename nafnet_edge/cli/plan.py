"""``nafnet-edge plan``: the tile plan of an artifact for a frame size, as data an app can embed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from nafnet_edge.cli.bench import parse_frame
from nafnet_edge.cli.common import EPILOG, SIDE_OR_ZERO, Parents
from nafnet_edge.errors import BadInputError, UsageError, display_path


def cmd_plan(args: argparse.Namespace) -> int:
    from nafnet_edge.cli.run import artifact_directory
    from nafnet_edge.manifest import read_manifest
    from nafnet_edge.tiling import tile_plan

    directory = artifact_directory(args.artifact)
    if directory is None:
        raise BadInputError(
            f"{display_path(args.artifact)} is not an artifact: pass a directory written by nafnet-edge convert "
            "(OUT/<target>-<precision>, with its manifest.json) or the model file in it"
        )
    manifest = read_manifest(directory)
    tiling = manifest.tiling
    overlap = tiling.overlap_px if args.overlap is None else args.overlap
    if overlap >= min(tiling.tile):
        raise UsageError(
            f"--overlap {overlap} must be smaller than the artifact's {tiling.tile[0]}x{tiling.tile[1]} tile"
        )
    plan = tile_plan(
        *args.frame, tile=tiling.tile, overlap_px=overlap, align_px=tiling.align_px, scale=manifest.io.scale
    )
    if args.json:
        data: dict[str, Any] = {
            "artifact": str(directory),
            "target": manifest.target,
            "precision": manifest.precision,
            **plan.to_dict(weights=not args.no_weights),
            "padding": tiling.padding,
            "window": tiling.blend,
        }
        print(json.dumps(data, indent=None if not args.no_weights else 2))
        return 0
    (h, w), (ph, pw), (th, tw) = plan.frame, plan.padded, plan.tile
    rows = [
        ("artifact", f"{display_path(directory)} ({manifest.target} {manifest.precision})"),
        ("frame", f"{h}x{w}" + (f", zero-padded right/bottom to {ph}x{pw}" if (ph, pw) != (h, w) else "")),
        ("tiles", f"{len(plan)} of {th}x{tw} ({len(plan.ys)} rows x {len(plan.xs)} columns), row-major"),
        ("overlap", f"at least {overlap} px; tile starts are multiples of {plan.align_px} px"),
        ("rows at y", ", ".join(map(str, plan.ys))),
        ("cols at x", ", ".join(map(str, plan.xs))),
        ("window", tiling.blend),
    ]
    for name, value in rows:
        print(f"{name:<10} {value}")
    print("(--json prints the plan with every tile's blend weights per axis)")
    return 0


def add_parser(sub: Any, parents: Parents) -> None:
    p = sub.add_parser(
        "plan",
        help="the tile plan of an artifact for a frame size: padding, tile origins, blend weights",
        description="Print how a frame of the given size is restored through an artifact of fixed input size, "
        "exactly as validation and `run` do it: the zero padding, every tile's origin and the blend window, with "
        "--json as data an app can embed (each tile row's and column's weights included).",
        epilog=EPILOG,
    )
    p.add_argument("artifact", type=Path, metavar="ARTIFACT", help="OUT/<target>-<precision>, or the model file in it")
    p.add_argument("--frame", type=parse_frame, required=True, metavar="HxW|12MP", help="frame size, e.g. 3024x4032")
    p.add_argument("--overlap", type=SIDE_OR_ZERO, metavar="PX", help="tile overlap (default: the manifest's)")
    p.add_argument("--json", action="store_true", help="print one JSON object, blend weights included")
    p.add_argument("--no-weights", action="store_true", help="with --json: leave the blend weights out")
    p.set_defaults(func=cmd_plan)
