"""Exact rewrites of a NAFNet or Baseline into its deploy graph, one function per transformation.

Every pass keeps the function (within float rounding) and mutates the ``DeployNAFNet`` it is given;
``nafnet_edge.deploy.deploy`` copies the trained model first, so callers' models are never touched.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import nn

from nafnet_edge.deploy.modules import (
    AnyDeployBlock,
    ChannelNorm,
    DeployBaselineBlock,
    DeployBlock,
    DeployNAFNet,
    FixedPool,
    NormForm,
)
from nafnet_edge.errors import OptionError
from nafnet_edge.model import BaselineBlock, ChannelPool, LayerNorm2d, NAFBlock, UNet


def _conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """A conv with ``conv``'s hyper-parameters (groups adjusted to the new channel count) and new weights."""
    groups = weight.shape[0] if conv.groups > 1 else 1
    out = nn.Conv2d(
        weight.shape[1] * groups,
        weight.shape[0],
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        groups=groups,
        bias=bias is not None,
    )
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)  # type: ignore[union-attr]
    return out


def _norm_from(ln: LayerNorm2d) -> ChannelNorm:
    norm = ChannelNorm(ln.weight.shape[0], ln.eps)
    norm.weight = nn.Parameter(ln.weight.detach().clone())
    norm.bias = nn.Parameter(ln.bias.detach().clone())
    return norm


def to_deploy_modules(model: UNet) -> DeployNAFNet:
    """An independent copy of ``model`` (a NAFNet or a Baseline, TLC or not) as deploy modules, computing the
    same function (nothing folded yet)."""
    model = copy.deepcopy(model).eval()

    def convert(module: nn.Module) -> AnyDeployBlock:
        if isinstance(module, BaselineBlock):
            b = DeployBaselineBlock()
            b.norm1, b.norm2 = _norm_from(module.norm1), _norm_from(module.norm2)
            b.conv1, b.conv2, b.conv3, b.conv4, b.conv5 = (
                module.conv1,
                module.conv2,
                module.conv3,
                module.conv4,
                module.conv5,
            )
            b.pool, b.se_reduce, b.se_expand = (
                module.se[0],
                cast(nn.Conv2d, module.se[1]),
                cast(nn.Conv2d, module.se[3]),
            )
            b.beta, b.gamma = module.beta, module.gamma
            return b
        blk = cast(NAFBlock, module)
        d = DeployBlock()
        d.norm1, d.norm2 = _norm_from(blk.norm1), _norm_from(blk.norm2)
        d.conv1, d.conv2, d.conv3, d.conv4, d.conv5 = blk.conv1, blk.conv2, blk.conv3, blk.conv4, blk.conv5
        d.pool, d.sca = blk.sca[0], cast(nn.Conv2d, blk.sca[1])
        d.beta, d.gamma = blk.beta, blk.gamma
        return d

    graph = DeployNAFNet(
        intro=model.intro,
        ending=model.ending,
        encoders=nn.ModuleList(nn.Sequential(*map(convert, cast(nn.Sequential, s))) for s in model.encoders),
        downs=model.downs,
        middle_blks=nn.Sequential(*map(convert, model.middle_blks)),
        ups=model.ups,
        decoders=nn.ModuleList(nn.Sequential(*map(convert, cast(nn.Sequential, s))) for s in model.decoders),
        pad_multiple=model.pad_multiple,
    )
    return graph.eval().requires_grad_(False)


def fold_norm_affine_into(module: nn.Module, norm: ChannelNorm, conv_name: str) -> None:
    """conv(w * n + b) == conv'(n): the 1x1 conv ``module.<conv_name>`` after ``norm`` takes its affine (input
    channels scaled by w, conv(b) added to the bias); the norm keeps none. Nothing to do without an affine."""
    conv: nn.Conv2d | None = getattr(module, conv_name)
    if norm.weight is None or norm.bias is None or conv is None:
        return
    w = conv.weight.detach()[:, :, 0, 0]
    new_w = w * norm.weight.detach()[None, :]
    new_b = conv.bias.detach() + w @ norm.bias.detach()  # type: ignore[union-attr]
    setattr(module, conv_name, _conv_like(conv, new_w[:, :, None, None], new_b))
    norm.weight = None
    norm.bias = None


