"""What a long command is doing, and the third-party output it keeps out of the user's way.

- :func:`phase`: one line on stderr, ``nafnet-edge: [  12.3s] coreml-fp16: export`` (the time since
  :func:`configure`, or since import for the Python API); :func:`note`: ``nafnet-edge: note: ...``, something to
  read rather than a step.
- :func:`task`: a counted phase. On a terminal a progress bar; otherwise (CI logs, ``2> file``) a line when it
  starts, a line at most every :data:`INTERVAL_S` seconds while it runs (``... 12/24 tiles, 30.1s``) and one
  when it ends.
- :func:`backend_output`: runs third-party code (exporters, quantizers, runtimes) with its output captured: its
  ``print``s, warnings and logging, and at file-descriptor level what C++ loggers and the backends' own progress
  bars write to fds 1 and 2. Lines from this module still reach the real stderr meanwhile. When the block fails,
  the captured text is saved to ``nafnet-edge-<pid>.log`` in the temporary directory (:func:`failure_log`
  names it for the error message); otherwise it is dropped.

Levels: ``quiet`` shows nothing from here (errors and results are printed by the caller), ``normal`` shows the
lines above, ``verbose`` also lets third-party output through uncaptured.

The state is per process and not thread-safe: configure and capture from the main thread (``warnings`` and the
file descriptors are process-wide anyway).
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

from nafnet_edge.errors import printable

Level = Literal["quiet", "normal", "verbose"]
LEVELS: tuple[Level, ...] = ("quiet", "normal", "verbose")
PREFIX = "nafnet-edge:"
INTERVAL_S = 10.0  # at most one "still running" line per task this often, when no bar is shown

_level: Level = "normal"
_stream: TextIO | None = None  # None: the real stderr at the time of writing
_started = time.perf_counter()
_capture: _Capture | None = None  # the active backend_output block, if any
_bars = 0  # progress bars shown now: lines are written above them


def configure(*, level: Level = "normal", stream: TextIO | None = None) -> None:
    """Set how much is shown and where (the CLI calls this once per command; the Python API leaves the default),
    and restart the clock of the lines."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    _set(level, stream, time.perf_counter())


def level() -> Level:
    return _level


@contextmanager
def configured(*, level: Level = "normal", stream: TextIO | None = None) -> Iterator[None]:
    """:func:`configure` for the block, the previous settings restored after it (``main()`` runs in notebooks)."""
    previous = _level, _stream, _started
    configure(level=level, stream=stream)
    try:
        yield
    finally:
        _set(*previous)


def _set(level: Level, stream: TextIO | None, started: float) -> None:
    global _level, _stream, _started
    _level, _stream, _started = level, stream, started


def _out() -> TextIO:
    """Where this module's lines go: the configured stream, else the real stderr, also inside backend_output."""
    if _stream is not None:
        return _stream
    if _capture is not None:
        return _capture.real_stderr
    return sys.stderr


class _RealStderr:
    """A file for tqdm that resolves :func:`_out` on every write, so a bar started before a backend_output block
    keeps drawing on the terminal inside it."""

    def write(self, text: str) -> int:
        return _out().write(text)

    def flush(self) -> None:
        _out().flush()

    def isatty(self) -> bool:
        return _isatty(_out())

    def __getattr__(self, name: str) -> Any:
        return getattr(_out(), name)


_REAL_STDERR = _RealStderr()  # one object: tqdm clears the bars drawn on the file it writes a line to


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def line(text: str) -> str:
    """``text`` as this module writes it: prefix and elapsed time."""
    return f"{PREFIX} [{time.perf_counter() - _started:6.1f}s] {text}"


def _write(text: str) -> None:
    text = printable(text)  # a path with a newline or a terminal escape can neither fake lines nor change the terminal
    if _bars:
        from tqdm import tqdm

        tqdm.write(text, file=_REAL_STDERR)
        return
    stream = _out()
    stream.write(text + "\n")
    stream.flush()


def phase(text: str) -> None:
    """Announce a phase (``"coreml-fp16: export"``): one line, unless quiet."""
    if _level != "quiet":
        _write(line(text))


def note(text: str) -> None:
    """Something the user should read even in a long run: ``nafnet-edge: note: text`` (unless quiet)."""
    if _level != "quiet":
        _write(f"{PREFIX} note: {text}")


def warning(text: str) -> None:
    """A condition the user must know about (results still valid, something costs more): ``nafnet-edge: warning:
    text``, shown even with quiet and while backend output is captured."""
    _write(f"{PREFIX} warning: {text}")


