"""Baseline / BaselineLocal / NAFNetSR / NAFSSR against independent, deliberately naive implementations.

Written from the papers' descriptions (see NAFNET_FACTS.md and the model docstrings) in float64, reading the weights
by the official state-dict keys: einsum 1x1 convs, explicit 3x3 taps, explicit window sums for TLC pooling (the
helpers of test_model.py), GELU through erf, sigmoid as 1 / (1 + exp(-x)), SCAM as a softmax written out per
row, PixelShuffle by index arithmetic and bilinear upsampling (align_corners=False: half-pixel centres, clamped
at the edges) by hand. Shares no code with the package.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize
from test_model import block as nafblock
from test_model import conv1x1, conv3x3, depthwise3x3, layernorm_channels, pool

from nafnet_edge.model import NAFSSR, Baseline, BaselineLocal, NAFNetConfig, NAFNetSR, build_model

Tensor = torch.Tensor
Kernel = tuple[int, int] | None

BASELINE = NAFNetConfig(
    arch="baseline", width=8, enc_blk_nums=(1, 2), middle_blk_num=1, dec_blk_nums=(2, 1), dw_expand=1
)
SR = NAFNetConfig(arch="nafnet-sr", width=8, enc_blk_nums=(), middle_blk_num=2, dec_blk_nums=(), up_scale=2)
SSR = SR.replace(arch="nafssr", fusion=True)


# ---- the reference -------------------------------------------------------------------------------------------


def gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.special.erf(x / math.sqrt(2.0)))


def sigmoid(x: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


def baseline_block(x: Tensor, sd: dict[str, Tensor], p: str, kernel: Kernel) -> Tensor:
    t = layernorm_channels(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
    t = conv1x1(t, sd[p + "conv1.weight"], sd[p + "conv1.bias"])
    t = gelu(depthwise3x3(t, sd[p + "conv2.weight"], sd[p + "conv2.bias"]))
    s = conv1x1(pool(t, kernel), sd[p + "se.1.weight"], sd[p + "se.1.bias"]).clamp_min(0.0)  # squeeze, ReLU
    t = t * sigmoid(conv1x1(s, sd[p + "se.3.weight"], sd[p + "se.3.bias"]))  # excite
    y = x + conv1x1(t, sd[p + "conv3.weight"], sd[p + "conv3.bias"]) * sd[p + "beta"]
    t = gelu(conv1x1(layernorm_channels(y, sd[p + "norm2.weight"], sd[p + "norm2.bias"]), *conv(sd, p + "conv4")))
    return y + conv1x1(t, *conv(sd, p + "conv5")) * sd[p + "gamma"]


def conv(sd: dict[str, Tensor], name: str) -> tuple[Tensor, Tensor]:
    return sd[name + ".weight"], sd[name + ".bias"]


def pixel_shuffle(x: Tensor, s: int) -> Tensor:
    """out[n, c, h*s + i, w*s + j] = x[n, c*s*s + i*s + j, h, w], element by element of the index arithmetic."""
    n, cs2, h, w = x.shape
    c = cs2 // (s * s)
    out = torch.zeros(n, c, h * s, w * s, dtype=x.dtype)
    for ch in range(c):
        for i in range(s):
            for j in range(s):
                out[:, ch, i::s, j::s] = x[:, ch * s * s + i * s + j]
    return out


def bilinear_weights(n_in: int, s: int) -> Tensor:
    """(n_in * s, n_in) interpolation matrix, align_corners=False: source (o + 0.5) / s - 0.5, clamped at 0 and at
    the last sample."""
    m = torch.zeros(n_in * s, n_in, dtype=torch.float64)
    for o in range(n_in * s):
        src = max((o + 0.5) / s - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0 if i0 < n_in - 1 else 0.0
        m[o, i0] += 1.0 - lam
        m[o, i1] += lam
    return m


def bilinear(x: Tensor, s: int) -> Tensor:
    rows, cols = bilinear_weights(x.shape[2], s), bilinear_weights(x.shape[3], s)
    return torch.einsum("oh,nchw,pw->ncop", rows, x, cols)


def softmax_rows(a: Tensor) -> Tensor:
    e = torch.exp(a - a.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def scam(x_l: Tensor, x_r: Tensor, sd: dict[str, Tensor], p: str) -> tuple[Tensor, Tensor]:
    c = x_l.shape[1]
    q_l = conv1x1(layernorm_channels(x_l, *conv(sd, p + "norm_l")), *conv(sd, p + "l_proj1"))
    q_r = conv1x1(layernorm_channels(x_r, *conv(sd, p + "norm_r")), *conv(sd, p + "r_proj1"))
    v_l, v_r = conv1x1(x_l, *conv(sd, p + "l_proj2")), conv1x1(x_r, *conv(sd, p + "r_proj2"))
    r2l, l2r = torch.zeros_like(x_l), torch.zeros_like(x_r)
    for n in range(x_l.shape[0]):
        for h in range(x_l.shape[2]):  # one row of the left view against the same row of the right
            scores = q_l[n, :, h].T @ q_r[n, :, h] / math.sqrt(c)  # (W_left, W_right)
            r2l[n, :, h] = v_r[n, :, h] @ softmax_rows(scores).T  # each left pixel: weights over right pixels
            l2r[n, :, h] = v_l[n, :, h] @ softmax_rows(scores.T).T  # each right pixel: weights over left pixels
    return x_l + r2l * sd[p + "beta"], x_r + l2r * sd[p + "gamma"]


def unet_forward(sd: dict[str, Tensor], cfg: NAFNetConfig, x: Tensor, block, *, tlc: bool) -> Tensor:
    levels = len(cfg.enc_blk_nums)
    m = 2**levels
    h, w = x.shape[-2:]
    inp = torch.zeros(x.shape[0], x.shape[1], -(-h // m) * m, -(-w // m) * m, dtype=x.dtype)
    inp[:, :, :h, :w] = x

    def kernel(depth: int) -> Kernel:
        th, tw = cfg.train_size  # kernel = padded training feature size at this depth x 1.5 (integer division)
        fh, fw = (-(-th // m) * m) >> depth, (-(-tw // m) * m) >> depth
        return (fh * int(1.5 * th) // th, fw * int(1.5 * tw) // tw) if tlc else None

    t = conv3x3(inp, *conv(sd, "intro"))
    skips = []
    for i, n in enumerate(cfg.enc_blk_nums):
        for j in range(n):
            t = block(t, sd, f"encoders.{i}.{j}.", kernel(i))
        skips.append(t)
        t = F.conv2d(t, *conv(sd, f"downs.{i}"), stride=2)
    for j in range(cfg.middle_blk_num):
        t = block(t, sd, f"middle_blks.{j}.", kernel(levels))
    for i, n in enumerate(cfg.dec_blk_nums):
        t = pixel_shuffle(conv1x1(t, sd[f"ups.{i}.0.weight"], None), 2) + skips[levels - 1 - i]
        for j in range(n):
            t = block(t, sd, f"decoders.{i}.{j}.", kernel(levels - 1 - i))
    return (conv3x3(t, *conv(sd, "ending")) + inp)[:, :, :h, :w]


def sr_forward(sd: dict[str, Tensor], cfg: NAFNetConfig, x: Tensor, *, tlc: bool) -> Tensor:
    s, views = cfg.up_scale, 2 if cfg.fusion else 1
    kernel = (int(1.5 * cfg.train_size[0]), int(1.5 * cfg.train_size[1])) if tlc else None  # base size = 1.5x train
    c_in = x.shape[1] // views
    feats = [conv3x3(x[:, v * c_in : (v + 1) * c_in], *conv(sd, "intro")) for v in range(views)]
    for i in range(cfg.middle_blk_num):
        p = f"body.{i}.module."
        feats = [nafblock(f, sd, p + "blk.", kernel) for f in feats]
        if cfg.fusion:
            feats = list(scam(feats[0], feats[1], sd, p + "fusion."))
    out = torch.cat([pixel_shuffle(conv3x3(f, *conv(sd, "up.0")), s) for f in feats], dim=1)
    return out + bilinear(x, s)


# ---- the tests -------------------------------------------------------------------------------------------------


def compare(model: torch.nn.Module, x: Tensor, reference) -> float:
    """Max abs error of the fp32 model against the fp64 reference; the fp64 model must match it to 1e-10."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ours = model(x)
        ref = reference(sd, x.double())
        ours64 = copy.deepcopy(model).double()(x.double())
    assert ours.shape == ref.shape
    assert float((ours64 - ref).abs().max()) <= 1e-10
    assert float(ref.abs().max()) > 0.5  # a real signal, not a network that outputs ~0
    return float((ours.double() - ref).abs().max())


