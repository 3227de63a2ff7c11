"""Typed errors. Each message says what is wrong and what to do; the CLI maps each class to an exit code."""

from __future__ import annotations

import os

# Exit codes of the `nafnet-edge` command (documented in docs/cli.md).
EXIT_OK = 0
EXIT_FAILURE = 1  # an unexpected internal error (a bug: please report it with --debug output)
EXIT_USAGE = 2  # bad command line (argparse)
EXIT_BUDGET = 3  # an artifact missed a validation or latency budget
EXIT_MISSING_BACKEND = 4  # an optional backend (extra) is not installed
EXIT_BAD_INPUT = 5  # a checkpoint, image or other input file is unusable
EXIT_OUTPUT = 6  # the output cannot be written: permissions, disk full, or another nafnet-edge is writing it
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM; nothing half-written is left behind


def display_path(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """A file name safe to print on a terminal: as is when it is plain, else quoted with escapes as ``repr`` does.

    Control characters (newlines, ESC of terminal escape sequences), other non-printable characters and the lone
    surrogates that stand for undecodable bytes of a non-UTF-8 name are shown as escapes (``'a\\x1b[31m.png'``), so a
    hostile name can neither fake output lines nor change the terminal.
    """
    text = os.fsdecode(path)
    return text if text.isprintable() else repr(text)


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped as ``repr`` does (no quotes): a message for one line."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def first_sentence(error: BaseException) -> str:
    """The first sentence of a third-party exception's message (its class name when empty), for one-line errors."""
    text = str(error)
    return text.splitlines()[0].split(". ")[0] if text else type(error).__name__


class NafnetEdgeError(Exception):
    """Base class of every error nafnet-edge raises on purpose."""

    exit_code = EXIT_FAILURE


class BadInputError(NafnetEdgeError):
    exit_code = EXIT_BAD_INPUT


class CheckpointError(BadInputError):
    """A checkpoint file cannot be used."""


class CheckpointNotFoundError(CheckpointError):
    pass


class CorruptCheckpointError(CheckpointError):
    """Truncated, damaged or not a checkpoint format at all."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that could only be loaded by executing code from it; we refuse."""


class NotNAFNetError(CheckpointError):
    """A readable state dict that does not look like NAFNet."""


class StateDictMismatchError(CheckpointError):
    """Missing or unexpected keys, or tensors of the wrong shape, for the inferred configuration."""

    def __init__(
        self,
        message: str,
        *,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing = missing or []
        self.unexpected = unexpected or []
        self.shape_mismatches = shape_mismatches or []


class NonFiniteWeightsError(CheckpointError):
    """NaN or Inf values in the weights."""


class ImageError(BadInputError):
    """An input image cannot be read, or an output image cannot be written."""


class OutputError(NafnetEdgeError):
    """The output cannot be written (unwritable, no space left, locked by another nafnet-edge process)."""

    exit_code = EXIT_OUTPUT


class MissingBackendError(NafnetEdgeError):
    exit_code = EXIT_MISSING_BACKEND


class UsageError(NafnetEdgeError):
    """A combination of options that cannot work (argparse catches the rest)."""

    exit_code = EXIT_USAGE


class OptionError(UsageError, ValueError):
    """Options a target or the pipeline cannot honour (--dynamic for OpenVINO, fp16 for ONNX, an input size that
    is not a multiple of the padding): the user's to change. Also a ValueError for callers of the Python API."""


class ArtifactError(BadInputError, ValueError):
    """An artifact directory, or a file in it, that cannot be used: damaged, hand-edited, or pointing elsewhere.
    Also a ValueError for callers of the Python API."""
