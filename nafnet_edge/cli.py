"""The ``nafnet-edge`` command. Heavy imports (torch, backends) happen inside each command, never at start-up."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nafnet_edge import __version__
from nafnet_edge.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CheckpointError,
    NafnetEdgeError,
    UsageError,
    printable,
)
from nafnet_edge.manifest import Manifest
from nafnet_edge.sizes import MAX_SIDE_PX, parse_size

if TYPE_CHECKING:
    from nafnet_edge.deploy import NormForm

EPILOG = (
    "exit codes: 0 ok, 1 internal error, 2 usage, 3 budget missed, 4 missing backend, 5 bad input, "
    "6 output not writable, 130 interrupted"
)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: what is wrong and where the help is (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def target_list(names: Sequence[str]) -> Callable[[str], str]:
    """A parser for ``--target``: one of ``names``, several joined by commas (each once), or ``all``."""

    def parse(text: str) -> str:
        chosen = [t.strip() for t in text.split(",")]
        for name in chosen:
            if name not in names:
                allowed = ", ".join(repr(n) for n in [*names, "all"])
                extra = " ('all' stands alone)" if name == "all" else ""
                raise argparse.ArgumentTypeError(f"invalid choice: {name!r}{extra} (choose from {allowed})")
        return ",".join(dict.fromkeys(chosen))

    def all_or_list(text: str) -> str:
        return "all" if text.strip() == "all" else parse(text)

    return all_or_list


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a positive integer, got 0")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


# Upper bounds of the numeric options: past them a command runs out of memory or time rather than doing more of
# what was asked. A model input side (tile, export shape, training crop) of 16384 px (MAX_SIDE_PX) already needs
# hundreds of GB for one forward pass of the official models; full frames may be larger, up to the image reader's
# pixel limit.
MAX_FRAME_SIDE_PX = 65535  # the largest side JPEG, and so most cameras' files, can hold
MAX_FRAME_PIXELS = 1 << 30  # images.MAX_IMAGE_PIXELS, OpenCV's default limit
MAX_BATCH = 1024
MAX_ITERS = 1_000_000
MAX_SEED = 2**32 - 1  # numpy's and every runtime's seed range
MAX_SEARCH_ROUNDS = 16  # round k keeps 2^(k-1) units float: 16 rounds cover any NAFNet's units
MAX_LISTED = 1000  # profile rows, report images
STREAM_SCALES = (1, 2, 4, 8, 16, 32, 64)


def bounded(parse: Callable[[str], Any], high: float | Callable[[], float], what: str = "") -> Callable[[str], Any]:
    """An argparse type: ``parse`` (which sets the lower bound), then at most ``high`` (a number, or a function
    for a limit of this machine), saying ``what`` the limit is."""

    def parse_bounded(text: str) -> Any:
        value = parse(text)
        limit = high() if callable(high) else high
        if value > limit:
            shown = f"{limit:g}" if isinstance(limit, float) else str(limit)
            raise argparse.ArgumentTypeError(f"expected at most {shown}{f' ({what})' if what else ''}, got {text!r}")
        return value

    return parse_bounded


def cpu_count() -> int:
    """The CPU cores this process may run on (the affinity mask where there is one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def stream_scale(text: str) -> float:
    value = finite_float(text)
    if value not in STREAM_SCALES:
        raise argparse.ArgumentTypeError(f"expected a power of two from 1 to 64, got {text!r}")
    return value


SIDE_OR_ZERO = bounded(non_negative_int, MAX_SIDE_PX, "px, the largest model input side")
BATCH = bounded(positive_int, MAX_BATCH)
ITERS = bounded(positive_int, MAX_ITERS)


def checkpoint_options() -> Parser:
    p = Parser(add_help=False)
    g = p.add_argument_group("checkpoint")
    g.add_argument(
        "--param-key",
        default="auto",
        choices=["auto", "params", "params_ema", "state_dict", "model_state_dict", "model", "net", "network"],
        help="which entry of a wrapped checkpoint to use (auto: 'params' first, as the official files)",
    )
    g.add_argument("--arch", choices=["nafnet", "nafnet-local"], help="override the identified class (TLC or not)")
    g.add_argument("--train-size", type=parse_size, metavar="PX", help="TLC training crop, e.g. 256 (default)")
    return p


def _validation_knobs(g: Any) -> None:
    g.add_argument("--reference-device", default="auto", choices=["auto", "cpu", "cuda"], help="fp32 reference on")
    g.add_argument(
        "--overlap", type=SIDE_OR_ZERO, metavar="PX", help="tile overlap (convert: 32; validate: the manifest's)"
    )
    g.add_argument(
        "--min-fidelity", type=finite_float, metavar="DB", help="PSNR vs reference (fp32 60, fp16 45, int8 35)"
    )
    g.add_argument(
        "--max-drift", type=finite_float, metavar="DB", help="task PSNR loss vs ground truth (0.01/0.05/0.1)"
    )
    g.add_argument("--no-cache", action="store_true", help="recompute the reference outputs")


def _target_classes() -> list[Any]:
    """Every registered target class (their modules import no backend: the parser needs no heavy import)."""
    from nafnet_edge.converters import target_class, target_names

    return [target_class(name) for name in target_names()]


def _title(cls: Any) -> str:
    """A target as prose: its usage title ("Core ML"), else its name."""
    return str(cls.usage_title or cls.name)


def _titles(classes: list[Any], conjunction: str) -> str:
    titles = [_title(cls) for cls in classes]
    return titles[0] if len(titles) == 1 else f"{', '.join(titles[:-1])} {conjunction} {titles[-1]}"


def _precision_help() -> str:
    """convert --precision's help: each target's default precision."""
    classes = _target_classes()
    other = [c for c in classes if c.default_precision != "fp32"]
    by_precision = {
        precision: [c for c in other if c.default_precision == precision]
        for precision in dict.fromkeys(c.default_precision for c in other)
    }
    parts = [f"{precision} for {_titles(owners, 'and')}" for precision, owners in by_precision.items()]
    return "default: " + ", ".join([*parts, "fp32 elsewhere" if parts else "fp32"])


def target_options(command: str | None = None) -> list[tuple[Any, tuple[Any, ...]]]:
    """Every registered target's own options (those of ``command`` when given) with the targets owning each: an
    option two targets declare with the same flag and destination is listed once, with both owners."""
    from nafnet_edge.converters import all_options

    merged: dict[tuple[str, str], tuple[Any, tuple[Any, ...]]] = {}
    for cls, option in all_options():
        if command is None or command in option.commands:
            key = (option.flag, option.dest)
            first, owners = merged.get(key, (option, ()))
            merged[key] = (first, (*owners, cls))
    return list(merged.values())


def add_target_options(parser: argparse.ArgumentParser, command: str) -> None:
    """Add the registered targets' options for ``command`` to ``parser``: one argument group per owner, the help
    prefixed by the owner. An option not given stays out of the parsed namespace (``target_settings`` then tells
    given options from defaults, and each target falls back to its option's default)."""
    groups: dict[tuple[str, ...], Any] = {}
    for option, owners in target_options(command):
        key = tuple(cls.name for cls in owners)
        if key not in groups:
            groups[key] = parser.add_argument_group(f"{_titles(list(owners), 'and')} options")
        owner = " and ".join(_title(cls) for cls in owners)
        kwargs: dict[str, Any] = {"dest": option.dest, "default": argparse.SUPPRESS, "help": f"{owner}: {option.help}"}
        if option.kind == "flag":
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=option.type, metavar=option.metavar, choices=option.choices)
            if option.kind == "values":
                kwargs["nargs"] = "+"
        groups[key].add_argument(option.flag, **kwargs)