def image(*shape: int, seed: int = 0) -> Tensor:
    """Noise over a left-to-right ramp: local means differ from the global one, so TLC pooling has an effect."""
    noise = torch.rand(*shape, generator=torch.Generator().manual_seed(seed))
    return 0.3 * noise + 0.7 * torch.linspace(0, 1, shape[-1])


def test_baseline_matches_reference() -> None:
    model = randomize(Baseline(BASELINE), seed=1)
    x = image(1, 3, 37, 30)  # not a multiple of 4: padding
    assert compare(model, x, lambda sd, x64: unet_forward(sd, BASELINE, x64, baseline_block, tlc=False)) <= 1e-5


def test_baseline_local_matches_reference_with_local_pooling() -> None:
    cfg = BASELINE.replace(arch="baseline-local", train_size=(16, 16))  # kernels 24 / 12 / 6 < 40x56 and below
    model = randomize(BaselineLocal(cfg), seed=2)
    with torch.no_grad():  # a responsive squeeze-excitation (at randomize's scale the sigmoid stays near 0.5)
        for name, p in model.named_parameters():
            if ".se." in name:
                p.mul_(8.0)
    assert model.encoders[0][0].se[0].kernel_size == (24, 24)
    x = image(1, 3, 40, 56, seed=1)
    assert compare(model, x, lambda sd, x64: unet_forward(sd, cfg, x64, baseline_block, tlc=True)) <= 1e-5
    plain = Baseline(cfg.replace(arch="baseline"))
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():  # TLC really changes the function at this size
        assert float((model(x) - plain.eval()(x)).abs().max()) > 1e-4


