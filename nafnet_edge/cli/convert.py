"""``nafnet-edge convert``: export, validate and optionally benchmark artifacts."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from nafnet_edge.cli.bench import bench_defaults, run_bench
from nafnet_edge.cli.common import (
    EPILOG,
    Parents,
    add_target_options,
    check_input_sizes,
    load_model,
    precision_help,
    size_settings,
    target_list,
    target_settings,
    titles,
)
from nafnet_edge.errors import (
    UsageError,
    printable,
)
from nafnet_edge.sizes import parse_size


def validation_settings(args: argparse.Namespace, channels: int) -> Any:
    from nafnet_edge.conversion import ValidationSettings
    from nafnet_edge.inference import resolve_device
    from nafnet_edge.validation import default_images, folder_images, paired_images

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


def result_json(result: Any) -> dict[str, Any]:
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


def print_result(result: Any) -> None:
    v = result.validation
    line = f"{result.target:<18} {result.manifest.precision:<5} {printable(str(result.directory))}"
    if v is not None:
        s = v.summary
        line += f"  fidelity {s['fidelity_db_min']:.1f} dB  max err {s['max_abs_error']:.1e}"
        if "drift_db_mean" in s:
            line += f"  drift {s['drift_db_mean']:+.3f} dB"
        line += "  ok" if v.passed else f"  FAILED: {'; '.join(v.failures)}"
    print(line)


def _dirname(target: str, args: argparse.Namespace) -> str:
    """OUT/<target>-<precision>: the precision asked for, else the target's default."""
    from nafnet_edge.converters import target_class
    from nafnet_edge.manifest import artifact_dirname

    return artifact_dirname(target, args.precision or target_class(target).default_precision)


def cmd_convert(args: argparse.Namespace) -> int:
    from nafnet_edge.converters import target_names

    targets = target_names() if args.target == "all" else args.target.split(",")
    target_settings(args, targets)  # an option none of them owns is refused before anything is locked or loaded
    with contextlib.ExitStack() as locks:
        if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 writes artifacts
            from nafnet_edge.atomic import output_lock

            for target in targets:  # held from the existence check to the rename: --force races are impossible
                locks.enter_context(output_lock(args.output / _dirname(target, args)))
        return _convert_targets(args, targets)


def _convert_targets(args: argparse.Namespace, targets: list[str]) -> int:
    from tqdm import tqdm

    from nafnet_edge.conversion import convert
    from nafnet_edge.converters import ExportOptions, get_target
    from nafnet_edge.errors import EXIT_BUDGET, EXIT_MISSING_BACKEND, MissingBackendError

    if args.overlap is None:
        from nafnet_edge.validation import DEFAULT_OVERLAP_PX

        args.overlap = DEFAULT_OVERLAP_PX
    if not args.no_validate and args.overlap >= min(args.input_size):
        raise UsageError(
            f"--overlap {args.overlap} must be smaller than the tile the artifact runs on (--input-size "
            f"{args.input_size[0]}x{args.input_size[1]})"
        )
    existing = [str(args.output / _dirname(t, args)) for t in targets if (args.output / _dirname(t, args)).exists()]
    if existing and not args.force:
        raise UsageError(f"{', '.join(existing)} exists; pass --force to replace it or choose another -o")
    own = target_settings(args, targets)
    loaded = load_model(args, args.checkpoint)
    check_input_sizes(loaded.config, [args.input_size], more=size_settings(own))
    settings = None if args.no_validate else validation_settings(args, loaded.config.img_channels)
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
        artifacts = [result_json(r) for r in results]
        if benched is not None:
            for artifact, measured in zip(artifacts, benched.artifacts, strict=True):
                artifact["bench"] = measured.to_dict()
        print(json.dumps({"artifacts": artifacts, "skipped": skipped}, indent=2))
    else:
        for result in results:
            print_result(result)
        if benched is not None:
            from nafnet_edge.benchmark import format_table

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
    from nafnet_edge.conversion import Int8Settings
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
        checkpoint=args.output / f".{_dirname(args.target, args)}-train.pt",
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


def add_parser(sub: Any, parents: Parents) -> None:
    ckpt = parents.ckpt
    validation = parents.validation
    int8 = parents.int8
    bench = parents.bench
    targets = parents.targets
    names = parents.names
    p = sub.add_parser(
        "convert",
        parents=[ckpt, validation, int8, bench],
        help=f"export {titles(targets, 'or')} artifacts and validate them in their runtimes",
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
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], help=precision_help())
    p.add_argument("--train-data", type=Path, metavar="DIR", help="int8: images to calibrate / fine-tune on")
    p.add_argument("--train-pairs", type=Path, metavar="CLEAN", help="int8: ground truth for --train-data")
    p.add_argument("--input-size", type=parse_size, default=(256, 256), metavar="PX", help="tile size (256)")
    p.add_argument("--no-validate", action="store_true", help="export only")
    p.add_argument("--force", action="store_true", help="replace OUT/<target> when it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object: artifacts, metrics, skipped")
    add_target_options(p, "convert")
    p.set_defaults(func=cmd_convert)
