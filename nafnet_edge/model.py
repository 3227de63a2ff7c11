"""NAFNet and NAFNetLocal (TLC), compatible with the official checkpoints.

Paper: Chen, Chu, Zhang, Sun, "Simple Baselines for Image Restoration", ECCV 2022.
Official code: megvii-research/NAFNet (MIT). This file re-derives the semantics described in
``shared/docs/NAFNET_FACTS.md``; module names follow the official state-dict keys exactly
(``intro``, ``encoders.{i}.{j}.conv1``, ``...sca.1``, ``downs``, ``middle_blks``, ``ups.{i}.0``, ...),
so an official ``{'params': ...}`` file loads with ``strict=True``.

NAFNetLocal is the same network with Test-time Local Converter (TLC) pooling: each global average pool
in the channel attention becomes a box mean whose kernel was fixed at the training resolution. The two
classes share parameters, so one checkpoint loads into either.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

Arch = Literal["nafnet", "nafnet-local"]
ARCHS: tuple[Arch, ...] = ("nafnet", "nafnet-local")


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
    arch: Arch = "nafnet"  # "nafnet-local" replaces global pooling with TLC's local pooling
    train_size: tuple[int, int] = (256, 256)  # TLC only: training crop (H, W) that fixes the pooling kernels

    def __post_init__(self) -> None:
        object.__setattr__(self, "enc_blk_nums", tuple(int(n) for n in self.enc_blk_nums))
        object.__setattr__(self, "dec_blk_nums", tuple(int(n) for n in self.dec_blk_nums))
        object.__setattr__(self, "train_size", tuple(int(n) for n in self.train_size))
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if len(self.enc_blk_nums) != len(self.dec_blk_nums):
            raise ValueError(
                f"enc_blk_nums {self.enc_blk_nums} and dec_blk_nums {self.dec_blk_nums} must have the same length"
            )
        if self.width < 1 or self.img_channels < 1 or self.dw_expand < 1 or self.ffn_expand < 1:
            raise ValueError(f"width, img_channels and expansions must be positive: {self}")

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
    """Average pooling for the simplified channel attention.

    ``kernel_size=None`` is NAFNet's global average pool. With a kernel (TLC), a feature map that the
    kernel covers is still pooled globally; otherwise each pixel gets the mean of the (min(H,kh), min(W,kw))
    window ("valid", stride 1), replicate-padded back to H x W exactly as upstream pads it.
    """

    def __init__(self, kernel_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.kernel_size is None or (self.kernel_size[0] >= h and self.kernel_size[1] >= w):
            return x.mean((-2, -1), keepdim=True)
        k1, k2 = min(h, self.kernel_size[0]), min(w, self.kernel_size[1])
        out = F.avg_pool2d(x, (k1, k2), stride=1)
        oh, ow = out.shape[-2:]
        pad = ((w - ow) // 2, (w - ow + 1) // 2, (h - oh) // 2, (h - oh + 1) // 2)
        return F.pad(out, pad, mode="replicate")

    def extra_repr(self) -> str:
        return "global" if self.kernel_size is None else f"tlc_kernel={self.kernel_size}"


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


class NAFNet(nn.Module):
    """U-shaped NAFNet with a global residual; pads inputs to ``config.pad_multiple`` and crops back.

    Takes and returns NCHW float tensors in the image's value range (the official models use [0, 1]);
    the output is not clamped, as upstream.
    """

    arch: Arch = "nafnet"

    def __init__(self, config: NAFNetConfig | None = None) -> None:
        super().__init__()
        config = (config or NAFNetConfig()).replace(arch=self.arch)
        self.config = config
        chan = config.width
        block = lambda c: NAFBlock(c, config.dw_expand, config.ffn_expand)  # noqa: E731
        self.intro = nn.Conv2d(config.img_channels, chan, 3, padding=1)
        self.ending = nn.Conv2d(chan, config.img_channels, 3, padding=1)
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        for num in config.enc_blk_nums:
            self.encoders.append(nn.Sequential(*[block(chan) for _ in range(num)]))
            self.downs.append(nn.Conv2d(chan, 2 * chan, 2, 2))
            chan *= 2
        self.middle_blks = nn.Sequential(*[block(chan) for _ in range(config.middle_blk_num)])
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for num in config.dec_blk_nums:
            self.ups.append(nn.Sequential(nn.Conv2d(chan, chan * 2, 1, bias=False), nn.PixelShuffle(2)))
            chan //= 2
            self.decoders.append(nn.Sequential(*[block(chan) for _ in range(num)]))

    @property
    def pad_multiple(self) -> int:
        return self.config.pad_multiple

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


def tlc_kernel_sizes(config: NAFNetConfig) -> list[tuple[int, int]]:
    """TLC pooling kernel per U-Net depth (0 = full resolution ... num_levels = bottleneck).

    Upstream fixes each kernel by running one forward pass at the training size with
    base_size = int(1.5 * train_size): kernel = feature_size * base_size // train_size, where the
    feature size is that of the zero-padded training input at that depth.
    """
    th, tw = config.train_size
    m = config.pad_multiple
    ph, pw = -(-th // m) * m, -(-tw // m) * m
    bh, bw = int(th * 1.5), int(tw * 1.5)
    return [((ph >> d) * bh // th, (pw >> d) * bw // tw) for d in range(config.num_levels + 1)]


class NAFNetLocal(NAFNet):
    """NAFNet with Test-time Local Converter pooling (used upstream for GoPro and REDS, not SIDD)."""

    arch: Arch = "nafnet-local"

    def __init__(self, config: NAFNetConfig | None = None) -> None:
        super().__init__(config)
        kernels = tlc_kernel_sizes(self.config)
        depth_stages: list[tuple[int, nn.Module]] = [(d, enc) for d, enc in enumerate(self.encoders)]
        depth_stages.append((self.config.num_levels, self.middle_blks))
        depth_stages += [(self.config.num_levels - 1 - i, dec) for i, dec in enumerate(self.decoders)]
        for depth, stage in depth_stages:
            for pool in stage.modules():  # one per NAFBlock of the stage
                if isinstance(pool, ChannelPool):
                    pool.kernel_size = kernels[depth]


def build_model(config: NAFNetConfig) -> NAFNet:
    """The module class the config's ``arch`` names, with freshly initialised weights."""
    return NAFNetLocal(config) if config.arch == "nafnet-local" else NAFNet(config)