def test_baseline_local_pools_globally_where_the_kernel_covers_the_map() -> None:
    cfg = BASELINE.replace(arch="baseline-local", train_size=(64, 64))  # kernels 96 / 48 / 24 cover 40x56
    model = randomize(BaselineLocal(cfg), seed=3)
    plain = Baseline(cfg.replace(arch="baseline"))
    plain.load_state_dict(model.state_dict())
    x = image(1, 3, 40, 56, seed=2)
    with torch.no_grad():
        assert torch.equal(model(x), plain.eval()(x))
    assert compare(model, x, lambda sd, x64: unet_forward(sd, cfg, x64, baseline_block, tlc=True)) <= 1e-5


@pytest.mark.parametrize("scale", [2, 3])
def test_nafnet_sr_matches_reference(scale: int) -> None:
    cfg = SR.replace(up_scale=scale)
    model = randomize(NAFNetSR(cfg), seed=scale)
    x = image(1, 3, 12, 17, seed=scale)
    assert compare(model, x, lambda sd, x64: sr_forward(sd, cfg, x64, tlc=False)) <= 1e-5


@pytest.mark.parametrize(("train_size", "local"), [((8, 12), True), ((64, 64), False)], ids=["tlc-local", "tlc-global"])
def test_nafssr_matches_reference(train_size: tuple[int, int], local: bool) -> None:
    cfg = SSR.replace(train_size=train_size)  # kernel (12, 18) < one 20x28 view: local; (96, 96): global
    model = randomize(NAFSSR(cfg), seed=5)
    x = image(1, 6, 20, 28, seed=5)  # left RGB, right RGB
    assert compare(model, x, lambda sd, x64: sr_forward(sd, cfg, x64, tlc=True)) <= 1e-5
    plain = NAFNetSR(cfg.replace(arch="nafnet-sr"))  # the same network with global pooling
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        tlc_effect = float((model(x) - plain.eval()(x)).abs().max())
        out = model(x)
        swapped = model(torch.cat([x[:, :3], x[:, 3:].flip(-1)], dim=1))
    assert (tlc_effect > 1e-4) == local  # local pooling changes the function; a covering kernel does not
    assert float((out[:, :3] - swapped[:, :3]).abs().max()) > 1e-4  # SCAM: the left output sees the right view


