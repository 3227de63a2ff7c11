"""Run the ``nafnet-edge`` CLI with one function made to stop, so a test can signal the process in a known phase.

    python tests/paused_cli.py MODULE:NAME[.NAME] WHEN CALL READY_FD RESUME_FD -- CLI ARGUMENTS...

On the CALL-th call of the named function (1 = the first) the process stops at the point WHEN names:

- ``call``: before the function runs;
- ``return``: after it has returned;
- ``enter``: the function returns a context manager: after its ``__enter__`` (inside the ``with`` block);
- ``exit``: the function returns a context manager: after its ``with`` block has completed.

Stopped, it writes ``paused`` and a newline to READY_FD and waits for RESUME_FD: a byte there (or the test's end
of the pipe closing) lets it go on. A signal that arrives meanwhile takes effect right there, whichever thread of
the process the kernel hands it to: the wait also watches Python's signal wakeup descriptor, so the main thread
wakes up and runs the handler (for nafnet-edge, KeyboardInterrupt) inside the stopped phase.

This is test harness only: nothing in nafnet_edge knows about it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import select
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

WHEN = ("call", "return", "enter", "exit")


def _stop(ready_fd: int, resume_fd: int) -> None:
    if threading.current_thread() is not threading.main_thread():
        os.write(ready_fd, b"reached on a thread other than the main thread: a signal cannot land there\n")
        os._exit(70)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    previous = signal.set_wakeup_fd(wake_w)
    try:
        os.write(ready_fd, b"paused\n")
        os.close(ready_fd)
        while True:
            readable, _, _ = select.select([resume_fd, wake_r], [], [])
            if wake_r in readable:  # a signal was caught: its Python handler runs before the next loop
                os.read(wake_r, 64)
            if resume_fd in readable:
                os.read(resume_fd, 1)
                return
    finally:
        signal.set_wakeup_fd(previous)
        os.close(wake_r)
        os.close(wake_w)


def pausing(original: Callable[..., Any], *, when: str, call: int, ready_fd: int, resume_fd: int) -> Callable[..., Any]:
    """``original`` with a stop at its ``call``-th call (see the module docstring)."""
    calls = 0
    stop = functools.partial(_stop, ready_fd, resume_fd)

    @contextlib.contextmanager
    def stopping_in(manager: Any) -> Iterator[Any]:
        with manager as value:
            if when == "enter":
                stop()
            yield value
        if when == "exit":
            stop()

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls != call:
            return original(*args, **kwargs)
        if when == "call":
            stop()
        result = original(*args, **kwargs)
        if when == "return":
            stop()
        return stopping_in(result) if when in ("enter", "exit") else result

    return wrapper


def main() -> None:
    target, when, call, ready_fd, resume_fd, separator, *cli_args = sys.argv[1:]
    if when not in WHEN or separator != "--":
        raise SystemExit(__doc__)
    module_name, _, qualname = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    setattr(owner, name, pausing(original, when=when, call=int(call), ready_fd=int(ready_fd), resume_fd=int(resume_fd)))

    from nafnet_edge.cli import main as cli_main

    sys.exit(cli_main(cli_args))


if __name__ == "__main__":
    main()
