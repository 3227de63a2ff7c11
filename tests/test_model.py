"""NAFNet / NAFNetLocal against an independent, deliberately naive implementation of the official semantics.

The reference below is written from the description in NAFNET_FACTS.md with einsum for 1x1 convs, explicit
loops over the 3x3 taps, and explicit window sums for TLC pooling; it shares no code with the package.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from helpers import randomize

from nafnet_edge.model import ChannelPool, NAFNet, NAFNetConfig, NAFNetLocal, separable_box_mean, tlc_kernel_sizes

Tensor = torch.Tensor

TINY = NAFNetConfig(width=8, enc_blk_nums=(1, 2), middle_blk_num=1, dec_blk_nums=(2, 1))


# ---- the reference -------------------------------------------------------------------------------------------


def conv1x1(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    y = torch.einsum("nchw,oc->nohw", x, w[:, :, 0, 0])
    return y if b is None else y + b[None, :, None, None]


def conv3x3(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    n, c, h, wd = x.shape
    xp = torch.zeros(n, c, h + 2, wd + 2, dtype=x.dtype)
    xp[:, :, 1:-1, 1:-1] = x
    out = torch.zeros(n, w.shape[0], h, wd, dtype=x.dtype)
    for dy in range(3):
        for dx in range(3):
            out += torch.einsum("nchw,oc->nohw", xp[:, :, dy : dy + h, dx : dx + wd], w[:, :, dy, dx])
    return out + b[None, :, None, None]


def depthwise3x3(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    n, c, h, wd = x.shape
    xp = torch.zeros(n, c, h + 2, wd + 2, dtype=x.dtype)
    xp[:, :, 1:-1, 1:-1] = x
    out = torch.zeros_like(x)
    for dy in range(3):
        for dx in range(3):
            out += xp[:, :, dy : dy + h, dx : dx + wd] * w[None, :, 0, dy, dx, None, None]
    return out + b[None, :, None, None]


def layernorm_channels(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    c = x.shape[1]
    mu = torch.einsum("nchw->nhw", x)[:, None] / c
    var = torch.einsum("nchw->nhw", (x - mu) ** 2)[:, None] / c
    return (x - mu) / torch.sqrt(var + 1e-6) * weight[None, :, None, None] + bias[None, :, None, None]


def pool(x: Tensor, kernel: tuple[int, int] | None) -> Tensor:
    n, c, h, w = x.shape
    if kernel is None or (kernel[0] >= h and kernel[1] >= w):
        return x.sum(dim=(2, 3), keepdim=True) / (h * w)
    k1, k2 = min(h, kernel[0]), min(w, kernel[1])
    oh, ow = h - k1 + 1, w - k2 + 1
    valid = torch.zeros(n, c, oh, ow, dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            valid[:, :, i, j] = x[:, :, i : i + k1, j : j + k2].sum(dim=(2, 3)) / (k1 * k2)
    top, left = (h - oh) // 2, (w - ow) // 2
    rows = [min(max(r - top, 0), oh - 1) for r in range(h)]  # replicate padding, written as index clamping
    cols = [min(max(q - left, 0), ow - 1) for q in range(w)]
    return valid[:, :, rows][:, :, :, cols]


def block(x: Tensor, sd: dict[str, Tensor], p: str, kernel: tuple[int, int] | None) -> Tensor:
    t = layernorm_channels(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
    t = conv1x1(t, sd[p + "conv1.weight"], sd[p + "conv1.bias"])
    t = depthwise3x3(t, sd[p + "conv2.weight"], sd[p + "conv2.bias"])
    half = t.shape[1] // 2
    t = t[:, :half] * t[:, half:]
    t = t * conv1x1(pool(t, kernel), sd[p + "sca.1.weight"], sd[p + "sca.1.bias"])
    t = conv1x1(t, sd[p + "conv3.weight"], sd[p + "conv3.bias"])
    y = x + t * sd[p + "beta"]
    t = layernorm_channels(y, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
    t = conv1x1(t, sd[p + "conv4.weight"], sd[p + "conv4.bias"])
    half = t.shape[1] // 2
    t = conv1x1(t[:, :half] * t[:, half:], sd[p + "conv5.weight"], sd[p + "conv5.bias"])
    return y + t * sd[p + "gamma"]


def reference_forward(sd: dict[str, Tensor], cfg: NAFNetConfig, x: Tensor, *, tlc: bool) -> Tensor:
    levels = len(cfg.enc_blk_nums)
    m = 2**levels
    h, w = x.shape[-2:]
    ph, pw = -(-h // m) * m, -(-w // m) * m
    inp = torch.zeros(x.shape[0], x.shape[1], ph, pw, dtype=x.dtype)
    inp[:, :, :h, :w] = x

    def kernel(depth: int) -> tuple[int, int] | None:
        if not tlc:
            return None
        th, tw = cfg.train_size  # training crop; base size 1.5x; feature size of the padded crop at this depth
        fh, fw = (-(-th // m) * m) // 2**depth, (-(-tw // m) * m) // 2**depth
        return fh * int(1.5 * th) // th, fw * int(1.5 * tw) // tw

    t = conv3x3(inp, sd["intro.weight"], sd["intro.bias"])
    skips = []
    for i, n in enumerate(cfg.enc_blk_nums):
        for j in range(n):
            t = block(t, sd, f"encoders.{i}.{j}.", kernel(i))
        skips.append(t)
        t = F.conv2d(t, sd[f"downs.{i}.weight"], sd[f"downs.{i}.bias"], stride=2)
    for j in range(cfg.middle_blk_num):
        t = block(t, sd, f"middle_blks.{j}.", kernel(levels))
    for i, n in enumerate(cfg.dec_blk_nums):
        t = conv1x1(t, sd[f"ups.{i}.0.weight"], None)
        n_, c4, hh, ww = t.shape  # pixel shuffle by explicit index arithmetic
        c = c4 // 4
        t = t.view(n_, c, 2, 2, hh, ww).permute(0, 1, 4, 2, 5, 3).reshape(n_, c, hh * 2, ww * 2)
        t = t + skips[levels - 1 - i]
        for j in range(n):
            t = block(t, sd, f"decoders.{i}.{j}.", kernel(levels - 1 - i))
    t = conv3x3(t, sd["ending.weight"], sd["ending.bias"]) + inp
    return t[:, :, :h, :w]


# ---- the tests -------------------------------------------------------------------------------------------------


def compare(model: NAFNet, x: Tensor, *, tlc: bool) -> float:
    """Max abs error of the fp32 model against the fp64 reference; also checks the semantics to fp64 precision."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ours = model(x)
        ref = reference_forward(sd, model.config, x.double(), tlc=tlc)
        ours64 = copy.deepcopy(model).double()(x.double())
    assert float((ours64 - ref).abs().max()) <= 1e-10
    assert float(ref.abs().max()) > 0.5  # a real signal, not a network that outputs ~0
    return float((ours.double() - ref).abs().max())


