"""Progress lines and the capture of third-party output (``nafnet_edge.progress``), and what a convert run prints
on stderr at each level: a line per phase, and none of the backends' chatter unless ``--verbose``."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from helpers import TINY_CONFIG, require

from nafnet_edge import progress
from nafnet_edge.cli import build_parser
from nafnet_edge.defaults import VALIDATION_OVERLAP_PX
from nafnet_edge.images import read_image
from nafnet_edge.validation import tile_count

LINE = re.compile(r"nafnet-edge: (?:\[ *\d+\.\ds\]|note:) (.*)")  # a progress line or a note
# What the backends print during a Core ML convert when nothing captures it: coremltools' progress bars, its
# failed native-proxy load off macOS, and the source line Python shows under a warning.
THIRD_PARTY_MARKERS = ("MLModelProxy", "Running MIL", "%|", "warnings.warn", "Converting PyTorch")


@pytest.fixture(autouse=True)
def normal_level(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts at the normal level, with failure logs written under its own temporary directory."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with progress.configured(level="normal"):
        yield


@contextmanager
def real_fds() -> Iterator[None]:
    """``sys.stdout`` / ``sys.stderr`` on the process's fds 1 and 2 (as in a command), not pytest's stand-ins, so
    backend_output captures at fd level; capfd still sees what reaches the fds. (Set in the test's body: pytest
    puts its own streams back between a fixture's setup and the test.)"""
    saved = sys.stdout, sys.stderr
    with open(1, "w", closefd=False) as stdout, open(2, "w", closefd=False) as stderr:
        sys.stdout, sys.stderr = stdout, stderr
        try:
            yield
        finally:
            stdout.flush()
            stderr.flush()
            sys.stdout, sys.stderr = saved


def said(err: str) -> list[str]:
    """The progress lines and notes in ``err`` without their prefix; fails on any other line."""
    lines = []
    for line in err.splitlines():
        match = LINE.fullmatch(line)
        assert match, f"not a progress line: {line!r} in\n{err}"
        lines.append(match[1])
    return lines


def _fd_identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


# --- backend_output ----------------------------------------------------------------------------------------------


def test_native_and_python_output_is_captured_while_progress_lines_get_through(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with real_fds():
        with progress.backend_output() as captured:
            os.write(2, b"native stderr chatter\n")  # a C++ logger
            os.write(1, b"native stdout chatter\n")
            print("python stdout chatter")
            print("python stderr chatter", file=sys.stderr)
            warnings.warn("a backend's deprecation", FutureWarning, stacklevel=1)
            progress.phase("coreml-fp16: export")
        out, err = capfd.readouterr()
        assert out == "" and said(err) == ["coreml-fp16: export"]
        for text in ("native stderr", "native stdout", "python stdout", "python stderr", "a backend's deprecation"):
            assert text in captured.text, captured.text
        assert captured.log is None  # the block succeeded: nothing kept

        os.write(2, b"after\n")  # fds 1 and 2 are back where they were
        print("result")
        sys.stdout.flush()
        assert capfd.readouterr() == ("result\n", "after\n")


def test_a_failed_block_restores_the_fds_and_keeps_its_output_in_a_log(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    before = _fd_identity(1), _fd_identity(2)
    with real_fds(), pytest.raises(RuntimeError) as raised, progress.backend_output() as captured:
        os.write(2, b"E0000 converter.cc:12] unsupported op\n")
        raise RuntimeError("export failed")
    assert (_fd_identity(1), _fd_identity(2)) == before
    assert captured.log == tmp_path / f"nafnet-edge-{os.getpid()}.log"
    assert progress.failure_log(raised.value) == captured.log
    try:  # an error raised from it (a library wrapping the backend's error) leads to the same log
        raise ValueError("conversion failed") from raised.value
    except ValueError as wrapped:
        assert progress.failure_log(wrapped) == captured.log
    log = captured.log.read_text()
    assert "RuntimeError: export failed" in log and "unsupported op" in log
    assert capfd.readouterr() == ("", "")  # nothing reached the terminal


def test_an_interrupt_restores_the_fds_and_leaves_no_log(capfd: pytest.CaptureFixture[str]) -> None:
    before = _fd_identity(1), _fd_identity(2)
    with real_fds(), pytest.raises(KeyboardInterrupt), progress.backend_output() as captured:
        os.write(2, b"chatter\n")
        raise KeyboardInterrupt
    assert (_fd_identity(1), _fd_identity(2)) == before
    assert captured.log is None and not progress.log_path().exists()
    assert "chatter" in captured.text and capfd.readouterr() == ("", "")


def test_without_real_fds_the_python_side_is_captured(capsys: pytest.CaptureFixture[str]) -> None:
    """Under pytest's capture (or in a notebook) sys.stderr is no fd: Python-level capture only."""
    with progress.backend_output() as captured:
        print("python stdout chatter")
        sys.stderr.write("python stderr chatter\n")
        progress.note("still shown")
    out, err = capsys.readouterr()
    assert out == "" and said(err) == ["still shown"]
    assert "python stdout chatter" in captured.text and "python stderr chatter" in captured.text


def test_nested_and_verbose_blocks_capture_nothing_themselves(capsys: pytest.CaptureFixture[str]) -> None:
    with progress.backend_output() as outer:
        with progress.backend_output() as inner:
            print("inner chatter")
        assert inner.text == ""
    assert "inner chatter" in outer.text
    with progress.configured(level="verbose"), progress.backend_output() as captured:
        print("shown")
    assert captured.text == "" and capsys.readouterr().out == "shown\n"


# --- phases and tasks --------------------------------------------------------------------------------------------


def test_a_task_off_a_terminal_prints_start_periodic_and_end_lines(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)  # a periodic line at every advance
    with progress.task("coreml-fp16: run in its runtime", total=3, unit="tile") as advance:
        for _ in range(3):
            advance(1, info="fidelity 41.00 dB")
    lines = said(capsys.readouterr().err)
    assert lines[0] == "coreml-fp16: run in its runtime (3 tiles)"
    assert re.fullmatch(r"coreml-fp16: run in its runtime: 1/3 tiles, \d+\.\ds, fidelity 41\.00 dB", lines[1])
    assert re.fullmatch(r"coreml-fp16: run in its runtime: 2/3 tiles, \d+\.\ds, fidelity 41\.00 dB", lines[2])
    assert re.fullmatch(r"coreml-fp16: run in its runtime: done, 3 tiles in \d+\.\ds, fidelity 41\.00 dB", lines[3])
    assert len(lines) == 4


def test_periodic_lines_wait_for_the_interval(capsys: pytest.CaptureFixture[str]) -> None:
    with progress.task("fp32 reference", total=100, unit="image") as advance:
        for _ in range(100):
            advance()
    lines = said(capsys.readouterr().err)
    assert lines[0] == "fp32 reference (100 images)" and lines[-1].startswith("fp32 reference: done, 100 images in ")
    assert len(lines) == 2  # a hundred quick steps: no line in between


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_task_on_a_terminal_draws_a_bar() -> None:
    terminal = _Terminal()
    with (
        progress.configured(level="normal", stream=terminal),
        progress.task("executorch-int8: qat training", total=4) as advance,
    ):
        for _ in range(4):
            advance(1, info="fidelity 38.20 dB")
        progress.phase("a line above the bar")
    text = terminal.getvalue()
    assert re.search(r"executorch-int8: qat training: +0%\|.*\| 0/4 ", text), text  # the bar (tqdm's)
    assert re.search(r"\r *\rnafnet-edge: \[ *\d+\.\ds\] a line above the bar\n", text), text  # bar cleared first
    assert re.search(r"\] executorch-int8: qat training: done, 4 steps in \d+\.\ds, fidelity 38\.20 dB\n$", text)


def test_quiet_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with progress.configured(level="quiet"):
        progress.phase("export")
        progress.note("note")
        with progress.task("validate", total=2) as advance:
            advance(2)
        with progress.backend_output() as captured:
            print("chatter")
    assert capsys.readouterr() == ("", "") and "chatter" in captured.text


# --- the command line -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["inspect"], "normal"),
        (["--quiet", "inspect"], "quiet"),
        (["inspect", "--quiet"], "quiet"),
        (["--verbose", "bench", "x"], "verbose"),
        (["--quiet", "convert", "--target", "onnx"], "quiet"),  # a command's own default does not override it
        (["--debug", "convert", "--target", "onnx"], "verbose"),
    ],
)
def test_quiet_and_verbose_go_before_or_after_the_command(argv: list[str], level: str) -> None:
    from nafnet_edge.cli import output_level

    assert output_level(build_parser().parse_args(argv)) == level


def test_quiet_and_verbose_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["inspect", "--quiet", "--verbose"])
    assert exited.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def _convert(checkpoint: Path, data: Path, out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """``python -m nafnet_edge convert`` for Core ML at 64 px, stderr to a file as in a CI log (no terminal)."""
    argv = [sys.executable, "-m", "nafnet_edge", "convert", str(checkpoint), "--target", "coreml"]
    argv += ["--input-size", "64", "-o", str(out), *flags]
    env: dict[str, Any] = {**os.environ, "NAFNET_EDGE_CACHE": str(out.parent / "cache")}
    env.pop("PYTHONWARNINGS", None)
    with open(out.parent / f"{out.name}.err", "w+") as err:
        result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env, timeout=900)
        err.seek(0)
        result.stderr = err.read()
    return result