def fold_scale_into(module: nn.Module, scale_name: str, conv_name: str) -> None:
    """conv(x) * s == conv'(x) with output rows scaled by s: the per-channel ``module.<scale_name>`` (beta, gamma)
    goes into ``module.<conv_name>`` and becomes None."""
    scale = getattr(module, scale_name)
    if scale is None:
        return
    conv: nn.Conv2d = getattr(module, conv_name)
    s = scale.detach().reshape(-1)
    new_w = conv.weight.detach() * s[:, None, None, None]
    new_b = conv.bias.detach() * s  # type: ignore[union-attr]
    setattr(module, conv_name, _conv_like(conv, new_w, new_b))
    setattr(module, scale_name, None)


def fold_layernorm_affine(block: AnyDeployBlock) -> None:
    """conv(w * n + b) == conv'(n): scale conv1/conv4's input channels by w, add conv(b) to their bias."""
    fold_norm_affine_into(block, block.norm1, "conv1")
    fold_norm_affine_into(block, block.norm2, "conv4")


def fold_beta_gamma(block: AnyDeployBlock) -> None:
    """(conv3(x)) * beta == conv3'(x) with rows scaled by beta; the same for gamma and conv5."""
    fold_scale_into(block, "beta", "conv3")
    fold_scale_into(block, "gamma", "conv5")


def split_simple_gate(block: AnyDeployBlock) -> None:
    """Produce each SimpleGate half with its own convs, so no channel slice or chunk remains (a Baseline block
    has no gate: left as it is)."""
    if not isinstance(block, DeployBlock) or block.is_split:
        return
    assert block.conv1 is not None and block.conv2 is not None and block.conv4 is not None
    half = block.conv1.out_channels // 2
    for src, names in ((block.conv1, ("conv1a", "conv1b")), (block.conv2, ("conv2a", "conv2b"))):
        w, b = src.weight.detach(), src.bias.detach()  # type: ignore[union-attr]
        setattr(block, names[0], _conv_like(src, w[:half], b[:half]))
        setattr(block, names[1], _conv_like(src, w[half:], b[half:]))
    half4 = block.conv4.out_channels // 2
    w4, b4 = block.conv4.weight.detach(), block.conv4.bias.detach()  # type: ignore[union-attr]
    block.conv4a = _conv_like(block.conv4, w4[:half4], b4[:half4])
    block.conv4b = _conv_like(block.conv4, w4[half4:], b4[half4:])
    block.conv1 = block.conv2 = block.conv4 = None


def transposed_conv_upsampling(graph: DeployNAFNet) -> None:
    """1x1 conv (C -> 4C') + PixelShuffle(2) == ConvTranspose2d(C, C', 2, stride=2): the same weights, reordered.

    One op instead of a conv and a depth-to-space; OpenVINO's CPU plugin otherwise lowers the pixel shuffle to
    reshape/transpose with layout reorders around it.
    """
    for i, up in enumerate(graph.ups):
        if isinstance(up, nn.ConvTranspose2d):
            continue
        upsample = cast(nn.Sequential, up)  # 1x1 conv + PixelShuffle, as NAFNet builds them
        conv, shuffle = upsample[0], upsample[1]
        if conv.bias is not None:  # a bias per sub-pixel has no transposed-conv equivalent; NAFNet has none
            raise ValueError("upsampling convs with a bias are not NAFNet's")
        r = shuffle.upscale_factor
        w = conv.weight.detach()[:, :, 0, 0]  # (C' r r, C): output channel c' r^2 + a r + b -> pixel (a, b)
        out_ch = w.shape[0] // (r * r)
        t = nn.ConvTranspose2d(w.shape[1], out_ch, r, stride=r, bias=False)
        with torch.no_grad():
            t.weight.copy_(w.reshape(out_ch, r, r, w.shape[1]).permute(3, 0, 1, 2))
        graph.ups[i] = t.eval().requires_grad_(False)


def _rescaled(conv: nn.Conv2d, weight_factor: float, bias_factor: float) -> nn.Conv2d:
    bias = None if conv.bias is None else conv.bias.detach() * bias_factor
    return _conv_like(conv, conv.weight.detach() * weight_factor, bias)


