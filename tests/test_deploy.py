"""The deploy graph: every pass exact on its own and together, fp16 safety, static graph without slices."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import randomize

from nafnet_edge.deploy import (
    NORM_FORM_NAMES,
    PASSES,
    ChannelNorm,
    FixedPool,
    PadCrop,
    deploy,
    fix_pooling,
    fold_beta_gamma,
    fold_layernorm_affine,
    scale_residual_stream,
    set_norm_form,
    split_simple_gate,
    to_deploy_modules,
    transposed_conv_upsampling,
)
from nafnet_edge.images import read_image
from nafnet_edge.model import ChannelPool, NAFNet, NAFNetConfig, NAFNetLocal

KODAK = sorted(Path(str(resources.files("nafnet_edge") / "data" / "kodak")).glob("*.png"))
CFG = NAFNetConfig(width=8, enc_blk_nums=(1, 2), middle_blk_num=1, dec_blk_nums=(1, 1))


def photo(h: int, w: int, index: int = 0) -> torch.Tensor:
    pixels = read_image(KODAK[index]).pixels[100 : 100 + h, 50 : 50 + w]
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


MODELS = {
    "nafnet": lambda: randomize(NAFNet(CFG)),
    "tlc-local": lambda: randomize(NAFNetLocal(CFG.replace(train_size=(32, 32))), seed=1),  # kernel 48 < 96
    "tlc-global": lambda: randomize(NAFNetLocal(CFG.replace(train_size=(96, 96))), seed=2),  # kernel 144 > 96
}


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("form", NORM_FORM_NAMES)
def test_deploy_graph_is_exact_on_real_images(kind: str, form: str) -> None:
    model = MODELS[kind]()
    x = torch.cat([photo(96, 128, 0), photo(96, 128, 1)])
    with torch.no_grad():
        ref = model(x)
        for size in (None, (96, 128)):
            graph = deploy(model, norm_form=form, input_size=size)  # type: ignore[arg-type]
            assert max_err(graph(x), ref) <= 1e-5
        odd = x[..., :90, :117]  # padding and crop outside the graph
        assert max_err(PadCrop(deploy(model, norm_form=form))(odd), model(odd)) <= 1e-5  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", list(MODELS))
def test_each_pass_alone_keeps_the_function(kind: str) -> None:
    model = MODELS[kind]()
    x = photo(96, 128, 2)
    graph = to_deploy_modules(model)
    with torch.no_grad():
        ref = model(x)
        assert max_err(graph(x), ref) <= 1e-6
        steps = [
            (fold_layernorm_affine, lambda b: b.norm1.weight is None and b.norm2.bias is None),
            (fold_beta_gamma, lambda b: b.beta is None and b.gamma is None),
            (split_simple_gate, lambda b: b.is_split and b.conv1 is None and b.conv4a is not None),
            (lambda b: set_norm_form(b, "conv-mean"), lambda b: b.norm1.form == "conv-mean"),
        ]
        for apply, done in steps:
            for block in graph.blocks():
                apply(block)
                assert done(block)
            assert max_err(graph(x), ref) <= 1e-5
        transposed_conv_upsampling(graph)
        assert all(isinstance(up, torch.nn.ConvTranspose2d) for up in graph.ups)
        assert max_err(graph(x), ref) <= 1e-5
        eps = graph.blocks()[0].norm1.eps
        scale_residual_stream(graph, 64)
        assert graph.blocks()[0].norm1.eps == eps / 64**2
        assert max_err(graph(x), ref) <= 1e-5
        fix_pooling(graph, (96, 128))
        assert max_err(graph(x), ref) <= 1e-5


def test_deploy_never_mutates_its_input() -> None:
    model = MODELS["tlc-local"]()
    before = copy.deepcopy(model.state_dict())
    graph = deploy(model, norm_form="conv-mean", input_size=(96, 128))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(p.data_ptr() == q.data_ptr() for p in graph.parameters() for q in model.parameters())


def test_bad_arguments_are_refused() -> None:
    model = MODELS["nafnet"]()
    with pytest.raises(ValueError, match="multiple of 4"):
        deploy(model, input_size=(90, 128))
    for bad in (100, 128, 0.5):
        with pytest.raises(ValueError, match="power of two from 1 to 64"):
            deploy(model, stream_scale=bad)
    with pytest.raises(ValueError, match="unknown deploy norm form"):
        deploy(model, norm_form="tpu")  # type: ignore[arg-type]


def realistic_magnitudes(model: NAFNet, gain: float = 400.0) -> NAFNet:
    """Scale the residual stream like trained models' (|x| in the hundreds): intro, beta and gamma x gain (so the
    blocks' contributions keep their share of the stream), ending / gain."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("intro.") or name.endswith(("beta", "gamma")):
                p.mul_(gain)
        model.ending.weight.div_(gain)
    return model


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.mark.parametrize("form", NORM_FORM_NAMES)
def test_fp16_deploy_graph_survives_magnitudes_that_break_the_original(form: str) -> None:
    model = realistic_magnitudes(MODELS["tlc-local"]())
    x = photo(96, 128, 3)
    peak = []
    hook = model.encoders[0][0].register_forward_pre_hook(lambda m, a: peak.append(float(a[0].abs().max())))
    with torch.no_grad():
        ref = model(x).clamp(0, 1)
        hook.remove()
        assert peak[0] > 175  # the residual stream is at trained-model magnitudes
        half_model = copy.deepcopy(model).half()
        overflowed = []
        for m in half_model.modules():
            if type(m).__name__ == "LayerNorm2d":
                m.register_forward_pre_hook(
                    lambda m, a: overflowed.append(bool(torch.isinf((a[0] - a[0].mean(1, keepdim=True)).pow(2)).any()))
                )
        half = half_model(x.half()).float()
        assert any(overflowed)  # upstream's LayerNorm squares overflow fp16 (65504) ...
        assert psnr(half.clamp(0, 1), ref) < 45.0  # ... and the output misses the fp16 budget
        graph = deploy(model, norm_form=form).half()  # type: ignore[arg-type]
        out = graph(x.half()).float()
        assert bool(torch.isfinite(out).all())
        assert psnr(out.clamp(0, 1), ref) >= 45.0
        for flat in (torch.zeros(1, 3, 96, 128), torch.full((1, 3, 96, 128), 0.5)):
            assert bool(torch.isfinite(graph(flat.half())).all())
        padded = PadCrop(graph)(x[..., :83, :101].half())  # zero-padded region inside the graph input
        assert bool(torch.isfinite(padded).all())


