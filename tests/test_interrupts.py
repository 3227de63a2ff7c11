"""Interrupted and concurrent work, unwritable and full disks: the real `nafnet-edge` process, real signals, real
file systems (a size-limited or read-only tmpfs in a private mount namespace). After every failure the output
location holds what it held before (nothing, or the previous artifact intact) and a rerun succeeds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import artifact_dir, save_tiny_checkpoint, without_progress

from nafnet_edge.atomic import output_lock
from nafnet_edge.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OUTPUT

CLI = [sys.executable, "-m", "nafnet_edge"]
KODAK = Path(str(resources.files("nafnet_edge") / "data" / "kodak"))
PAUSED_CLI = Path(__file__).with_name("paused_cli.py")
ONNX_EXPORT = "nafnet_edge.converters.onnx:ONNXTarget.export"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth")


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    """A test that fails while a process it started is stopped at a pause point does not leave it behind."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            finish(proc)


def start(args: list[str], cwd: Path, *, prefix: list[str] = CLI, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    log = open(cwd / f"stderr-{time.monotonic_ns()}.log", "w+")  # noqa: SIM115 (closed by finish)
    proc = subprocess.Popen(
        [*prefix, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=log, text=True, pass_fds=pass_fds
    )
    proc.log = log  # type: ignore[attr-defined]
    _started.append(proc)
    return proc


def start_paused(args: list[str], cwd: Path, *, at: str, when: str, call: int = 1) -> subprocess.Popen:
    """Start the CLI with the function ``at`` (``module:name``) made to stop at its ``call``-th call, at the point
    ``when`` names (see tests/paused_cli.py), and return once the process has stopped there. It stays stopped
    until it is signalled or let go with :func:`resume`, so a signal always lands in that phase."""
    ready_r, ready_w = os.pipe()
    resume_r, resume_w = os.pipe()
    prefix = [sys.executable, str(PAUSED_CLI), at, when, str(call), str(ready_w), str(resume_r), "--"]
    try:
        proc = start(args, cwd, prefix=prefix, pass_fds=(ready_w, resume_r))
    finally:
        os.close(ready_w)
        os.close(resume_r)
    proc.resume_fd = resume_w  # type: ignore[attr-defined]
    with os.fdopen(ready_r, "rb") as ready:
        said = ready.readline()  # b"" when the process ended without stopping there
    if said != b"paused\n":
        code, err = finish(proc)
        reason = said.decode().strip() or f"it ended with exit {code} first"
        pytest.fail(f"the command did not stop at {at} ({when}, call {call}): {reason}\n{err}")
    return proc


def resume(proc: subprocess.Popen) -> None:
    """Let a process started by :func:`start_paused` go on from its pause point."""
    os.write(proc.resume_fd, b"g")  # type: ignore[attr-defined]


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    """Wait for the process to end (no time limit: under load a command may take long, and a test that waits on
    wall time fails by chance); its exit code and stderr."""
    code = proc.wait()
    if getattr(proc, "resume_fd", None) is not None:
        os.close(proc.resume_fd)  # type: ignore[attr-defined]
        proc.resume_fd = None  # type: ignore[attr-defined]
    if not proc.log.closed:  # type: ignore[attr-defined]
        proc.log.seek(0)  # type: ignore[attr-defined]
        proc.err = proc.log.read()  # type: ignore[attr-defined]
        proc.log.close()  # type: ignore[attr-defined]
    return code, proc.err  # type: ignore[attr-defined]


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def run_ok(args: list[str], cwd: Path) -> str:
    code, err = finish(start(args, cwd))
    assert code == 0, err
    return err


def interrupted(proc: subprocess.Popen, signum: int) -> str:
    proc.send_signal(signum)
    code, err = finish(proc)
    assert code == EXIT_INTERRUPTED, err
    assert err.rstrip().splitlines()[-1] == "nafnet-edge: interrupted; no partial output was left in place", err
    return err


# ---- signals --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_convert_interrupted_leaves_nothing_and_keeps_a_previous_artifact(tmp_path: Path, ckpt: Path, signum) -> None:
    out = tmp_path / "out"
    convert = ["convert", str(ckpt), "--target", "onnx", "-o", str(out)]
    proc = start_paused(convert, tmp_path, at=ONNX_EXPORT, when="return")  # exported, not yet validated
    (staging,) = out.glob(".onnx-fp32.*.partial")
    assert entries(staging) == ["model.onnx"]
    interrupted(proc, signum)
    assert entries(out) == []  # no artifact, no staging directory, no lock file

    run_ok(convert, tmp_path)  # the rerun succeeds
    manifest = (artifact_dir(out, "onnx") / "manifest.json").read_bytes()
    assert entries(out) == ["onnx-fp32"]

    # replacing it, interrupted: the previous artifact stays whole
    proc = start_paused([*convert, "--force"], tmp_path, at=ONNX_EXPORT, when="return")
    (staging,) = out.glob(".onnx-fp32.*.partial")
    assert entries(staging) == ["model.onnx"]
    interrupted(proc, signum)
    assert entries(out) == ["onnx-fp32"]
    assert (artifact_dir(out, "onnx") / "manifest.json").read_bytes() == manifest
    for name in json.loads(manifest)["files"]:
        assert (artifact_dir(out, "onnx") / name).is_file()


@pytest.mark.slow
def test_quantize_interrupted_in_training_resumes(tmp_path: Path, ckpt: Path) -> None:
    out = tmp_path / "out"
    val = tmp_path / "val"  # validating on one Kodak crop, not the four whole images: same checks, far fewer tiles
    val.mkdir()
    cv2.imwrite(str(val / "crop.png"), cv2.imread(str(KODAK / "kodim23.png"))[128:256, 256:384])
    base = ["quantize", str(ckpt), "--target", "executorch", "--train-data", str(KODAK), "--input-size", "64"]
    base += ["--train-batch", "2", "--val-data", str(val), "-o", str(out)]
    train_state = out / ".executorch-int8-train.pt"
    # stopped once the first training state (saved every 50 steps, atomically) is in place
    saving = "nafnet_edge.quantization.train:atomic_path"
    proc = start_paused([*base, "--steps", "200"], tmp_path, at=saving, when="exit")
    interrupted(proc, signal.SIGTERM)
    assert entries(out) == [".executorch-int8-train.pt"]  # the resumable training state, nothing else
    state = torch.load(train_state, weights_only=True)
    assert state["step"] == 50

    saved = train_state.read_bytes()  # a damaged training state: refused in one line, left for the user to judge
    train_state.write_bytes(saved[: len(saved) // 2])
    code, err = finish(start([*base, "--steps", "60", "--resume"], tmp_path))
    assert code == EXIT_BAD_INPUT, err
    assert "--resume: " in one_error_line(err) and "is damaged or belongs to another model" in err
    train_state.write_bytes(saved)

    run_ok([*base, "--steps", str(state["step"] + 2), "--resume"], tmp_path)
    assert (artifact_dir(out, "executorch", "int8") / "manifest.json").is_file()
    assert not any(p.name.endswith(".partial") or p.name.endswith(".lock") for p in out.iterdir())


def _noise_png(path: Path, size: int, seed: int) -> None:
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_run_interrupted_leaves_only_whole_images(tmp_path: Path, ckpt: Path) -> None:
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for i in range(3):
        _noise_png(inputs / f"img{i}.png", 128, i)
    command = ["run", str(ckpt), str(inputs), "-o", str(out), "--tile", "64", "--overlap", "16"]
    # stopped while the second image is being written: the first is in place, the second's temporary file exists
    proc = start_paused(command, tmp_path, at="nafnet_edge.images:atomic_path", when="enter", call=2)
    (partial,) = [n for n in entries(out) if n.startswith(".")]
    assert partial.startswith(".img1.") and partial.endswith(".png"), entries(out)
    interrupted(proc, signal.SIGINT)
    assert entries(out) == ["img0.png"]  # no partial file left
    assert cv2.imread(str(out / "img0.png")).shape == (128, 128, 3)  # and the image written before is complete
    run_ok(command, tmp_path)
    assert entries(out) == [f"img{i}.png" for i in range(3)]


# ---- two writers ----------------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_while_the_first_holds_the_output(tmp_path: Path, ckpt: Path) -> None:
    out = tmp_path / "out"
    convert = ["convert", str(ckpt), "--target", "onnx", "--no-validate", "-o", str(out)]
    with output_lock(artifact_dir(out, "onnx")):  # this test process plays the first writer
        code, err = finish(start(convert, tmp_path))
        assert code == EXIT_OUTPUT, err
        assert err.strip() == (
            f"nafnet-edge: error: {artifact_dir(out, 'onnx')} is being written by another nafnet-edge process "
            f"(pid {os.getpid()}); wait for it to finish or choose another output location"
        )
        assert entries(out) == [".onnx-fp32.lock"]
    assert entries(out) == []
    run_ok(convert, tmp_path)


def test_what_a_killed_process_leaves_is_cleaned_up_by_the_next_run(tmp_path: Path, ckpt: Path) -> None:
    """SIGKILL cannot be caught: it can leave a hidden staging directory and a lock file (whose flock the kernel
    released). The next conversion is not blocked by them and removes the stale staging directory."""
    out = tmp_path / "out"
    convert = ["convert", str(ckpt), "--target", "onnx", "--no-validate", "-o", str(out)]
    proc = start_paused(convert, tmp_path, at=ONNX_EXPORT, when="return")
    proc.kill()
    finish(proc)
    assert any(out.glob(".onnx-fp32.*.partial")) and (out / ".onnx-fp32.lock").exists()
    run_ok(convert, tmp_path)
    assert entries(out) == ["onnx-fp32"]


def test_an_artifact_moved_aside_by_a_killed_replacement_is_put_back(tmp_path: Path, ckpt: Path) -> None:
    """The one moment a SIGKILL can hurt a --force replacement: the old artifact renamed aside, the new one not yet
    in place. The next command that takes the lock restores the old one (then refuses to replace it without
    --force, as for any existing artifact)."""
    out = tmp_path / "out"
    convert = ["convert", str(ckpt), "--target", "onnx", "--no-validate", "-o", str(out)]
    run_ok(convert, tmp_path)
    manifest = (artifact_dir(out, "onnx") / "manifest.json").read_bytes()
    artifact_dir(out, "onnx").rename(out / ".onnx-fp32.4242.old")  # what the killed process left
    (out / ".onnx-fp32.x1y2.partial").mkdir()
    code, err = finish(start(convert, tmp_path))
    assert code == 2 and "exists; pass --force" in err, err
    assert entries(out) == ["onnx-fp32"] and (artifact_dir(out, "onnx") / "manifest.json").read_bytes() == manifest


def test_two_conversions_at_once_never_corrupt_the_artifact(tmp_path: Path, ckpt: Path) -> None:
    """A second conversion started while a first one is half-way through writing the same artifact is refused
    with the first's pid; the first then completes a whole artifact."""
    out = tmp_path / "out"
    convert = ["convert", str(ckpt), "--target", "onnx", "--no-validate", "--force", "-o", str(out)]
    first = start_paused(convert, tmp_path, at=ONNX_EXPORT, when="return")  # holds the lock, the model file staged
    code, err = finish(start(convert, tmp_path))
    assert code == EXIT_OUTPUT, err
    assert err.strip() == (
        f"nafnet-edge: error: {artifact_dir(out, 'onnx')} is being written by another nafnet-edge process "
        f"(pid {first.pid}); wait for it to finish or choose another output location"
    )
    resume(first)
    code, err = finish(first)
    assert code == 0, err
    manifest = json.loads((artifact_dir(out, "onnx") / "manifest.json").read_text())
    import onnx

    onnx.checker.check_model(str(artifact_dir(out, "onnx") / manifest["files"][0]))
    assert entries(out) == ["onnx-fp32"]


# ---- disks ----------------------------------------------------------------------------------------------------


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode == 0


UNSHARE = _can_unshare()


def run_on_tmpfs(tmp_path: Path, mount_options: str, args: list[str]) -> tuple[int, str, list[str]]:
    """Run the CLI with ``tmp_path/out`` on a fresh tmpfs (private mount namespace, gone afterwards); returns the
    exit code, stderr and what the tmpfs held when the command had ended."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    listing = tmp_path / "listing.txt"
    script = (
        'mount -t tmpfs -o "$1" tmpfs "$2" || exit 99; shift 2; "$@"; code=$?; ls -A "$OUT" > "$LISTING"; exit $code'
    )
    env = {**os.environ, "OUT": str(out), "LISTING": str(listing)}
    command = ["unshare", "-Urm", "sh", "-c", script, "sh", mount_options, str(out), *CLI, *args]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode != 99, proc.stderr
    return proc.returncode, proc.stderr, listing.read_text().split()


def _limited_file_size(limit: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes get EFBIG

    return apply


def one_error_line(err: str) -> str:
    lines = [line for line in without_progress(err).splitlines() if line.startswith("nafnet-edge")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("command", ["run", "convert"])
def test_full_disk(tmp_path: Path, ckpt: Path, command: str) -> None:
    _noise_png(tmp_path / "noise.png", 400, 0)  # a ~480 KB PNG result
    out = tmp_path / "out"
    if command == "run":
        args = ["run", str(ckpt), str(tmp_path / "noise.png"), "-o", str(out)]
    else:
        args = ["convert", str(ckpt), "--target", "onnx", "--no-validate", "-o", str(out)]
    if UNSHARE:
        code, err, left = run_on_tmpfs(tmp_path, "size=64k", args)
        assert "no space left on the device" in one_error_line(err)
    else:  # no mount namespaces here: a file-size limit makes the same writes fail (EFBIG)
        proc = subprocess.run([*CLI, *args], cwd=tmp_path, capture_output=True, text=True,
                              preexec_fn=_limited_file_size(64 * 1024))  # fmt: skip
        code, err, left = proc.returncode, proc.stderr, entries(out)
        assert "too large for this file system" in one_error_line(err)
    assert code == EXIT_OUTPUT, err
    assert left == []  # the partial file or staging directory was removed, and the lock
    assert run_ok(args, tmp_path) is not None and entries(out)  # with space, the same command succeeds


@pytest.mark.parametrize("command", ["run", "convert", "reparam"])
def test_unwritable_output(tmp_path: Path, ckpt: Path, command: str) -> None:
    _noise_png(tmp_path / "noise.png", 32, 0)
    out = tmp_path / "out"
    args = {
        "run": ["run", str(ckpt), str(tmp_path / "noise.png"), "-o", str(out / "restored")],
        "convert": ["convert", str(ckpt), "--target", "onnx", "--no-validate", "-o", str(out / "artifacts")],
        "reparam": ["reparam", str(ckpt), "-o", str(out / "deploy.safetensors")],
    }[command]
    if UNSHARE:
        code, err, left = run_on_tmpfs(tmp_path, "ro", args)
        assert "read-only; choose another output location" in one_error_line(err)
    elif os.geteuid() != 0:
        out.mkdir()
        out.chmod(0o555)
        proc = subprocess.run([*CLI, *args], cwd=tmp_path, capture_output=True, text=True)
        code, err, left = proc.returncode, proc.stderr, entries(out)
        assert "permission denied" in one_error_line(err)
    else:
        pytest.skip("root without mount namespaces: no way to make a directory unwritable here")
    assert code == EXIT_OUTPUT, err
    assert left == []


def test_output_on_a_file_system_that_cannot_hold_files(tmp_path: Path, ckpt: Path) -> None:
    proc = subprocess.run(
        [*CLI, "reparam", str(ckpt), "-o", "/proc/deploy.safetensors"], capture_output=True, text=True
    )
    assert proc.returncode == EXIT_OUTPUT, proc.stderr
    assert "the folder cannot hold files" in one_error_line(proc.stderr)


def test_output_path_through_a_file(tmp_path: Path, ckpt: Path) -> None:
    (tmp_path / "afile").write_text("x")
    _noise_png(tmp_path / "noise.png", 32, 0)
    proc = subprocess.run(
        [*CLI, "run", str(ckpt), str(tmp_path / "noise.png"), "-o", str(tmp_path / "afile" / "out")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == EXIT_OUTPUT, proc.stderr
    assert "a path component is a file, not a folder" in one_error_line(proc.stderr)
    assert (tmp_path / "afile").read_text() == "x"