@pytest.mark.slow
def test_convert_prints_its_phases_and_none_of_the_backends_output(
    tiny_checkpoint: Path, kodak_data: Path, tmp_path: Path
) -> None:
    require("coremltools")
    normal = _convert(tiny_checkpoint, kodak_data, tmp_path / "normal", "--val-data", str(kodak_data))
    assert normal.returncode == 0, normal.stderr
    lines = said(normal.stderr)  # every stderr line is one of ours
    phases = [line for line in lines if re.fullmatch(r"coreml-fp16: [a-z0-9 ]+( \(\d+ \w+\))?", line)]
    assert phases[:4] == [
        "coreml-fp16: load the converter",
        "coreml-fp16: deploy graph",
        "coreml-fp16: export",
        "coreml-fp16: validate in its runtime",
    ]
    multiple = TINY_CONFIG.pad_multiple
    tiles = sum(
        tile_count(read_image(p).pixels.shape, (64, 64), VALIDATION_OVERLAP_PX, multiple) for p in kodak_data.iterdir()
    )
    assert tiles > len(list(kodak_data.iterdir()))  # the larger crop is tiled
    assert phases[4:] == ["coreml-fp16: fp32 reference (2 images)", f"coreml-fp16: run in its runtime ({tiles} tiles)"]
    assert lines[-1] == f"coreml-fp16: write {tmp_path / 'normal' / 'coreml-fp16'}"
    assert not [marker for marker in THIRD_PARTY_MARKERS if marker in normal.stderr], normal.stderr
    assert normal.stdout.strip(), "the result goes to stdout"

    quiet = _convert(tiny_checkpoint, kodak_data, tmp_path / "quiet", "--quiet", "--no-validate")
    assert quiet.returncode == 0 and quiet.stderr == "" and "coreml-fp16" in quiet.stdout, quiet

    verbose = _convert(tiny_checkpoint, kodak_data, tmp_path / "verbose", "--no-validate", "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    assert [marker for marker in THIRD_PARTY_MARKERS if marker in verbose.stderr], "--verbose shows them"
    assert re.search(r"nafnet-edge: \[ *\d+\.\ds\] coreml-fp16: export\n", verbose.stderr), verbose.stderr