def expected_keys(cfg: NAFNetConfig) -> set[str]:
    """The official state-dict keys of ``cfg``'s model, written from the layout description."""

    def params(prefix: str, *modules: str) -> list[str]:
        return [f"{prefix}{m}.{p}" for m in modules for p in ("weight", "bias")]

    if cfg.family == "nafnet-sr":
        blk = [*params("", "conv1", "conv2", "conv3", "conv4", "conv5", "norm1", "norm2", "sca.1"), "beta", "gamma"]
        fusion = [*params("", "norm_l", "norm_r", "l_proj1", "r_proj1", "l_proj2", "r_proj2"), "beta", "gamma"]
        keys = params("", "intro", "up.0")
        for i in range(cfg.middle_blk_num):
            keys += [f"body.{i}.module.blk.{k}" for k in blk]
            keys += [f"body.{i}.module.fusion.{k}" for k in fusion] if cfg.fusion else []
        return set(keys)
    attention = ("se.1", "se.3") if cfg.family == "baseline" else ("sca.1",)
    blk = [*params("", "conv1", "conv2", "conv3", "conv4", "conv5", "norm1", "norm2", *attention), "beta", "gamma"]
    keys = params("", "intro", "ending")
    for i, n in enumerate(cfg.enc_blk_nums):
        keys += [f"encoders.{i}.{j}.{k}" for j in range(n) for k in blk] + [f"downs.{i}.weight", f"downs.{i}.bias"]
    keys += [f"middle_blks.{j}.{k}" for j in range(cfg.middle_blk_num) for k in blk]
    for i, n in enumerate(cfg.dec_blk_nums):
        keys += [f"ups.{i}.0.weight"] + [f"decoders.{i}.{j}.{k}" for j in range(n) for k in blk]
    return set(keys)


@pytest.mark.parametrize(
    "cfg",
    [BASELINE, BASELINE.replace(arch="baseline-local"), SR, SR.replace(up_scale=3), SSR],
    ids=["baseline", "baseline-local", "nafnet-sr-x2", "nafnet-sr-x3", "nafssr-x2"],
)
def test_state_dict_keys_are_the_official_ones(cfg: NAFNetConfig) -> None:
    sd = build_model(cfg).state_dict()
    assert set(sd) == expected_keys(cfg)
    for key in ("encoders.0.0.se.1.weight", "body.0.module.fusion.l_proj1.weight", "up.0.weight"):
        assert (key in sd) == (key in expected_keys(cfg))  # the brief's landmarks, where the family has them
    if cfg.family == "baseline":
        assert tuple(sd["encoders.0.0.se.1.weight"].shape) == (4, 8, 1, 1)  # dw (8) -> dw/2
        assert tuple(sd["encoders.0.0.conv4.weight"].shape) == (16, 8, 1, 1)  # ffn_expand 2
        assert tuple(sd["encoders.0.0.conv5.weight"].shape) == (8, 16, 1, 1)  # no gate: ffn -> c
    else:
        s = cfg.up_scale
        assert tuple(sd["up.0.weight"].shape) == (3 * s * s, 8, 3, 3)
        assert not any(re.search(r"\.(ending|ups|downs)\.", "." + k) for k in sd)


def nafssr_params(width: int, blocks: int, scale: int) -> int:
    """NAFBlock: 7c^2 + 33c (five convs c<->2c, depthwise 3x3 on 2c, SCA, two norms, beta, gamma); SCAM:
    4c^2 + 10c (four projections, two norms, beta, gamma); intro 3x3 3->c; up 3x3 c->3s^2."""
    c = width
    return blocks * (11 * c * c + 43 * c) + (27 * c + c) + (27 * scale * scale * c + 3 * scale * scale)


@pytest.mark.parametrize(
    ("size", "width", "blocks", "paper_millions"),
    [("T", 48, 16, 0.46), ("S", 64, 32, 1.56), ("B", 96, 64, 6.80), ("L", 128, 128, 23.83)],
)
def test_nafssr_release_parameter_counts(size: str, width: int, blocks: int, paper_millions: float) -> None:
    cfg = NAFNetConfig(
        arch="nafssr", width=width, enc_blk_nums=(), middle_blk_num=blocks, dec_blk_nums=(), up_scale=4, fusion=True
    )
    with torch.device("meta"):
        count = sum(p.numel() for p in NAFSSR(cfg).parameters())
    assert count == nafssr_params(width, blocks, 4)
    assert round(count / 1e6, 2) == paper_millions  # the paper's x4 figures
    if size == "T":
        assert count == 460_656
