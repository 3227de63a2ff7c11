"""Inference-only NAFNet and Baseline modules that the deploy passes rewrite step by step.

``DeployNAFNet`` starts as an exact re-expression of a trained ``NAFNet`` or ``Baseline`` (same parameters, same
function; ``DeployBlock`` or ``DeployBaselineBlock`` for its blocks)
and each pass in ``nafnet_edge.deploy.passes`` rewrites parts of it while keeping the function. The modules
stay valid in every intermediate state, so each pass can be tested on its own.

The deploy graph takes inputs whose height and width are already multiples of ``pad_multiple``: zero padding
and the crop back are done by the caller (``PadCrop``, or the tiler), so exported graphs have static shapes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from nafnet_edge.deploy.pipeline import DeployRecipe

NormForm = Literal["reference", "conv-mean", "layer-norm", "mvn"]


FP16_MAX = 65504.0


class ChannelNorm(nn.Module):
    """Per-pixel normalization over channels (LayerNorm2d without its affine unless ``weight`` is kept).

    ``form`` chooses how the same function is written for a backend:
    - "reference": mean/var reductions over dim 1, as upstream;
    - "conv-mean": the channel mean as a fixed 1x1 convolution (C -> 1), which XNNPACK delegates; eps rides
      in the variance conv's bias;
    - "layer-norm": ``F.layer_norm`` on an NHWC view, which Core ML lowers to one ``layer_norm`` op;
    - "mvn": upstream's mean/var pattern, which OpenVINO's frontend turns into one MVN op (its CPU plugin runs a
      channel-only MVN as reduce/eltwise kernels; of the four forms this one measured fastest there).
    fp16 safety does not cost an op here: ``scale_residual_stream`` divides the residual stream feeding the
    norms by a power of two and rescales ``eps``. In "reference" and "conv-mean" the inverse standard deviation
    is capped at fp16's largest value, so a flat input (var = 0, eps flushed to zero in fp16) gives 0, not 0/0;
    the cap never binds in fp32 while ``eps`` >= 1/FP16_MAX**2 (any stream scale up to 64 with eps 1e-6).
    """

    mean_weight: torch.Tensor  # buffers, registered in __init__
    eps_bias: torch.Tensor

    def __init__(self, channels: int, eps: float = 1e-6, *, form: NormForm = "reference") -> None:
        super().__init__()
        self.channels = channels
        self.form: NormForm = form
        self.weight: nn.Parameter | None = None
        self.bias: nn.Parameter | None = None
        self.register_buffer("mean_weight", torch.full((1, channels, 1, 1), 1.0 / channels), persistent=False)
        self.register_buffer("eps_bias", torch.full((1,), eps), persistent=False)  # the variance conv's bias
        self.eps = eps

    @property
    def eps(self) -> float:
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        self._eps = float(value)
        self.eps_bias.fill_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "layer-norm":
            y = F.layer_norm(x.permute(0, 2, 3, 1), (self.channels,), eps=self.eps).permute(0, 3, 1, 2)
        elif self.form == "mvn":
            mu = x.mean(1, keepdim=True)  # upstream's exact pattern, which OpenVINO reads as one MVN op
            y = (x - mu) / ((x - mu).pow(2).mean(1, keepdim=True) + self.eps).sqrt()
        else:
            if self.form == "conv-mean":
                d = x - F.conv2d(x, self.mean_weight)
                var_eps = F.conv2d(d * d, self.mean_weight, self.eps_bias)
            else:
                d = x - x.mean(1, keepdim=True)
                var_eps = (d * d).mean(1, keepdim=True) + self.eps
            y = d * torch.rsqrt(var_eps).clamp_max(FP16_MAX)
        if self.weight is not None:
            y = y * self.weight.view(1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y


class FixedPool(nn.Module):
    """Channel-attention pooling fixed for one deploy size: global mean, or TLC's local box mean.

    ``kernel_size=None`` is the global mean. Otherwise ``size`` is the (H, W) feature map the pool is fixed for
    and ``kernel_size`` its (already clipped) kernel: the stride-1 box mean, replicate-padded back to H x W by
    ``pad`` (left, right, top, bottom). Written in ops every target delegates, with no cumsum and no
    shape-dependent branch:

    - the box mean is separable, a (k1, 1) then a (1, k2) average pool (a 1-wide one skipped): k1 + k2
      additions a pixel instead of k1 * k2, the same means up to float rounding;
    - the replicate padding concatenates copies of the edge rows and columns, made by constant 0/1 matrix
      products (pick the first and last value along the axis, then place them in the padding's places), which
      are exact. A ``replicate`` pad itself has no XNNPACK op: ExecuTorch decomposes it into index ops that stay
      outside the delegate and split the program into pieces.
    """

    pick_h: torch.Tensor  # buffers registered in __init__ for a kernel: (2, pooled length) picks,
    before_h: torch.Tensor  # (pad, 2) placements
    after_h: torch.Tensor
    pick_w: torch.Tensor
    before_w: torch.Tensor
    after_w: torch.Tensor

    def __init__(
        self,
        kernel_size: tuple[int, int] | None = None,
        pad: tuple[int, int, int, int] = (0, 0, 0, 0),
        size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.pad = pad
        self.size = size
        if kernel_size is None:
            return
        if size is None:
            raise ValueError("a local FixedPool needs the feature map size it is fixed for")
        (k1, k2), (h, w), (left, right, top, bottom) = kernel_size, size, pad
        if left + right != k2 - 1 or top + bottom != k1 - 1 or not (0 < k1 <= h and 0 < k2 <= w):
            raise ValueError(f"kernel {kernel_size} with pad {pad} does not restore a {h}x{w} map")
        for axis, pooled, before, after in (("h", h - k1 + 1, top, bottom), ("w", w - k2 + 1, left, right)):
            pick = torch.zeros(2, pooled)
            pick[0, 0] = pick[1, pooled - 1] = 1.0
            self.register_buffer(f"pick_{axis}", pick, persistent=False)
            self.register_buffer(f"before_{axis}", torch.tensor([[1.0, 0.0]]).repeat(before, 1), persistent=False)
            self.register_buffer(f"after_{axis}", torch.tensor([[0.0, 1.0]]).repeat(after, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_size is None:
            return x.mean((2, 3), keepdim=True)
        k1, k2 = self.kernel_size
        if k1 > 1:
            x = F.avg_pool2d(x, (k1, 1), stride=1)
        if k2 > 1:
            x = F.avg_pool2d(x, (1, k2), stride=1)
        if k1 > 1:  # the edge copies of the small pooled map first, then of the taller one
            x = _with_edge_copies(x, self.pick_h, self.before_h, self.after_h, dim=2)
        if k2 > 1:
            x = _with_edge_copies(x, self.pick_w, self.before_w, self.after_w, dim=3)
        return x

    def extra_repr(self) -> str:
        return "global" if self.kernel_size is None else f"kernel={self.kernel_size}, pad={self.pad}, size={self.size}"


def _with_edge_copies(
    x: torch.Tensor, pick: torch.Tensor, before: torch.Tensor, after: torch.Tensor, *, dim: int
) -> torch.Tensor:
    """``x`` with copies of its first and last slices along ``dim`` (2: rows, 3: columns) concatenated before and
    after it, as many as ``before`` and ``after`` have rows. The copies are linear ops on a rank-3 view (Core ML's
    ``linear`` takes rank 1 to 3) with that axis last: the rows' copies are made transposed and turned back."""
    t = x.transpose(2, 3) if dim == 2 else x
    n, c, rows, length = t.shape
    edges = F.linear(t.reshape(n, c * rows, length), pick)

    def copies(place: torch.Tensor) -> torch.Tensor | None:
        if not place.shape[0]:
            return None
        out = F.linear(edges, place).reshape(n, c, rows, place.shape[0])
        return out.transpose(2, 3) if dim == 2 else out

    return torch.cat([p for p in (copies(before), x, copies(after)) if p is not None], dim=dim)


class DeployBlock(nn.Module):
    """A NAFBlock whose pieces the passes fold and split.

    Starts holding the trained block's modules (``norm1/2`` with affine, ``conv1/2/4`` producing both gate
    halves, ``beta``/``gamma``); after the passes, ``conv1a/conv1b`` etc. produce the halves separately and
    beta/gamma/affine are gone.
    """

    def __init__(self) -> None:
        super().__init__()
        self.norm1: ChannelNorm
        self.norm2: ChannelNorm
        self.pool: nn.Module
        self.sca: nn.Conv2d
        self.conv3: nn.Conv2d
        self.conv5: nn.Conv2d
        self.beta: nn.Parameter | None = None
        self.gamma: nn.Parameter | None = None
        # either the joint producers ...
        self.conv1: nn.Conv2d | None = None
        self.conv2: nn.Conv2d | None = None
        self.conv4: nn.Conv2d | None = None
        # ... or the split ones
        self.conv1a: nn.Conv2d | None = None
        self.conv1b: nn.Conv2d | None = None
        self.conv2a: nn.Conv2d | None = None
        self.conv2b: nn.Conv2d | None = None
        self.conv4a: nn.Conv2d | None = None
        self.conv4b: nn.Conv2d | None = None

    @property
    def is_split(self) -> bool:
        return self.conv1 is None

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.norm1(inp)
        if self.conv1 is not None and self.conv2 is not None:
            x1, x2 = self.conv2(self.conv1(x)).chunk(2, dim=1)
        else:
            x1 = self.conv2a(self.conv1a(x))  # type: ignore[misc]
            x2 = self.conv2b(self.conv1b(x))  # type: ignore[misc]
        x = x1 * x2
        x = self.conv3(x * self.sca(self.pool(x)))
        y = inp + (x * self.beta if self.beta is not None else x)
        x = self.norm2(y)
        if self.conv4 is not None:
            x1, x2 = self.conv4(x).chunk(2, dim=1)
        else:
            x1, x2 = self.conv4a(x), self.conv4b(x)  # type: ignore[misc]
        x = self.conv5(x1 * x2)
        return y + (x * self.gamma if self.gamma is not None else x)


class DeployBaselineBlock(nn.Module):
    """A Baseline block (GELU and squeeze-excitation where NAFBlock gates) whose pieces the passes fold.

    ``norm1 -> conv1 -> depthwise conv2 -> GELU -> x * SE(x) -> conv3 -> y = inp + x*beta``, then
    ``norm2 -> conv4 -> GELU -> conv5 -> y + x*gamma``, with ``SE(x) = sigmoid(se_expand(relu(se_reduce(pool(x)))))``.
    The folds are NAFBlock's (norm affine into conv1/conv4, beta/gamma into conv3/conv5); there is no gate to
    split. GELU stays the exact (erf) form: every target has an op for it (``docs/deploy-graph.md``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.norm1: ChannelNorm
        self.norm2: ChannelNorm
        self.conv1: nn.Conv2d
        self.conv2: nn.Conv2d
        self.pool: nn.Module
        self.se_reduce: nn.Conv2d  # dw -> dw/2, then ReLU
        self.se_expand: nn.Conv2d  # dw/2 -> dw, then sigmoid
        self.conv3: nn.Conv2d
        self.conv4: nn.Conv2d
        self.conv5: nn.Conv2d
        self.beta: nn.Parameter | None = None
        self.gamma: nn.Parameter | None = None

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv2(self.conv1(self.norm1(inp))))
        x = x * torch.sigmoid(self.se_expand(F.relu(self.se_reduce(self.pool(x)))))
        x = self.conv3(x)
        y = inp + (x * self.beta if self.beta is not None else x)
        x = self.conv5(F.gelu(self.conv4(self.norm2(y))))
        return y + (x * self.gamma if self.gamma is not None else x)


AnyDeployBlock = DeployBlock | DeployBaselineBlock


class DeployNAFNet(nn.Module):
    """The U-Net of NAFNet and Baseline over deploy blocks; inputs must already be padded to ``pad_multiple``."""

    recipe: DeployRecipe  # how the graph was made; set by ``deploy()``

    def __init__(
        self,
        *,
        intro: nn.Conv2d,
        ending: nn.Conv2d,
        encoders: nn.ModuleList,
        downs: nn.ModuleList,
        middle_blks: nn.Sequential,
        ups: nn.ModuleList,
        decoders: nn.ModuleList,
        pad_multiple: int,
    ) -> None:
        super().__init__()
        self.intro, self.ending = intro, ending
        self.encoders, self.downs, self.middle_blks = encoders, downs, middle_blks
        self.ups, self.decoders = ups, decoders
        self.pad_multiple = pad_multiple

    @property
    def in_channels(self) -> int:
        """Channels of the graph's input."""
        return int(self.intro.in_channels)

    def blocks(self) -> list[AnyDeployBlock]:
        stages = [*self.encoders, self.middle_blks, *self.decoders]
        return [b for stage in stages for b in stage]

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.intro(inp)
        skips = []
        for encoder, down in zip(self.encoders, self.downs, strict=True):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.middle_blks(x)
        for decoder, up, skip in zip(self.decoders, self.ups, reversed(skips), strict=True):
            x = decoder(up(x) + skip)
        return self.ending(x) + inp


class PadCrop(nn.Module):
    """Zero-pad right/bottom to the deploy graph's multiple, run it, crop back: the original model's contract."""

    def __init__(self, graph: DeployNAFNet) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.graph.pad_multiple
        y = self.graph(F.pad(x, (0, (m - w % m) % m, 0, (m - h % m) % m)))
        return y[..., :h, :w]
