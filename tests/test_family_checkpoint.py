"""Every family from a checkpoint's tensors alone: NAFNet, Baseline, NAFNetSR and NAFSSR in the official file layout
(inferred config, arch chosen, output equal to the in-memory model's), release identification, refusals, inspect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import inspect_refused
from safetensors.torch import save_file

from nafnet_edge import checkpoint as ckpt_mod
from nafnet_edge.archs import ARCHS
from nafnet_edge.checkpoint import expected_shapes, fitting_archs, infer_config, load_checkpoint
from nafnet_edge.cli import main
from nafnet_edge.complexity import count_macs
from nafnet_edge.errors import EXIT_USAGE, NotNAFNetError, OptionError, StateDictMismatchError
from nafnet_edge.model import NAFNetConfig, build_model, tlc_kernel_sizes
from nafnet_edge.releases import RELEASE_SHAPES, RELEASES, Release, releases_with_shape, shapes_like

SR = {"enc_blk_nums": (), "dec_blk_nums": ()}
TINY = {
    "nafnet": NAFNetConfig(width=8, enc_blk_nums=(1, 2), middle_blk_num=1, dec_blk_nums=(1, 1)),
    "baseline": NAFNetConfig(
        arch="baseline", width=12, enc_blk_nums=(1, 1), middle_blk_num=2, dec_blk_nums=(1, 1), dw_expand=1
    ),
    "nafssr-x2": NAFNetConfig(arch="nafssr", width=16, middle_blk_num=2, up_scale=2, fusion=True, **SR),
    "nafnet-sr-x3": NAFNetConfig(arch="nafnet-sr", width=8, middle_blk_num=3, up_scale=3, **SR),
}
# what a file of each gets without flags, release or metadata, and why
IDENTIFIED = {
    "nafnet": ("nafnet", "default"),
    "baseline": ("baseline", "default"),
    "nafssr-x2": ("nafssr", "shape"),
    "nafnet-sr-x3": ("nafnet-sr", "shape"),
}
INPUTS = {  # large enough that NAFSSR's TLC kernel (45 x 135 per view) pools locally
    "nafnet": (1, 3, 20, 28),
    "baseline": (1, 3, 20, 28),
    "nafssr-x2": (1, 6, 48, 144),
    "nafnet-sr-x3": (1, 3, 12, 20),
}


def trained_like(config: NAFNetConfig, seed: int = 0) -> torch.nn.Module:
    """A model of ``config`` whose residual scales (zero at init) are not zero, so every branch shows."""
    torch.manual_seed(seed)
    model = build_model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("beta", "gamma")):
                p.normal_(0, 0.2)
    return model


def official_file(path: Path, model: torch.nn.Module, prefix: str = "") -> Path:
    """What upstream's trainer writes: ``torch.save({'params': state_dict})`` (``module.`` keys from DataParallel)."""
    torch.save({"params": {prefix + k: v for k, v in model.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {name: trained_like(cfg, seed) for seed, (name, cfg) in enumerate(TINY.items())}


# ---- identification from the tensors ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("fmt", ["official", "module-prefix", "params_ema", "safetensors"])
def test_each_family_is_identified_and_loads_exactly(tmp_path: Path, models, name: str, fmt: str) -> None:
    model, cfg = models[name], TINY[name]
    sd = model.state_dict()
    path = tmp_path / f"{name}.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "params_ema":
        torch.save({"params_ema": sd, "iter": 1000}, path)
    else:
        official_file(path, model, "module." if fmt == "module-prefix" else "")

    assert infer_config(sd) == cfg.replace(arch=cfg.family)  # the family's class without TLC
    loaded = load_checkpoint(path)
    arch, source = IDENTIFIED[name]
    assert (loaded.config.arch, loaded.arch_source) == (arch, source)
    assert loaded.config == cfg and type(loaded.model).__name__ == cfg.class_name
    x = torch.rand(INPUTS[name], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(x), loaded.model(x)
    assert got.shape == (x.shape[0], x.shape[1], x.shape[2] * cfg.up_scale, x.shape[3] * cfg.up_scale)
    assert torch.equal(got, expected)


def test_nafssr_pools_locally_at_the_tested_size(models) -> None:
    """The NAFSSR comparison above runs TLC's local box means, not a global pool that any kernel would match."""
    kernel = tlc_kernel_sizes(TINY["nafssr-x2"])
    assert kernel == [(45, 135)]
    _, _, h, w = INPUTS["nafssr-x2"]
    assert h > kernel[0][0] and w > kernel[0][1]
    x = torch.rand(INPUTS["nafssr-x2"], generator=torch.Generator().manual_seed(1))
    global_pool = build_model(TINY["nafssr-x2"].replace(arch="nafnet-sr"))
    global_pool.load_state_dict(models["nafssr-x2"].state_dict())
    with torch.no_grad():
        drift = (global_pool.eval()(x) - models["nafssr-x2"](x)).abs().max()
    assert drift > 1e-5, drift


@pytest.mark.parametrize("shape", list(RELEASE_SHAPES))
def test_every_released_shape_is_inferred_from_its_keys(shape: str) -> None:
    cfg = RELEASE_SHAPES[shape]
    with torch.device("meta"):
        sd = build_model(cfg).state_dict()
    inferred = infer_config(sd)
    assert inferred == cfg.replace(arch=cfg.family, train_size=None)
    assert cfg.arch in fitting_archs(inferred)
    assert shape in shapes_like(inferred) and expected_shapes(inferred) == {k: tuple(v.shape) for k, v in sd.items()}


def test_released_shapes_are_the_published_ones() -> None:
    assert {"SIDD-width32", "SIDD-width64", "GoPro-width32", "GoPro-width64"} <= set(RELEASE_SHAPES)
    sizes = {"T": (48, 16), "S": (64, 32), "B": (96, 64), "L": (128, 128)}
    for size, (width, blocks) in sizes.items():
        for scale in (2, 4):
            cfg = RELEASE_SHAPES[f"NAFSSR-{size}-x{scale}"]
            assert (cfg.arch, cfg.width, cfg.middle_blk_num, cfg.up_scale, cfg.fusion) == (
                "nafssr",
                width,
                blocks,
                scale,
                True,
            )
            assert cfg.train_size == (30, 90) and cfg.in_channels == 6
    for task, local in (("SIDD", False), ("GoPro", True)):
        for width in (32, 64):
            base, nafnet = RELEASE_SHAPES[f"Baseline-{task}-width{width}"], RELEASE_SHAPES[f"{task}-width{width}"]
            assert base.class_name == ("BaselineLocal" if local else "Baseline") and base.dw_expand == 1
            assert (base.enc_blk_nums, base.middle_blk_num, base.dec_blk_nums) == (
                nafnet.enc_blk_nums,
                nafnet.middle_blk_num,
                nafnet.dec_blk_nums,
            )
            assert not releases_with_shape(base)  # a Baseline never matches a NAFNet of the same layout
    # The NAFSSR-L files hold float32 weights: their sizes differ by the x4 conv's extra weights exactly (to the
    # pickle's length fields), and each holds its parameters plus under 2% of pickle overhead.
    l2, l4 = (next(r for r in RELEASES if r.name == n) for n in ("NAFSSR-L_2x", "NAFSSR-L_4x"))
    params = [sum(p.numel() for p in build_model(r.config.replace()).parameters()) for r in (l2, l4)]
    assert abs((l4.file_bytes - l2.file_bytes) - 4 * (params[1] - params[0])) < 64
    assert all(0 < r.file_bytes - 4 * n < 0.02 * r.file_bytes for r, n in zip((l2, l4), params, strict=True))
    assert l2.psnr_ssim is None and "stereo super-resolution x2" in l2.task


# ---- arch resolution -----------------------------------------------------------------------------------------


def test_release_sha256_identifies_a_nafssr_file(tmp_path: Path, models, monkeypatch, capsys) -> None:
    path = official_file(tmp_path / "NAFSSR-tiny_2x.pth", models["nafssr-x2"], "module.")
    release = Release("NAFSSR-tiny_2x", "stereo SR x2", TINY["nafssr-x2"], 1, ckpt_mod.sha256_file(path))
    monkeypatch.setattr("nafnet_edge.releases.RELEASES", (*RELEASES, release))  # the table, for a tiny file
    loaded = load_checkpoint(path)
    assert loaded.release == release and loaded.arch_source == "release" and loaded.config == TINY["nafssr-x2"]
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "release     NAFSSR-tiny_2x: stereo SR x2" in out and "[from official release (sha256)]" in out
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["release"] == "NAFSSR-tiny_2x" and info["task"] == "stereo SR x2" and info["arch_source"] == "release"
    assert info["same_shape_as"] == ["NAFSSR-tiny_2x"]


def test_a_gopro_shaped_baseline_gets_tlc_and_is_named_by_its_shape(tmp_path: Path, models, monkeypatch, capsys):
    cfg = TINY["baseline"].replace(arch="baseline-local")
    monkeypatch.setitem(RELEASE_SHAPES, "Baseline-Tiny-width12", cfg)  # a released shape without a sha256
    path = official_file(tmp_path / "deblur.pth", models["baseline"])
    loaded = load_checkpoint(path)
    assert loaded.release is None and (loaded.config.arch, loaded.arch_source) == ("baseline-local", "shape")
    assert type(loaded.model).__name__ == "BaselineLocal"
    assert load_checkpoint(path, arch="baseline").config.arch == "baseline"
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "matches the shape of Baseline-Tiny-width12; sha256 not in the release table" in out
    assert "BaselineLocal (TLC, train size 256x256" in out and "--arch baseline to disable" in out


def test_a_real_nafssr_shape_is_named_and_gets_tlc(tmp_path: Path, capsys) -> None:
    cfg = RELEASE_SHAPES["NAFSSR-T-x4"]
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_model(cfg).state_dict().items()}
    path = tmp_path / "nafssr-t.pth"
    torch.save({"params": {k: torch.zeros(s) for k, s in shapes.items()}}, path)
    loaded = load_checkpoint(path)
    assert loaded.config == cfg and loaded.arch_source == "shape"
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["released_shape"] == ["NAFSSR-T-x4"] and info["same_shape_as"] == [] and info["release"] is None
    l2 = load_checkpoint(path, arch="nafnet-sr")
    assert type(l2.model).__name__ == "NAFNetSR" and l2.config.fusion and not l2.config.local


@pytest.mark.parametrize(
    ("name", "arch", "fits"),
    [
        ("nafnet", "baseline", "archs that fit: nafnet, nafnet-local"),
        ("nafnet", "nafssr", "archs that fit: nafnet, nafnet-local"),
        ("baseline", "nafnet-local", "archs that fit: baseline, baseline-local"),
        ("nafssr-x2", "nafnet", "archs that fit: nafssr, nafnet-sr"),
        ("nafnet-sr-x3", "nafssr", "NAFSSR is the stereo network"),
        ("nafnet-sr-x3", "baseline-local", "the arch that fits: nafnet-sr"),
    ],
)
def test_arch_across_families_is_refused(tmp_path: Path, models, capsys, name: str, arch: str, fits: str) -> None:
    path = official_file(tmp_path / f"{name}.pth", models[name])
    with pytest.raises(OptionError, match=fits):
        load_checkpoint(path, arch=arch)  # type: ignore[arg-type]
    assert main(["inspect", str(path), "--arch", arch]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"--arch {arch} does not fit" in err and fits in err and path.name in err


def test_arch_within_the_family_switches_tlc(tmp_path: Path, models) -> None:
    path = official_file(tmp_path / "ssr.pth", models["nafssr-x2"])
    x = torch.rand(INPUTS["nafssr-x2"], generator=torch.Generator().manual_seed(2))
    plain = load_checkpoint(path, arch="nafnet-sr")
    assert plain.config == TINY["nafssr-x2"].replace(arch="nafnet-sr") and plain.arch_source == "flag"
    small = load_checkpoint(path, train_size=(16, 48))
    assert small.config.train_size == (16, 48) and tlc_kernel_sizes(small.config) == [(24, 72)]
    with torch.no_grad():
        assert not torch.equal(plain.model(x), small.model(x))


def test_metadata_arch_must_fit_the_tensors(tmp_path: Path, models) -> None:
    sd = {k: v.contiguous() for k, v in models["nafssr-x2"].state_dict().items()}
    good = tmp_path / "good.safetensors"
    save_file(sd, str(good), metadata={"config": json.dumps({"arch": "nafnet-sr"})})
    loaded = load_checkpoint(good)
    assert (loaded.config.arch, loaded.arch_source) == ("nafnet-sr", "metadata") and loaded.config.fusion
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad), metadata={"config": json.dumps({"arch": "baseline"})})
    with pytest.raises(ckpt_mod.CheckpointError, match=r"metadata gives arch 'baseline'.*nafssr, nafnet-sr"):
        load_checkpoint(bad)


def test_arch_choices_are_every_arch() -> None:
    from nafnet_edge.cli.common import checkpoint_options

    action = next(a for a in checkpoint_options()._actions if a.dest == "arch")
    assert tuple(action.choices) == ARCHS


# ---- refusals -------------------------------------------------------------------------------------------------


def test_partial_fusion_is_refused_naming_the_blocks(tmp_path: Path, capsys) -> None:
    cfg = NAFNetConfig(arch="nafssr", width=8, middle_blk_num=4, up_scale=2, fusion=True, **SR)
    sd = {k: v for k, v in build_model(cfg).state_dict().items() if not k.startswith(("body.2.", "body.3."))}
    sd.update({k: v for k, v in build_model(cfg.replace(arch="nafnet-sr", fusion=False)).state_dict().items()})
    sd = {k: v for k, v in sd.items() if not k.startswith(("body.2.module.fusion", "body.3.module.fusion"))}
    with pytest.raises(StateDictMismatchError, match=r"in blocks 0-1 but not in blocks 2-3 of 4") as info:
        infer_config(sd)
    assert "fusion_from/fusion_to" in str(info.value)
    torch.save({"params": sd}, tmp_path / "partial.pth")
    inspect_refused(tmp_path / "partial.pth", capsys, "not in blocks 2-3", "not supported")


@pytest.mark.parametrize("channels", [3 * 3, 3 * 5, 4])
def test_upsampling_channels_that_are_not_a_square_scale_are_refused(tmp_path: Path, capsys, channels: int) -> None:
    sd = dict(build_model(TINY["nafnet-sr-x3"]).state_dict())
    sd["up.0.weight"] = torch.zeros(channels, 8, 3, 3)
    sd["up.0.bias"] = torch.zeros(channels)
    with pytest.raises(StateDictMismatchError, match=rf"'up.0.weight' has shape \[{channels}, 8, 3, 3\]"):
        infer_config(sd)
    torch.save({"params": sd}, tmp_path / "scale.pth")
    inspect_refused(tmp_path / "scale.pth", capsys, "12 for x2, 27 for x3, 48 for x4")


def test_mixed_sca_and_se_blocks_are_refused(tmp_path: Path, models, capsys) -> None:
    nafnet = TINY["nafnet"]
    baseline_sd = build_model(nafnet.replace(arch="baseline")).state_dict()
    sd = dict(models["nafnet"].state_dict())
    for key in [k for k in sd if k.startswith("middle_blks.0.")]:
        del sd[key]
    sd.update({k: v for k, v in baseline_sd.items() if k.startswith("middle_blks.0.")})
    with pytest.raises(StateDictMismatchError, match=r"mixed block kinds: 5 blocks .* and 1 the Baseline"):
        infer_config(sd)
    torch.save({"params": sd}, tmp_path / "mixed.pth")
    inspect_refused(tmp_path / "mixed.pth", capsys, "mixed block kinds", "'middle_blks.0.se.*'")


def test_missing_and_far_away_sr_blocks_are_refused_before_building(tmp_path: Path, models, capsys) -> None:
    sd = {k: v for k, v in models["nafnet-sr-x3"].state_dict().items() if not k.startswith("body.1.")}
    torch.save({"params": sd}, tmp_path / "gap.pth")
    inspect_refused(tmp_path / "gap.pth", capsys, "1 of the 3 blocks", "'body.1.module.blk.*'")
    far = {**sd, "body.999999999999.module.blk.norm1.weight": torch.zeros(8)}  # 10**12 blocks implied
    torch.save({"params": far}, tmp_path / "far.pth")
    inspect_refused(tmp_path / "far.pth", capsys, "999999999997 of the 1000000000000 blocks")
    no_up = {k: v for k, v in models["nafnet-sr-x3"].state_dict().items() if not k.startswith("up.")}
    torch.save({"params": no_up}, tmp_path / "no-up.pth")
    inspect_refused(tmp_path / "no-up.pth", capsys, "no 'up.0.weight'")


def test_wrong_shapes_and_bad_values_are_refused_in_every_family(tmp_path: Path, models, capsys) -> None:
    sd = dict(models["nafssr-x2"].state_dict())
    sd["body.1.module.fusion.l_proj2.weight"] = torch.zeros(16, 8, 1, 1)
    torch.save({"params": sd}, tmp_path / "shape.pth")
    inspect_refused(
        tmp_path / "shape.pth",
        capsys,
        "NAFSSR configuration inferred from it (width 16, 2 blocks, x2, stereo, SCAM fusion)",
        "'body.1.module.fusion.l_proj2.weight': expected [16, 16, 1, 1], found [16, 8, 1, 1]",
    )
    sd = dict(models["baseline"].state_dict())
    sd["middle_blks.1.se.3.weight"] = sd["middle_blks.1.se.3.weight"].clone().fill_(float("nan"))
    torch.save({"params": sd}, tmp_path / "nan.pth")
    inspect_refused(tmp_path / "nan.pth", capsys, "NaN or Inf", "'middle_blks.1.se.3.weight'")
    sd = dict(models["nafnet-sr-x3"].state_dict())
    sd["up.0.bias"] = sd["up.0.bias"].to(torch.int32)
    torch.save({"params": sd}, tmp_path / "int.pth")
    inspect_refused(tmp_path / "int.pth", capsys, "non-floating-point weights: 'up.0.bias'")


def test_huge_sr_configurations_are_refused_before_building() -> None:
    # 7 * 4096**2 weights a NAFBlock: 20 of them are 2.3G parameters
    sd = {"intro.weight": torch.zeros(1).expand(4096, 3, 3, 3), "up.0.weight": torch.zeros(1).expand(12, 4096, 3, 3)}
    sd.update({f"body.{i}.module.blk.norm1.weight": torch.zeros(1) for i in range(20)})
    with pytest.raises(ckpt_mod.CheckpointError, match="G parameters; refusing to build it"):
        expected_shapes(infer_config(sd))


def test_other_networks_are_told_what_each_family_needs(tmp_path: Path, capsys) -> None:
    path = tmp_path / "other.pth"
    torch.save({"intro.weight": torch.zeros(8, 3, 3, 3), "tail.weight": torch.zeros(3, 8, 3, 3)}, path)
    with pytest.raises(NotNAFNetError, match=r"neither 'downs.\{i\}.weight'.*nor 'body.\{i\}.module.blk.\*'"):
        load_checkpoint(path)
    inspect_refused(path, capsys, "NAFNet and Baseline U-Nets", "NAFNetSR and NAFSSR")


# ---- inspect --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "needles"),
    [
        (
            "nafnet",
            [
                "family      NAFNet (U-Net: restores at the input size, 1 view)",
                "class       NAFNet  [from default for an unrecognised file]",
                "config      img_channels 3, width 8, enc [1, 2], middle 1, dec [1, 1], dw_expand 2, ffn_expand 2",
                "multiple of 4, then crop",
            ],
        ),
        (
            "baseline",
            [
                "family      Baseline (U-Net",
                "class       Baseline  [from default",
                "width 12, enc [1, 1], middle 2, dec [1, 1], dw_expand 1, ffn_expand 2",
            ],
        ),
        (
            "nafssr-x2",
            [
                "family      NAFNet-SR (super-resolution x2, stereo pair: 2 views (left first), 6 channels in and out)",
                "class       NAFSSR (TLC, train size 30x90 per view, kernels [[45, 135]])  [from stereo checkpoint",
                "width 16, 2 blocks, x2, stereo fusion (SCAM) after every block",
                "at 64x96 per view (input; output x2)",
                "padding     none (no downsampling)",
            ],
        ),
        (
            "nafnet-sr-x3",
            [
                "family      NAFNet-SR (super-resolution x3, single view, 3 channels in and out)",
                "class       NAFNetSR  [from single-view super-resolution network",
                "width 8, 3 blocks, x3, no fusion",
            ],
        ),
    ],
)
def test_inspect_describes_each_family(tmp_path: Path, models, capsys, name: str, needles: list[str]) -> None:
    cfg = TINY[name]
    path = official_file(tmp_path / f"{name}.pth", models[name], "module.")
    assert main(["inspect", str(path), "--size", "64x96"]) == 0
    out = capsys.readouterr().out
    for needle in needles:
        assert needle in out, out
    params = sum(p.numel() for p in models[name].parameters())
    gmacs = round(count_macs(cfg, 64, 96) / 1e9, 3)
    assert f"({params:,})" in out and f"GMACs       {gmacs:.2f} at 64x96" in out
    assert main(["inspect", str(path), "--json", "--size", "64x96"]) == 0
    info = json.loads(capsys.readouterr().out)
    blocks = sum(cfg.enc_blk_nums) + cfg.middle_blk_num + sum(cfg.dec_blk_nums)
    assert {k: info[k] for k in ("arch", "family", "class", "up_scale", "views", "in_channels", "fusion")} == {
        "arch": cfg.arch,
        "family": cfg.family,
        "class": cfg.class_name,
        "up_scale": cfg.up_scale,
        "views": cfg.views,
        "in_channels": cfg.in_channels,
        "fusion": cfg.fusion,
    }
    assert info["blocks"] == blocks and info["params"] == params and info["key_prefix"] == "module."
    assert info["train_size"] == (list(cfg.train_size) if cfg.local else None)
    assert info["tlc_kernels"] == ([list(k) for k in tlc_kernel_sizes(cfg)] if cfg.local else None)
    assert info["released_shape"] == [] and info["same_shape_as"] == [] and info["release"] is None
