"""The files of an artifact directory, checked before any runtime or reader opens them.

An artifact directory is input like any other: it may have been copied from elsewhere, unpacked from an archive or
edited by hand. Before nafnet-edge opens a file of it (the manifest, ``bench.json``, the model a runtime loads, an
ONNX model's external data, the contents of an ``.mlpackage``), the file is looked at with ``lstat`` only, and
refused, naming it, when it:

- is a link that resolves outside the directory (a manifest cannot point a runtime at a model elsewhere);
- is not a regular file (a named pipe that would block the reader, a device such as ``/dev/zero`` that never
  ends, a socket), or is a directory where a file belongs (or a file where a bundle directory belongs);
- is larger than the bound for its kind (``MAX_ARTIFACT_BYTES``, ``MAX_RECORD_BYTES``);
- has a name that is absolute, climbs out with ``..``, or is too long for a file system.

Directory walks never follow links. Links that stay inside the directory are allowed: an artifact may share
files between its own names.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from nafnet_edge.errors import ArtifactError, NafnetEdgeError, display_path, first_sentence

MAX_ARTIFACT_BYTES = 8 << 30  # a model file or bundle; NAFNet's largest fp32 artifacts are about 0.5 GB
MAX_RECORD_BYTES = 64 << 20  # manifest.json, bench.json
MAX_BUNDLE_ENTRIES = 10_000  # files and folders inside one bundle (.mlpackage)
MAX_NAME_BYTES = 255  # one path component, as most file systems allow
MAX_PATH_CHARS = 1024  # a whole name in a manifest's ``files``
BUNDLE_SUFFIXES = (".mlpackage",)  # artifacts that are folders; every other artifact file is a regular file


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a file name in an artifact directory's manifest (None when it can)."""
    if not name or "\0" in name:
        return "an empty name or one with a NUL character"
    if len(name) > MAX_PATH_CHARS:
        return f"a name of {len(name)} characters (at most {MAX_PATH_CHARS})"
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        return "a name with characters no file name on this system can hold"
    path = PurePosixPath(name)
    shown = repr(name) if len(name) <= 60 else repr(name[:57]) + "..."
    if path.is_absolute() or "\\" in name:
        return f"a name that is not relative to the directory: {shown}"
    if ".." in path.parts:
        return f"a name that points outside the directory: {shown}"
    long = [part for part in path.parts if len(os.fsencode(part)) > MAX_NAME_BYTES]
    if long:
        return f"a path component of {len(os.fsencode(long[0]))} bytes (at most {MAX_NAME_BYTES})"
    return None


def artifact_file(
    directory: str | Path, name: str, *, bundle: bool = False, max_bytes: int = MAX_ARTIFACT_BYTES
) -> Path:
    """``directory / name`` once it is known to be a regular file (``bundle``: a directory of regular files) inside
    ``directory`` and at most ``max_bytes``; ``ArtifactError`` naming it otherwise. Nothing is opened."""
    path, _ = _checked(Path(directory), name, bundle=bundle, max_bytes=max_bytes)
    return path


def artifact_size(directory: str | Path, name: str) -> int | None:
    """Bytes of the file ``name`` in ``directory`` (of every file in it, for a bundle such as ``.mlpackage``),
    checked as ``artifact_file`` does; None when it does not exist."""
    directory = Path(directory)
    if name_problem(name) is None and not os.path.lexists(directory / name):
        return None
    bundle = PurePosixPath(name).suffix in BUNDLE_SUFFIXES
    return _checked(directory, name, bundle=bundle, max_bytes=MAX_ARTIFACT_BYTES)[1]


@contextmanager
def loading(
    path: Path,
    what: str,
    errors: tuple[type[BaseException], ...],
    reason: Callable[[BaseException], str] | None = None,
) -> Iterator[None]:
    """Turn a runtime's refusal to load ``path`` (one of ``errors``) into a one-line ArtifactError naming it;
    ``reason`` picks the informative part of the runtime's message (default :func:`runtime_reason`)."""
    reason = reason or runtime_reason
    try:
        yield
    except NafnetEdgeError:
        raise
    except errors as e:
        raise ArtifactError(f"{display_path(path)} is not a loadable {what}: {reason(e)}; convert again") from e


