"""Checkpoint layouts, configuration inference, release identification and every bad-input error."""

from __future__ import annotations

import random
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import inspect_refused
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from nafnet_edge import checkpoint as ckpt_mod
from nafnet_edge.checkpoint import infer_config, load_checkpoint
from nafnet_edge.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    NonFiniteWeightsError,
    NotNAFNetError,
    StateDictMismatchError,
    UnsafeCheckpointError,
)
from nafnet_edge.model import NAFNet, NAFNetConfig
from nafnet_edge.releases import RELEASE_SHAPES, RELEASES

TINY = NAFNetConfig(width=8, enc_blk_nums=(1, 2), middle_blk_num=2, dec_blk_nums=(1, 1))


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = NAFNet(TINY)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("beta", "gamma")):
                p.normal_(0, 0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


# ---- layouts ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wrap", "expected_key"),
    [
        (lambda sd: {"params": sd}, "params"),
        (lambda sd: {"params_ema": sd}, "params_ema"),
        (lambda sd: sd, None),
        (lambda sd: {"params": {"module." + k: v for k, v in sd.items()}}, "params"),
        (lambda sd: {"state_dict": {"model._orig_mod." + k: v for k, v in sd.items()}, "epoch": 3}, "state_dict"),
    ],
    ids=["official", "params_ema", "bare", "module-prefix", "lightning-compiled"],
)
def test_torch_layouts_load(tmp_path: Path, tiny_sd: dict, wrap, expected_key: str | None) -> None:
    path = tmp_path / "model.pth"
    torch.save(wrap(tiny_sd), path)
    loaded = load_checkpoint(path)
    assert loaded.config == TINY
    assert loaded.raw_param_key == expected_key
    assert same_weights(loaded.model, tiny_sd)
    assert loaded.release is None and loaded.arch_source == "default"


def test_params_ema_is_chosen_by_flag_and_reported(tmp_path: Path, tiny_sd: dict) -> None:
    ema = {k: v + 1.0 for k, v in tiny_sd.items()}
    path = tmp_path / "both.pth"
    torch.save({"params": tiny_sd, "params_ema": ema}, path)
    default = load_checkpoint(path)
    assert default.raw_param_key == "params" and default.other_param_keys == ["params_ema"]
    assert same_weights(default.model, tiny_sd)
    chosen = load_checkpoint(path, param_key="params_ema")
    assert chosen.raw_param_key == "params_ema" and same_weights(chosen.model, ema)
    with pytest.raises(ckpt_mod.CheckpointError, match="no 'state_dict' entry"):
        load_checkpoint(path, param_key="state_dict")


def test_safetensors_with_and_without_metadata(tmp_path: Path, tiny_sd: dict) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file(tiny_sd, str(plain))
    loaded = load_checkpoint(plain)
    assert loaded.file_format == "safetensors" and loaded.config == TINY and same_weights(loaded.model, tiny_sd)
    described = tmp_path / "local.safetensors"
    cfg = TINY.replace(arch="nafnet-local", train_size=(64, 64))
    save_file(tiny_sd, str(described), metadata={"config": __import__("json").dumps(cfg.to_dict())})
    local = load_checkpoint(described)
    assert local.config == cfg and local.arch_source == "metadata"
    assert type(local.model).__name__ == "NAFNetLocal"


def test_fp16_checkpoint_is_loaded_as_fp32(tmp_path: Path, tiny_sd: dict) -> None:
    path = tmp_path / "half.pth"
    torch.save({"params": {k: v.half() for k, v in tiny_sd.items()}}, path)
    loaded = load_checkpoint(path)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())


# ---- configuration inference ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        NAFNetConfig(width=8, enc_blk_nums=(2, 0, 3), middle_blk_num=0, dec_blk_nums=(1, 2, 0)),
        NAFNetConfig(img_channels=1, width=12, enc_blk_nums=(1,), middle_blk_num=3, dec_blk_nums=(2,)),
        NAFNetConfig(width=8, enc_blk_nums=(1, 1), middle_blk_num=1, dec_blk_nums=(1, 1), dw_expand=4, ffn_expand=3),
        RELEASE_SHAPES["SIDD-width32"],
        RELEASE_SHAPES["GoPro-width64"].replace(arch="nafnet"),
    ],
    ids=["empty-levels", "gray", "expansions", "sidd32", "gopro64"],
)
def test_config_is_inferred_from_shapes_alone(cfg: NAFNetConfig) -> None:
    with torch.device("meta"):
        sd = NAFNet(cfg).state_dict()
    assert infer_config(sd) == cfg