def scale_residual_stream(graph: DeployNAFNet, scale: float) -> None:
    """Carry the residual stream (everything the norms see) divided by ``scale``, a power of two.

    The convs writing into the stream from elsewhere (intro, conv3, conv5) are divided by ``scale``; those
    mapping the stream to itself keep their weights (downsampling: bias divided; upsampling has no bias); the
    ending conv's weights are multiplied by it and each norm's eps divided by ``scale**2``: the function is the
    same (power-of-two factors are exact in floating point), but the norms' squares and sums stay inside fp16
    range for activations ``scale`` times larger than fp16 alone allows (|x| ~ 175 and more in trained models)
    without a single extra op in the graph.
    """
    if not (1 <= scale <= 64 and float(scale).is_integer() and int(scale) & (int(scale) - 1) == 0):
        raise OptionError(f"stream scale must be a power of two from 1 to 64, got {scale}")
    if scale == 1:
        return
    inv = 1.0 / scale
    graph.intro = _rescaled(graph.intro, inv, inv)
    graph.ending = _rescaled(graph.ending, scale, 1.0)
    for i, down in enumerate(graph.downs):
        graph.downs[i] = _rescaled(cast(nn.Conv2d, down), 1.0, inv)
    if any(
        (up if isinstance(up, nn.ConvTranspose2d) else cast(nn.Sequential, up)[0]).bias is not None for up in graph.ups
    ):
        raise ValueError("upsampling convs with a bias are not NAFNet's")
    for block in graph.blocks():
        scale_block_stream(block, inv)


def scale_block_stream(block: AnyDeployBlock, inv: float) -> None:
    """A block on a residual stream carried times ``inv``: the convs adding into the stream (conv3, conv5) scaled
    by it, the norms' eps by its square (a norm's output does not change with its input's scale)."""
    if block.beta is not None or block.gamma is not None:
        raise ValueError("fold beta/gamma before scaling the residual stream")
    block.conv3 = _rescaled(block.conv3, inv, inv)
    block.conv5 = _rescaled(block.conv5, inv, inv)
    for norm in (block.norm1, block.norm2):
        norm.eps = norm.eps * inv * inv


def set_norm_form(block: AnyDeployBlock, form: NormForm) -> None:
    """Write both channel norms in the form a backend delegates (same function in every form)."""
    for norm in (block.norm1, block.norm2):
        norm.form = form


def fix_pooling(graph: DeployNAFNet, input_size: tuple[int, int]) -> None:
    """Replace shape-dependent pooling by the fixed global/local pool valid for ``input_size`` (padded H, W)."""
    h, w = input_size
    m = graph.pad_multiple
    if h % m or w % m:
        raise OptionError(f"deploy input size {h}x{w} must be a multiple of {m}; pad it (the tiler does)")
    levels = len(graph.encoders)
    stages = [(d, s) for d, s in enumerate(graph.encoders)] + [(levels, graph.middle_blks)]
    stages += [(levels - 1 - i, s) for i, s in enumerate(graph.decoders)]
    for depth, stage in stages:
        fh, fw = h >> depth, w >> depth
        for block in cast(nn.Sequential, stage):
            pool = block.pool
            if isinstance(pool, FixedPool):
                continue
            block.pool = fixed_pool(pool.kernel_size if isinstance(pool, ChannelPool) else None, (fh, fw))


def fixed_pool(kernel: tuple[int, int] | None, size: tuple[int, int]) -> FixedPool:
    """The pool ``ChannelPool(kernel)`` computes on an (H, W) = ``size`` map: global when the kernel covers it,
    else the kernel clipped to the map and the means replicate-padded back to H x W."""
    h, w = size
    if kernel is None or (kernel[0] >= h and kernel[1] >= w):
        return FixedPool(None)
    k1, k2 = min(h, kernel[0]), min(w, kernel[1])
    oh, ow = h - k1 + 1, w - k2 + 1
    return FixedPool((k1, k2), ((w - ow) // 2, (w - ow + 1) // 2, (h - oh) // 2, (h - oh + 1) // 2), size)
