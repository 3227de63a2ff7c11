"""``nafnet-edge run``: restore images with a checkpoint in PyTorch, or with an artifact in its own runtime."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from nafnet_edge import defaults
from nafnet_edge.cli.common import BATCH, EPILOG, SIDE_OR_ZERO, Parents, deprecated_alias, load_model
from nafnet_edge.errors import BadInputError, UsageError

# Names of the two views of a stereo pair, as Flickr1024 (0001_L.png) and others (scene_left.png) write them.
_STEREO_NAME = re.compile(r"^(?P<base>.+)_(?P<view>l|r|left|right)$", re.IGNORECASE)
_PARTNER = {"l": "r", "r": "l", "left": "right", "right": "left"}


class _Given(argparse.Action):
    """Stores the value like ``store`` and remembers that the option was given (``args.given``): an artifact has
    its own tile size and runtime, so ``--tile`` and ``--device`` are refused for one and ``--overlap`` replaces
    the one it records only when given."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option: Any = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


def _expand_inputs(paths: list[str]) -> list[Path]:
    from nafnet_edge.errors import ImageError
    from nafnet_edge.images import is_image_path

    files: list[Path] = []
    for text in paths:
        p = Path(text)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and is_image_path(f))
            if not found:
                raise ImageError(f"{p} contains no PNG, JPEG or TIFF images" + _artifacts_hint(p))
            files += found
        elif not p.exists():
            raise ImageError(f"input not found: {p}")
        else:
            files.append(p)
    return files


def _artifacts_hint(folder: Path) -> str:
    """When ``folder`` holds artifact directories (``convert -o OUT``), the advice to name one of them."""
    from nafnet_edge.manifest import find_artifacts

    try:
        found = find_artifacts(folder)
    except BadInputError:
        return ""
    names = ", ".join(str(p) for p in found[:3]) + (", ..." if len(found) > 3 else "")
    return f"; it holds artifacts: give one of them first, as the model to run ({names})"


def artifact_directory(path: Path) -> Path | None:
    """The artifact directory ``path`` names, or None when it names none (a checkpoint, an image, a folder of
    images): a directory holding ``manifest.json``, or the artifact ``convert`` wrote inside one (``model.pte``,
    ``model.xml``, ``model.onnx``, ``X.mlpackage``). A file of an artifact kind without the manifest beside it was
    not written by nafnet-edge: refused in one line."""
    from nafnet_edge.converters import target_class, target_names
    from nafnet_edge.errors import display_path
    from nafnet_edge.manifest import MANIFEST_FILE, read_manifest

    if path.is_dir() and os.path.lexists(path / MANIFEST_FILE):
        return path
    kinds = {Path(target_class(name).artifact).suffix.lower() for name in target_names()}
    if path.suffix.lower() not in kinds - {""}:
        return None
    if not path.exists():
        raise BadInputError(f"artifact not found: {display_path(path)}")
    folder = path.parent
    if not os.path.lexists(folder / MANIFEST_FILE):
        raise BadInputError(
            f"{display_path(path)} has no {MANIFEST_FILE} beside it, so nafnet-edge cannot tell how to run it: pass "
            f"the directory nafnet-edge convert wrote it into (OUT/<target>-<precision>, with its {MANIFEST_FILE})"
        )
    manifest = read_manifest(folder)
    if path.name not in manifest.files:
        raise BadInputError(
            f"{display_path(path)} is not the artifact of {display_path(folder)} (its {MANIFEST_FILE} lists "
            f"{', '.join(manifest.files)}): pass the directory {display_path(folder)}"
        )
    return folder


def cmd_run(args: argparse.Namespace) -> int:
    from nafnet_edge.images import is_image_path

    inputs = list(args.inputs)
    checkpoint = None
    first = Path(inputs[0])
    artifact = artifact_directory(first)
    if artifact is not None:
        inputs.pop(0)
    elif not is_image_path(first) and not first.is_dir():
        checkpoint = defaults.shipped_model_path(inputs.pop(0))
    if not inputs:
        model = "artifact" if artifact is not None else "checkpoint"
        raise UsageError(f"no input images: give images or folders after the {model}")
    if artifact is None and args.tile and args.overlap >= args.tile:
        raise UsageError(f"--overlap ({args.overlap}) must be smaller than --tile ({args.tile})")
    if artifact is not None and args.side_by_side:
        raise UsageError("--side-by-side: artifacts restore single images; run a stereo checkpoint (NAFSSR) instead")
    files = _expand_inputs(inputs)
    if artifact is not None:
        return _run_artifact(args, artifact, files)
    return _run_files(args, checkpoint, files)


