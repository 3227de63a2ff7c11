"""Hostile and careless checkpoint files: every one is refused in one line (exit 5) or loaded, nothing runs,
nothing large is allocated. The basic cases (missing, empty, directory, truncated zip, random bytes, another
network, wrong keys and shapes, NaN/Inf, a pickle with code) are in test_checkpoint.py."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import resource
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import artifact_dir, inspect_refused, without_progress
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save, save_file

from nafnet_edge.checkpoint import load_checkpoint
from nafnet_edge.cli import main
from nafnet_edge.errors import EXIT_BAD_INPUT, CheckpointError, CorruptCheckpointError
from nafnet_edge.model import NAFNet, NAFNetConfig

TINY = NAFNetConfig(width=8, enc_blk_nums=(1, 1), middle_blk_num=1, dec_blk_nums=(1, 1))


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in NAFNet(TINY).state_dict().items()}


class _System:
    """Unpickling this would run a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("layout", ["torch-legacy", "plain-pickle", "pickle-in-params"])
def test_code_in_any_pickle_layout_never_runs(tmp_path: Path, capsys, layout: str) -> None:
    marker = tmp_path / "code-ran"
    payload = _System(marker)
    path = tmp_path / "evil.pth"
    good = {"intro.weight": torch.zeros(8, 3, 3, 3)}
    if layout == "torch-legacy":
        torch.save({"params": good, "hook": payload}, path, _use_new_zipfile_serialization=False)
        inspect_refused(path, capsys, "posix.system", "never does that")
    elif layout == "plain-pickle":
        path.write_bytes(pickle.dumps({"params": good, "hook": payload}, protocol=pickle.HIGHEST_PROTOCOL))
        inspect_refused(path, capsys, "save the weights with torch.save or safetensors")
    else:  # the payload sits inside the state dict itself, where a loader would look for tensors
        torch.save({"params": {**good, "downs.0.weight": payload}}, path)
        inspect_refused(path, capsys, "posix.system")
    assert not marker.exists()
    pickle.loads(pickle.dumps(payload))  # control: unpickled the unsafe way, the payload does create the marker
    assert marker.exists()


def _tar(path: Path, member: Path) -> None:
    with tarfile.open(path, "w") as tf:
        tf.add(member, arcname=member.name)


def _zip(path: Path, member: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(member, arcname=member.name)


@pytest.mark.parametrize(
    ("name", "make", "needle"),
    [
        ("page.pth", lambda p, good: p.write_text("<!DOCTYPE html>\n<html><body>Sign in</body></html>"), "HTML page"),
        (
            "lfs.pth",
            lambda p, good: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\n"),
            "git lfs pull",
        ),
        ("weights.pth.gz", lambda p, good: p.write_bytes(gzip.compress(good.read_bytes())), "gunzip"),
        ("weights.tar", lambda p, good: _tar(p, good), "tar archive"),
        ("weights.zip", lambda p, good: _zip(p, good), "zip archive, not a torch.save file"),
        ("photo.pth", lambda p, good: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64)), "a PNG image"),
        ("config.pth", lambda p, good: p.write_text(json.dumps({"width": 32})), "JSON or text file"),
        ("array.pth", lambda p, good: p.write_bytes(b"\x93NUMPY\x01\x00" + bytes(64)), "NumPy array"),
    ],
    ids=["html-page", "git-lfs-pointer", "gzip", "tar", "zip-of-checkpoint", "png", "json", "npy"],
)
def test_files_that_are_something_else_say_what_they_are(tmp_path: Path, tiny_sd, capsys, name, make, needle) -> None:
    good = tmp_path / "good.pth"
    torch.save({"params": tiny_sd}, good)
    make(tmp_path / name, good)
    inspect_refused(tmp_path / name, capsys, needle)


@pytest.mark.parametrize("name", ["model.bin", "model.ckpt", "model", "model.safetensors.pth"])
def test_the_extension_does_not_matter_the_content_does(tmp_path: Path, tiny_sd, name: str) -> None:
    path = tmp_path / name
    if "safetensors" in name:
        save_file(tiny_sd, str(path))
    else:
        torch.save({"params": tiny_sd}, path)
    loaded = load_checkpoint(path)
    assert loaded.config.width == 8 and loaded.file_format == ("safetensors" if "safetensors" in name else "torch-zip")


