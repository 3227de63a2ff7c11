"""Super-resolution and stereo super-resolution through `run`: the tiler at a scale, the shipped NAFNet-SR x2
model, NAFSSR stereo pairs (two files or one side-by-side image) and their errors."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import randomize, require
from PIL import Image
from safetensors import safe_open

from nafnet_edge.checkpoint import load_checkpoint
from nafnet_edge.cli import main
from nafnet_edge.errors import EXIT_BAD_INPUT, EXIT_USAGE
from nafnet_edge.images import read_image
from nafnet_edge.inference import restore_tensor, tile_count
from nafnet_edge.model import NAFSSR, NAFNetConfig, NAFNetSR
from nafnet_edge.tiling import run_tiled
from nafnet_edge.validation import apply_tiled

KODAK = sorted(Path(str(resources.files("nafnet_edge") / "data" / "kodak")).glob("*.png"))
SR_X2 = Path(str(resources.files("nafnet_edge") / "weights" / "nafnet-edge-sr-x2.safetensors"))
STEREO = NAFNetConfig(
    arch="nafssr", width=16, enc_blk_nums=(), dec_blk_nums=(), middle_blk_num=4, up_scale=2, fusion=True
)


def psnr(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """dB, data range 1.0."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(10 * np.log10(1.0 / np.mean(d**2)))