def test_nafnet_matches_reference_with_padding() -> None:
    model = randomize(NAFNet(TINY))
    x = torch.rand(2, 3, 37, 30, generator=torch.Generator().manual_seed(1))  # not a multiple of 4: padding
    assert compare(model, x, tlc=False) <= 1e-5


def test_nafnetlocal_matches_reference_with_local_pooling() -> None:
    cfg = TINY.replace(train_size=(16, 16))  # kernels 24 / 12 / 6: local at every depth for a 64x56 input
    model = randomize(NAFNetLocal(cfg), seed=3)
    assert [blk.sca[0].kernel_size for blk in model.encoders[0]] == [(24, 24)]
    x = torch.rand(1, 3, 64, 55, generator=torch.Generator().manual_seed(2))  # > 1.5 x train size
    assert compare(model, x, tlc=True) <= 1e-5
    plain = NAFNet(cfg)  # and TLC really changes the function at this size
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert float((model(x) - plain.eval()(x)).abs().max()) > 1e-4  # 10x the tolerance above


def test_nafnetlocal_is_global_pooling_when_kernel_covers_the_map() -> None:
    cfg = TINY.replace(train_size=(32, 32))  # kernels 48 / 24 / 12
    local = randomize(NAFNetLocal(cfg), seed=5)
    plain = NAFNet(cfg)
    plain.load_state_dict(local.state_dict())
    x = torch.rand(1, 3, 44, 48)
    with torch.no_grad():
        assert torch.equal(local(x), plain.eval()(x))
    assert compare(local, x, tlc=True) <= 1e-5


def test_official_tlc_kernels_for_256_training_crops() -> None:
    gopro = NAFNetConfig(width=32, enc_blk_nums=(1, 1, 1, 28), middle_blk_num=1, dec_blk_nums=(1, 1, 1, 1))
    assert tlc_kernel_sizes(gopro) == [(384, 384), (192, 192), (96, 96), (48, 48), (24, 24)]
    model = NAFNetLocal(gopro.replace(width=8))
    assert model.middle_blks[0].sca[0].kernel_size == (24, 24)
    assert model.decoders[0][0].sca[0].kernel_size == (48, 48)  # deepest decoder level mirrors encoder 3
    assert model.decoders[3][0].sca[0].kernel_size == (384, 384)