def test_static_graph_has_no_slices_chunks_or_cumsum() -> None:
    graph = deploy(MODELS["tlc-local"](), norm_form="conv-mean", input_size=(96, 128))
    exported = torch.export.export(graph, (torch.rand(1, 3, 96, 128),))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    banned = ("split", "chunk", "slice", "cumsum", "native_layer_norm", "pixel_shuffle")
    banned = [op for op in ops if any(k in op for k in banned)]
    assert banned == [], banned
    pools = [n.args[1] for n in exported.graph.nodes if "avg_pool2d" in str(n.target)]
    assert pools and all(1 in kernel for kernel in pools), pools  # TLC's box mean: separable average pools
    assert not [op for op in ops if "pad" in op]  # replicate edges as copies concatenated: no pad XNNPACK lacks
    assert any("cat" in op for op in ops) and any("linear" in op for op in ops)


@pytest.mark.parametrize(
    ("size", "kernel"),
    [((96, 128), (48, 48)), ((37, 53), (20, 9)), ((30, 90), (30, 40)), ((24, 16), (24, 1)), ((5, 7), (2, 7))],
)
def test_fixed_pool_is_the_tlc_box_mean_at_its_size(size: tuple[int, int], kernel: tuple[int, int]) -> None:
    """Separable pools and copied edges give ChannelPool's box mean (clipped kernels and 1-wide ones included)."""
    h, w = size
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    oh, ow = h - kernel[0] + 1, w - kernel[1] + 1
    pad = ((w - ow) // 2, (w - ow + 1) // 2, (h - oh) // 2, (h - oh + 1) // 2)
    with torch.no_grad():
        ours = FixedPool(kernel, pad, size)(x)
        exact = ChannelPool(kernel)(x.double())
        old = torch.nn.functional.pad(torch.nn.functional.avg_pool2d(x, kernel, stride=1), pad, mode="replicate")
    assert ours.shape == x.shape
    assert max_err(ours, exact) <= 1e-6 and max_err(ours, old) <= 2e-6  # old: one 2-D pool (fp32 sums stray)
    with pytest.raises(ValueError, match="needs the feature map size"):
        FixedPool(kernel, pad)
    for bad_pad, bad_size in (((0, 0, 0, 0), size), (pad, (kernel[0] - 1, w))):
        with pytest.raises(ValueError, match="does not restore"):
            FixedPool(kernel, bad_pad, bad_size)


@pytest.mark.parametrize("form", ["reference", "conv-mean"])
def test_channel_flat_input_gives_zero_not_nan_in_fp16(form: str) -> None:
    """var = 0 with eps flushed to zero in fp16 (1e-6 / 16**2 is below fp16's smallest subnormal): upstream's
    formula gives 0/0; the capped inverse deviation gives the exact answer, 0."""
    norm = ChannelNorm(16, eps=1e-6 / 16**2, form=form).half()  # type: ignore[arg-type]
    flat = torch.full((1, 16, 8, 8), 3.0, dtype=torch.float16)
    assert bool(torch.isnan(upstream_norm(flat, 1e-6 / 256)).all())
    assert torch.equal(norm(flat), torch.zeros_like(flat))
    x = torch.randn(1, 16, 8, 8)  # and in fp32 the cap never binds: same as the plain formula
    assert max_err(ChannelNorm(16, eps=1e-6 / 256, form=form)(x), upstream_norm(x, 1e-6 / 256)) <= 1e-6  # type: ignore[arg-type]


def upstream_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    d = x - x.mean(1, keepdim=True)
    return d / (d.pow(2).mean(1, keepdim=True) + eps).sqrt()


def test_deploy_runs_exactly_the_pass_list_in_order(monkeypatch) -> None:
    ran: list[str] = []

    def recording(name, run):
        def record(graph, settings):
            ran.append(name)
            run(graph, settings)

        return record

    from nafnet_edge.deploy import pipeline

    monkeypatch.setattr(pipeline, "PASSES", [(name, recording(name, run)) for name, run in PASSES])
    graph = deploy(MODELS["nafnet"](), input_size=(96, 128))
    assert ran == [name for name, _ in PASSES]
    assert graph.recipe.passes == tuple(ran)

    monkeypatch.setattr(pipeline, "PASSES", [("noop", lambda graph, settings: ran.append("noop"))])
    ran.clear()
    graph = deploy(MODELS["nafnet"]())
    assert ran == ["noop"] and graph.recipe.passes == ("noop",)
    assert graph.blocks()[0].beta is not None  # nothing else ran


def test_recipe_records_how_the_graph_was_made() -> None:
    from nafnet_edge.manifest import IOSpec

    graph = deploy(MODELS["nafnet"](), norm_form="mvn", input_size=(96, 128), stream_scale=8, metadata={"k": "v"})
    r = graph.recipe
    assert (r.arch, r.norm_form, r.stream_scale, r.input_size) == ("NAFNet", "mvn", 8.0, (96, 128))
    assert r.config == CFG.to_dict() and r.channels == 3 and r.pad_multiple == CFG.pad_multiple
    assert r.passes == tuple(name for name, _ in PASSES)
    assert r.local_pooling == () and not r.is_tlc
    assert dict(r.metadata) == {"k": "v"}
    assert r.io == IOSpec.image(3, (96, 128))
    assert all(b.norm1.form == "mvn" for b in graph.blocks())
    assert deploy(MODELS["nafnet"]()).recipe.io is None  # no fixed size, no fixed tensors


def test_recipe_lists_tlc_local_pooling_at_the_export_size() -> None:
    local = deploy(MODELS["tlc-local"](), norm_form="conv-mean", input_size=(96, 128)).recipe
    assert local.arch == "NAFNetLocal" and local.is_tlc
    assert len(local.local_pooling) == 6  # every block's pool: kernel 48 (scaled per depth) < the feature map
    assert local.local_pooling[0] == (48, 48)
    pooled = [b.pool.kernel_size for b in deploy(MODELS["tlc-local"](), input_size=(96, 128)).blocks()]
    assert list(local.local_pooling) == pooled
    wide = deploy(MODELS["tlc-global"](), input_size=(96, 128)).recipe
    assert wide.arch == "NAFNetLocal" and wide.local_pooling == ()  # kernels cover the map: global at this size


def test_every_target_asks_for_a_norm_form_and_an_unknown_one_is_refused() -> None:
    from nafnet_edge.converters import target_class, target_names
    from nafnet_edge.deploy import check_norm_form

    model = MODELS["nafnet"]()
    for name in target_names():
        form = target_class(name).norm_form
        assert deploy(model, norm_form=form).recipe.norm_form == form
    with pytest.raises(ValueError, match="unknown deploy norm form 'xnnpack'; choose one of reference, conv-mean"):
        check_norm_form("xnnpack")
