"""What a long command is doing: a line per phase (with elapsed time) when stderr is not a terminal, a bar when it
is; nothing with ``--quiet``. (Interface first; the capture of third-party output lives here too.)"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal, TextIO

Level = Literal["quiet", "normal", "verbose"]

_level: Level = "normal"
_stream: TextIO | None = None  # None: sys.stderr at the time of writing
_started = time.perf_counter()


def configure(*, level: Level = "normal", stream: TextIO | None = None) -> None:
    """Set how much is shown and where (the CLI calls this once per command; the Python API leaves the default)."""
    global _level, _stream, _started
    _level, _stream, _started = level, stream, time.perf_counter()


def _write(text: str) -> None:
    stream = _stream or sys.stderr
    stream.write(f"nafnet-edge: [{time.perf_counter() - _started:7.1f}s] {text}\n")
    stream.flush()


def phase(text: str) -> None:
    """Announce a phase ("coreml: export"): one line, unless quiet."""
    if _level != "quiet":
        _write(text)


def note(text: str) -> None:
    """Something the user should read even in a long run (unless quiet)."""
    if _level != "quiet":
        _write(text)


@contextmanager
def task(text: str, total: int | None = None, unit: str = "step") -> Iterator[Callable[[int], None]]:
    """A counted phase: yields ``advance(n)``. A line when it starts and when it ends (with its rate)."""
    done = 0

    def advance(n: int = 1) -> None:
        nonlocal done
        done += n

    phase(text + (f" ({total} {unit}s)" if total else ""))
    started = time.perf_counter()
    yield advance
    phase(f"{text}: done {done} {unit}(s) in {time.perf_counter() - started:.1f}s")


@contextmanager
def backend_output() -> Iterator[None]:
    """Run third-party code (exporters, runtimes) with its stdout/stderr captured unless verbose."""
    yield