def test_special_files_are_refused_without_being_opened(tmp_path: Path, capsys) -> None:
    fifo = tmp_path / "weights.pth"
    os.mkfifo(fifo)  # opening it would block forever
    inspect_refused(fifo, capsys, "not a regular file")
    assert main(["inspect", "/dev/zero"]) == EXIT_BAD_INPUT
    assert "not a regular file" in capsys.readouterr().err


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_terabyte_width_in_a_tiny_file_is_refused_before_allocating(tmp_path: Path, capsys) -> None:
    # A stride-0 view: the file stores one float, the tensor claims 10^9 x 3 x 3 x 3 (108 GB as fp32).
    claimed = torch.zeros(1).expand(10**9, 3, 3, 3)
    path = tmp_path / "huge.pth"
    torch.save({"params": {"intro.weight": claimed, "downs.0.weight": torch.zeros(16, 8, 2, 2)}}, path)
    assert path.stat().st_size < 10_000
    before = _max_rss_mb()
    with pytest.raises(CorruptCheckpointError, match=r"claims shape \[1000000000, 3, 3, 3\]"):
        load_checkpoint(path)
    inspect_refused(path, capsys, "refused before allocating")
    assert _max_rss_mb() - before < 200  # the process's high-water mark barely moved


def test_configurations_implied_by_key_names_alone_are_refused_before_building(tmp_path: Path, capsys) -> None:
    base = {"intro.weight": torch.zeros(8, 3, 3, 3)}
    deep = {**base, **{f"downs.{i}.weight": torch.zeros(1) for i in range(40)}}  # 8 * 2**40 channels
    torch.save(deep, tmp_path / "deep.pth")
    inspect_refused(tmp_path / "deep.pth", capsys, "8,796,093,022,208 channels", "refused before building")
    sparse = {**base, "downs.0.weight": torch.zeros(16, 8, 2, 2), "encoders.0.99999.norm1.weight": torch.zeros(8)}
    torch.save(sparse, tmp_path / "sparse.pth")  # one key whose index implies 100000 blocks
    inspect_refused(tmp_path / "sparse.pth", capsys, "99999 of the 100000 blocks", "'encoders.0.0.*'")


def test_safetensors_header_claiming_more_than_the_file_holds(tmp_path: Path, capsys) -> None:
    header = json.dumps({"intro.weight": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}})
    blob = header.encode() + b" " * (-len(header) % 8)
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(64))
    before = _max_rss_mb()
    inspect_refused(path, capsys, "damaged safetensors")
    assert _max_rss_mb() - before < 200


def test_views_of_a_larger_storage_still_load(tmp_path: Path, tiny_sd) -> None:
    """The storage check refuses claims beyond the stored bytes, not legitimate views into a larger storage."""
    big = torch.randn(64, 3, 3, 3)
    sd = {**tiny_sd, "intro.weight": big[8:16]}
    torch.save({"params": sd}, tmp_path / "view.pth")
    torch.testing.assert_close(load_checkpoint(tmp_path / "view.pth").model.intro.weight, big[8:16])


@pytest.mark.parametrize("content", [{}, {"params": {}}, {"params": {"intro.weight": "not a tensor"}}])
def test_no_tensors(tmp_path: Path, capsys, content) -> None:
    torch.save(content, tmp_path / "empty-dict.pth")
    inspect_refused(tmp_path / "empty-dict.pth", capsys, "holds no tensors")


_FILES: dict[str, bytes] = {}


