"""``nafnet-edge reparam``: write the deploy graph."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nafnet_edge import defaults
from nafnet_edge.errors import (
    CheckpointError,
    UsageError,
)
from nafnet_edge.sizes import parse_size

if TYPE_CHECKING:
    from nafnet_edge.deploy import NormForm

from nafnet_edge.cli.common import CHECKPOINT_HELP, EPILOG, Parents, kodak_dir, load_model, stream_scale


def cmd_reparam(args: argparse.Namespace) -> int:
    import torch

    from nafnet_edge import api
    from nafnet_edge.deploy import PadCrop, deploy
    from nafnet_edge.deploy.io import save_deploy
    from nafnet_edge.images import read_image

    loaded = load_model(args, args.checkpoint)
    m = loaded.config.pad_multiple
    if args.input_size and (args.input_size[0] % m or args.input_size[1] % m):
        raise UsageError(f"--input-size {args.input_size[0]}x{args.input_size[1]} must be a multiple of {m}")
    api.check_input_sizes(loaded.config, [args.input_size or defaults.INPUT_SIZE])
    norm_form = _reparam_norm_form(args.target)
    graph = deploy(loaded.model, norm_form=norm_form, input_size=args.input_size, stream_scale=args.stream_scale)

    # Check on a real photo: a crop of the input size (or the default input size) from a shipped Kodak image.
    h, w = args.input_size or defaults.INPUT_SIZE
    photo = read_image(sorted(kodak_dir().glob("*.png"))[0]).pixels[:h, :w]
    x = torch.from_numpy(photo.transpose(2, 0, 1).copy())[None]
    x = torch.nn.functional.pad(x, (0, w - x.shape[3], 0, h - x.shape[2]), mode="replicate")  # photo < size
    if loaded.config.img_channels != 3:
        x = x.mean(1, keepdim=True).expand(-1, loaded.config.img_channels, -1, -1)
    with torch.no_grad():
        reference, deployed = loaded.model(x), PadCrop(graph)(x)
    if not torch.isfinite(reference).all():
        raise CheckpointError(
            f"{loaded.path.name}: the model produces non-finite values (NaN or Inf) on a {h}x{w} photo; its weights "
            "overflow float32, so nothing was written: use another checkpoint"
        )
    err = float((deployed - reference).abs().max())
    if not math.isfinite(err):
        raise RuntimeError(f"the deploy graph for {args.target} produces non-finite values where the original does not")
    extra = {"source_sha256": loaded.sha256, "max_abs_error_vs_original": f"{err:.3g}"}
    save_deploy(graph, args.output, extra=extra)
    pooling = "" if args.input_size else "; pooling left shape-dependent (no --input-size)"
    print(
        f"wrote {args.output}: deploy graph for {args.target} ({norm_form} norms; passes: "
        f"{', '.join(graph.recipe.passes)}{pooling}); max abs error vs the original on a {h}x{w} photo: {err:.2e}",
        file=sys.stderr,
    )
    return 0


def _reparam_norm_form(target: str) -> NormForm:
    """The deploy norm form for ``reparam --target``: a registered target's own, or upstream's for generic."""
    from nafnet_edge.converters import target_class

    return "reference" if target == "generic" else target_class(target).norm_form


def add_parser(sub: Any, parents: Parents) -> None:
    ckpt = parents.ckpt
    names = parents.names
    p = sub.add_parser(
        "reparam",
        parents=[ckpt],
        help="rewrite a checkpoint into the exact deploy graph (folded, split, fp16-safe)",
        description="Rewrite a checkpoint into the inference-only deploy graph and check that it computes the "
        "same function on a real photo. .safetensors keeps weights and recipe; .pt2 is a static torch.export "
        "program of --input-size.",
        epilog=EPILOG,
    )
    p.add_argument("checkpoint", nargs="?", metavar="CKPT", help=CHECKPOINT_HELP)
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="OUT.safetensors or OUT.pt2")
    p.add_argument(
        "--target",
        default="generic",
        choices=["generic", *names],
        help="target whose normalization form to use (generic: upstream's reference form; default: %(default)s)",
    )
    p.add_argument(
        "--input-size",
        type=parse_size,
        metavar="PX",
        help="fixed (padded) input size, a multiple of 16; fixes TLC pooling (required for .pt2)",
    )
    p.add_argument(
        "--stream-scale",
        type=stream_scale,
        default=defaults.STREAM_SCALE,
        metavar="S",
        help="power of two (1-64) dividing the residual stream so fp16 norms cannot overflow (default: %(default)s)",
    )
    p.set_defaults(func=cmd_reparam)