def stereo_pairs(files: list[Path]) -> list[tuple[Path, Path]]:
    """(left, right) pairs of the stereo views among ``files``, by name: ``NAME_L``/``NAME_R`` (Flickr1024, any
    case) or ``NAME_left``/``NAME_right``, in the same folder. A file whose partner is not among them, or whose
    name says no view, is refused naming what is expected."""
    from nafnet_edge.errors import ImageError, display_path

    views = {}
    for f in files:
        match = _STEREO_NAME.match(f.stem)
        if match is None:
            raise ImageError(
                f"{display_path(f)}: a stereo model restores left/right pairs named NAME_L and NAME_R (or NAME_left "
                "and NAME_right), given together or in one folder; for one image holding both views side by side, "
                "add --side-by-side"
            )
        views[f] = (match["base"], match["view"])
    by_key = {(f.parent, f.stem.lower()): f for f in files}
    pairs = []
    for f, (base, view) in views.items():
        other = _PARTNER[view.lower()]
        other = other.upper() if view.isupper() else other.title() if view.istitle() else other
        partner = by_key.get((f.parent, f"{base}_{other}".lower()))
        if partner is None:
            raise ImageError(
                f"{display_path(f)} is one view of a stereo pair and its partner is not among the inputs: give "
                f"{display_path(f.with_name(f'{base}_{other}{f.suffix}'))} too"
            )
        if view.lower() in ("l", "left"):
            pairs.append((f, partner))
    return pairs


def _outputs(args: argparse.Namespace, files: list[Path]) -> tuple[list[Path], list[Any]]:
    """Where each input goes, and each input's probe (header and structure, nothing decoded) against what reading
    it and writing it in the chosen format accept: a bad file is reported at once, in one line, before anything
    loads and before any output of the batch is written."""
    from nafnet_edge.errors import ImageError
    from nafnet_edge.images import check_image_file, output_suffix

    targets = [args.output / (f.stem + output_suffix(f, args.format)) for f in files]
    seen: dict[Path, Path] = {}
    for src, dst in zip(files, targets, strict=True):
        if dst in seen:
            raise ImageError(f"{seen[dst]} and {src} would both be written to {dst}; restore them separately")
        if dst.resolve() == src.resolve():
            raise ImageError(f"the output {dst} would overwrite its input; choose another --output folder")
        seen[dst] = src
    probes = [check_image_file(src, write_as=dst.suffix) for src, dst in zip(files, targets, strict=True)]
    return targets, probes


def _check_channels(src: Path, probe: Any, model_channels: int, what: str) -> None:
    from nafnet_edge.inference import check_channels

    check_channels(probe.channels, model_channels, f"{src}: {what}")