def tiny_file(layout: str) -> bytes:
    """The tiny checkpoint's bytes in ``layout`` (cached; not a fixture, so hypothesis does not print it)."""
    if not _FILES:
        torch.manual_seed(0)
        sd = NAFNet(TINY).state_dict()
        buf = io.BytesIO()
        torch.save({"params": sd}, buf)
        _FILES.update({"torch-zip": buf.getvalue(), "safetensors": save(sd)})
    return _FILES[layout]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    layout=st.sampled_from(["torch-zip", "safetensors"]),
    cut=st.one_of(st.none(), st.floats(0.0, 1.0)),
    flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(1, 255)), max_size=6),
)
def test_damaged_files_never_crash_the_loader(tmp_path: Path, layout, cut, flips) -> None:
    """Truncations and byte flips anywhere: the file loads or is refused as a checkpoint error, nothing else."""
    data = bytearray(tiny_file(layout))
    for where, xor in flips:
        data[min(int(where * len(data)), len(data) - 1)] ^= xor
    if cut is not None:
        data = data[: int(cut * len(data))]
    path = tmp_path / f"fuzz-{layout}.pth"
    path.write_bytes(bytes(data))
    try:
        loaded = load_checkpoint(path)
    except CheckpointError:
        return
    assert loaded.config.width == 8  # a flip in tensor data, or in bytes no reader looks at