class Advance(Protocol):
    def __call__(self, n: int = 1, *, info: str | None = None) -> None: ...


def _plural(n: int | None, unit: str) -> str:
    return unit if n == 1 else unit + "s"


_untimed = 0


@contextmanager
def untimed() -> Iterator[None]:
    """Inside this block, tasks report counts without durations (work whose time means nothing, such as a run
    under CPU emulation)."""
    global _untimed
    _untimed += 1
    try:
        yield
    finally:
        _untimed -= 1


def _took(seconds: float) -> str:
    return "" if _untimed else f"{seconds:.1f}s"


@contextmanager
def task(text: str, total: int | None = None, unit: str = "step") -> Iterator[Advance]:
    """A counted phase: yields ``advance(n=1, *, info=None)``, ``info`` a short status shown with the count
    (``"fidelity 38.2 dB"``). A bar on a terminal; otherwise a start line, a line at most every
    :data:`INTERVAL_S` seconds while it advances and an end line with the count and time."""
    global _bars
    started = time.perf_counter()
    done = 0
    status: str | None = None
    if _level == "quiet":

        def advance_quietly(n: int = 1, *, info: str | None = None) -> None:
            pass

        yield advance_quietly
        return
    if _isatty(_out()):
        from tqdm import tqdm

        bar = tqdm(total=total, desc=text, unit=unit, file=_REAL_STDERR, leave=False, dynamic_ncols=True)
        _bars += 1

        def advance_bar(n: int = 1, *, info: str | None = None) -> None:
            nonlocal done, status
            done += n
            bar.update(n)
            if info is not None and info != status:
                status = info
                bar.set_postfix_str(info, refresh=False)

        try:
            yield advance_bar
        finally:
            _bars -= 1
            bar.close()
        phase(_summary(text, done, total, unit, started, status))
        return

    last = started
    phase(text + (f" ({total} {_plural(total, unit)})" if total else ""))

    def advance_lines(n: int = 1, *, info: str | None = None) -> None:
        nonlocal done, last, status
        done += n
        status = info if info is not None else status
        now = time.perf_counter()
        if now - last >= INTERVAL_S and (total is None or done < total):
            last = now
            count = f"{done}/{total}" if total else str(done)
            took = _took(now - started)
            phase(f"{text}: {count} {_plural(total or done, unit)}" + (f", {took}" if took else "") + _suffix(status))

    yield advance_lines
    phase(_summary(text, done, total, unit, started, status))


def _suffix(status: str | None) -> str:
    return f", {status}" if status else ""


def _summary(text: str, done: int, total: int | None, unit: str, started: float, status: str | None) -> str:
    took = _took(time.perf_counter() - started)
    return f"{text}: done, {done} {_plural(done, unit)}" + (f" in {took}" if took else "") + _suffix(status)


# --- third-party output -------------------------------------------------------------------------------------------


@dataclass
class Captured:
    """What a :func:`backend_output` block caught; ``text`` is filled when the block ends (empty when nothing was
    captured: verbose, or a nested block)."""

    text: str = ""
    log: Path | None = None  # where it was saved, when the block failed


