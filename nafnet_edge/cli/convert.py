"""``nafnet-edge convert``: export, validate and optionally benchmark artifacts (``nafnet_edge.api.convert``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
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
    load_model,
    precision_help,
    target_list,
    target_settings,
    titles,
    validation_options,
)
from nafnet_edge.errors import (
    UsageError,
    printable,
)
from nafnet_edge.sizes import parse_size


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
    from nafnet_edge.converters import target_class

    v = result.validation
    line = f"{result.target:<18} {result.manifest.precision:<5} {printable(str(result.directory))}"
    if v is not None:
        s = v.summary
        line += f"  fidelity {s['fidelity_db_min']:.1f} dB  max err {s['max_abs_error']:.1e}"
        if "drift_db_mean" in s:
            line += f"  drift {s['drift_db_mean']:+.3f} dB"
        if v.budgets.get("min_within_one_level") is not None:  # image I/O: scored on 8-bit outputs
            line += f"  8-bit {s['within_one_level_share_min']:.2%} within 1 level"
        line += "  ok" if v.passed else f"  FAILED: {'; '.join(v.failures)}"
    extra = target_class(result.target).export_summary(result.manifest.export)
    print(f"{line}  {extra}" if extra else line)


def cmd_convert(args: argparse.Namespace) -> int:
    from nafnet_edge import api
    from nafnet_edge.converters import target_names

    targets = target_names() if args.target == "all" else args.target.split(",")
    own = target_settings(args, targets)  # an option none of them owns is refused before anything is locked or loaded
    directories = [api.artifact_directory(args.output, target, args.precision, args.io) for target in targets]
    with contextlib.ExitStack() as locks:
        for directory in directories:  # held from the existence check to the rename: --force races are impossible
            locks.enter_context(api.writer_lock(directory))
        return _convert_targets(args, targets, own, directories)


def _refuse_for_every_target(args: argparse.Namespace) -> None:
    """What no target can build is refused once, before anything is built (``--target all`` would otherwise skip
    every target for the same reason); ``api.convert`` refuses the same for one target."""
    from nafnet_edge import api

    if not args.no_validate:
        api.check_validation_data(args.val_data, args.val_pairs)
    if args.precision == "int8":
        api.check_train_data(args.train_data)


def _convert_targets(
    args: argparse.Namespace, targets: list[str], own: dict[str, dict[str, Any]], directories: list[Path]
) -> int:
    from nafnet_edge import api
    from nafnet_edge.errors import EXIT_BUDGET, EXIT_MISSING_BACKEND, MissingBackendError

    overlap = api.resolve_overlap(args.overlap, args.input_size, validate=not args.no_validate)
    api.check_free(directories, force=args.force)
    _refuse_for_every_target(args)
    loaded = load_model(args, args.checkpoint)
    sizes = dict(pair for target in targets for pair in api.option_sizes(target, own[target]))
    api.check_input_sizes(loaded.config, [args.input_size], more=list(sizes.items()))
    results, skipped = [], []
    missing = 0  # targets of --target all whose extra is not installed: exit 4 once the others are built
    for target in targets:
        try:
            results.append(
                api.convert(
                    loaded,
                    target=target,
                    output=args.output,
                    precision=args.precision,
                    input_size=args.input_size,
                    validate=not args.no_validate,
                    **validation_options(args, overlap=overlap),
                    train_data=args.train_data,
                    train_pairs=args.train_pairs,
                    method=args.method,
                    steps=args.steps,
                    train_batch=args.train_batch,
                    lr=args.lr,
                    seed=args.seed,
                    keep_float=args.keep_float,
                    search_rounds=args.search_rounds,
                    resume=args.resume,
                    options=own[target],
                    io=args.io,
                    pixel_format=args.pixel_format,
                    force=args.force,
                )
            )
        except (MissingBackendError, UsageError) as e:  # anything else is not the user's to fix: it propagates
            if args.target != "all":
                raise
            skipped.append(f"{target}: {e}")
            missing += isinstance(e, MissingBackendError)
    if any(r.manifest is None for r in results):
        return 0  # torchrun: rank 0 exports, validates and reports
    benched = None
    if args.bench and results:
        benched = api.bench(
            *[r.directory for r in results],
            runs=args.bench_runs,
            time=args.bench_time,
            checkpoint=args.checkpoint,
            save=True,
        )
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


def add_parser(sub: Any, parents: Parents) -> None:
    ckpt = parents.ckpt
    validation = parents.validation
    int8 = parents.int8
    targets = parents.targets
    names = parents.names
    p = sub.add_parser(
        "convert",
        parents=[ckpt, validation, int8],
        help=f"export {titles(targets, 'or')} artifacts and validate them in their runtimes",
        description="Export a checkpoint (default: the embedded model) through the deploy graph to one target "
        "or all, each into OUT/<target>-<precision>/ with manifest.json and USAGE.md, then validate the artifact in "
        "its own runtime against fp32 PyTorch outputs of the original model. Exit code 3 when a budget is missed.",
        epilog=EPILOG,
    )
    p.add_argument("checkpoint", nargs="?", metavar="CKPT", help=CHECKPOINT_HELP)
    p.add_argument(
        "--target",
        required=True,
        type=target_list(names),
        metavar="{" + ",".join([*names, "all"]) + "}",
        help="what to produce: one target, several separated by commas, or all",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=defaults.OUTPUT_DIR,
        metavar="OUT",
        help="parent folder of the artifacts, OUT/<target>-<precision>/ each (default: %(default)s)",
    )
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], help=precision_help())
    p.add_argument("--train-data", type=Path, metavar="DIR", help="int8: images to calibrate / fine-tune on")
    p.add_argument("--train-pairs", type=Path, metavar="CLEAN", help="int8: ground truth for --train-data")
    p.add_argument(
        "--input-size",
        type=parse_size,
        default=defaults.INPUT_SIZE,
        metavar="PX",
        help="the artifact's fixed input size, its tile (default: %(default)s)",
    )
    p.add_argument("--no-validate", action="store_true", help="export only")
    p.add_argument("--force", action="store_true", help="replace OUT/<target>-<precision> when it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object: artifacts, metrics, skipped")
    add_io_options(p)
    add_bench_options(p)
    add_target_options(p, "convert")
    p.set_defaults(func=cmd_convert)
