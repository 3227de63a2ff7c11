"""The NAFNet family, compatible with the official checkpoints.

Papers: Chen, Chu, Zhang, Sun, "Simple Baselines for Image Restoration", ECCV 2022 (NAFNet and the Baseline
it simplifies); Chu, Chen, Yu, "NAFSSR: Stereo Image Super-Resolution Using NAFNet", CVPRW 2022.
Official code: megvii-research/NAFNet (MIT). This file re-derives the semantics; module names follow the
official state-dict keys exactly (``intro``, ``encoders.{i}.{j}.conv1``, ``...sca.1``, ``...se.1``, ``downs``,
``middle_blks``, ``ups.{i}.0``, ``body.{i}.module.blk.conv1``, ``body.{i}.module.fusion.l_proj1``, ``up.0``),
so an official ``{'params': ...}`` file loads with ``strict=True``.

- NAFNet / Baseline: the same U-Net over NAFBlocks or BaselineBlocks (GELU and squeeze-excitation attention).
- NAFNetSR / NAFSSR: a flat stack of NAFBlocks at low resolution, then a 3x3 conv and PixelShuffle to the
  output scale, plus a bilinear upsampling of the input as the global residual. NAFSSR takes a stereo pair as
  6 channels (left view first) and runs a stereo cross-attention module (SCAM) after every block.
- The ``...Local`` classes (and NAFSSR, which is evaluated that way upstream) use Test-time Local Converter
  (TLC) pooling: each global average pool in the channel attention becomes a box mean whose kernel was fixed at
  the training resolution. Local and global classes share parameters, so one checkpoint loads into either.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nafnet_edge.archs import ARCHS, CLASS_NAMES, DEFAULT_TRAIN_SIZES, FAMILIES, LOCAL_ARCHS, Arch, Family

# re-exported: model code imports the names from here
__all__ = ["ARCHS", "CLASS_NAMES", "FAMILIES", "LOCAL_ARCHS", "Arch", "Family"]


@dataclass(frozen=True)
class NAFNetConfig:
    """Everything needed to build a NAFNet; all of it can be inferred from a state dict except ``arch``."""

    img_channels: int = 3  # image channels in and out (3 for RGB, 1 for grayscale models)
    width: int = 32  # channels after the intro conv; doubles at every encoder level
    enc_blk_nums: tuple[int, ...] = (2, 2, 4, 8)  # NAFBlocks per encoder level
    middle_blk_num: int = 12  # NAFBlocks at the bottleneck
    dec_blk_nums: tuple[int, ...] = (2, 2, 2, 2)  # NAFBlocks per decoder level, deepest first
    dw_expand: int = 2  # conv1 expansion before the depthwise conv and SimpleGate
    ffn_expand: int = 2  # conv4 expansion before the SimpleGate of the feed-forward half
    arch: Arch = "nafnet"  # the class (see CLASS_NAMES); the "-local" ones and NAFSSR use TLC's local pooling
    # TLC only: training crop (H, W) fixing the pooling kernels; None (the default) takes the family's
    # (256 x 256 for the U-Nets, one 30 x 90 view for NAFSSR)
    train_size: tuple[int, int] = None  # type: ignore[assignment]
    up_scale: int = 1  # NAFNet-SR family: output scale (2 or 4 in the releases); 1 for the U-Nets
    fusion: bool = False  # NAFNet-SR family: stereo cross-attention after every block (NAFSSR)

    def __post_init__(self) -> None:
        object.__setattr__(self, "enc_blk_nums", tuple(int(n) for n in self.enc_blk_nums))
        object.__setattr__(self, "dec_blk_nums", tuple(int(n) for n in self.dec_blk_nums))
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        size = DEFAULT_TRAIN_SIZES[FAMILIES[self.arch]] if self.train_size is None else self.train_size
        object.__setattr__(self, "train_size", tuple(int(n) for n in size))
        if len(self.enc_blk_nums) != len(self.dec_blk_nums):
            raise ValueError(
                f"enc_blk_nums {self.enc_blk_nums} and dec_blk_nums {self.dec_blk_nums} must have the same length"
            )
        if self.width < 1 or self.img_channels < 1 or self.dw_expand < 1 or self.ffn_expand < 1:
            raise ValueError(f"width, img_channels and expansions must be positive: {self}")
        if self.family == "nafnet-sr":
            if self.enc_blk_nums or self.dec_blk_nums:
                raise ValueError("the NAFNet-SR family has no encoder or decoder levels: its blocks are middle_blk_num")
            if self.up_scale < 1:
                raise ValueError(f"up_scale must be positive, got {self.up_scale}")
            if self.arch == "nafssr" and not self.fusion:
                raise ValueError("NAFSSR is the stereo network: it needs fusion=True (use arch 'nafnet-sr' otherwise)")
        elif self.up_scale != 1 or self.fusion:
            raise ValueError(f"{self.class_name} restores at the input size: up_scale 1, no fusion")

    @property
    def family(self) -> Family:
        return FAMILIES[self.arch]

    @property
    def local(self) -> bool:
        """True where channel attention pools with TLC's local box mean (given a large enough input)."""
        return self.arch in LOCAL_ARCHS

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.arch]

    @property
    def views(self) -> int:
        """Images per sample: 2 for a stereo pair (NAFNet-SR with fusion), else 1."""
        return 2 if self.fusion else 1

    @property
    def in_channels(self) -> int:
        """Channels of the model's input and output tensors (views stacked on the channel axis)."""
        return self.img_channels * self.views

    @property
    def num_levels(self) -> int:
        return len(self.enc_blk_nums)

    @property
    def pad_multiple(self) -> int:
        """Inputs are zero-padded right/bottom to a multiple of this (16 for every official release)."""
        return 2**self.num_levels

    def replace(self, **changes: Any) -> NAFNetConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor (per pixel), eps 1e-6, biased variance.

    Upstream implements it as a custom autograd Function, which has no ONNX rule; this is the same
    arithmetic in plain ops.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        y = (x - mu) / (var + self.eps).sqrt()
        return self.weight.view(1, -1, 1, 1) * y + self.bias.view(1, -1, 1, 1)


