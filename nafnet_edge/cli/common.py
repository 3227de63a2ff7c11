"""Parsing, option types and helpers every command shares."""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nafnet_edge import defaults
from nafnet_edge.archs import ARCHS
from nafnet_edge.errors import (
    EXIT_USAGE,
    UsageError,
)
from nafnet_edge.sizes import MAX_SIDE_PX, parse_size

EPILOG = (
    "exit codes: 0 ok, 1 internal error, 2 usage, 3 budget missed, 4 missing backend, 5 bad input, "
    "6 output not writable, 130 interrupted"
)


def shown_default(value: Any) -> Any:
    """A default as --help shows it: a size as 256 or 512x768, a float as 0.001, a path as its text."""
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return str(value[0]) if value[0] == value[1] else f"{value[0]}x{value[1]}"
    if isinstance(value, float):
        return f"{value:g}"
    return value


class HelpFormatter(argparse.HelpFormatter):
    """%(default)s in a help string shows the default as the user would type it (``shown_default``)."""

    def _expand_help(self, action: argparse.Action) -> str:
        shown = copy.copy(action)
        shown.default = shown_default(action.default)
        return super()._expand_help(shown)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: what is wrong and where the help is (exit code 2), and defaults in help
    shown as typed (``HelpFormatter``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

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


CHECKPOINT_HELP = (
    f"checkpoint file (.pth, .pt, .safetensors) or a shipped model: {', '.join(defaults.SHIPPED_MODELS)} "
    "(default: denoise-s, the embedded denoiser)"
)
SIDE_OR_ZERO = bounded(non_negative_int, MAX_SIDE_PX, "px, the largest model input side")


BATCH = bounded(positive_int, MAX_BATCH)


ITERS = bounded(positive_int, MAX_ITERS)


def checkpoint_options() -> Parser:
    p = Parser(add_help=False)
    g = p.add_argument_group("checkpoint")
    g.add_argument(
        "--param-key",
        default=defaults.PARAM_KEY,
        choices=["auto", "params", "params_ema", "state_dict", "model_state_dict", "model", "net", "network"],
        help="which entry of a wrapped checkpoint to use (auto: 'params' first, as the official files; "
        "default: %(default)s)",
    )
    g.add_argument(
        "--arch",
        choices=ARCHS,
        help="override the identified class, within the checkpoint's family: nafnet or nafnet-local (TLC) for a "
        "NAFNet, baseline or baseline-local (TLC) for a Baseline, nafssr (TLC) or nafnet-sr for a stereo "
        "super-resolution checkpoint, nafnet-sr for a single-view one",
    )
    g.add_argument(
        "--train-size",
        type=parse_size,
        metavar="PX",
        help="TLC training crop (default: 256 for the U-Nets, 30x90 (one view) for NAFSSR)",
    )
    return p


def _validation_knobs(g: Any) -> None:
    g.add_argument(
        "--reference-device",
        default=defaults.REFERENCE_DEVICE,
        choices=["auto", "cpu", "cuda"],
        help="where the fp32 reference runs (default: %(default)s; validate: the manifest's)",
    )
    g.add_argument(
        "--overlap",
        type=SIDE_OR_ZERO,
        metavar="PX",
        help=f"tile overlap (default: convert {defaults.VALIDATION_OVERLAP_PX}, validate the manifest's)",
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


def title(cls: Any) -> str:
    """A target as prose: its usage title ("Core ML"), else its name."""
    return str(cls.usage_title or cls.name)


def titles(classes: list[Any], conjunction: str) -> str:
    titles = [title(cls) for cls in classes]
    return titles[0] if len(titles) == 1 else f"{', '.join(titles[:-1])} {conjunction} {titles[-1]}"


def precision_help() -> str:
    """convert --precision's help: each target's default precision."""
    classes = _target_classes()
    other = [c for c in classes if c.default_precision != "fp32"]
    by_precision = {
        precision: [c for c in other if c.default_precision == precision]
        for precision in dict.fromkeys(c.default_precision for c in other)
    }
    parts = [f"{precision} for {titles(owners, 'and')}" for precision, owners in by_precision.items()]
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
            groups[key] = parser.add_argument_group(f"{titles(list(owners), 'and')} options")
        owner = " and ".join(title(cls) for cls in owners)
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


def load_model(args: argparse.Namespace, checkpoint: str | None, device: str = "cpu") -> Any:
    """``checkpoint`` loaded with the checkpoint options (--param-key, --arch, --train-size) in ``args``."""
    from nafnet_edge import api

    return api.load(checkpoint, param_key=args.param_key, arch=args.arch, train_size=args.train_size, device=device)


def kodak_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("nafnet_edge") / "data" / "kodak"))


@dataclass(frozen=True)
class Parents:
    """The option groups several commands share (argparse parents) and the registered targets. ``validation``
    accepts the old spellings --data and --data-pairs; ``validation_only`` does not (quantize's --data was its
    training images)."""

    ckpt: Parser
    int8: Parser
    validation: Parser
    validation_only: Parser
    targets: list[Any]
    names: list[str]
    int8_names: list[str]