def runtime_reason(error: BaseException, *, skip: Callable[[str], bool] = lambda line: False) -> str:
    """The informative part of a runtime's error: the first sentence of its first line that ``skip`` keeps, at
    most 300 characters (targets pass ``skip`` for their runtime's location lines and strip its prefixes)."""
    lines = [line.strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line and not skip(line)]
    if not lines:
        return type(error).__name__
    text = first_sentence(Exception(lines[0]))
    return text if len(text) <= 300 else text[:297] + "..."


# --- checks ----------------------------------------------------------------------------------------------------


def _checked(directory: Path, name: str, *, bundle: bool, max_bytes: int) -> tuple[Path, int]:
    problem = name_problem(name)
    if problem:
        raise ArtifactError(f"{display_path(directory)}: an artifact file has {problem}; convert again")
    root = _resolved(directory, directory)
    path = directory
    for part in PurePosixPath(name).parts:
        path = path / part
        _inside(path, root, directory)
    st = _stat(path)
    if bundle:
        if not stat.S_ISDIR(st.st_mode):
            raise ArtifactError(f"{display_path(path)} is {_kind(st)}, not a bundle directory; convert again")
        return path, _bundle_bytes(path, root, directory, max_bytes)
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"{display_path(path)} is {_kind(st)}, not a regular file; convert again")
    _check_bytes(path, st.st_size, max_bytes)
    return path, st.st_size


def _inside(path: Path, root: Path, directory: Path) -> os.stat_result:
    """lstat ``path``; a link must resolve inside ``root`` (the resolved artifact directory)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ArtifactError(f"{display_path(path)} is missing: convert again") from None
    except OSError as e:
        raise ArtifactError(f"{display_path(path)} cannot be read: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        target = _resolved(path, directory)
        if not target.is_relative_to(root):
            raise ArtifactError(
                f"{display_path(path)} is a link to {display_path(target)}, outside {display_path(directory)}: an "
                "artifact's files must be inside its directory (copy the file in instead of linking to it)"
            )
    return st


def _resolved(path: Path, directory: Path) -> Path:
    try:
        return path.resolve(strict=True)
    except FileNotFoundError:
        raise ArtifactError(f"{display_path(path)} is a broken link or missing: convert again") from None
    except (OSError, RuntimeError) as e:  # a link loop: OSError (ELOOP), or RuntimeError before Python 3.13
        raise ArtifactError(f"{display_path(path)} cannot be resolved ({e}); convert again") from None


def _stat(path: Path) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as e:
        raise ArtifactError(f"{display_path(path)} cannot be read: {e.strerror}") from None


def _bundle_bytes(bundle: Path, root: Path, directory: Path, max_bytes: int) -> int:
    """Total bytes of the regular files in ``bundle``, walked without following links; every entry must be a
    folder or a regular file, and every link must resolve inside ``root``."""
    total, entries = 0, 0
    seen: set[tuple[int, int]] = set()
    stack = [bundle]
    while stack:
        folder = stack.pop()
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            continue  # two links to one folder inside the artifact
        seen.add((st.st_dev, st.st_ino))
        try:
            names = sorted(os.listdir(folder))
        except OSError as e:
            raise ArtifactError(f"{display_path(folder)} cannot be listed: {e.strerror}") from None
        for entry in names:
            entries += 1
            if entries > MAX_BUNDLE_ENTRIES:
                raise ArtifactError(
                    f"{display_path(bundle)} holds more than {MAX_BUNDLE_ENTRIES} entries; convert again"
                )
            path = folder / entry
            _inside(path, root, directory)
            st = _stat(path)
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)
            elif stat.S_ISREG(st.st_mode):
                total += st.st_size
                _check_bytes(bundle, total, max_bytes)
            else:
                raise ArtifactError(f"{display_path(path)} is {_kind(st)}, not a regular file; convert again")
    return total


def _check_bytes(path: Path, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise ArtifactError(
            f"{display_path(path)} is {_mib(size)}, more than the {_mib(max_bytes)} a file of this kind of an "
            "artifact can need; convert again"
        )


def _mib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _kind(st: os.stat_result) -> str:
    mode = st.st_mode
    for test, words in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return words
    return "a special file"