def _rewrite_zip(src: Path, dst: Path, *, record: str | None = None, keep_bytes: int = 0, deflate: bool = False):
    """``src`` rezipped to ``dst``: ``record`` cut to its first ``keep_bytes`` bytes, or data records deflated."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == record:
                data = data[:keep_bytes]
            compressed = deflate and "/data/" in info.filename
            zout.writestr(info.filename, data, zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED)


def _largest_record(path: Path) -> zipfile.ZipInfo:
    with zipfile.ZipFile(path) as zf:
        return max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["half", "empty"])
def test_a_data_record_shorter_than_its_tensor_is_refused(tmp_path: Path, tiny_sd, capsys, keep: float) -> None:
    good = tmp_path / "good.pth"
    torch.save({"params": tiny_sd}, good)
    record = _largest_record(good)
    short = tmp_path / "short.pth"
    _rewrite_zip(good, short, record=record.filename, keep_bytes=int(record.file_size * keep))
    inspect_refused(
        short,
        capsys,
        f"record {record.filename!r} holds {int(record.file_size * keep):,} bytes but its tensor needs "
        f"{record.file_size:,}",
    )
    _rewrite_zip(good, tmp_path / "rezipped.pth")  # control: the same rewrite without the cut loads
    assert load_checkpoint(tmp_path / "rezipped.pth").config.width == 8


def test_a_compressed_data_record_is_refused(tmp_path: Path, tiny_sd, capsys) -> None:
    torch.save({"params": tiny_sd}, tmp_path / "good.pth")
    _rewrite_zip(tmp_path / "good.pth", tmp_path / "deflated.pth", deflate=True)
    inspect_refused(tmp_path / "deflated.pth", capsys, "'good/data/0' is compressed", "zip -0")


def _with(sd: dict[str, torch.Tensor], key: str, dtype: torch.dtype, index: int, value: float) -> dict:
    t = sd[key].to(dtype).clone()
    t.view(-1)[index] = value
    return {**sd, key: t}


@pytest.mark.parametrize(
    ("dtype", "value", "needle"),
    [
        (torch.float64, 1e300, "'ending.bias' (1 values, of which 1 overflow float32 from float64)"),
        (torch.float64, -1e39, "'ending.bias' (1 values, of which 1 overflow float32 from float64)"),
        (torch.float16, float("inf"), "NaN or Inf weights in float32 in 1 tensors: 'ending.bias' (1 values)"),
        (torch.bfloat16, float("-inf"), "NaN or Inf weights in float32 in 1 tensors: 'ending.bias' (1 values)"),
        (torch.bfloat16, float("nan"), "NaN or Inf weights in float32 in 1 tensors: 'ending.bias' (1 values)"),
        (torch.float32, 1e38, "weights of magnitude 1.8e+19 or more in 1 tensors: 'ending.bias' (up to 1e+38)"),
        (torch.float64, -1e25, "weights of magnitude 1.8e+19 or more in 1 tensors: 'ending.bias' (up to 1e+25)"),
    ],
    ids=["fp64-1e300", "fp64-minus-1e39", "fp16-inf", "bf16-minus-inf", "bf16-nan", "fp32-1e38", "fp64-1e25"],
)
@pytest.mark.parametrize("layout", ["torch-zip", "safetensors"])
def test_weights_that_overflow_float32_are_refused(tmp_path: Path, tiny_sd, capsys, layout, dtype, value, needle):
    sd = _with(tiny_sd, "ending.bias", dtype, 1, value)
    path = tmp_path / ("bad.safetensors" if layout == "safetensors" else "bad.pth")
    if layout == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"params": sd}, path)
    inspect_refused(path, capsys, needle)


def test_float64_and_float16_weights_within_range_load(tmp_path: Path, tiny_sd) -> None:
    sd = {k: v.to(torch.float64 if i % 2 else torch.float16) for i, (k, v) in enumerate(tiny_sd.items())}
    sd = _with(sd, "ending.bias", torch.float64, 1, 1e15)  # large, but float32 holds it and its square
    torch.save({"params": sd}, tmp_path / "mixed.pth")
    loaded = load_checkpoint(tmp_path / "mixed.pth")
    assert loaded.model.ending.bias[1].item() == pytest.approx(1e15)


def _tensor_shapes(config: NAFNetConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in NAFNet(config).state_dict().items()}


WIDE = NAFNetConfig(width=32, enc_blk_nums=(1, 1), middle_blk_num=40, dec_blk_nums=(1, 1))


@pytest.mark.parametrize("trick", ["views-of-one-storage", "expanded-one-value", "same-tensor-every-key"])
def test_tensors_sharing_one_storage_are_refused_before_allocating(tmp_path: Path, capsys, trick: str) -> None:
    shapes = _tensor_shapes(WIDE)
    stored = torch.randn(max(s.numel() for s in shapes.values())) * 0.01
    if trick == "views-of-one-storage":
        sd = {k: stored[: s.numel()].view(s) for k, s in shapes.items()}
    elif trick == "expanded-one-value":  # stride 0: each tensor alone claims no more than the storage holds
        sd = {k: stored[:1].expand(s) if len(s) else stored[0] for k, s in shapes.items()}
    else:
        same = {s: stored[: s.numel()].view(s) for s in set(shapes.values())}
        sd = {k: same[s] for k, s in shapes.items()}
    path = tmp_path / "shared.pth"
    torch.save({"params": sd}, path)
    claimed = sum(s.numel() for s in shapes.values()) * 4
    assert path.stat().st_size * 20 < claimed
    before = _max_rss_mb()
    inspect_refused(
        path, capsys, f"tensors claim {claimed:,} bytes", f"stores {stored.numel() * 4:,} bytes for them", "sharing"
    )
    assert _max_rss_mb() - before < 20


def test_tensors_in_separate_parts_of_one_storage_still_load(tmp_path: Path, tiny_sd) -> None:
    """A flat parameter buffer, every tensor a slice of its own: nothing overlaps, nothing is refused."""
    flat = torch.cat([v.reshape(-1) for v in tiny_sd.values()])
    sd, start = {}, 0
    for k, v in tiny_sd.items():
        sd[k] = flat[start : start + v.numel()].view(v.shape)
        start += v.numel()
    torch.save({"params": sd}, tmp_path / "flat.pth")
    loaded = load_checkpoint(tmp_path / "flat.pth")
    torch.testing.assert_close(loaded.model.state_dict(), tiny_sd)


def test_weights_larger_than_the_memory_available_are_refused(tmp_path: Path, tiny_sd, capsys, monkeypatch) -> None:
    torch.save({"params": tiny_sd}, tmp_path / "good.pth")
    needed = sum(v.numel() for v in tiny_sd.values()) * 4
    monkeypatch.setattr("nafnet_edge.inference.available_memory_bytes", lambda device: needed - 1)
    inspect_refused(
        tmp_path / "good.pth", capsys, f"float32 weights need {needed / 1e9:.2f} GB of memory", "GB are available"
    )
    monkeypatch.setattr("nafnet_edge.inference.available_memory_bytes", lambda device: needed)
    assert main(["inspect", str(tmp_path / "good.pth")]) == 0


def _overflowing_checkpoint(tiny_sd, path: Path) -> Path:
    """Finite weights a million times too large: the forward pass overflows float32 into NaN."""
    sd = {k: v * 1e6 if ".conv" in k and k.endswith("weight") else v for k, v in tiny_sd.items()}
    torch.save({"params": sd}, path)
    return path


@pytest.mark.parametrize("tile", ["0", "32"], ids=["whole", "tiled"])
def test_run_refuses_an_output_with_nan_and_writes_no_image(tmp_path: Path, tiny_sd, capsys, tile: str) -> None:
    ckpt = _overflowing_checkpoint(tiny_sd, tmp_path / "overflows.pth")
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    assert main(["run", str(ckpt), str(image), "-o", str(out), "--tile", tile, "--overlap", "8"]) == EXIT_BAD_INPUT
    errors = [
        line for line in without_progress(capsys.readouterr().err).splitlines() if line.startswith("nafnet-edge:")
    ]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"nafnet-edge: error: {image}: the checkpoint produced non-finite values (NaN or Inf)")
    assert "of 6,720 output values, so no image was written for it" in errors[0]
    assert not out.exists() or not any(out.iterdir())


def test_a_checkpoint_that_produces_nan_gets_no_verdict_and_no_deploy_graph(
    tmp_path: Path, tiny_sd, capsys, monkeypatch
) -> None:
    """With a NaN reference every PSNR is NaN and every comparison with a budget is false: refuse instead."""
    monkeypatch.setenv("NAFNET_EDGE_CACHE", str(tmp_path / "cache"))
    ckpt = _overflowing_checkpoint(tiny_sd, tmp_path / "overflows.pth")
    out = tmp_path / "out"
    assert main(["convert", str(ckpt), "--target", "onnx", "--input-size", "64", "-o", str(out)]) == EXIT_BAD_INPUT
    errors = [
        line for line in without_progress(capsys.readouterr().err).splitlines() if line.startswith("nafnet-edge:")
    ]
    assert len(errors) == 1 and "the source checkpoint itself (the fp32 reference) produces non-finite" in errors[0]
    assert not artifact_dir(out, "onnx").exists()

    assert main(["reparam", str(ckpt), "-o", str(tmp_path / "deploy.safetensors")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err == (
        "nafnet-edge: error: overflows.pth: the model produces non-finite values (NaN or Inf) on a 256x256 photo; "
        "its weights overflow float32, so nothing was written: use another checkpoint\n"
    )
    assert not (tmp_path / "deploy.safetensors").exists()


def test_a_nan_score_is_a_failure_whichever_image_has_it() -> None:
    """min() over [50, nan] is 50 but over [nan, 50] is nan: a NaN fidelity or drift must fail in any order."""
    from nafnet_edge.validation import Budgets, ValidationImage, validate_runner

    pixels = np.full((16, 16, 3), 0.5, np.float32)
    images = [ValidationImage(name=f"{i}.png", input=pixels, target=pixels) for i in range(2)]
    for nan_at in (0, 1):
        references = [(pixels.copy(), None) for _ in images]
        references[nan_at][0][0, 0, 0] = np.nan
        report = validate_runner(
            lambda x: x,
            references,
            images,
            tile=(16, 16),
            overlap=0,
            multiple=4,
            budgets=Budgets.for_precision("fp32"),
            reference_device="cpu",
            data="test",
        )
        assert not report.passed
        assert any(f.startswith("fidelity nan dB") for f in report.failures), report.failures
        assert any(f.startswith("drift nan dB") for f in report.failures), report.failures


@pytest.mark.parametrize("train_size", [[0, 256], [-256, 256], "256x256", [256], [256.5, 256], [True, 256]])
def test_a_bad_train_size_in_metadata_names_the_file(tmp_path: Path, tiny_sd, capsys, train_size) -> None:
    path = tmp_path / "tlc.safetensors"
    config = {"arch": "nafnet-local", "train_size": train_size}
    save_file(tiny_sd, str(path), metadata={"config": json.dumps(config)})
    err = inspect_refused(path, capsys, f"its metadata gives train_size {train_size!r}", "pass --train-size")
    assert "--train-size must" not in err
    assert main(["inspect", str(path), "--train-size", "128", "--json"]) == 0  # the flag overrides the metadata
    assert json.loads(capsys.readouterr().out)["train_size"] == [128, 128]
