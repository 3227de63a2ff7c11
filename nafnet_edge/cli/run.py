"""``nafnet-edge run``: restore images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from nafnet_edge.cli.common import BATCH, EPILOG, SIDE_OR_ZERO, Parents, load_model
from nafnet_edge.errors import (
    UsageError,
)


def _expand_inputs(paths: list[str]) -> list[Path]:
    from nafnet_edge.errors import ImageError
    from nafnet_edge.images import is_image_path

    files: list[Path] = []
    for text in paths:
        p = Path(text)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and is_image_path(f))
            if not found:
                raise ImageError(f"{p} contains no PNG, JPEG or TIFF images")
            files += found
        elif not p.exists():
            raise ImageError(f"input not found: {p}")
        else:
            files.append(p)
    return files


def cmd_run(args: argparse.Namespace) -> int:
    from nafnet_edge.images import is_image_path

    inputs = list(args.inputs)
    checkpoint = None
    first = Path(inputs[0])
    if not is_image_path(first) and not first.is_dir():
        checkpoint = inputs.pop(0)
    if not inputs:
        raise UsageError("no input images: give images or folders after the checkpoint")
    if args.tile and args.overlap >= args.tile:
        raise UsageError(f"--overlap ({args.overlap}) must be smaller than --tile ({args.tile})")
    files = _expand_inputs(inputs)
    return _run_files(args, checkpoint, files)


def _run_files(args: argparse.Namespace, checkpoint: str | None, files: list[Path]) -> int:
    from tqdm import tqdm

    from nafnet_edge.errors import ImageError, display_path
    from nafnet_edge.images import check_image_file, output_suffix, read_image, write_image
    from nafnet_edge.inference import check_restore_memory, resolve_device, restore_image, tile_count

    targets = [args.output / (f.stem + output_suffix(f, args.format)) for f in files]
    seen: dict[Path, Path] = {}
    for src, dst in zip(files, targets, strict=True):
        if dst in seen:
            raise ImageError(f"{seen[dst]} and {src} would both be written to {dst}; restore them separately")
        if dst.resolve() == src.resolve():
            raise ImageError(f"the output {dst} would overwrite its input; choose another --output folder")
        seen[dst] = src
    # Every input is checked (header and structure, nothing decoded) against what reading it and writing it in the
    # chosen format accept before the model loads, then against the model's channels and the memory its pass
    # needs: a bad file is reported at once, in one line, and before any output of the batch is written.
    probes = [check_image_file(src, write_as=dst.suffix) for src, dst in zip(files, targets, strict=True)]
    device = resolve_device(args.device)
    loaded = load_model(args, checkpoint, device=str(device))
    model_channels = loaded.config.img_channels
    for src, probe in zip(files, probes, strict=True):
        if probe.channels != model_channels and not (probe.channels == 1 and model_channels == 3):
            raise ImageError(
                f"{src}: this checkpoint restores {model_channels}-channel images and the input has "
                f"{probe.channels}; convert the input to grayscale first"
            )
        check_restore_memory(
            loaded.model,
            probe.height,
            probe.width,
            tile_px=args.tile,
            overlap_px=args.overlap,
            batch=args.batch,
            name=str(src),
            channels=probe.channels,
            alpha=probe.has_alpha,
            bit_depth=probe.bit_depth,
        )
    cfg = loaded.config
    name = (
        loaded.release.name
        if loaded.release
        else ("embedded default" if loaded.is_default else display_path(loaded.path.name))
    )
    print(
        f"model: {name} ({'NAFNetLocal' if cfg.arch == 'nafnet-local' else 'NAFNet'}, width {cfg.width}) on {device}; "
        f"tile {args.tile or 'off'}, overlap {args.overlap if args.tile else '-'}",
        file=sys.stderr,
    )
    for src, dst in tqdm(list(zip(files, targets, strict=True)), desc="images", unit="img", disable=None):
        image = read_image(src)
        n = tile_count(
            image.height, image.width, tile_px=args.tile, overlap_px=args.overlap, pad_multiple=cfg.pad_multiple
        )
        label = display_path(src.name)
        with tqdm(total=n, desc=label, unit="tile", leave=False, disable=None if n > 1 else True) as bar:
            result = restore_image(
                loaded.model, image, tile_px=args.tile, overlap_px=args.overlap, batch=args.batch, on_tile=bar.update
            )
        write_image(dst, result)
    print(f"wrote {len(files)} image(s) to {display_path(args.output)}", file=sys.stderr)
    return 0


def add_parser(sub: Any, parents: Parents) -> None:
    ckpt = parents.ckpt
    p = sub.add_parser(
        "run",
        parents=[ckpt],
        help="restore images at full resolution with the fp32 PyTorch reference",
        description="Restore images with a checkpoint (the embedded default when the first argument is an "
        "image or a folder). Large images are processed in overlapping tiles blended with a smooth window.",
        epilog=EPILOG,
    )
    p.add_argument("inputs", nargs="+", metavar="[CKPT] INPUT", help="optional checkpoint, then images or folders")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR", help="folder for the results")
    p.add_argument("--tile", type=SIDE_OR_ZERO, default=512, metavar="PX", help="tile size, 0 = whole image (512)")
    p.add_argument("--overlap", type=SIDE_OR_ZERO, default=64, metavar="PX", help="tile overlap (64)")
    p.add_argument("--batch", type=BATCH, default=1, metavar="N", help="tiles per forward pass (1)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = CUDA when present")
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "png", "tiff", "jpg"],
        help="output format (auto: TIFF for TIFF inputs, else PNG); bit depth follows the input",
    )
    p.set_defaults(func=cmd_run)