def target_settings(args: argparse.Namespace, targets: list[str]) -> dict[str, dict[str, Any]]:
    """The target options given on the command line, by chosen target: ``{target: {dest: value}}`` with each
    target's own options only (with ``--target all`` an option goes to the targets owning it). An option that
    none of ``targets`` owns is refused (``UsageError``, exit 2) naming its owner."""
    given = vars(args)
    settings: dict[str, dict[str, Any]] = {name: {} for name in targets}
    for option, owners in target_options():
        if option.dest not in given:
            continue
        owning = [cls.name for cls in owners if cls.name in settings]
        if not owning:
            names = " or ".join(cls.name for cls in owners)
            raise UsageError(f"{option.flag} is an option of --target {names}")
        for name in owning:
            settings[name][option.dest] = given[option.dest]
    return settings


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="nafnet-edge",
        description="Load, convert, validate and benchmark NAFNet image-restoration models for edge runtimes.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"nafnet-edge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    ckpt = checkpoint_options()
    targets = _target_classes()
    names = [cls.name for cls in targets]
    int8_names = [cls.name for cls in targets if cls.quantizer is not None]

    p = sub.add_parser(
        "inspect",
        parents=[ckpt],
        help="identify a checkpoint: configuration, class, params, GMACs, release",
        description="Identify a NAFNet checkpoint from its tensor shapes and sha256. "
        "Without CKPT, describes the embedded default model.",
        epilog=EPILOG,
    )
    p.add_argument("checkpoint", nargs="?", metavar="CKPT", help="checkpoint file (.pth, .pt, .safetensors)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--size", type=parse_size, default=(256, 256), metavar="PX", help="GMACs input size (256)")
    p.set_defaults(func=cmd_inspect)

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

    p = sub.add_parser(
        "reparam",
        parents=[ckpt],
        help="rewrite a checkpoint into the exact deploy graph (folded, split, fp16-safe)",
        description="Rewrite a checkpoint into the inference-only deploy graph and check that it computes the "
        "same function on a real photo. .safetensors keeps weights and recipe; .pt2 is a static torch.export "
        "program of --input-size.",
        epilog=EPILOG,
    )
    p.add_argument("checkpoint", nargs="?", metavar="CKPT", help="checkpoint file (default: the embedded model)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="OUT.safetensors or OUT.pt2")
    p.add_argument(
        "--target",
        default="generic",
        choices=["generic", *names],
        help="target whose normalization form to use (generic: upstream's reference form)",
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
        default=16.0,
        help="power of two (1-64) dividing the residual stream so fp16 norms cannot overflow (default 16)",
    )
    p.set_defaults(func=cmd_reparam)

    int8 = Parser(add_help=False)
    g = int8.add_argument_group("int8")
    g.add_argument("--method", choices=["qat", "ptq"], default="qat", help="fine-tune or calibrate only (qat)")
    g.add_argument("--iters", type=ITERS, default=300, metavar="N", help="QAT steps (300)")
    g.add_argument("--batch", type=BATCH, default=4, metavar="N", help="crops per step (4)")
    g.add_argument(
        "--lr",
        type=bounded(positive_float, 1.0, "a step as large as the weights"),
        default=1e-3,
        help="AdamW step relative to each tensor's RMS, cosine (1e-3)",
    )
    g.add_argument(
        "--seed",
        type=bounded(non_negative_int, MAX_SEED),
        default=0,
        metavar="N",
        help="seed of the training crops and their order (0)",
    )
    g.add_argument("--resume", action="store_true", help="continue from OUT/.<target>-train.pt")
    g.add_argument(
        "--keep-float",
        type=lambda text: tuple(u for u in text.split(",") if u),
        default=(),
        metavar="UNITS",
        help="units to leave in float, comma-separated (intro, encoders.0.0, downs.0, middle_blks.0, ups.0, "
        "decoders.0.0, ending, ...)",
    )
    g.add_argument(
        "--search-rounds",
        type=bounded(non_negative_int, MAX_SEARCH_ROUNDS),
        default=4,
        metavar="N",
        help="when the artifact misses --max-drift: up to N more rounds keeping the most sensitive units float "
        "(1, 2, 4, ...); 0 turns the search off (4)",
    )

    bench = Parser(add_help=False)
    g = bench.add_argument_group("benchmark")
    g.add_argument("--bench", action="store_true", help="benchmark what was built (nafnet-edge bench --save)")
    g.add_argument("--bench-iters", type=ITERS, default=20, metavar="N", help="timed runs with --bench (20)")

    validation_only = Parser(add_help=False)
    g = validation_only.add_argument_group("validation")
    g.add_argument("--val-data", dest="data", type=Path, metavar="DIR", help="validation images (default: shipped)")
    g.add_argument(
        "--val-pairs",
        dest="data_pairs",
        nargs=2,
        type=Path,
        metavar=("INPUTS", "TARGETS"),
        help="validation degraded/ground-truth folders",
    )
    _validation_knobs(g)

    validation = Parser(add_help=False)
    g = validation.add_argument_group("validation")
    g.add_argument("--data", type=Path, metavar="DIR", help="your images (default: shipped Kodak photos + noise)")
    g.add_argument(
        "--data-pairs", nargs=2, type=Path, metavar=("INPUTS", "TARGETS"), help="degraded/ground-truth folders"
    )
    _validation_knobs(g)

    p = sub.add_parser(
        "convert",
        parents=[ckpt, validation, int8, bench],
        help=f"export {_titles(targets, 'or')} artifacts and validate them in their runtimes",
        description="Export a checkpoint (default: the embedded model) through the deploy graph to one target "
        "or all, each into OUT/<target>/ with manifest.json and USAGE.md, then validate the artifact in its own "
        "runtime against fp32 PyTorch outputs of the original model. Exit code 3 when a budget is missed.",
        epilog=EPILOG,
    )
    p.add_argument("checkpoint", nargs="?", metavar="CKPT", help="checkpoint file (default: the embedded model)")
    p.add_argument(
        "--target",
        required=True,
        type=target_list(names),
        metavar="{" + ",".join([*names, "all"]) + "}",
        help="what to produce: one target, several separated by commas, or all",
    )
    p.add_argument("-o", "--output", type=Path, default=Path("artifacts"), metavar="OUT", help="(./artifacts)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], help=_precision_help())
    p.add_argument("--train-data", type=Path, metavar="DIR", help="int8: images to calibrate / fine-tune on")
    p.add_argument("--train-pairs", type=Path, metavar="CLEAN", help="int8: ground truth for --train-data")
    p.add_argument("--input-size", type=parse_size, default=(256, 256), metavar="PX", help="tile size (256)")
    p.add_argument("--no-validate", action="store_true", help="export only")
    p.add_argument("--force", action="store_true", help="replace OUT/<target> when it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object: artifacts, metrics, skipped")
    add_target_options(p, "convert")
    p.set_defaults(func=cmd_convert)

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

    p = sub.add_parser(
        "bench",
        help="latency, throughput, memory and per-operator profile of artifacts in their runtimes",
        description="Run artifact directories written by convert/quantize in their own runtimes on this machine "
        f"({_titles(targets, 'and')}) and the "
        "original PyTorch fp32 model as the baseline: load and first-inference time, min/median/mean/p90/p99/std "
        "latency after warm-up, frames/s, peak memory, GFLOP/s against this machine's matmul rate, the top "
        "operators by time. Exit code 3 when a median exceeds --max-latency-ms.",
        epilog=EPILOG,
    )
    p.add_argument("directories", nargs="+", type=Path, metavar="ARTIFACT_DIR", help="OUT/<target> or OUT")
    p.add_argument(
        "--iters", dest="bench_iters", type=ITERS, default=20, metavar="N", help="timed runs per artifact (20)"
    )
    p.add_argument(
        "--warmup", type=bounded(non_negative_int, MAX_ITERS), default=3, metavar="N", help="untimed runs first (3)"
    )
    p.add_argument(
        "--threads",
        type=bounded(positive_int, cpu_count, "the CPU cores here"),
        metavar="N",
        help="runtime threads (default: the runtime's)",
    )
    p.add_argument(
        "--max-latency-ms", type=positive_float, metavar="MS", help="exit 3 when an artifact's median exceeds MS"
    )
    p.add_argument(
        "--frame",
        type=parse_frame,
        metavar="HxW|12MP",
        help="also run one full frame through the artifact's tile, e.g. 3000x4000 or 12MP (4:3)",
    )
    p.add_argument(
        "--overlap", dest="bench_overlap", type=SIDE_OR_ZERO, default=32, metavar="PX", help="full-frame overlap"
    )
    p.add_argument(
        "--top", type=bounded(positive_int, MAX_LISTED), default=8, metavar="N", help="operators listed per profile (8)"
    )
    p.add_argument("--no-profile", action="store_true", help="skip the per-operator profile")
    p.add_argument("--no-baseline", action="store_true", help="skip the PyTorch fp32 baseline")
    p.add_argument("--checkpoint", metavar="CKPT", help="source checkpoint for the baseline (default: recorded)")
    p.add_argument("--save", action="store_true", help="write bench.json into each artifact directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_target_options(p, "bench")
    p.set_defaults(func=cmd_bench)
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
    return parser


def _load(args: argparse.Namespace, checkpoint: str | None, device: str = "cpu") -> Any:
    from nafnet_edge.checkpoint import load_checkpoint

    return load_checkpoint(
        checkpoint, param_key=args.param_key, arch=args.arch, train_size=args.train_size, device=device
    )


def describe(loaded: Any, size: tuple[int, int]) -> dict[str, Any]:
    """The inspect report; the first keys are the documented --json contract."""
    from nafnet_edge.complexity import count_macs
    from nafnet_edge.model import tlc_kernel_sizes
    from nafnet_edge.releases import releases_with_shape

    cfg = loaded.config
    info: dict[str, Any] = {
        "arch": cfg.arch,
        "img_channels": cfg.img_channels,
        "width": cfg.width,
        "enc_blk_nums": list(cfg.enc_blk_nums),
        "middle_blk_num": cfg.middle_blk_num,
        "dec_blk_nums": list(cfg.dec_blk_nums),
        "params": loaded.num_params,
        "gmacs": round(count_macs(cfg, *size) / 1e9, 3),
        "release": loaded.release.name if loaded.release else None,
        "sha256": loaded.sha256,
        "param_key": loaded.raw_param_key,
        "gmacs_size": list(size),
        "dw_expand": cfg.dw_expand,
        "ffn_expand": cfg.ffn_expand,
        "class": "NAFNetLocal" if cfg.arch == "nafnet-local" else "NAFNet",
        "arch_source": loaded.arch_source,
        "train_size": list(cfg.train_size) if cfg.arch == "nafnet-local" else None,
        "tlc_kernels": [list(k) for k in tlc_kernel_sizes(cfg)] if cfg.arch == "nafnet-local" else None,
        "pad_multiple": cfg.pad_multiple,
        "task": loaded.release.task if loaded.release else loaded.metadata.get("task"),
        "same_shape_as": [r.name for r in releases_with_shape(cfg)],
        "other_param_keys": loaded.other_param_keys,
        "key_prefix": loaded.key_prefix,
        "file_format": loaded.file_format,
        "path": str(loaded.path),
        "embedded_default": loaded.is_default,
    }
    return info


ARCH_SOURCES = {
    "flag": "--arch",
    "release": "official release (sha256)",
    "metadata": "file metadata",
    "shape": "GoPro/REDS-shaped network: TLC as upstream evaluates it; --arch nafnet to disable",
    "default": "default for an unrecognised file",
}


def cmd_inspect(args: argparse.Namespace) -> int:
    loaded = _load(args, args.checkpoint)
    info = describe(loaded, args.size)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    layout = [info["file_format"], f"'{info['param_key']}' entry" if info["param_key"] else "bare state dict"]
    if info["other_param_keys"]:
        layout.append(f"also has {', '.join(info['other_param_keys'])} (--param-key to use it)")
    if info["key_prefix"]:
        layout.append(f"prefix '{info['key_prefix']}' stripped")
    arch = info["class"]
    if info["tlc_kernels"]:
        arch += f" (TLC, train size {info['train_size'][0]}x{info['train_size'][1]}, kernels {info['tlc_kernels']})"
    release = info["release"] or "none (not an official release file)"
    if info["release"]:
        release += f": {info['task']}"
    elif info["same_shape_as"]:
        release += f"; same shape as {', '.join(info['same_shape_as'])}"
    rows = [
        ("checkpoint", info["path"] + ("  [embedded default]" if info["embedded_default"] else "")),
        ("sha256", info["sha256"]),
        ("release", release),
        ("layout", ", ".join(layout)),
        ("class", f"{arch}  [from {ARCH_SOURCES[info['arch_source']]}]"),
        (
            "config",
            f"img_channels {info['img_channels']}, width {info['width']}, enc {info['enc_blk_nums']}, "
            f"middle {info['middle_blk_num']}, dec {info['dec_blk_nums']}, "
            f"dw_expand {info['dw_expand']}, ffn_expand {info['ffn_expand']}",
        ),
        ("params", f"{info['params'] / 1e6:.2f} M ({info['params']:,})"),
        ("GMACs", f"{info['gmacs']:.2f} at {args.size[0]}x{args.size[1]}"),
        ("padding", f"zero pad right/bottom to a multiple of {info['pad_multiple']}, then crop"),
    ]
    if info["task"] and not info["release"]:
        rows.insert(3, ("task", info["task"]))
    for name, value in rows:
        print(f"{name:<11} {value}")
    return 0


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
    loaded = _load(args, checkpoint, device=str(device))
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


def _check_input_sizes(
    config: Any, sizes: list[tuple[int, int]], *, more: Sequence[tuple[str, list[tuple[int, int]]]] = ()
) -> None:
    """Refuse (exit 2) fixed model input sizes whose forward pass does not fit in this machine's memory:
    ``sizes`` (--input-size) and the sizes of target options (``more``: flag and sizes)."""
    from nafnet_edge.inference import check_input_size_memory

    check_input_size_memory(config, sizes, option="--input-size")
    for flag, extra in more:
        check_input_size_memory(config, extra, option=flag)


def _size_settings(settings: dict[str, dict[str, Any]]) -> list[tuple[str, list[tuple[int, int]]]]:
    """The given target options that are model input sizes (parsed by ``parse_size``), as (flag, sizes)."""
    found: dict[str, list[tuple[int, int]]] = {}
    for option, owners in target_options():
        if option.type is not parse_size:
            continue
        for cls in owners:
            if option.dest in settings.get(cls.name, {}):
                value = settings[cls.name][option.dest]
                found[option.flag] = list(value) if option.kind == "values" else [value]
    return list(found.items())


def cmd_reparam(args: argparse.Namespace) -> int:
    import torch

    from nafnet_edge.deploy import PadCrop, deploy
    from nafnet_edge.deploy.io import save_deploy
    from nafnet_edge.images import read_image

    loaded = _load(args, args.checkpoint)
    m = loaded.config.pad_multiple
    if args.input_size and (args.input_size[0] % m or args.input_size[1] % m):
        raise UsageError(f"--input-size {args.input_size[0]}x{args.input_size[1]} must be a multiple of {m}")
    _check_input_sizes(loaded.config, [args.input_size or (256, 256)])
    norm_form = _reparam_norm_form(args.target)
    graph = deploy(loaded.model, norm_form=norm_form, input_size=args.input_size, stream_scale=args.stream_scale)

    # Check on a real photo: a crop of the input size (or 256 px) from a shipped Kodak image.
    h, w = args.input_size or (256, 256)
    photo = read_image(sorted(_kodak_dir().glob("*.png"))[0]).pixels[:h, :w]
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


def _validation_settings(args: argparse.Namespace, channels: int) -> Any:
    from nafnet_edge.convert import ValidationSettings
    from nafnet_edge.inference import resolve_device
    from nafnet_edge.validate import default_images, folder_images, paired_images

    if args.data and args.data_pairs:
        raise UsageError("--data and --data-pairs are alternatives; give one")
    if args.data_pairs:
        inputs, targets = args.data_pairs  # nargs=2
        images, data = paired_images(inputs, targets, channels=channels), f"pairs {inputs}"
    elif args.data:
        images, data = folder_images(args.data, channels=channels), f"folder {args.data}"
    else:
        images, data = default_images(channels), "shipped Kodak photos, Gaussian noise sigma 25/255 (seeded)"
    return ValidationSettings(
        images=images,
        data=data,
        reference_device=resolve_device(args.reference_device),
        overlap_px=args.overlap,
        min_fidelity_db=args.min_fidelity,
        max_drift_db=args.max_drift,
        use_cache=not args.no_cache,
    )


def _result_json(result: Any) -> dict[str, Any]:
    v = result.validation
    return {
        "target": result.target,
        "directory": str(result.directory),
        "files": [str(result.directory / f) for f in result.manifest.files],
        "precision": result.manifest.precision,
        "runtime": result.manifest.runtime,
        "passed": result.passed,
        "validation": None if v is None else {"failures": v.failures, **v.summary},
    }


def _print_result(result: Any) -> None:
    v = result.validation
    line = f"{result.target:<18} {result.manifest.precision:<5} {printable(str(result.directory))}"
    if v is not None:
        s = v.summary
        line += f"  fidelity {s['fidelity_db_min']:.1f} dB  max err {s['max_abs_error']:.1e}"
        if "drift_db_mean" in s:
            line += f"  drift {s['drift_db_mean']:+.3f} dB"
        line += "  ok" if v.passed else f"  FAILED: {'; '.join(v.failures)}"
    print(line)


def cmd_convert(args: argparse.Namespace) -> int:
    from nafnet_edge.converters import target_names

    targets = target_names() if args.target == "all" else args.target.split(",")
    target_settings(args, targets)  # an option none of them owns is refused before anything is locked or loaded
    with contextlib.ExitStack() as locks:
        if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 writes artifacts
            from nafnet_edge.atomic import output_lock

            for target in targets:  # held from the existence check to the rename: --force races are impossible
                locks.enter_context(output_lock(args.output / target))
        return _convert_targets(args, targets)


def _convert_targets(args: argparse.Namespace, targets: list[str]) -> int:
    from tqdm import tqdm

    from nafnet_edge.convert import convert
    from nafnet_edge.converters import ExportOptions, get_target
    from nafnet_edge.errors import EXIT_BUDGET, EXIT_MISSING_BACKEND, MissingBackendError

    if args.overlap is None:
        from nafnet_edge.validate import DEFAULT_OVERLAP_PX

        args.overlap = DEFAULT_OVERLAP_PX
    if not args.no_validate and args.overlap >= min(args.input_size):
        raise UsageError(
            f"--overlap {args.overlap} must be smaller than the tile the artifact runs on (--input-size "
            f"{args.input_size[0]}x{args.input_size[1]})"
        )
    existing = [str(args.output / t) for t in targets if (args.output / t).exists()]
    if existing and not args.force:
        raise UsageError(f"{', '.join(existing)} exists; pass --force to replace it or choose another -o")
    own = target_settings(args, targets)
    loaded = _load(args, args.checkpoint)
    _check_input_sizes(loaded.config, [args.input_size], more=_size_settings(own))
    settings = None if args.no_validate else _validation_settings(args, loaded.config.img_channels)
    int8 = _int8_settings(args, loaded) if args.precision == "int8" else None
    results, skipped = [], []
    missing = 0  # targets of --target all whose extra is not installed: exit 4 once the others are built
    steps = 2 if args.no_validate else 3
    with tqdm(total=steps * len(targets), unit="step", disable=None, file=sys.stderr) as bar:
        for target in targets:
            converter = get_target(target)
            options = ExportOptions(
                input_size=args.input_size,
                precision=args.precision or converter.default_precision,
                settings=own[target],
            )
            done = bar.n

            def step(text: str, done: int = done) -> None:
                bar.set_description(text)
                if not text.endswith("deploy graph") and bar.n < done + steps - 1:  # int8 may take more rounds
                    bar.update(1)

            try:
                quantize = None if int8 is None else _target_int8(int8, converter, own[target])
                results.append(
                    convert(loaded, target, args.output, options, validation=settings, int8=quantize, step=step)
                )
            except (MissingBackendError, UsageError) as e:  # anything else is not the user's to fix: it propagates
                if args.target != "all":
                    raise
                skipped.append(f"{target}: {e}")
                missing += isinstance(e, MissingBackendError)
            bar.update(done + steps - bar.n)
    if int8 is not None and int8.rank != 0:
        return 0  # torchrun: rank 0 exports, validates and reports
    benched = None
    if args.bench and results:
        benched = run_bench(bench_defaults(args), [r.directory for r in results], save=True)
    if args.json:
        artifacts = [_result_json(r) for r in results]
        if benched is not None:
            for artifact, measured in zip(artifacts, benched.artifacts, strict=True):
                artifact["bench"] = measured.to_dict()
        print(json.dumps({"artifacts": artifacts, "skipped": skipped}, indent=2))
    else:
        for result in results:
            _print_result(result)
        if benched is not None:
            from nafnet_edge.bench import format_table

            print(format_table(benched))
    for line in skipped:
        print(f"skipped {printable(line)}", file=sys.stderr)
    if not results:
        error = MissingBackendError if missing else UsageError
        raise error("nothing could be built here: " + "; ".join(skipped))
    if any(not r.passed for r in results):
        return EXIT_BUDGET
    return EXIT_MISSING_BACKEND if missing else 0


def _int8_settings(args: argparse.Namespace, loaded: Any) -> Any:
    from nafnet_edge.convert import Int8Settings
    from nafnet_edge.quantization.train import TrainConfig, init_distributed, load_training_images

    if args.train_data is None:
        raise UsageError("--precision int8 needs images to calibrate on: --train-data DIR (nafnet-edge quantize)")
    h, w = args.input_size
    if h != w:
        raise UsageError("int8 trains on square crops of the input size: give a square --input-size")
    if args.search_rounds < 0:
        raise UsageError("--search-rounds takes 0 (no search) or more")
    rank, world = init_distributed()
    images = load_training_images(args.train_data, h, pairs=args.train_pairs, channels=loaded.config.img_channels)
    config = TrainConfig(method=args.method, iters=args.iters, batch=args.batch, lr=args.lr, seed=args.seed)
    return Int8Settings(
        images=images,
        config=config,
        data=f"{args.train_data}" + (f" (ground truth {args.train_pairs})" if args.train_pairs else " (distilled)"),
        checkpoint=args.output / f".{args.target}-train.pt",
        resume=args.resume,
        progress=rank == 0,
        rank=rank,
        keep_float=args.keep_float,
        search_rounds=args.search_rounds if world == 1 else 0,  # the ranks train together; rank 0 alone validates
    )


def _target_int8(int8: Any, target: Any, settings: dict[str, Any]) -> Any:
    """``int8`` for ``target``: its quantizer's options from the target's own option values (``settings``)."""
    import dataclasses

    from nafnet_edge.quantization import get_quantizer

    options = target.quantizer_options(settings)
    config = int8.config
    if options and not get_quantizer(target.name, **options).trains:  # a post-training-only mode (weight-only)
        config = dataclasses.replace(config, method="ptq")
    return dataclasses.replace(int8, quantizer_options=options, config=config)


def cmd_quantize(args: argparse.Namespace) -> int:
    args.precision = "int8"
    return cmd_convert(args)


def parse_frame(text: str) -> tuple[int, int]:
    """'12MP' -> a 4:3 frame of about 12 megapixels (3000x4000); '3000x4000' -> (3000, 4000) as height x width."""
    if text.upper().endswith("MP"):
        try:
            megapixels = float(text[:-2])
        except ValueError:
            megapixels = 0.0
        if not 0 < megapixels <= 200:
            raise argparse.ArgumentTypeError(f"expected megapixels like 12MP (at most 200), got {text!r}")
        height = max(1, round((megapixels * 1e6 * 3 / 4) ** 0.5))
        return height, max(1, round(height * 4 / 3))
    height, width = parse_size(text, max_side=MAX_FRAME_SIDE_PX)
    if height * width > MAX_FRAME_PIXELS:
        raise argparse.ArgumentTypeError(
            f"expected at most {MAX_FRAME_PIXELS / 1e6:.0f} megapixels (the image reader's limit), got {text!r}"
        )
    return height, width


def _baseline_loader(args: argparse.Namespace) -> Any:
    """Loads the source model of a manifest for the PyTorch baseline (None when it cannot be found)."""

    def load(manifest: Manifest) -> Any:
        source = manifest.source
        checkpoint = args.checkpoint
        if checkpoint is None and not source.embedded_default:
            checkpoint = source.path
            if not checkpoint or not Path(checkpoint).is_file():
                return None
        from nafnet_edge.checkpoint import load_checkpoint

        config = source.config
        return load_checkpoint(checkpoint, arch=config["arch"], train_size=tuple(config["train_size"])).model

    return load


def run_bench(args: argparse.Namespace, directories: list[Path], *, save: bool) -> Any:
    """Benchmark ``directories`` with the bench options in ``args``; saves bench.json into each when asked."""
    from nafnet_edge.bench import BenchSettings, bench_artifacts
    from nafnet_edge.bench import save as save_bench

    settings = BenchSettings(
        iters=args.bench_iters,
        warmup=args.warmup,
        threads=args.threads,
        profile=not args.no_profile,
        top=args.top,
        frame=args.frame,
        overlap_px=args.bench_overlap,
        hints=bench_hints(args),
    )
    loader = None if args.no_baseline else _baseline_loader(args)
    report = bench_artifacts(directories, settings, baseline_model=loader)
    if save:
        save_bench(report)
    return report


def bench_hints(args: argparse.Namespace) -> dict[str, Any]:
    """The targets' runtime options given to ``bench`` (``SessionSettings.hints``): each artifact's target reads its
    own and takes its option's default for the others."""
    given = vars(args)
    return {option.dest: given[option.dest] for option, _ in target_options("bench") if option.dest in given}


def bench_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``bench``'s defaults for the options convert/quantize --bench do not expose."""
    return argparse.Namespace(
        bench_iters=args.bench_iters,
        warmup=3,
        threads=None,
        no_profile=False,
        top=8,
        frame=None,
        bench_overlap=32,
        no_baseline=False,
        checkpoint=args.checkpoint,
    )


# bench --frame holds three float32 copies of an RGB frame (the random input, its padded copy and the output):
# 36 bytes per pixel measured (peak RSS at 6 MP); one more copy for the runtime's own buffers and slack.
FRAME_BYTES_PER_PIXEL = 4 * 3 * 4


def _check_frame_memory(frame: tuple[int, int]) -> None:
    """Refuse (exit 2) a --frame whose buffers do not fit in this machine's memory, naming the largest that does."""
    import torch

    from nafnet_edge.inference import available_memory_bytes

    available = available_memory_bytes(torch.device("cpu"))
    needed = frame[0] * frame[1] * FRAME_BYTES_PER_PIXEL
    if available is not None and needed > available:
        height = int(math.sqrt(available / FRAME_BYTES_PER_PIXEL * 3 / 4))  # the largest 4:3 frame that fits
        raise UsageError(
            f"--frame {frame[0]}x{frame[1]} needs about {needed / 1e9:.1f} GB for the frame, {available / 1e9:.1f} GB "
            f"are available; use --frame {height}x{height * 4 // 3} or smaller"
        )


def cmd_bench(args: argparse.Namespace) -> int:
    from nafnet_edge.bench import artifact_directories, format_table
    from nafnet_edge.errors import EXIT_BUDGET

    if args.frame is not None:
        _check_frame_memory(args.frame)
    report = run_bench(args, artifact_directories(args.directories), save=args.save)
    over = [
        f"{r.target} {r.precision}: median {r.median_ms:.1f} ms > {args.max_latency_ms:g} ms"
        for r in report.artifacts
        if args.max_latency_ms is not None and r.median_ms is not None and r.median_ms > args.max_latency_ms
    ]
    if args.json:
        print(json.dumps({**report.to_dict(), "failures": over}, indent=2))
    else:
        print(format_table(report))
    for line in over:
        print(f"nafnet-edge: latency budget missed: {line}", file=sys.stderr)
    return EXIT_BUDGET if over else 0


def cmd_validate(args: argparse.Namespace) -> int:
    from nafnet_edge.atomic import output_lock
    from nafnet_edge.manifest import read_manifest

    if not args.directory.is_dir():
        read_manifest(args.directory)  # its one-line "not an artifact directory" error, before any lock file
    with output_lock(args.directory.resolve()):  # convert's lock: a concurrent convert --force is refused
        return _validate_locked(args)


def _validate_locked(args: argparse.Namespace) -> int:
    from nafnet_edge.convert import ConvertResult, validate_directory
    from nafnet_edge.errors import EXIT_BUDGET
    from nafnet_edge.manifest import read_manifest
    from nafnet_edge.validate import DEFAULT_OVERLAP_PX

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
    loaded = _load(args, checkpoint)
    settings = _validation_settings(args, loaded.config.img_channels)
    manifest, report = validate_directory(args.directory, loaded, settings)
    result = ConvertResult(manifest.target, Path(args.directory), manifest)
    if args.json:
        print(json.dumps(_result_json(result), indent=2))
    else:
        _print_result(result)
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


def cmd_report(args: argparse.Namespace) -> int:
    from nafnet_edge.report import write_report

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


def _kodak_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("nafnet_edge") / "data" / "kodak"))


class _Interrupts:
    """main()'s handler for SIGINT, SIGTERM and SIGHUP. The first signal raises KeyboardInterrupt, so the command
    unwinds and removes its temporary files; later ones are only counted, so neither that clean-up nor the one
    "interrupted" line can be cut short by a second traceback. ``armed`` is cleared once the command has ended."""

    def __init__(self) -> None:
        self.received = 0
        self.armed = True

    def __call__(self, signum: int, frame: object) -> None:
        self.received += 1
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt


def _catch_termination(handler: Any) -> dict[int, Any]:
    """Ctrl-C, SIGTERM and SIGHUP all go to ``handler``: they end a command alike, so temporary files are removed
    (Ctrl-C too when a parent shell started us with it ignored). Returns the previous handlers (main() restores
    them, since notebooks call it). Signal handlers can only be set from the main thread; elsewhere nothing
    changes."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            number = getattr(signal, name)
            previous[number] = signal.signal(number, handler)
    return previous


def _write_whole(text: str) -> None:
    """Write ``text`` to stderr in one piece: a signal arriving meanwhile waits until it is written."""
    from nafnet_edge.atomic import _signals_deferred

    with _signals_deferred():
        sys.stderr.write(text)
        sys.stderr.flush()


def _report_failure(interrupts: _Interrupts, line: str | None, *, debug: bool) -> None:
    """Print a failure: the traceback being handled when ``debug``, then ``line``. A failure that comes with an
    interrupt (a native call cut short, a KeyboardInterrupt a library turned into its own error, a signal while
    the message was being put together) is the interrupt: KeyboardInterrupt is raised instead, and main() prints
    its one line."""
    text = (traceback.format_exc() if debug else "") + (line + "\n" if line else "")
    if interrupts.received:
        raise KeyboardInterrupt
    _write_whole(text)


def _run_command(args: argparse.Namespace, interrupts: _Interrupts) -> int:
    """The command's exit code, its failure reported in one line (after the traceback with --debug)."""
    try:
        return int(args.func(args))
    except NafnetEdgeError as e:
        _report_failure(interrupts, f"nafnet-edge: error: {printable(str(e))}", debug=args.debug)
        return e.exit_code
    except Exception as e:  # an unexpected failure is a bug: say so in one line unless --debug
        message = " ".join(str(e).split())  # one line, whatever the exception carried
        line = f"nafnet-edge: internal error: {type(e).__name__}: {message} (rerun with --debug for details)"
        _report_failure(interrupts, None if args.debug else line, debug=args.debug)
        return EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:  # the backends' deprecation chatter is for their developers, not for our users
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    interrupts = _Interrupts()
    previous = _catch_termination(interrupts)
    try:
        try:
            code = _run_command(args, interrupts)
            interrupts.armed = False  # the command has ended: a signal from here on changes nothing
            return code
        except KeyboardInterrupt:  # raised in the command, or while it was reporting a failure: one line either way
            interrupts.armed = False
            _write_whole("nafnet-edge: interrupted; no partial output was left in place\n")
            return EXIT_INTERRUPTED
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


if __name__ == "__main__":
    sys.exit(main())
