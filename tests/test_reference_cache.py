"""The reference cache can cost time, never a verdict: keys cover every reference setting, entries are
authenticated with a private per-user key and bounded in size, and validate holds the artifact's lock."""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import artifact_dir, kodak_crops, randomize, require, without_progress

import nafnet_edge.conversion as convert_module
from nafnet_edge import validation as validate
from nafnet_edge.atomic import _acquire
from nafnet_edge.checkpoint import load_checkpoint
from nafnet_edge.cli import main
from nafnet_edge.converters import get_target
from nafnet_edge.errors import EXIT_BAD_INPUT, EXIT_BUDGET, EXIT_OUTPUT, OutputError
from nafnet_edge.model import NAFNet, NAFNetConfig, build_model

require("onnxruntime")

TINY = NAFNetConfig(width=8, enc_blk_nums=(1, 1), middle_blk_num=1, dec_blk_nums=(1, 1))
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NAFNET_EDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(validate, "_cache_warned", False)  # each test sees its own first warning


def _save(model: NAFNet, path: Path) -> Path:
    torch.save({"params": model.state_dict()}, path)
    return path


@pytest.fixture
def tlc_checkpoint(tmp_path: Path) -> Path:
    """A tiny model whose channel attention matters: with TLC pooling (train size 64) its outputs on a 128 px tile
    are ~50 dB from global pooling, below the 60 dB fp32 budget."""
    model = randomize(NAFNet(TINY))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sca.1" in name:
                p.mul_(30)
            if name.endswith(("beta", "gamma")):
                p.mul_(5)
    return _save(model, tmp_path / "tlc.pth")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A crop larger than TLC's 96 px window at train size 64 (so pooling is local) and a small one (padded)."""
    return kodak_crops(tmp_path / "data", [(160, 200), (50, 40)])


def _convert(checkpoint: Path, out: Path, data: Path, *extra: str) -> int:
    args = ["convert", str(checkpoint), "--target", "onnx", "-o", str(out), "--input-size", "128"]
    return main([*args, "--val-data", str(data), *extra])


def _validation(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())["validation"]


def _entries(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "reference").glob("*.ref"))


# --- keys ------------------------------------------------------------------------------------------------------


