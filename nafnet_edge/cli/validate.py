"""``nafnet-edge validate``: re-validate an artifact directory (``nafnet_edge.api.validate``); with ``--arm64`` also
on emulated ARM64 CPUs (``nafnet_edge.arm64.validate``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from nafnet_edge.cli.common import EPILOG, Parents, validation_options
from nafnet_edge.cli.convert import print_result, result_json
from nafnet_edge.errors import printable


def cmd_validate(args: argparse.Namespace) -> int:
    from nafnet_edge.errors import EXIT_BUDGET, UsageError

    options: dict[str, Any] = {
        "checkpoint": args.checkpoint,
        **validation_options(args, overlap=args.overlap),
        "param_key": args.param_key,
        "arch": args.arch,
        "train_size": args.train_size,
    }
    if not args.arm64:
        if args.cpu or args.arm64_dir:
            raise UsageError("--cpu and --arm64-dir go with --arm64")
        from nafnet_edge import api

        result = api.validate(args.directory, **options)
        if args.json:
            print(json.dumps(result_json(result), indent=2))
        else:
            print_result(result)
        return 0 if result.passed else EXIT_BUDGET

    from nafnet_edge.arm64.emulator import DEFAULT_CPUS
    from nafnet_edge.arm64.validate import validate

    arm = validate(args.directory, cpus=args.cpu or DEFAULT_CPUS, sysroot_dir=args.arm64_dir, **options)
    if args.json:
        out = result_json(arm.x86)
        out["passed"] = arm.passed
        out["arm64"] = {cpu: record.to_dict() for cpu, record in arm.arm64.items()}
        print(json.dumps(out, indent=2))
    else:
        print_result(arm.x86)
        for cpu, record in arm.arm64.items():
            print_arm64(cpu, record)
    return 0 if arm.passed else EXIT_BUDGET


def print_arm64(cpu: str, record: Any) -> None:
    """One line per emulated CPU, under the x86 line of ``print_result``."""
    v = record.validation
    s = v.summary
    line = f"  arm64 {cpu:<12} fidelity {s['fidelity_db_min']:.1f} dB  max err {s['max_abs_error']:.1e}"
    if "drift_db_mean" in s:
        line += f"  drift {s['drift_db_mean']:+.3f} dB"
    if v.budgets.get("min_within_one_level") is not None:
        line += f"  8-bit {s['within_one_level_share_min']:.2%} within 1 level"
    if record.vs_x86_max_abs is not None:
        line += f"  vs x86 {record.vs_x86_max_abs:.1e}"
    line += "  ok" if v.passed else f"  FAILED: {'; '.join(v.failures)}"
    print(printable(line))


def add_parser(sub: Any, parents: Parents) -> None:
    ckpt = parents.ckpt
    validation = parents.validation
    p = sub.add_parser(
        "validate",
        parents=[ckpt, validation],
        help="validate an artifact directory in its runtime against the fp32 reference",
        description="Run an artifact written by convert in its own runtime on validation images and compare it "
        "with fp32 PyTorch outputs of the original model; updates the manifest. With --arm64, ExecuTorch and "
        "LiteRT artifacts also run in their runtime on emulated ARM64 CPUs (qemu; prepare the sysroot once with "
        "`nafnet-edge arm64 prepare`), scored the same way and recorded beside the x86 results. Exit code 3 on a "
        "missed budget.",
        epilog=EPILOG,
    )
    p.add_argument(
        "directory", type=Path, metavar="ARTIFACT_DIR", help="OUT/<target>-<precision> written by convert or quantize"
    )
    p.add_argument("--checkpoint", dest="checkpoint", metavar="CKPT", help="source checkpoint (default: recorded)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the metrics")
    arm = p.add_argument_group("ARM64 (emulated)")
    arm.add_argument(
        "--arm64",
        action="store_true",
        help="also validate on emulated ARM64 CPUs (executorch and litert artifacts); no timings come from emulation",
    )
    arm.add_argument(
        "--cpu",
        action="append",
        metavar="MODEL",
        help="a qemu CPU model to emulate, with qemu properties if any, repeatable (default: cortex-a76, a dot-product "
        "core, and max,sme=off, with i8mm)",
    )
    arm.add_argument(
        "--arm64-dir",
        type=Path,
        metavar="DIR",
        help="the prepared sysroot (default: $NAFNET_EDGE_ARM64, else ~/.cache/nafnet-edge/arm64/<versions>)",
    )
    p.set_defaults(func=cmd_validate)
