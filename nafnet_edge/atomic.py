"""Safe output: temporary names renamed into place when complete, an exclusive lock per output, clear write errors.

Three guarantees every command relies on:
- nothing half-written is ever seen where an output should be (Ctrl-C, SIGTERM, a full disk or a crash leaves
  the previous state: the old output or none, plus at most a hidden ``.*.partial`` entry after a SIGKILL);
- two nafnet-edge processes never write the same output at once: the second is refused with the first's pid;
- a write that fails for lack of space or permission says so in one line (:class:`OutputError`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nafnet_edge.errors import NafnetEdgeError, OutputError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the rename below is still atomic
    fcntl = None  # type: ignore[assignment]

# Write failures that are the output location's fault, not a bug: each becomes an OutputError saying what to do.
_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device; free some space or choose another output location",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another output location",
    errno.EFBIG: "the file is too large for this file system or for the process's file-size limit (ulimit -f)",
    errno.EROFS: "the file system is read-only; choose another output location",
    errno.EACCES: "permission denied; choose an output location you can write to",
    errno.EPERM: "operation not permitted; choose an output location you can write to",
    errno.ENOTDIR: "a path component is a file, not a folder; choose another output location",
    errno.EEXIST: "a file is in the way; remove it or choose another output location",
    errno.ENOENT: "the folder cannot hold files (removed meanwhile, or a special file system); choose another",
}
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _output_error(error: OSError, path: str | Path) -> OutputError | None:
    """The OutputError for a failed write at ``path`` (None when ``error`` is not about the location)."""
    advice = _WRITE_ERRNOS.get(error.errno or 0)
    if advice is None:
        return None
    return OutputError(f"cannot write {error.filename or path}: {advice}")


def _disk_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < 1 << 20
    except OSError:
        return False


@contextmanager
def _writing(path: Path, directory: Path) -> Iterator[None]:
    """Turn location failures into OutputError; a backend's own error while the disk is full becomes one too."""
    try:
        yield
    except NafnetEdgeError:
        raise
    except OSError as e:
        ours = e.filename is None or Path(os.path.abspath(e.filename)).is_relative_to(directory.absolute())
        raise (_output_error(e, path) if ours else None) or e from None  # a read elsewhere keeps its own error
    except Exception as e:
        if _disk_full(directory):  # backends (OpenVINO, Core ML) report ENOSPC in their own words
            raise OutputError(f"cannot write {path}: no space left on the device ({type(e).__name__}: {e})") from e
        raise


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C / SIGTERM / SIGHUP for the few system calls that swap an output into place."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a pending signal is delivered here


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that check it are happy).

    When the block completes, the file is made world-readable and renamed onto ``path``; on any exception,
    Ctrl-C included, it is removed, so no partial file is ever left where the output should be.
    """
    path = Path(path)
    with _writing(path, path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """A temporary directory beside ``final`` that replaces it when the block completes, else is removed.

    Hold :func:`output_lock` for ``final`` around it when other processes may write there (taking the lock also
    cleans up what a killed writer left).
    """
    final = Path(final)
    with _writing(final, final.parent):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
        try:
            yield tmp
            os.chmod(tmp, 0o755)
            with _signals_deferred():  # never leave `final` moved aside and the new one not yet in place
                old = None
                if final.exists():
                    old = final.parent / f".{final.name}.{os.getpid()}.old"
                    os.replace(final, old)
                os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _recover(final: Path) -> None:
    """Undo what a killed writer of ``final`` left (called by :func:`output_lock`: nobody else is writing).

    A SIGKILL between the two renames of a replacement leaves the previous artifact as ``.<name>.<pid>.old`` and
    no ``final``: it is put back. Staging directories (``.<name>.*.partial``) are removed.
    """
    if not final.exists():
        olds = sorted(final.parent.glob(f".{final.name}.*.old"), key=lambda p: p.stat().st_mtime)
        if olds:
            os.replace(olds[-1], final)
    for stale in [*final.parent.glob(f".{final.name}.*.partial"), *final.parent.glob(f".{final.name}.*.old")]:
        shutil.rmtree(stale, ignore_errors=True)


_held: dict[str, int] = {}  # outputs this process has locked, with a count (the lock is re-entrant per process)
_held_lock = threading.Lock()


@contextmanager
def output_lock(final: str | Path) -> Iterator[None]:
    """Exclusive right to write ``final`` (an artifact directory) among nafnet-edge processes.

    An advisory ``flock`` on ``.<name>.lock`` beside it, released by the kernel when the process ends however it
    ends, so a crash never leaves a stale lock. A second process is refused at once with the holder's pid. Once
    acquired, what a killed writer left is cleaned up (:func:`_recover`). The lock file is removed on release,
    and an output folder created only to hold it is removed again.
    """
    final = Path(final)
    key = str(final.resolve())
    with _held_lock:
        reentrant = bool(_held.get(key))
        if reentrant:
            _held[key] += 1
    if reentrant:
        try:
            yield
        finally:
            with _held_lock:
                _held[key] -= 1
        return
    created = not final.parent.exists()
    lock_path = final.parent / f".{final.name}.lock"
    with _writing(lock_path, final.parent):
        final.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(lock_path, final)
        try:
            _recover(final)
        except BaseException:
            os.close(fd)
            raise
    with _held_lock:
        _held[key] = 1
    try:
        yield
    finally:
        with _held_lock:
            _held.pop(key, None)
        lock_path.unlink(missing_ok=True)  # still held: a waiting process sees the inode change and retries
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                final.parent.rmdir()  # only when empty: nothing was written


def _acquire(lock_path: Path, final: Path) -> int:
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(
                f"{final} is being written by another nafnet-edge process (pid {holder}); wait for it to finish "
                "or choose another output location"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its previous holder unlinked while we waited to open it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