def _run_files(args: argparse.Namespace, checkpoint: str | None, files: list[Path]) -> int:
    from nafnet_edge import progress
    from nafnet_edge.errors import display_path
    from nafnet_edge.inference import full_width_tiles, resolve_device

    targets, probes = _outputs(args, files)
    # Then against the model's channels, its views and the memory its pass needs: everything before any work.
    device = resolve_device(args.device)
    loaded = load_model(args, checkpoint, device=str(device))
    model, cfg = loaded.model, loaded.config
    name = (
        loaded.release.name
        if loaded.release
        else ("embedded default" if loaded.is_default else display_path(loaded.path.name))
    )
    if args.side_by_side and cfg.views == 1:
        raise UsageError(
            f"--side-by-side: {name} is a single-image model ({cfg.class_name}); the option is for stereo models "
            "(NAFSSR): leave it out"
        )
    for src, probe in zip(files, probes, strict=True):
        _check_channels(src, probe, cfg.img_channels, "this checkpoint")
    pairs: list[tuple[Path, Path]] = []
    if cfg.views == 1:
        for src, probe in zip(files, probes, strict=True):
            _check_memory(args, model, src, probe)
    elif args.side_by_side:
        for src, probe in zip(files, probes, strict=True):
            _check_side_by_side(src, probe)
            _check_memory(args, model, src, probe, width=probe.width // 2)
    else:
        pairs = _checked_pairs(args, model, files, probes)
    scale = f" x{cfg.up_scale}" if cfg.family == "nafnet-sr" else ""
    tiles = "off"
    if args.tile:
        tiles = f"{args.tile} px row bands (full width)" if full_width_tiles(cfg) else str(args.tile)
    progress.phase(
        f"model: {name} ({cfg.class_name}{scale}, width {cfg.width}) on {device}; "
        f"tile {tiles}, overlap {args.overlap if args.tile else '-'}"
    )
    if cfg.views == 1:
        _restore_singles(args, model, files, targets)
    elif args.side_by_side:
        _restore_side_by_side(args, model, files, targets)
    else:
        _restore_pairs(args, model, pairs, dict(zip(files, targets, strict=True)))
    print(f"wrote {len(files)} image(s) to {display_path(args.output)}", file=sys.stderr)
    return 0


def _check_memory(args: argparse.Namespace, model: Any, src: Path, probe: Any, width: int | None = None) -> None:
    from nafnet_edge.inference import check_restore_memory

    check_restore_memory(
        model,
        probe.height,
        probe.width if width is None else width,
        tile_px=args.tile,
        overlap_px=args.overlap,
        batch=args.tile_batch,
        name=str(src),
        channels=probe.channels,
        alpha=probe.has_alpha,
        bit_depth=probe.bit_depth,
    )


def _check_side_by_side(src: Path, probe: Any) -> None:
    from nafnet_edge.errors import ImageError, display_path

    if probe.width % 2:
        raise ImageError(
            f"{display_path(src)} is {probe.width} px wide: a side-by-side stereo image holds two views of equal "
            "width, so its width must be even; crop one column, or leave out --side-by-side for a single image"
        )


def _checked_pairs(
    args: argparse.Namespace, model: Any, files: list[Path], probes: list[Any]
) -> list[tuple[Path, Path]]:
    from nafnet_edge.errors import ImageError, display_path

    probe_of = dict(zip(files, probes, strict=True))
    pairs = stereo_pairs(files)
    for left, right in pairs:
        pl, pr = probe_of[left], probe_of[right]
        if (pl.width, pl.height) != (pr.width, pr.height):
            raise ImageError(
                f"{display_path(left)} is {pl.width}x{pl.height} and {display_path(right)} {pr.width}x{pr.height}: "
                "the views of a stereo pair must have the same size"
            )
        _check_memory(args, model, left, pl)
    return pairs


def _tiles(args: argparse.Namespace, model: Any, height: int, width: int) -> int:
    from nafnet_edge.inference import full_width_tiles, tile_count

    cfg = model.config
    return tile_count(
        height,
        width,
        tile_px=args.tile,
        overlap_px=args.overlap,
        pad_multiple=cfg.pad_multiple,
        full_width=full_width_tiles(cfg),
    )


def _restore_singles(args: argparse.Namespace, model: Any, files: list[Path], targets: list[Path]) -> None:
    from nafnet_edge import progress
    from nafnet_edge.errors import display_path
    from nafnet_edge.images import read_image, write_image
    from nafnet_edge.inference import restore_image

    for src, dst in zip(files, targets, strict=True):
        image = read_image(src)
        n = _tiles(args, model, image.height, image.width)
        with progress.task(display_path(src.name), total=n, unit="tile") as advance:
            result = restore_image(
                model, image, tile_px=args.tile, overlap_px=args.overlap, batch=args.tile_batch, on_tile=advance
            )
        write_image(dst, result)


def _restore_pairs(
    args: argparse.Namespace, model: Any, pairs: list[tuple[Path, Path]], target_of: dict[Path, Path]
) -> None:
    """Stereo pairs given as two files each: every view is written under its own name."""
    from nafnet_edge import progress
    from nafnet_edge.errors import display_path
    from nafnet_edge.images import read_image, write_image
    from nafnet_edge.inference import restore_stereo

    for left, right in pairs:
        views = read_image(left), read_image(right)
        n = _tiles(args, model, views[0].height, views[0].width)
        with progress.task(f"{display_path(left.name)} + {display_path(right.name)}", total=n, unit="tile") as advance:
            results = restore_stereo(
                model, *views, tile_px=args.tile, overlap_px=args.overlap, batch=args.tile_batch, on_tile=advance
            )
        for src, result in zip((left, right), results, strict=True):
            write_image(target_of[src], result)


def _restore_side_by_side(args: argparse.Namespace, model: Any, files: list[Path], targets: list[Path]) -> None:
    """Stereo pairs given as one image each, left view in the left half: written side by side too."""
    from nafnet_edge import progress
    from nafnet_edge.errors import display_path
    from nafnet_edge.images import read_image, write_image
    from nafnet_edge.inference import join_side_by_side, restore_stereo, split_side_by_side

    for src, dst in zip(files, targets, strict=True):
        left, right = split_side_by_side(read_image(src))
        n = _tiles(args, model, left.height, left.width)
        with progress.task(display_path(src.name), total=n, unit="tile") as advance:
            results = restore_stereo(
                model, left, right, tile_px=args.tile, overlap_px=args.overlap, batch=args.tile_batch, on_tile=advance
            )
        write_image(dst, join_side_by_side(*results))


# Peak memory of restoring one image through an artifact besides the runtime's own: frame_peak_bytes (reading and
# writing) plus the tiler's float32 copies per pixel and model channel (the CHW input, its padded copy, the output
# accumulator and its cropped HxWxC copy).
_ARTIFACT_COPIES = 4


def _run_artifact(args: argparse.Namespace, directory: Path, files: list[Path]) -> int:
    from nafnet_edge import progress
    from nafnet_edge.converters import get_target
    from nafnet_edge.converters.base import NotRunnable
    from nafnet_edge.errors import MissingBackendError, display_path
    from nafnet_edge.images import read_image, write_image
    from nafnet_edge.inference import restore_image_with
    from nafnet_edge.manifest import read_manifest
    from nafnet_edge.validation import tile_count

    manifest = read_manifest(directory)
    tile, multiple, channels = manifest.io.input_size, manifest.padding_multiple, manifest.io.channels
    if "+" in manifest.io.input.channels:  # "RGB+RGB": both views of a stereo pair in one tensor
        raise UsageError(
            f"{display_path(directory)} is a stereo artifact ({manifest.io.input.channels}): run restores stereo "
            "pairs with the checkpoint (nafnet-edge run CKPT NAME_L.png NAME_R.png, or --side-by-side); an app "
            "feeds the artifact both views stacked on the channel axis, as its USAGE.md shows"
        )
    overlap = _artifact_overlap(args, manifest)
    targets, probes = _outputs(args, files)
    for src, probe in zip(files, probes, strict=True):
        _check_channels(src, probe, channels, "this artifact")
        _check_pixel_depth(src, probe, directory, manifest.io.kind)
        _check_artifact_memory(src, probe, channels, manifest.io.scale)
    target = get_target(manifest.target)
    target.check_available()
    with progress.backend_output():
        try:
            session = target.open_session(directory, export=manifest.export)
        except NotRunnable as e:
            raise MissingBackendError(f"{display_path(directory)} cannot run on this machine: {e}") from None
    note = session.info.get("note")
    progress.phase(
        f"artifact: {display_path(directory)} ({manifest.target} {manifest.precision}) in {session.runtime}; "
        f"{tile[0]}x{tile[1]} tiles, overlap {overlap}" + (f" ({note})" if isinstance(note, str) and note else "")
    )
    for src, dst in zip(files, targets, strict=True):
        image = read_image(src)
        n = tile_count((image.height, image.width), tile, overlap, multiple)  # the calls restore_image_with makes
        with progress.task(display_path(src.name), total=n, unit="tile") as advance, progress.backend_output():
            result = restore_image_with(
                session.run,
                image,
                channels=channels,
                tile=tile,
                overlap_px=overlap,
                multiple=multiple,
                on_tile=advance,
                scale=manifest.io.scale,
            )
        write_image(dst, result)
    print(f"wrote {len(files)} image(s) to {display_path(args.output)}", file=sys.stderr)
    return 0


def _check_pixel_depth(src: Path, probe: Any, directory: Path, io: str) -> None:
    """Refuse a 16-bit image for an image-I/O artifact (8-bit pixels in and out): it would lose its depth."""
    from nafnet_edge.errors import ImageError, display_path

    if io == "image" and probe.bit_depth != 8:
        raise ImageError(
            f"{display_path(src)} has {probe.bit_depth}-bit samples and {display_path(directory)} takes 8-bit pixels "
            "(image I/O), which would drop the extra precision: convert with --io tensor for 16-bit and HDR frames, "
            "or save the input as 8-bit"
        )


def _artifact_overlap(args: argparse.Namespace, manifest: Any) -> int:
    """The tile overlap for the artifact ``manifest`` describes (``--overlap`` when given, else the one it records),
    refusing what an artifact cannot honour: its tile size and batch were fixed at conversion, its runtime is its
    own."""
    given: set[str] = getattr(args, "given", set())
    tile = manifest.io.input_size
    size = f"{tile[0]}x{tile[1]}"
    if "tile" in given:
        raise UsageError(
            f"--tile: an artifact restores the {size} tiles it was converted for; leave --tile out (or convert "
            "again with another --input-size)"
        )
    if "device" in given:
        raise UsageError("--device: an artifact runs in its own runtime; leave --device out")
    if args.tile_batch != defaults.TILE_BATCH:
        raise UsageError(f"--tile-batch: an artifact runs one {size} tile at a time; leave --tile-batch out")
    overlap = args.overlap if "overlap" in given else manifest.tiling.overlap_px
    if overlap >= min(tile):
        raise UsageError(f"--overlap {overlap} must be smaller than this artifact's {size} tiles")
    return overlap


def _check_artifact_memory(src: Path, probe: Any, channels: int, scale: int = 1) -> None:
    """Refuse an image whose whole-image buffers cannot fit in the memory here (the runtime needs its own)."""
    import torch

    from nafnet_edge.errors import ImageError
    from nafnet_edge.inference import available_memory_bytes, frame_peak_bytes

    h, w = probe.height, probe.width
    per_pixel = frame_peak_bytes(
        1,
        1,
        channels=probe.channels,
        alpha=probe.has_alpha,
        bit_depth=probe.bit_depth,
        model_channels=channels,
        up_scale=scale,
    )
    per_pixel += _ARTIFACT_COPIES * 4 * channels * scale**2
    available = available_memory_bytes(torch.device("cpu"))
    if available is not None and h * w * per_pixel > available:
        raise ImageError(
            f"{src}: restoring {h}x{w} needs about {h * w * per_pixel / 1e9:.1f} GB for the whole image, "
            f"{available / 1e9:.1f} GB are available; crop it into parts of at most "
            f"{int(available / per_pixel / 1e6)} megapixels"
        )


def add_parser(sub: Any, parents: Parents) -> None:
    ckpt = parents.ckpt
    p = sub.add_parser(
        "run",
        parents=[ckpt],
        help="restore images at full resolution with a checkpoint (PyTorch) or an artifact (its runtime)",
        description="Restore images with a checkpoint in PyTorch fp32 (the embedded default when the first argument "
        "is an image or a folder), or with an artifact written by convert/quantize in its own runtime (the first "
        "argument is its directory OUT/<target>-<precision>, or the model file in it). Large images are processed "
        "in overlapping tiles blended with a smooth window; an artifact uses its own tile size and the overlap "
        "its manifest records, exactly as its validation ran it.",
        epilog=EPILOG,
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="[CKPT|ARTIFACT] INPUT",
        help="optional checkpoint or artifact directory, then images or folders",
    )
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR", help="folder for the results")
    p.add_argument(
        "--tile",
        type=SIDE_OR_ZERO,
        action=_Given,
        default=defaults.RUN_TILE_PX,
        metavar="PX",
        help="tile size, 0 = whole image (default: %(default)s; an artifact's is fixed)",
    )
    p.add_argument(
        "--overlap",
        type=SIDE_OR_ZERO,
        action=_Given,
        default=defaults.RUN_OVERLAP_PX,
        metavar="PX",
        help="tile overlap (default: %(default)s; for an artifact, the one its manifest records)",
    )
    p.add_argument(
        "--tile-batch",
        type=BATCH,
        default=defaults.TILE_BATCH,
        metavar="N",
        help="tiles per forward pass (default: %(default)s; an artifact runs one at a time)",
    )
    deprecated_alias(p, "--batch", "--tile-batch", dest="tile_batch", type=BATCH, metavar="N")
    p.add_argument(
        "--device",
        default="auto",
        action=_Given,
        choices=["auto", "cpu", "cuda"],
        help="auto = CUDA when present (default: %(default)s; the PyTorch path only)",
    )
    p.add_argument(
        "--side-by-side",
        action="store_true",
        help="stereo models (NAFSSR): each input holds both views, left view in the left half (width even); the "
        "output is side by side too. Without it a stereo model takes pairs of files NAME_L/NAME_R",
    )
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "png", "tiff", "jpg"],
        help="output format (auto: TIFF for TIFF inputs, else PNG); bit depth follows the input",
    )
    p.set_defaults(func=cmd_run, given=set())