def downscaled(path: Path, scale: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(HR, LR) float HWC: a shipped photo and its 8-bit bicubic downscale (Pillow), as the SR model was trained."""
    hr = Image.open(path).convert("RGB")
    lr = hr.resize((hr.width // scale, hr.height // scale), Image.Resampling.BICUBIC)
    return np.asarray(hr, np.float32) / 255, np.asarray(lr, np.float32) / 255


def chw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]


# --- the tiler at a scale


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_tiles_are_placed_and_blended_at_the_output_scale(scale: int) -> None:
    """A zero-padded 3x3 conv then PixelShuffle sees wrong values only in a tile's outer input pixel; the blend
    gives the outer quarter of the (scaled) overlap weight 0, so tiled equals whole, also with rectangular tiles."""
    g = torch.Generator().manual_seed(scale)
    conv = torch.nn.Conv2d(3, 3 * scale**2, 3, padding=1)
    torch.nn.init.normal_(conv.weight, std=0.3, generator=g)
    fn = torch.nn.Sequential(conv, torch.nn.PixelShuffle(scale), torch.nn.Tanh())
    image = torch.rand(1, 3, 77, 131, generator=g)
    with torch.no_grad():
        whole = fn(image)
    for tile in (32, (24, 131)):
        out = run_tiled(fn, image, tile_px=tile, overlap_px=8, batch=2, scale=scale)
        assert out.shape == whole.shape == (1, 3, 77 * scale, 131 * scale)
        torch.testing.assert_close(out, whole, atol=1e-5, rtol=0)


def test_a_tile_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(ValueError, match="expected tiles of"):
        run_tiled(lambda t: t, torch.rand(1, 3, 40, 40), tile_px=16, overlap_px=4, scale=2)


# --- the shipped NAFNet-SR x2 model


@pytest.fixture(scope="module")
def sr_x2() -> NAFNetSR:
    loaded = load_checkpoint(SR_X2)
    assert isinstance(loaded.model, NAFNetSR) and loaded.config.up_scale == 2 and loaded.config.views == 1
    return loaded.model  # type: ignore[return-value]


def test_shipped_sr_x2_beats_bicubic_on_the_held_out_photos(sr_x2: NAFNetSR) -> None:
    """The shipped Kodak crops were not trained on (CBSD68 was): the model's 8-bit output against the original,
    border of 2 px shaved, beats Pillow's bicubic upsampling of the same low-resolution image on every photo."""
    gains = []
    for path in KODAK:
        hr, lr = downscaled(path)
        out = restore_tensor(sr_x2, chw(lr), tile_px=0).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        out = np.round(out * 255) / 255
        lr8 = Image.fromarray(np.round(lr * 255).astype(np.uint8))
        bicubic = np.asarray(lr8.resize((hr.shape[1], hr.shape[0]), Image.Resampling.BICUBIC), np.float32) / 255
        s = np.s_[2:-2, 2:-2]
        gains.append(psnr(out[s], hr[s]) - psnr(bicubic[s], hr[s]))
    assert min(gains) > 1.0, gains  # measured: +1.6 to +3.2 dB


def test_sr_x2_tiled_matches_whole_image_on_photos(sr_x2: NAFNetSR) -> None:
    """The four shipped photos, downscaled, as one 500x500 low-resolution image cut into 3 x 3 tiles."""
    lrs = [downscaled(p)[1] for p in KODAK]
    lr = chw(np.concatenate([np.concatenate(lrs[:2], axis=1), np.concatenate(lrs[2:], axis=1)], axis=0))
    assert tile_count(500, 500, tile_px=200, overlap_px=48, pad_multiple=1) == 9
    whole = restore_tensor(sr_x2, lr, tile_px=0).clamp(0, 1)
    tiled = restore_tensor(sr_x2, lr, tile_px=200, overlap_px=48).clamp(0, 1)
    assert tiled.shape == whole.shape == (1, 3, 1000, 1000)
    assert psnr(tiled, whole) >= 50.0  # measured: 57.2 dB; the requirement is 45


def test_model_card_figures_match_the_weights_metadata() -> None:
    card = (Path(__file__).resolve().parents[1] / "docs" / "model-card-sr.md").read_text()
    data = json.loads(SR_X2.with_suffix(".json").read_text())
    assert data["kodak24"] == json.loads(safe_open(str(SR_X2), "pt").metadata()["kodak24_psnr"])
    bicubic, model = data["kodak24"]["bicubic"], data["kodak24"]["model"]
    for channel in ("rgb", "y"):
        b, m = bicubic[f"psnr_{channel}_db"], model[f"psnr_{channel}_db"]
        row = f"| {'RGB' if channel == 'rgb' else 'Y'} | {b:.2f} dB | {m:.2f} dB | +{m - b:.2f} dB |"
        assert row in card, f"model-card-sr.md lacks {row}"
    training = data["training"]
    assert f"{training['iters']} iterations, batch {training['batch']}" in card
    assert f"{training['hr_crop']}-px crops" in card and f"{training['minutes']} minutes" in card


# --- NAFSSR: stereo pairs


def synthetic_pair(height: int, width: int, disparity: int) -> tuple[np.ndarray, np.ndarray]:
    """Not a real stereo pair: two crops of one photo, the right one shifted by ``disparity`` px (a fronto-parallel
    scene at one depth), which is what SCAM's row-wise matching looks for."""
    photo = read_image(KODAK[3]).pixels
    left = photo[100 : 100 + height, disparity : disparity + width]
    return left, photo[100 : 100 + height, :width]


def test_nafssr_row_bands_match_the_whole_pair() -> None:
    """Stereo tiles are full-width row bands (the cross-attention matches along whole rows); with random weights
    (attention spread over the whole row: the worst case for cutting it) bands agree with the whole pair."""
    model = randomize(NAFSSR(STEREO))
    left, right = synthetic_pair(128, 320, 12)
    x = torch.cat([chw(left), chw(right)], dim=1)
    assert tile_count(128, 320, tile_px=48, overlap_px=16, pad_multiple=1, full_width=True) == 4
    whole = restore_tensor(model, x, tile_px=0).clamp(0, 1)
    bands = restore_tensor(model, x, tile_px=48, overlap_px=16).clamp(0, 1)
    assert bands.shape == whole.shape == (1, 6, 256, 640)
    assert psnr(bands, whole) >= 45.0  # measured: 85 dB; square 64 px tiles cutting the rows: 44 dB


@pytest.fixture(scope="module")
def stereo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stereo") / "nafssr-tiny.pth"
    torch.save({"params": randomize(NAFSSR(STEREO.replace(middle_blk_num=1))).state_dict()}, path)
    return path


def _write(path: Path, pixels: np.ndarray) -> Path:
    cv2.imwrite(str(path), np.round(pixels * 255).astype(np.uint8)[:, :, ::-1])
    return path


def test_run_writes_both_views_of_a_stereo_pair(tmp_path: Path, stereo_checkpoint: Path, capsys) -> None:
    folder = tmp_path / "pairs"
    folder.mkdir()
    left, right = synthetic_pair(40, 64, 6)
    _write(folder / "0001_L.png", left)
    _write(folder / "0001_R.png", right)
    _write(folder / "scene_left.png", right[:24])
    _write(folder / "scene_right.png", left[:24])
    out = tmp_path / "out"
    assert main(["run", str(stereo_checkpoint), str(folder), "-o", str(out), "--tile", "16", "--overlap", "4"]) == 0
    assert "(NAFSSR x2, width 16)" in capsys.readouterr().err
    got = {p.name: cv2.imread(str(p)).shape for p in out.iterdir()}
    assert got == {
        "0001_L.png": (80, 128, 3),
        "0001_R.png": (80, 128, 3),
        "scene_left.png": (48, 128, 3),
        "scene_right.png": (48, 128, 3),
    }
    model = load_checkpoint(stereo_checkpoint).model
    x = torch.cat([chw(read_image(folder / "0001_L.png").pixels), chw(read_image(folder / "0001_R.png").pixels)], 1)
    expected = np.round(restore_tensor(model, x, tile_px=16, overlap_px=4).clamp(0, 1)[0].numpy() * 255)
    written = [cv2.imread(str(out / f"0001_{v}.png"))[:, :, ::-1].transpose(2, 0, 1) for v in "LR"]
    assert np.abs(np.concatenate(written).astype(float) - expected).max() <= 1  # left view first, right second


def test_run_side_by_side_writes_a_side_by_side_result(tmp_path: Path, stereo_checkpoint: Path) -> None:
    left, right = synthetic_pair(30, 50, 6)
    src = _write(tmp_path / "sbs.png", np.concatenate([left, right], axis=1))
    pair = tmp_path / "pair"
    pair.mkdir()
    _write(pair / "x_L.png", left)
    _write(pair / "x_R.png", right)
    assert main(["run", str(stereo_checkpoint), str(src), "--side-by-side", "-o", str(tmp_path / "a")]) == 0
    assert main(["run", str(stereo_checkpoint), str(pair), "-o", str(tmp_path / "b")]) == 0
    sbs = cv2.imread(str(tmp_path / "a" / "sbs.png"))
    assert sbs.shape == (60, 200, 3)
    views = [cv2.imread(str(tmp_path / "b" / f"x_{v}.png")) for v in "LR"]
    assert np.array_equal(sbs, np.concatenate(views, axis=1))  # the same pair, the same result


@pytest.mark.parametrize(
    ("files", "extra", "code", "message"),
    [
        (["a_L.png"], [], EXIT_BAD_INPUT, "its partner is not among the inputs: give a_R.png too"),
        (["b_Right.png"], [], EXIT_BAD_INPUT, "give b_Left.png too"),
        (["photo.png"], [], EXIT_BAD_INPUT, "named NAME_L and NAME_R"),
        (["odd.png"], ["--side-by-side"], EXIT_BAD_INPUT, "is 21 px wide: a side-by-side stereo image"),
        (["c_L.png", "c_R.png"], [], EXIT_BAD_INPUT, "the views of a stereo pair must have the same size"),
    ],
)
def test_stereo_input_errors(
    tmp_path: Path, monkeypatch, capsys, stereo_checkpoint: Path, files: list[str], extra: list[str], code, message
) -> None:
    monkeypatch.chdir(tmp_path)
    sizes = {"odd.png": (12, 21), "c_R.png": (12, 18)}
    for name in files:
        cv2.imwrite(name, np.full((*sizes.get(name, (12, 20)), 3), 128, np.uint8))
    assert main(["run", str(stereo_checkpoint), *files, *extra, "-o", "out"]) == code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_side_by_side_is_refused_for_a_single_view_model(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    cv2.imwrite("x.png", np.zeros((8, 8, 3), np.uint8))
    assert main(["run", "sr-x2", "x.png", "--side-by-side", "-o", "out"]) == EXIT_USAGE
    assert "single-image model (NAFNetSR)" in capsys.readouterr().err


# --- run with the shipped SR model by its name


def test_run_sr_x2_by_name_doubles_the_size_in_kind(tmp_path: Path, monkeypatch, capsys) -> None:
    """8-bit RGB, 16-bit RGBA (alpha upsampled with the image) and gray inputs come back at twice the size, in
    their own depth and channels; the dpi doubles so the print size stays."""
    monkeypatch.chdir(tmp_path)
    hr, lr = downscaled(KODAK[0])
    lr = lr[:40, :56]
    Image.fromarray(np.round(lr * 255).astype(np.uint8)).save("low.png", dpi=(72, 72))
    rgba16 = np.concatenate([lr, np.linspace(0, 1, 56, dtype=np.float32)[None, :, None].repeat(40, 0)], axis=2)
    cv2.imwrite("deep.png", np.round(rgba16 * 65535).astype(np.uint16)[:, :, [2, 1, 0, 3]])
    cv2.imwrite("gray.png", np.round(lr.mean(axis=2) * 255).astype(np.uint8))
    assert main(["run", "sr-x2", "low.png", "deep.png", "gray.png", "-o", "out", "--tile", "24", "--overlap", "8"]) == 0
    assert "(NAFNetSR x2, width" in capsys.readouterr().err
    low = Image.open("out/low.png")
    assert low.size == (112, 80) and low.mode == "RGB" and tuple(round(v) for v in low.info["dpi"]) == (144, 144)
    assert psnr(np.asarray(low, np.float32) / 255, hr[:80, :112]) > 28  # a real upscale of the photo
    deep = cv2.imread("out/deep.png", cv2.IMREAD_UNCHANGED)
    assert deep.shape == (80, 112, 4) and deep.dtype == np.uint16
    ramp = deep[:, :, 3].astype(np.float64) / 65535  # the alpha ramp, upsampled: still a ramp
    assert np.all(np.diff(ramp[5]) >= 0) and ramp[5, 0] < 0.01 and ramp[5, -1] > 0.99
    gray = cv2.imread("out/gray.png", cv2.IMREAD_UNCHANGED)
    assert gray.shape == (80, 112) and gray.dtype == np.uint8


def test_run_through_an_sr_artifact_doubles_the_size_as_validated(tmp_path: Path, monkeypatch) -> None:
    """An ONNX artifact of a tiny NAFNetSR: `run ARTIFACT` tiles in input pixels and blends at the output scale,
    exactly as validation's tiler runs the PyTorch model (to 8-bit rounding)."""
    require("onnxruntime")
    monkeypatch.chdir(tmp_path)
    config = STEREO.replace(arch="nafnet-sr", fusion=False, middle_blk_num=2)
    torch.save({"params": randomize(NAFNetSR(config)).state_dict()}, "sr.pth")
    assert main(["convert", "sr.pth", "--target", "onnx", "-o", "art", "--input-size", "32", "--no-validate"]) == 0
    low = downscaled(KODAK[1])[1][:50, :70]
    _write(tmp_path / "low.png", low)
    assert main(["run", "art/onnx-fp32", "low.png", "-o", "out", "--overlap", "8"]) == 0
    out = read_image("out/low.png").pixels
    model = load_checkpoint("sr.pth").model
    with torch.no_grad():
        expected, calls = apply_tiled(model, read_image("low.png").pixels, (32, 32), 8, 1, 2)
    assert out.shape == (100, 140, 3) and calls == 6
    assert np.abs(np.clip(expected, 0, 1) - out).max() <= 0.51 / 255


def test_a_file_named_like_a_shipped_model_is_ambiguous(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    cv2.imwrite("x.png", np.zeros((8, 8, 3), np.uint8))
    Path("sr-x2").write_bytes(b"")
    assert main(["run", "sr-x2", "x.png", "-o", "out"]) == EXIT_USAGE
    assert "write ./sr-x2 for the file" in capsys.readouterr().err


def test_shipped_models_load_by_name_in_every_command(tmp_path: Path, monkeypatch, capsys) -> None:
    """`sr-x2` and `denoise-s` stand for the shipped files wherever a checkpoint goes (API, inspect, convert); a
    file of that name in the working folder is refused as ambiguous."""
    monkeypatch.chdir(tmp_path)
    assert isinstance(load_checkpoint("sr-x2").model, NAFNetSR)
    assert load_checkpoint("denoise-s").sha256 == load_checkpoint(None).sha256
    assert main(["inspect", "sr-x2"]) == 0
    assert "super-resolution x2" in capsys.readouterr().out
    assert main(["convert", "sr-x2", "--target", "onnx", "-o", "art", "--input-size", "32", "--no-validate"]) == 0
    assert json.loads(Path("art/onnx-fp32/manifest.json").read_text())["io"]["scale"] == 2
    Path("sr-x2").write_bytes(b"")
    assert main(["inspect", "sr-x2"]) == EXIT_USAGE
    assert "write ./sr-x2 for the file" in capsys.readouterr().err