def parents() -> Parents:
    ckpt = checkpoint_options()
    targets = _target_classes()
    names = [cls.name for cls in targets]
    int8_names = [cls.name for cls in targets if cls.quantizer is not None]

    int8 = Parser(add_help=False)
    g = int8.add_argument_group("int8")
    g.add_argument(
        "--method",
        choices=["qat", "ptq"],
        default=defaults.METHOD,
        help="fine-tune with fake quantization (qat) or calibrate only (ptq) (default: %(default)s)",
    )
    g.add_argument("--steps", type=ITERS, default=defaults.STEPS, metavar="N", help="QAT steps (default: %(default)s)")
    deprecated_alias(g, "--iters", "--steps", dest="steps", type=ITERS, metavar="N")
    g.add_argument(
        "--train-batch",
        type=BATCH,
        default=defaults.TRAIN_BATCH,
        metavar="N",
        help="training crops per QAT step (default: %(default)s)",
    )
    deprecated_alias(g, "--batch", "--train-batch", dest="train_batch", type=BATCH, metavar="N")
    g.add_argument(
        "--lr",
        type=bounded(positive_float, 1.0, "a step as large as the weights"),
        default=defaults.LR,
        help="AdamW step relative to each tensor's RMS, cosine decay (default: %(default)s)",
    )
    g.add_argument(
        "--seed",
        type=bounded(non_negative_int, MAX_SEED),
        default=defaults.SEED,
        metavar="N",
        help="seed of the training crops and their order (default: %(default)s)",
    )
    g.add_argument("--resume", action="store_true", help="continue from OUT/.<target>-int8-train.pt")
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
        default=defaults.SEARCH_ROUNDS,
        metavar="N",
        help="when the artifact misses --max-drift: up to N more rounds keeping the most sensitive units float "
        "(1, 2, 4, ...); 0 turns the search off (default: %(default)s)",
    )

    validation_only = Parser(add_help=False)
    _validation_data(validation_only.add_argument_group("validation"), deprecated=False)

    validation = Parser(add_help=False)
    _validation_data(validation.add_argument_group("validation"), deprecated=True)
    return Parents(ckpt, int8, validation, validation_only, targets, names, int8_names)


def _validation_data(g: Any, *, deprecated: bool) -> None:
    """--val-data / --val-pairs and the validation knobs; ``deprecated``: also their old spellings --data and
    --data-pairs (not on quantize, where --data named the training images)."""
    g.add_argument(
        "--val-data", type=Path, metavar="DIR", help=f"validation images (default: {defaults.VALIDATION_DATA_NOTE})"
    )
    g.add_argument(
        "--val-pairs",
        nargs=2,
        type=Path,
        metavar=("INPUTS", "TARGETS"),
        help="validation degraded and ground-truth folders (instead of --val-data)",
    )
    if deprecated:
        deprecated_alias(g, "--data", "--val-data", dest="val_data", type=Path, metavar="DIR")
        deprecated_alias(
            g, "--data-pairs", "--val-pairs", dest="val_pairs", nargs=2, type=Path, metavar=("INPUTS", "TARGETS")
        )
    _validation_knobs(g)


MAX_TIME_S = 24 * 3600.0  # a time budget for timed runs: a day
TIME_S = bounded(positive_float, MAX_TIME_S, "s, a day")


def add_io_options(parser: argparse.ArgumentParser) -> None:
    """``--io`` and ``--pixel-format`` of convert and quantize (``nafnet_edge.pixels``)."""
    from nafnet_edge.pixels import IO_KINDS, PIXEL_FORMATS

    group = parser.add_argument_group("input and output")
    group.add_argument(
        "--io",
        choices=IO_KINDS,
        default="tensor",
        help="tensor: float32 NCHW in [0, 1], unclamped output; image: 8-bit pixels in and out (uint8 NHWC, or a "
        "Core ML image), scale, clamp and round inside the artifact, written to OUT/<target>-<precision>-image "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--pixel-format",
        choices=PIXEL_FORMATS,
        help="image I/O: byte order of the pixels (rgba: an Android Bitmap, alpha ignored; bgr: OpenCV; gray for "
        "1-channel models); default: the target's (executorch rgba, openvino bgr, coreml and onnx rgb)",
    )


def add_bench_options(parser: argparse.ArgumentParser) -> None:
    """convert/quantize --bench and its run count or time budget (alternatives)."""
    g = parser.add_argument_group("benchmark")
    g.add_argument("--bench", action="store_true", help="benchmark what was built (nafnet-edge bench --save)")
    runs = g.add_mutually_exclusive_group()
    runs.add_argument(
        "--bench-runs",
        type=ITERS,
        default=defaults.BENCH_RUNS,
        metavar="N",
        help="timed runs per artifact with --bench (default: %(default)s)",
    )
    runs.add_argument(
        "--bench-time",
        type=TIME_S,
        metavar="S",
        help="with --bench: time each artifact for about S seconds instead of --bench-runs",
    )
    deprecated_alias(runs, "--bench-iters", "--bench-runs", dest="bench_runs", type=ITERS, metavar="N")


DEPRECATED_UNTIL = "0.3"  # the release that drops the old spellings of renamed flags


class _DeprecatedAlias(argparse.Action):
    """Stores like the flag it stands for, after a one-line note on stderr naming the new spelling."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, **kwargs: Any):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        print(
            f"nafnet-edge: warning: {option_string} is deprecated, use {self.new} "
            f"(the old name goes in nafnet-edge {DEPRECATED_UNTIL})",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def deprecated_alias(parser: Any, old: str, new: str, *, dest: str, **kwargs: Any) -> None:
    """Accept ``old`` as a hidden, deprecated spelling of the flag ``new`` (same ``dest``; give the same ``type``,
    ``nargs`` and ``metavar`` as ``new``). Its value wins only if given after ``new``; it is not listed in --help."""
    parser.add_argument(
        old, dest=dest, action=_DeprecatedAlias, new=new, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs
    )


def validation_options(args: argparse.Namespace, *, overlap: int | None) -> dict[str, Any]:
    """The validation group's options as keyword arguments of ``api.convert``/``api.validate``."""
    return {
        "val_data": args.val_data,
        "val_pairs": args.val_pairs,
        "reference_device": args.reference_device,
        "overlap": overlap,
        "min_fidelity": args.min_fidelity,
        "max_drift": args.max_drift,
        "cache": not args.no_cache,
    }