class _Capture:
    """One active capture: swaps fds 1 and 2 for a temporary file where ``sys.stdout``/``sys.stderr`` really are
    those fds, and ``sys.stdout``/``sys.stderr`` for buffers where they are not (pytest's capture, notebooks);
    collects warnings; keeps a stream on the real stderr for this module's own lines."""

    def __init__(self) -> None:
        self.saved_fds: dict[int, int] = {}  # fd -> its duplicate, to restore
        self.file: Any = None  # the temporary file fds 1 and 2 point to
        self.buffers: dict[str, io.StringIO] = {}
        self.saved_streams: dict[str, TextIO] = {}
        self.warnings: list[warnings.WarningMessage] = []
        self.catcher: Any = None
        self.real_stderr: TextIO = sys.stderr
        self.owns_real_stderr = False

    def start(self) -> None:
        originals = {"stdout": sys.stdout, "stderr": sys.stderr}
        fd_level = [(fd, name) for fd, name in ((1, "stdout"), (2, "stderr")) if _fileno(originals[name]) == fd]
        try:
            if fd_level:
                self.file = tempfile.TemporaryFile(mode="w+b", prefix="nafnet-edge-")  # noqa: SIM115 (closed in stop)
            for fd, name in fd_level:
                originals[name].flush()
                self.saved_fds[fd] = os.dup(fd)
                if fd == 2:
                    self.real_stderr = os.fdopen(
                        os.dup(self.saved_fds[2]), "w", buffering=1, encoding=_encoding(originals[name])
                    )
                    self.owns_real_stderr = True
                os.dup2(self.file.fileno(), fd)
            at_fd_level = {name for _, name in fd_level}
            for name, stream in originals.items():
                if name not in at_fd_level:
                    self.saved_streams[name] = stream
                    self.buffers[name] = io.StringIO()
                    setattr(sys, name, self.buffers[name])
            if "stderr" in self.saved_streams:
                self.real_stderr = self.saved_streams["stderr"]
            self.catcher = warnings.catch_warnings(record=True)
            self.warnings = self.catcher.__enter__()
            warnings.simplefilter("default")  # each warning once per place, not once per call
        except BaseException:
            self.stop()
            raise

    def stop(self) -> str:
        """Restore everything (whatever ``start`` got to) and return the captured text."""
        if self.catcher is not None:
            self.catcher.__exit__(None, None, None)
            self.catcher = None
        for name, stream in self.saved_streams.items():
            setattr(sys, name, stream)
        self.saved_streams = {}
        raw = b""
        if self.saved_fds:
            for stream in (sys.stdout, sys.stderr):
                with suppress(OSError, ValueError):
                    stream.flush()
        for fd, saved in self.saved_fds.items():
            os.dup2(saved, fd)
            os.close(saved)
        self.saved_fds = {}
        if self.file is not None:
            self.file.seek(0)
            raw = self.file.read()
            self.file.close()
            self.file = None
        if self.owns_real_stderr:
            self.real_stderr.close()
            self.owns_real_stderr = False
        parts = [raw.decode("utf-8", errors="replace")]
        parts += [buffer.getvalue() for buffer in self.buffers.values()]
        parts += [warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in self.warnings]
        return "".join(part if part.endswith("\n") or not part else part + "\n" for part in parts)


def _fileno(stream: Any) -> int | None:
    try:
        return int(stream.fileno())
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return None


def _encoding(stream: Any) -> str:
    return getattr(stream, "encoding", None) or "utf-8"


@contextmanager
def backend_output() -> Iterator[Captured]:
    """Run third-party code with its output captured, unless verbose; nested blocks capture into the outer one.

    Yields a :class:`Captured`, filled when the block ends. The Python side (``sys.stdout``/``sys.stderr``,
    warnings, logging's last-resort handler, which writes to ``sys.stderr``) and, where the process's stdout and
    stderr are real file descriptors, the C side (fds 1 and 2: C++ loggers, subprocesses, progress bars) are
    captured. When the block raises an error the captured text is saved to :func:`log_path` (not on an
    interrupt); fds and streams are restored in every case, Ctrl-C included."""
    global _capture
    captured = Captured()
    if _level == "verbose" or _capture is not None:
        yield captured
        return
    from nafnet_edge.atomic import _signals_deferred

    capture = _Capture()
    failed: Exception | None = None
    try:  # an interrupt, held while the fds are swapped either way, lands inside: they are always swapped back
        with _signals_deferred():
            capture.start()
            _capture = capture
        yield captured
    except Exception as e:
        failed = e
        raise
    finally:
        with _signals_deferred():
            _capture = None
            captured.text = capture.stop()
        if failed is not None and captured.text.strip():
            captured.log = _save(captured.text, failed)


def log_path() -> Path:
    """Where failed blocks' captured output goes: ``nafnet-edge-<pid>.log`` in the temporary directory."""
    return Path(tempfile.gettempdir()) / f"nafnet-edge-{os.getpid()}.log"


_LOG_ATTRIBUTE = "_nafnet_edge_backend_log"


def _save(text: str, error: BaseException) -> Path | None:
    """Append ``text`` to :func:`log_path` under a header naming ``error``; the path, None when unwritable."""
    path = log_path()
    header = f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} backend output before {type(error).__name__}: {error}"
    try:
        with open(path, "a", encoding="utf-8", errors="replace") as f:
            f.write(header.replace("\n", " ") + "\n" + text)
        os.chmod(path, 0o600)
    except OSError:
        return None
    with suppress(AttributeError, TypeError):
        setattr(error, _LOG_ATTRIBUTE, path)
    return path


def failure_log(error: BaseException) -> Path | None:
    """The log holding the backends' output captured while ``error`` (or an exception it was raised from) went
    through a :func:`backend_output` block; None when there is none."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        path = getattr(current, _LOG_ATTRIBUTE, None)
        if isinstance(path, Path):
            return path
        current = current.__cause__ or current.__context__
    return None
