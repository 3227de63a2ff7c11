"""The ``nafnet-edge`` command: one module per command. Heavy imports (torch, backends) happen inside each command,
never at start-up."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback
import warnings
from typing import Any

from nafnet_edge import __version__, progress
from nafnet_edge.cli import arm64, bench, convert, inspect, plan, quantize, reparam, report, run, validate
from nafnet_edge.cli.bench import FRAME_BYTES_PER_PIXEL, parse_frame
from nafnet_edge.cli.common import EPILOG, Parser, parents, target_options
from nafnet_edge.errors import EXIT_FAILURE, EXIT_INTERRUPTED, NafnetEdgeError, printable
from nafnet_edge.sizes import parse_size

__all__ = ["FRAME_BYTES_PER_PIXEL", "build_parser", "main", "parse_frame", "parse_size", "target_options"]

COMMANDS = (inspect, run, reparam, convert, quantize, validate, bench, report, plan, arm64)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="nafnet-edge",
        description="Load, convert, validate and benchmark NAFNet image-restoration models for edge runtimes.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"nafnet-edge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors (implies --verbose)")
    add_output_options(parser, default="normal")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    shared = parents()
    for command in COMMANDS:
        command.add_parser(sub, shared)
    for command_parser in dict.fromkeys(sub.choices.values()):  # aliases share their parser
        add_output_options(command_parser, default=argparse.SUPPRESS)  # a top-level flag is not overridden
    return parser


def add_output_options(parser: argparse.ArgumentParser, *, default: str) -> None:
    """``--quiet`` / ``--verbose`` (one ``level`` for :mod:`nafnet_edge.progress`), on the top-level parser and
    on every command, so they go before or after the command name."""
    group = parser.add_argument_group("output").add_mutually_exclusive_group()
    group.add_argument(
        "--quiet",
        dest="level",
        action="store_const",
        const="quiet",
        default=default,
        help="print only results and errors: no progress lines",
    )
    group.add_argument(
        "--verbose",
        dest="level",
        action="store_const",
        const="verbose",
        default=default,
        help="also show the backends' own output (converter logs, warnings, progress bars), which is captured "
        "otherwise",
    )


def output_level(args: argparse.Namespace) -> progress.Level:
    """The progress level the flags ask for; --debug implies --verbose."""
    return "verbose" if args.debug else args.level


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


def _report_failure(interrupts: _Interrupts, line: str | None, *, debug: bool, error: BaseException) -> None:
    """Print a failure: the traceback being handled when ``debug``, then ``line``, then where the backends'
    output captured before the failure was saved, if it was. A failure that comes with an interrupt (a native
    call cut short, a KeyboardInterrupt a library turned into its own error, a signal while the message was being
    put together) is the interrupt: KeyboardInterrupt is raised instead, and main() prints its one line."""
    text = (traceback.format_exc() if debug else "") + (line + "\n" if line else "")
    log = progress.failure_log(error)
    if log is not None and not isinstance(error, NafnetEdgeError):  # ours say all there is to say; a bug may not
        text += f"nafnet-edge: note: the backends' own output before this error is in {printable(str(log))}\n"
    if interrupts.received:
        raise KeyboardInterrupt
    _write_whole(text)


def _run_command(args: argparse.Namespace, interrupts: _Interrupts) -> int:
    """The command's exit code, its failure reported in one line (after the traceback with --debug)."""
    try:
        return int(args.func(args))
    except NafnetEdgeError as e:
        _report_failure(interrupts, f"nafnet-edge: error: {printable(str(e))}", debug=args.debug, error=e)
        return e.exit_code
    except Exception as e:  # an unexpected failure is a bug: say so in one line unless --debug
        message = " ".join(str(e).split())  # one line, whatever the exception carried
        line = f"nafnet-edge: internal error: {type(e).__name__}: {message} (rerun with --debug for details)"
        _report_failure(interrupts, None if args.debug else line, debug=args.debug, error=e)
        return EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = output_level(args)
    interrupts = _Interrupts()
    previous = _catch_termination(interrupts)
    with progress.configured(level=level), warnings.catch_warnings():
        if level != "verbose":  # the backends' warnings are for their developers (captured in backend_output)
            warnings.filterwarnings("ignore", module=r"(?!nafnet_edge(\.|$))")
        return _main(args, interrupts, previous)


def _main(args: argparse.Namespace, interrupts: _Interrupts, previous: dict[int, Any]) -> int:
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