def test_every_reference_setting_changes_the_cache_key(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    weights = randomize(NAFNet(TINY)).state_dict()

    def model(**changes: object) -> NAFNet:
        m = build_model(TINY.replace(**changes))
        m.load_state_dict(weights)
        return m

    image = validate.ValidationImage("x", np.random.default_rng(0).random((40, 50, 3), dtype=np.float32))
    other = validate.ValidationImage("x", image.input + np.float32(1e-3))
    base = {"checkpoint_sha256": "ab" * 32, "param_key": "params", "device": CPU}
    variants = {
        "base": (model(), base, image, (64, 64), 32),
        "arch": (model(arch="nafnet-local"), base, image, (64, 64), 32),
        "train_size": (model(arch="nafnet-local", train_size=(128, 128)), base, image, (64, 64), 32),
        "param_key": (model(), {**base, "param_key": "params_ema"}, image, (64, 64), 32),
        "device": (model(), {**base, "device": torch.device("cuda")}, image, (64, 64), 32),
        "checkpoint": (model(), {**base, "checkpoint_sha256": "cd" * 32}, image, (64, 64), 32),
        "weights": (randomize(NAFNet(TINY), seed=1), base, image, (64, 64), 32),
        "image": (model(), base, other, (64, 64), 32),
        "tile": (model(), base, image, (128, 128), 32),
        "overlap": (model(), base, image, (64, 64), 16),
    }
    keys = {
        name: validate.cache_key(validate.reference_identity(m, **settings), img, tile=tile, overlap=overlap)[0]
        for name, (m, settings, img, tile, overlap) in variants.items()
    }
    assert len(set(keys.values())) == len(keys), keys
    again = validate.cache_key(validate.reference_identity(model(), **base), image, tile=(64, 64), overlap=32)[0]
    assert again == keys["base"]  # and the same settings find the same entry


def test_a_tlc_conversion_validates_alike_with_and_without_a_warm_cache(
    tlc_checkpoint: Path, data: Path, tmp_path: Path, capsys
) -> None:
    """The cache holds plain-NAFNet references of the same checkpoint, image and tiling; the TLC conversion must
    neither reuse them nor disagree with an uncached run, and validate must rebuild the TLC reference by itself."""
    assert _convert(tlc_checkpoint, tmp_path / "plain", data) == 0
    tlc = ["--arch", "nafnet-local", "--train-size", "64"]
    assert _convert(tlc_checkpoint, tmp_path / "tlc", data, *tlc) == 0
    art = artifact_dir(tmp_path / "tlc", "onnx")
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["reference"] == {
        "arch": "nafnet-local",
        "train_size": [64, 64],
        "param_key": "params",
        "device": "cpu",
        "precision": "fp32",
    }
    converted = _validation(art)["summary"]

    capsys.readouterr()
    assert main(["validate", str(art), "--val-data", str(data)]) == 0  # the manifest's settings, cached
    assert _validation(art)["summary"] == converted
    assert main(["validate", str(art), "--val-data", str(data), "--no-cache"]) == 0
    assert _validation(art)["summary"] == converted
    assert "note" not in capsys.readouterr().err

    for cache in ([], ["--no-cache"]):  # an explicit flag still wins, said in one note line
        assert main(["validate", str(art), "--val-data", str(data), "--arch", "nafnet", *cache]) == EXIT_BUDGET
        notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nafnet-edge: note:")]
        assert notes == [
            "nafnet-edge: note: --arch nafnet differs from the manifest's reference (nafnet-local); "
            "validating with --arch nafnet"
        ]
        failed = _validation(art)
        assert not failed["passed"] and failed["summary"]["fidelity_db_min"] < 60
        assert failed["reference_settings"]["arch"] == "nafnet"
        assert (art / "USAGE.md").read_text().startswith("> **FAILED its accuracy budget**")
    assert json.loads((art / "manifest.json").read_text())["reference"]["arch"] == "nafnet-local"  # unchanged

    del manifest["reference"]  # written before the section existed: the source config says TLC
    (art / "manifest.json").write_text(json.dumps(manifest))
    assert main(["validate", str(art), "--val-data", str(data)]) == 0
    assert "FAILED" not in (art / "USAGE.md").read_text()  # a passing re-validation clears the header
    assert _validation(art)["summary"] == converted

    manifest["reference"] = {"arch": "nafnet-local", "train_size": [0, 64], "param_key": "params", "device": "cpu"}
    (art / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["validate", str(art), "--val-data", str(data)]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == (
        f"nafnet-edge: error: {art / 'manifest.json'} has a damaged 'reference' section (train_size [0, 64]); "
        "convert again\n"
    )


def test_the_report_compares_each_artifact_with_its_own_reference(tlc_checkpoint: Path, tmp_path: Path) -> None:
    """Two artifacts of one checkpoint file, one converted with TLC and one without: each report row is scored
    against the reference its manifest records, not against whichever model the file was loaded as first."""
    from nafnet_edge.reporting import compare_images, read_artifact

    data = kodak_crops(tmp_path / "data", [(128, 128)])
    for name, extra in (("plain", []), ("tlc", ["--arch", "nafnet-local", "--train-size", "64"])):
        assert _convert(tlc_checkpoint, tmp_path / name, data, "--no-validate", *extra) == 0
    artifacts = [read_artifact(artifact_dir(tmp_path / name, "onnx")) for name in ("plain", "tlc")]
    groups = compare_images(artifacts, images=1, val_data=data, checkpoint=None)
    assert len(groups) == 2  # one reference per recorded setting, not one per checkpoint file
    for group in groups:
        [output] = group.outputs
        assert output.note is None and output.psnr_db is not None and output.psnr_db > 100, output


def test_validate_tiles_with_the_overlap_the_artifact_was_validated_with(tlc_checkpoint: Path, tmp_path: Path) -> None:
    """The overlap changes the tiled reference and the artifact's tiled output alike: validate re-runs with the
    manifest's overlap unless --overlap says otherwise, and records the one it used."""
    data = kodak_crops(tmp_path / "wide", [(128, 400)])  # 4 tiles of 128 across with overlap 16, 5 with 48
    tlc = ["--arch", "nafnet-local", "--train-size", "64"]
    assert _convert(tlc_checkpoint, tmp_path / "out", data, *tlc, "--overlap", "16") == 0
    art = artifact_dir(tmp_path / "out", "onnx")
    converted = _validation(art)["per_image"]

    assert main(["validate", str(art), "--val-data", str(data), "--overlap", "48"]) == 0
    assert json.loads((art / "manifest.json").read_text())["tiling"]["overlap_px"] == 48
    with_48 = _validation(art)["per_image"]
    assert with_48 != converted  # other tile starts: the overlap shows in the numbers

    assert main(["validate", str(art), "--val-data", str(data)]) == 0  # the overlap recorded last: 48
    assert _validation(art)["per_image"] == with_48
    assert main(["validate", str(art), "--val-data", str(data), "--overlap", "16"]) == 0
    assert _validation(art)["per_image"] == converted


# --- planted entries -------------------------------------------------------------------------------------------


def test_nothing_planted_in_the_cache_makes_a_wrong_artifact_pass(data: Path, tmp_path: Path, capsys) -> None:
    good = _save(randomize(NAFNet(TINY)), tmp_path / "good.pth")
    other = randomize(NAFNet(TINY), seed=1)
    assert _convert(good, tmp_path / "out", data, "--no-validate") == 0
    assert _convert(_save(other, tmp_path / "other.pth"), tmp_path / "other", data, "--no-validate") == 0
    art = artifact_dir(tmp_path / "out", "onnx")
    wrong = artifact_dir(tmp_path / "other", "onnx") / "model.onnx"
    wrong.replace(art / "model.onnx")  # the wrong model, good's manifest

    manifest = json.loads((art / "manifest.json").read_text())
    runner = get_target("onnx").load_runner(art, export=manifest["export"])
    loaded = load_checkpoint(good)
    identity = validate.reference_identity(
        loaded.model, checkpoint_sha256=loaded.sha256, param_key="params", device=CPU
    )
    images = validate.folder_images(data)
    planted = []
    for image in images:
        name, material = validate.cache_key(identity, image, tile=(128, 128), overlap=32)
        out, _ = validate.apply_tiled(validate.runner_fn(runner.run), image.input, (128, 128), 32, 4)
        planted.append((validate.cache_dir() / name, material, out))

    # The wrong artifact's own outputs are the "reference" in every planted entry below.
    secret = validate._cache_secret(validate.cache_dir())
    assert secret is not None
    other_refs = validate.reference_outputs(other, loaded.sha256, images, tile=(128, 128), overlap=32, device=CPU)
    for (_, _, out), (ref, _) in zip(planted, other_refs, strict=True):
        assert validate.psnr(np.clip(out, 0, 1), np.clip(ref, 0, 1)) > 100  # they are the other model's outputs
    authentic_elsewhere = {p.name: p.read_bytes() for p in _entries(tmp_path)}  # signed, for other settings

    def plant_npz(path: Path, material: bytes, out: np.ndarray) -> None:  # the old format, under the name
        with open(path, "wb") as f:
            np.savez(f, tiled=out, tiling_db=np.array([]))

    def plant_forged(path: Path, material: bytes, out: np.ndarray) -> None:  # the format, a key of our own
        header = validate._ENTRY_HEADER.pack(validate._ENTRY_MAGIC, *out.shape, False, 0.0)
        mac = hmac.new(os.urandom(32), material + header + out.astype("<f4").tobytes(), hashlib.sha256)
        path.write_bytes(header + out.astype("<f4").tobytes() + mac.digest())

    def plant_moved(path: Path, material: bytes, out: np.ndarray) -> None:  # signed by us, for the other model
        size = validate._entry_bytes(out.shape)
        path.write_bytes(next(b for b in authentic_elsewhere.values() if len(b) == size))

    for plant in (plant_npz, plant_forged, plant_moved):
        for path, material, out in planted:
            plant(path, material, out)
        capsys.readouterr()
        assert main(["validate", str(art), "--val-data", str(data), "--reference-device", "cpu"]) == EXIT_BUDGET
        assert "FAILED: fidelity" in capsys.readouterr().out
        result = _validation(art)
        assert not result["passed"] and result["summary"]["fidelity_db_min"] < 60, plant.__name__
        for path, material, _ in planted:  # the planted names were the ones looked up: now genuine entries
            assert validate._read_cached(path, _shape(path, images), secret, material) is not None


def _shape(path: Path, images: list[validate.ValidationImage]) -> tuple[int, ...]:
    sizes = {validate._entry_bytes(i.input.shape): i.input.shape for i in images}
    return sizes[path.stat().st_size]


def test_an_oversized_or_special_entry_is_refused_before_it_is_read(tmp_path: Path) -> None:
    secret = validate._cache_secret(validate.cache_dir())
    assert secret is not None
    shape = (50, 40, 3)
    ref = np.random.default_rng(0).random(shape, dtype=np.float32)
    good = validate.cache_dir() / "good.ref"
    validate._write_cached(good, ref, None, secret, b"material")
    read = validate._read_cached(good, shape, secret, b"material")
    assert read is not None and np.array_equal(read[0], ref) and read[1] is None

    big = validate.cache_dir() / "big.ref"
    with open(big, "wb") as f:
        f.write(good.read_bytes())
        f.truncate(1 << 30)  # a 1 GiB (sparse) file under an entry's name
    bomb = validate.cache_dir() / "bomb.ref"
    with open(bomb, "wb") as f:  # 768 MB of zeros deflated to under 1 MB: what np.load would have inflated
        np.savez_compressed(f, tiled=np.zeros((8000, 8000, 3), np.float32), tiling_db=np.array([]))
    fifo = validate.cache_dir() / "fifo.ref"
    os.mkfifo(fifo)  # opened without blocking, refused as not a regular file
    link = validate.cache_dir() / "link.ref"
    link.symlink_to(good)  # not followed, though its target is genuine
    for path in (big, bomb, fifo, link):
        tracemalloc.start()
        try:
            assert validate._read_cached(path, shape, secret, b"material") is None, path.name
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 64 * 1024, (path.name, peak)


# --- the key ---------------------------------------------------------------------------------------------------


def test_the_key_is_made_private_and_a_key_anyone_else_could_read_is_not_used(tmp_path: Path, capsys) -> None:
    directory = validate.cache_dir()
    secret = validate._cache_secret(directory)
    key = directory / "hmac.key"
    assert secret is not None and len(secret) == 32 and key.read_bytes() == secret
    assert oct(key.stat().st_mode & 0o777) == "0o600" and oct(directory.stat().st_mode & 0o777) == "0o700"
    assert validate._cache_secret(directory) == secret  # made once, then reused
    assert [p.name for p in directory.iterdir()] == ["hmac.key"]  # no temporary file left

    model = randomize(NAFNet(TINY))
    image = validate.ValidationImage("x", np.random.default_rng(0).random((40, 50, 3), dtype=np.float32))
    uncached = validate.reference_outputs(
        model, "ab" * 32, [image], tile=(64, 64), overlap=32, device=CPU, use_cache=False
    )[0][0]
    key.chmod(0o644)
    capsys.readouterr()
    run = validate.reference_outputs(model, "ab" * 32, [image], tile=(64, 64), overlap=32, device=CPU)[0][0]
    assert np.array_equal(run, uncached)
    assert without_progress(capsys.readouterr().err) == (
        f"nafnet-edge: warning: reference outputs not cached ({key} has mode 0644, not 0600); "
        "remove it to make a new one\n"
    )
    assert [p.name for p in directory.iterdir()] == ["hmac.key"]  # nothing read or written with it
    assert validate._cache_secret(directory) is None

    key.unlink()
    (tmp_path / "readable").write_bytes(secret)
    (tmp_path / "readable").chmod(0o600)
    key.symlink_to(tmp_path / "readable")  # a link, even to a private file, is not the key
    assert validate._cache_secret(directory) is None


def test_a_cache_folder_of_another_user_is_not_used(tmp_path: Path, monkeypatch, capsys) -> None:
    directory = validate.cache_dir()
    directory.mkdir(parents=True)
    uid = os.getuid() + 1
    monkeypatch.setattr(os, "getuid", lambda: uid)
    assert validate._cache_secret(directory) is None
    assert capsys.readouterr().err == (
        f"nafnet-edge: warning: reference outputs not cached ({directory} belongs to uid {uid - 1}, not to this "
        f"user (uid {uid})); set NAFNET_EDGE_CACHE to a folder of yours\n"
    )
    assert not (directory / "hmac.key").exists()


# --- the lock --------------------------------------------------------------------------------------------------


def test_validate_holds_the_artifact_lock_from_reading_to_writing_the_manifest(
    data: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    checkpoint = _save(randomize(NAFNet(TINY)), tmp_path / "tiny.pth")
    assert _convert(checkpoint, tmp_path / "out", data, "--no-validate") == 0
    art = artifact_dir(tmp_path / "out", "onnx")
    lock = tmp_path / "out" / ".onnx-fp32.lock"

    refusals = []
    run_validation = convert_module.run_validation

    def second_writer(*args, **kwargs):  # a convert --force arriving while validate runs
        with pytest.raises(OutputError) as refused:
            os.close(_acquire(lock, art))
        refusals.append(str(refused.value))
        return run_validation(*args, **kwargs)

    monkeypatch.setattr(convert_module, "run_validation", second_writer)
    assert main(["validate", str(art), "--val-data", str(data)]) == 0
    assert len(refusals) == 1 and "is being written by another nafnet-edge process" in refusals[0]
    assert not lock.exists()  # released

    before = (art / "manifest.json").read_bytes()
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)  # another process's writer holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        capsys.readouterr()
        assert main(["validate", str(art), "--val-data", str(data)]) == EXIT_OUTPUT
        err = capsys.readouterr().err
    finally:
        os.close(fd)
    assert err.startswith(f"nafnet-edge: error: {art.resolve()} is being written by another nafnet-edge process") and (
        err.count("\n") == 1
    )
    assert (art / "manifest.json").read_bytes() == before
