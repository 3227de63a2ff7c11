"""``nafnet-edge arm64``: the ARM64 sysroot that ``validate --arm64`` runs artifacts in (``nafnet_edge.arm64``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from nafnet_edge.cli.common import EPILOG, Parents
from nafnet_edge.errors import EXIT_MISSING_BACKEND, display_path


def cmd_prepare(args: argparse.Namespace) -> int:
    from nafnet_edge import arm64

    if args.check:
        return cmd_status(args)
    started = time.perf_counter()
    sysroot, built = arm64.prepare(args.dir, force=args.force)
    versions = ", ".join(f"{k} {v}" for k, v in sorted(sysroot.versions.items()))
    if built:
        print(f"prepared {display_path(sysroot.directory)} ({versions}) in {time.perf_counter() - started:.0f}s")
    else:
        print(f"already prepared: {display_path(sysroot.directory)} ({versions})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from nafnet_edge import arm64

    lines, ready = arm64.status_lines(args.dir)
    print("\n".join(lines))
    return 0 if ready else EXIT_MISSING_BACKEND


def add_parser(sub: Any, parents: Parents) -> None:
    p = sub.add_parser(
        "arm64",
        help="prepare the ARM64 sysroot that validate --arm64 runs artifacts in (qemu user-mode emulation)",
        description="ARM64 validation without a phone runs an artifact in its own runtime under qemu user-mode "
        "emulation, in a sysroot of Debian arm64 packages and aarch64 wheels of the runtimes installed here. "
        "`prepare` builds it once (the only step that downloads); `status` says what is there.",
        epilog=EPILOG,
    )
    commands = p.add_subparsers(dest="arm64_command", metavar="COMMAND", required=True, help="what to do")
    folder = argparse.ArgumentParser(add_help=False)
    folder.add_argument(
        "--dir",
        type=Path,
        metavar="DIR",
        help="the sysroot folder (default: $NAFNET_EDGE_ARM64, else ~/.cache/nafnet-edge/arm64/<versions>)",
    )
    prepare = commands.add_parser(
        "prepare",
        parents=[folder],
        help="download and build the sysroot (needs apt's arm64 index, pip, qemu-user-static, g++-aarch64-linux-gnu)",
        description="Download Debian's arm64 Python, C and C++ runtime packages (apt-get download) and the aarch64 "
        "wheels of executorch, ai-edge-litert and numpy at the versions installed here (pip download), unpack them, "
        "and cross-compile the ExecuTorch runner. Does nothing when a complete sysroot for these versions is there. "
        "Exit code 4 when something it needs is missing here (the message says what to install).",
        epilog=EPILOG,
    )
    prepare.add_argument("--force", action="store_true", help="build it again even when it is complete")
    prepare.add_argument("--check", action="store_true", help="only say what is there (as `arm64 status`)")
    prepare.set_defaults(func=cmd_prepare)
    status = commands.add_parser(
        "status",
        parents=[folder],
        help="say whether the sysroot is prepared and what it holds (exit code 4 when it is not usable)",
        epilog=EPILOG,
    )
    status.set_defaults(func=cmd_status)