class SimpleGate(nn.Module):
    """Split the channels in half and multiply the halves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return x1 * x2


class ChannelPool(nn.Module):
    """Average pooling for the channel attention.

    ``kernel_size=None`` is the global average pool. With a kernel (TLC), a feature map that the kernel
    covers is still pooled globally; otherwise each pixel gets the mean of the (min(H,kh), min(W,kw)) window
    ("valid", stride 1), replicate-padded back to H x W exactly as upstream pads it. The box means come from
    an integral image in float64 (four lookups a pixel, whatever the kernel), not from ``avg_pool2d``, whose
    cost grows with the window's area; under tracing or export the pool is written separably instead (two
    1-D average pools, no cumsum in a deployed graph).
    """

    def __init__(self, kernel_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if torch.jit.is_tracing():  # a trace records the shapes as tensors; pooling windows must be constants
            h, w = int(h), int(w)
        if self.kernel_size is None or (self.kernel_size[0] >= h and self.kernel_size[1] >= w):
            return x.mean((-2, -1), keepdim=True)
        k1, k2 = min(h, self.kernel_size[0]), min(w, self.kernel_size[1])
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            out = separable_box_mean(x, (k1, k2))
        else:
            out = integral_box_mean(x, (k1, k2))
        oh, ow = out.shape[-2:]
        pad = ((w - ow) // 2, (w - ow + 1) // 2, (h - oh) // 2, (h - oh + 1) // 2)
        return F.pad(out, pad, mode="replicate")

    def extra_repr(self) -> str:
        return "global" if self.kernel_size is None else f"tlc_kernel={self.kernel_size}"


def integral_box_mean(x: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """Means of every (k1, k2) window, stride 1, no padding ("valid"), from float64 cumulative sums."""
    k1, k2 = kernel
    s = F.pad(x.double().cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    box = s[..., k1:, k2:] - s[..., :-k1, k2:] - s[..., k1:, :-k2] + s[..., :-k1, :-k2]
    return (box / (k1 * k2)).to(x.dtype)


def separable_box_mean(x: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """The same means as two stride-1 average pools, (k1, 1) then (1, k2): k1 + k2 reads a pixel, not k1 * k2."""
    k1, k2 = kernel
    if k1 > 1:
        x = F.avg_pool2d(x, (k1, 1), stride=1)
    if k2 > 1:
        x = F.avg_pool2d(x, (1, k2), stride=1)
    return x


class NAFBlock(nn.Module):
    def __init__(self, c: int, dw_expand: int = 2, ffn_expand: int = 2) -> None:
        super().__init__()
        dw = c * dw_expand
        ffn = c * ffn_expand
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.conv3 = nn.Conv2d(dw // 2, c, 1)
        self.sca = nn.Sequential(ChannelPool(), nn.Conv2d(dw // 2, dw // 2, 1))
        self.sg = SimpleGate()
        self.conv4 = nn.Conv2d(c, ffn, 1)
        self.conv5 = nn.Conv2d(ffn // 2, c, 1)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(self.norm1(inp)))
        x = self.sg(x)
        x = x * self.sca(x)
        x = self.conv3(x)
        y = inp + x * self.beta
        x = self.conv5(self.sg(self.conv4(self.norm2(y))))
        return y + x * self.gamma


class BaselineBlock(nn.Module):
    """The paper's Baseline block: GELU where NAFBlock gates, squeeze-excitation where NAFBlock has SCA.

    ``norm1 -> conv1 (c -> c*dw_expand) -> depthwise 3x3 -> GELU -> x * SE(x) -> conv3 -> y = inp + x*beta``,
    then ``norm2 -> conv4 (c -> c*ffn_expand) -> GELU -> conv5 -> y + x*gamma``. SE is global (or TLC) average
    pool, 1x1 to half the channels, ReLU, 1x1 back, sigmoid. GELU is the exact (erf) form, as upstream.
    """

    def __init__(self, c: int, dw_expand: int = 1, ffn_expand: int = 2) -> None:
        super().__init__()
        dw = c * dw_expand
        ffn = c * ffn_expand
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.conv3 = nn.Conv2d(dw, c, 1)
        self.se = nn.Sequential(
            ChannelPool(), nn.Conv2d(dw, dw // 2, 1), nn.ReLU(), nn.Conv2d(dw // 2, dw, 1), nn.Sigmoid()
        )
        self.gelu = nn.GELU()
        self.conv4 = nn.Conv2d(c, ffn, 1)
        self.conv5 = nn.Conv2d(ffn, c, 1)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.gelu(self.conv2(self.conv1(self.norm1(inp))))
        x = x * self.se(x)
        x = self.conv3(x)
        y = inp + x * self.beta
        x = self.conv5(self.gelu(self.conv4(self.norm2(y))))
        return y + x * self.gamma


class RestorationNet(nn.Module):
    """What every model class of the family shares: its config, the input padding and the I/O geometry.

    Inputs are NCHW float tensors in the image's value range (the official models use [0, 1]) with
    ``config.in_channels`` channels; outputs have the same channels and ``config.up_scale`` times the size,
    not clamped, as upstream.
    """

    arch: Arch = "nafnet"
    config: NAFNetConfig

    def _configure(self, config: NAFNetConfig | None) -> NAFNetConfig:
        if config is None and FAMILIES[self.arch] == "nafnet-sr":  # upstream's defaults: width 48, 16 blocks, x4
            sr = {"enc_blk_nums": (), "dec_blk_nums": (), "middle_blk_num": 16, "width": 48, "up_scale": 4}
            config = NAFNetConfig(arch=self.arch, fusion=self.arch == "nafssr", **sr)  # type: ignore[arg-type]
        self.config = (config or NAFNetConfig(arch=self.arch)).replace(arch=self.arch)
        return self.config

    @property
    def pad_multiple(self) -> int:
        return self.config.pad_multiple

    @property
    def up_scale(self) -> int:
        return self.config.up_scale

    def use_tlc(self) -> None:
        """Give every channel-attention pool its TLC kernel for its depth (see :func:`tlc_kernel_sizes`)."""
        kernels = tlc_kernel_sizes(self.config)
        for depth, stage in self.stages():
            for pool in stage.modules():  # one per block of the stage
                if isinstance(pool, ChannelPool):
                    pool.kernel_size = kernels[depth]

    def stages(self) -> list[tuple[int, nn.Module]]:
        """(U-Net depth, stage) pairs covering every block."""
        raise NotImplementedError


class UNet(RestorationNet):
    """The NAFNet U-Net with a global residual over ``block`` modules; pads inputs to ``pad_multiple``."""

    def __init__(self, config: NAFNetConfig | None, block: type[NAFBlock] | type[BaselineBlock]) -> None:
        super().__init__()
        config = self._configure(config)
        chan = config.width
        make = lambda c: block(c, config.dw_expand, config.ffn_expand)  # noqa: E731
        self.intro = nn.Conv2d(config.img_channels, chan, 3, padding=1)
        self.ending = nn.Conv2d(chan, config.img_channels, 3, padding=1)
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        for num in config.enc_blk_nums:
            self.encoders.append(nn.Sequential(*[make(chan) for _ in range(num)]))
            self.downs.append(nn.Conv2d(chan, 2 * chan, 2, 2))
            chan *= 2
        self.middle_blks = nn.Sequential(*[make(chan) for _ in range(config.middle_blk_num)])
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for num in config.dec_blk_nums:
            self.ups.append(nn.Sequential(nn.Conv2d(chan, chan * 2, 1, bias=False), nn.PixelShuffle(2)))
            chan //= 2
            self.decoders.append(nn.Sequential(*[make(chan) for _ in range(num)]))
        if config.local:
            self.use_tlc()

    def stages(self) -> list[tuple[int, nn.Module]]:
        levels = self.config.num_levels
        out: list[tuple[int, nn.Module]] = list(enumerate(self.encoders))
        out.append((levels, self.middle_blks))
        return out + [(levels - 1 - i, dec) for i, dec in enumerate(self.decoders)]

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        h, w = inp.shape[-2:]
        m = self.pad_multiple
        inp = F.pad(inp, (0, (m - w % m) % m, 0, (m - h % m) % m))
        x = self.intro(inp)
        skips = []
        for encoder, down in zip(self.encoders, self.downs, strict=True):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.middle_blks(x)
        for decoder, up, skip in zip(self.decoders, self.ups, reversed(skips), strict=True):
            x = decoder(up(x) + skip)
        x = self.ending(x) + inp
        return x[..., :h, :w]


class NAFNet(UNet):
    """U-shaped NAFNet with a global residual; pads inputs to ``config.pad_multiple`` and crops back."""

    arch: Arch = "nafnet"

    def __init__(self, config: NAFNetConfig | None = None) -> None:
        super().__init__(config, NAFBlock)


class NAFNetLocal(NAFNet):
    """NAFNet with Test-time Local Converter pooling (used upstream for GoPro and REDS, not SIDD)."""

    arch: Arch = "nafnet-local"


class Baseline(UNet):
    """The paper's Baseline: NAFNet's U-Net over BaselineBlocks (released with dw_expand 1)."""

    arch: Arch = "baseline"

    def __init__(self, config: NAFNetConfig | None = None) -> None:
        super().__init__(config, BaselineBlock)


class BaselineLocal(Baseline):
    """Baseline with TLC pooling in the squeeze-excitation (the GoPro releases)."""

    arch: Arch = "baseline-local"


class SCAM(nn.Module):
    """Stereo cross-attention: each row of the left view attends over the same row of the right, and back.

    ``Q_l = l_proj1(norm_l(x_l))``, ``Q_r = r_proj1(norm_r(x_r))``, ``A = Q_l Q_r^T / sqrt(c)`` per row
    (W x W); the outputs are ``x_l + beta * softmax(A) @ r_proj2(x_r)`` and
    ``x_r + gamma * softmax(A^T) @ l_proj2(x_l)``, softmax over the last axis.
    """

    def __init__(self, c: int) -> None:
        super().__init__()
        self.scale = c**-0.5
        self.norm_l = LayerNorm2d(c)
        self.norm_r = LayerNorm2d(c)
        self.l_proj1 = nn.Conv2d(c, c, 1)
        self.r_proj1 = nn.Conv2d(c, c, 1)
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.l_proj2 = nn.Conv2d(c, c, 1)
        self.r_proj2 = nn.Conv2d(c, c, 1)

    def forward(self, x_l: torch.Tensor, x_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q_l = self.l_proj1(self.norm_l(x_l)).permute(0, 2, 3, 1)  # N, H, W, C
        q_r_t = self.r_proj1(self.norm_r(x_r)).permute(0, 2, 1, 3)  # N, H, C, W
        v_l = self.l_proj2(x_l).permute(0, 2, 3, 1)
        v_r = self.r_proj2(x_r).permute(0, 2, 3, 1)
        attention = torch.matmul(q_l, q_r_t) * self.scale  # N, H, W_left, W_right
        r2l = torch.matmul(torch.softmax(attention, dim=-1), v_r)
        l2r = torch.matmul(torch.softmax(attention.transpose(-1, -2), dim=-1), v_l)
        return x_l + r2l.permute(0, 3, 1, 2) * self.beta, x_r + l2r.permute(0, 3, 1, 2) * self.gamma


class NAFBlockSR(nn.Module):
    """One NAFBlock applied to every view, then (NAFSSR) SCAM between the two."""

    def __init__(self, c: int, fusion: bool, dw_expand: int = 2, ffn_expand: int = 2) -> None:
        super().__init__()
        self.blk = NAFBlock(c, dw_expand, ffn_expand)
        self.fusion = SCAM(c) if fusion else None

    def forward(self, *feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = tuple(self.blk(x) for x in feats)
        if self.fusion is not None:
            feats = self.fusion(*feats)
        return feats


class DropPath(nn.Module):
    """Upstream wraps every SR block in stochastic depth (training only); kept for the ``.module`` keys."""

    def __init__(self, module: NAFBlockSR) -> None:
        super().__init__()
        self.module = module

    def forward(self, *feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.module(*feats)


class NAFNetSR(RestorationNet):
    """Single-image super-resolution with NAFBlocks (``middle_blk_num`` of them at the input resolution)."""

    arch: Arch = "nafnet-sr"

    def __init__(self, config: NAFNetConfig | None = None) -> None:
        super().__init__()
        config = self._configure(config)
        c, scale = config.width, config.up_scale
        self.intro = nn.Conv2d(config.img_channels, c, 3, padding=1)
        self.body = nn.ModuleList(
            DropPath(NAFBlockSR(c, config.fusion, config.dw_expand, config.ffn_expand))
            for _ in range(config.middle_blk_num)
        )
        self.up = nn.Sequential(nn.Conv2d(c, config.img_channels * scale**2, 3, padding=1), nn.PixelShuffle(scale))
        if config.local:
            self.use_tlc()

    def stages(self) -> list[tuple[int, nn.Module]]:
        return [(0, self.body)]

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        residual = F.interpolate(inp, scale_factor=self.up_scale, mode="bilinear", align_corners=False)
        feats = tuple(self.intro(x) for x in inp.chunk(self.config.views, dim=1))
        for blk in self.body:
            feats = blk(*feats)
        return torch.cat([self.up(x) for x in feats], dim=1) + residual


class NAFSSR(NAFNetSR):
    """Stereo super-resolution: a left/right pair as 6 channels (left first), SCAM after every block, TLC."""

    arch: Arch = "nafssr"


def tlc_kernel_sizes(config: NAFNetConfig) -> list[tuple[int, int]]:
    """TLC pooling kernel per U-Net depth (0 = full resolution ... num_levels = bottleneck).

    Upstream fixes each kernel by running one forward pass at the training size with
    base_size = int(1.5 * train_size): kernel = feature_size * base_size // train_size, where the
    feature size is that of the zero-padded training input at that depth. NAFSSR (no levels) has one kernel:
    (45, 135) for its 30 x 90 training views.
    """
    th, tw = config.train_size
    m = config.pad_multiple
    ph, pw = -(-th // m) * m, -(-tw // m) * m
    bh, bw = int(th * 1.5), int(tw * 1.5)
    return [((ph >> d) * bh // th, (pw >> d) * bw // tw) for d in range(config.num_levels + 1)]


MODEL_CLASSES: dict[str, type[RestorationNet]] = {
    "nafnet": NAFNet,
    "nafnet-local": NAFNetLocal,
    "baseline": Baseline,
    "baseline-local": BaselineLocal,
    "nafnet-sr": NAFNetSR,
    "nafssr": NAFSSR,
}


def build_model(config: NAFNetConfig) -> RestorationNet:
    """The module class the config's ``arch`` names, with freshly initialised weights."""
    return MODEL_CLASSES[config.arch](config)