# ---- identification -------------------------------------------------------------------------------------------


def test_release_is_recognised_by_sha256_and_sets_tlc(tmp_path: Path, tiny_sd: dict, monkeypatch) -> None:
    path = tmp_path / "NAFNet-GoPro-width32.pth"
    torch.save({"params": tiny_sd}, path)
    gopro = next(r for r in RELEASES if r.name == "NAFNet-GoPro-width32")
    sha = ckpt_mod.sha256_file(path)
    monkeypatch.setattr(ckpt_mod, "release_by_sha256", lambda s: gopro if s == sha else None)
    loaded = load_checkpoint(path)
    assert loaded.release is gopro and loaded.arch_source == "release"
    assert loaded.config.arch == "nafnet-local" and type(loaded.model).__name__ == "NAFNetLocal"
    overridden = load_checkpoint(path, arch="nafnet", train_size=(128, 128))
    assert overridden.config.arch == "nafnet" and overridden.arch_source == "flag"


def test_release_table_matches_the_published_figures() -> None:
    from nafnet_edge.complexity import count_macs

    expected = {"NAFNet-SIDD-width32": (29.16, 16.05), "NAFNet-GoPro-width32": (17.11, 15.96)}
    for release in RELEASES:
        if release.name in expected:
            with torch.device("meta"):
                params = sum(p.numel() for p in NAFNet(release.config).parameters())
            assert round(params / 1e6, 2) == expected[release.name][0]
            assert round(count_macs(release.config) / 1e9, 2) == expected[release.name][1]
    assert ckpt_mod.release_by_sha256(RELEASES[2].sha256.upper()) is RELEASES[2]


def test_gopro_shaped_unknown_file_gets_tlc_from_its_shape(tmp_path: Path) -> None:
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in NAFNet(RELEASE_SHAPES["GoPro-width32"]).state_dict().items()}
    path = tmp_path / "finetuned-deblur.pth"
    torch.save({"params": {k: torch.zeros(s) for k, s in shapes.items()}}, path)
    loaded = load_checkpoint(path)
    assert loaded.release is None and loaded.arch_source == "shape"
    assert loaded.config == RELEASE_SHAPES["GoPro-width32"] and type(loaded.model).__name__ == "NAFNetLocal"
    assert load_checkpoint(path, arch="nafnet").config.arch == "nafnet"


# ---- bad input ---------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path, capsys) -> None:
    with pytest.raises(CheckpointNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")
    inspect_refused(tmp_path / "nope.pth", capsys, "not found")


def test_directory_and_empty_file(tmp_path: Path, capsys) -> None:
    inspect_refused(tmp_path, capsys, "is a directory")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="empty"):
        load_checkpoint(empty)


def test_truncated_zip_and_random_bytes(tmp_path: Path, tiny_sd: dict, capsys) -> None:
    good = tmp_path / "good.pth"
    torch.save({"params": tiny_sd}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match="truncated or damaged"):
        load_checkpoint(truncated)
    inspect_refused(truncated, capsys, "truncated or damaged")
    noise = tmp_path / "noise.pth"
    for seed in range(200):  # random bytes that happen to start with "{" (or whitespace and "{") are not text
        noise.write_bytes(random.Random(seed).randbytes(4096).replace(b"\x80", b"\x81").replace(b"PK", b"QK"))
        with pytest.raises(CorruptCheckpointError, match="neither a PyTorch checkpoint nor a safetensors"):
            load_checkpoint(noise)
    broken_st = tmp_path / "broken.safetensors"
    save_file(tiny_sd, str(broken_st))
    broken_st.write_bytes(broken_st.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match="damaged safetensors"):
        load_checkpoint(broken_st)