def test_state_dict_keys_follow_the_official_layout() -> None:
    sd = NAFNet(TINY).state_dict()
    for key in [
        "intro.weight",
        "ending.bias",
        "encoders.1.1.conv3.weight",
        "encoders.0.0.sca.1.weight",
        "encoders.0.0.norm1.weight",
        "encoders.0.0.beta",
        "downs.1.weight",
        "middle_blks.0.gamma",
        "ups.0.0.weight",
        "decoders.0.1.conv5.bias",
    ]:
        assert key in sd, key
    assert "ups.0.0.bias" not in sd
    assert tuple(sd["encoders.0.0.beta"].shape) == (1, 8, 1, 1)
    assert tuple(sd["ups.0.0.weight"].shape) == (64, 32, 1, 1)


def avg_pool_box_mean(x: Tensor, kernel: tuple[int, int]) -> Tensor:
    """TLC's local pooling as upstream writes it: one 2-D average pool (k1 * k2 reads a pixel), replicate-padded."""
    h, w = x.shape[-2:]
    out = F.avg_pool2d(x, kernel, stride=1)
    oh, ow = out.shape[-2:]
    return F.pad(out, ((w - ow) // 2, (w - ow + 1) // 2, (h - oh) // 2, (h - oh + 1) // 2), mode="replicate")


def test_tlc_box_means_match_the_avg_pool_form_and_window_sums() -> None:
    g = torch.Generator().manual_seed(7)
    cases = [
        ((100, 140), (48, 64)),
        ((37, 53), (20, 9)),  # odd sizes, rectangular kernel: uneven replicate padding
        ((30, 90), (45, 40)),  # kernel taller than the map: clipped to 30 rows, local along the width only
    ]
    for (h, w), kernel in cases:
        x = torch.rand(1, 2, h, w, generator=g)
        clipped = (min(h, kernel[0]), min(w, kernel[1]))
        exact = pool(x.double(), kernel)  # explicit window sums in float64
        with torch.no_grad():
            ours = ChannelPool(kernel)(x)  # eager: the float64 integral image, rounded once
            ours64 = ChannelPool(kernel)(x.double())
        assert ours.dtype == torch.float32 and ours.shape == x.shape
        assert float((ours.double() - exact).abs().max()) <= 1e-7, (h, w, kernel)  # measured 3e-8: half an ulp
        # the old avg_pool2d form: the same windows and padding (equal in float64); in float32 its own sums stray
        # from the exact means (measured 1.4e-6 over the 3072-pixel windows), so the gap is its rounding, not ours
        assert float((avg_pool_box_mean(x.double(), clipped) - ours64).abs().max()) <= 1e-12, (h, w, kernel)
        assert float((avg_pool_box_mean(x, clipped) - ours).abs().max()) <= 2e-6, (h, w, kernel)
        separable = separable_box_mean(x, clipped)  # the form traced and exported graphs get; measured 2e-7
        assert float((separable.double() - F.avg_pool2d(x.double(), clipped, stride=1)).abs().max()) <= 1e-6


def test_exported_nafnetlocal_pools_with_average_pools_not_float64_cumsums() -> None:
    model = randomize(NAFNetLocal(TINY.replace(train_size=(16, 16))), seed=4)  # kernels 24 / 12 / 6 < 64x56
    x = torch.rand(1, 3, 64, 56, generator=torch.Generator().manual_seed(3))
    exported = torch.export.export(model, (x,))
    nodes = [n for n in exported.graph.nodes if n.op == "call_function"]
    ops = {str(n.target) for n in nodes}
    assert not [op for op in ops if "cumsum" in op], ops
    assert any("avg_pool2d" in op for op in ops)
    dtypes = {n.meta["val"].dtype for n in exported.graph.nodes if isinstance(n.meta.get("val"), Tensor)}
    assert dtypes == {torch.float32}, dtypes
    with torch.no_grad():
        assert float((exported.module()(x) - model(x)).abs().max()) <= 1e-5  # the eager (integral) path agrees


def test_traced_nafnetlocal_bakes_constant_pooling_windows() -> None:
    """A TorchScript trace (what OpenVINO's converter takes from a module) records shapes as tensors; a window
    clipped to the map's side (kernel wider than the map, here 240 > 56) must still come out as a constant, or
    converters refuse the pool."""
    model = randomize(NAFNetLocal(TINY.replace(train_size=(16, 160))), seed=4)  # level 0: (24, 240) on 64x56
    x = torch.rand(1, 3, 64, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,), check_trace=False)
        graph = traced.inlined_graph  # kept: its nodes die with it
        windows = [n.inputsAt(1).node() for n in graph.nodes() if n.kind() == "aten::avg_pool2d"]
        assert windows and all(w.kind() == "prim::ListConstruct" for w in windows)  # each the window's two sides
        assert all(i.node().kind() == "prim::Constant" for w in windows for i in w.inputs())
        assert float((traced(x) - model(x)).abs().max()) <= 1e-5