class _Payload:
    """Unpickling this would create a marker file: proof that code from the checkpoint ran."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_that_needs_code_execution_is_refused_and_nothing_runs(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "code-ran"
    payload = _Payload()
    payload.marker = str(marker)
    path = tmp_path / "evil.pth"
    torch.save({"params": {"intro.weight": torch.zeros(8, 3, 3, 3)}, "hook": payload}, path)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="running code"):
        load_checkpoint(path)
    inspect_refused(path, capsys, "never does that", "safetensors")
    assert not marker.exists()
    with zipfile.ZipFile(path) as zf:  # the file really carries the payload
        assert any(b"touch" in zf.read(n) for n in zf.namelist() if n.endswith("data.pkl"))


def test_state_dict_of_another_network(tmp_path: Path, capsys) -> None:
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 3))
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(NotNAFNetError, match="no 'intro.weight'"):
        load_checkpoint(path)
    inspect_refused(path, capsys, "not a NAFNet state dict", "'0.weight'")
    torch.save([1, 2, 3], path)
    with pytest.raises(NotNAFNetError, match="holds a list"):
        load_checkpoint(path)


def test_missing_and_unexpected_keys(tmp_path: Path, tiny_sd: dict, capsys) -> None:
    sd = dict(tiny_sd)
    del sd["encoders.1.0.conv2.bias"]
    sd["encoders.0.0.extra.weight"] = torch.zeros(3)
    path = tmp_path / "keys.pth"
    torch.save({"params": sd}, path)
    with pytest.raises(StateDictMismatchError) as info:
        load_checkpoint(path)
    assert info.value.missing == ["encoders.1.0.conv2.bias"]
    assert info.value.unexpected == ["encoders.0.0.extra.weight"]
    inspect_refused(path, capsys, "missing keys: 'encoders.1.0.conv2.bias'", "unexpected keys: 'encoders.0.0.extra")


def test_wrong_shape_names_key_expected_and_found(tmp_path: Path, tiny_sd: dict, capsys) -> None:
    sd = dict(tiny_sd)
    sd["middle_blks.1.conv3.weight"] = torch.zeros(32, 16, 1, 1)
    path = tmp_path / "shape.pth"
    torch.save(sd, path)
    with pytest.raises(StateDictMismatchError) as info:
        load_checkpoint(path)
    assert info.value.shape_mismatches == [("middle_blks.1.conv3.weight", (32, 32, 1, 1), (32, 16, 1, 1))]
    inspect_refused(path, capsys, "'middle_blks.1.conv3.weight': expected [32, 32, 1, 1], found [32, 16, 1, 1]")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path: Path, tiny_sd: dict, capsys, bad: float) -> None:
    sd = dict(tiny_sd)
    sd["decoders.1.0.conv4.weight"] = sd["decoders.1.0.conv4.weight"].clone()
    sd["decoders.1.0.conv4.weight"][0, 0] = bad
    path = tmp_path / "nan.pth"
    torch.save({"params": sd}, path)
    with pytest.raises(NonFiniteWeightsError, match=r"'decoders.1.0.conv4.weight' \(1 values\)"):
        load_checkpoint(path)
    inspect_refused(path, capsys, "NaN or Inf", "decoders.1.0.conv4.weight")


@settings(max_examples=40, deadline=None)
@given(
    levels=st.integers(1, 4),
    data=st.data(),
    width=st.sampled_from([4, 8, 12, 16]),
    img_channels=st.sampled_from([1, 3, 4]),
    dw_expand=st.integers(1, 3),
    ffn_expand=st.integers(1, 3),
)
def test_config_inference_round_trips_for_any_config(levels, data, width, img_channels, dw_expand, ffn_expand) -> None:
    blocks = st.lists(st.integers(0, 3), min_size=levels, max_size=levels).map(tuple)
    cfg = NAFNetConfig(
        img_channels=img_channels,
        width=width,
        enc_blk_nums=data.draw(blocks),
        middle_blk_num=data.draw(st.integers(0, 3)),
        dec_blk_nums=data.draw(blocks),
        dw_expand=dw_expand * 2,  # SimpleGate halves the channels: expansions are even in practice
        ffn_expand=ffn_expand * 2,
    )
    with torch.device("meta"):
        sd = NAFNet(cfg).state_dict()
    inferred = infer_config(sd)
    if not any(cfg.enc_blk_nums + cfg.dec_blk_nums + (cfg.middle_blk_num,)):
        inferred = inferred.replace(dw_expand=cfg.dw_expand, ffn_expand=cfg.ffn_expand)  # no block: not observable
    assert inferred == cfg
