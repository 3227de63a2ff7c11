"""The deploy graph of the NAFNet-SR family (``NAFNetSR``, stereo ``NAFSSR``): an exact re-expression for export
at one fixed low-resolution input size.

``deploy_sr(model, ...)`` copies the model into deploy modules (``to_deploy_sr``: the body's NAFBlocks become
``DeployBlock``, so the NAFNet block passes apply to them unchanged) and runs ``SR_PASSES`` in order:

1. ``fold_layernorm_affine``  block norms into conv1/conv4; SCAM's norm_l/norm_r into l_proj1/r_proj1
2. ``fold_beta_gamma``        beta/gamma into conv3/conv5; SCAM's beta into r_proj2, gamma into l_proj2
                              (``softmax(A) @ (V * b) == (softmax(A) @ V) * b`` for a per-channel b)
3. ``fold_attention_scale``   SCAM's 1/sqrt(C) into l_proj1 (weights and bias): the scores come out scaled
4. ``split_simple_gate``      each SimpleGate half from its own convs
5. ``scale_residual_stream``  the body's features divided by a power of two (intro, conv3, conv5 and the
                              value projections l/r_proj2 divided; ``up`` multiplied; norm eps / s^2): the norms'
                              fp16 reductions stay finite; no op added
6. ``set_norm_form``          every channel norm (blocks and SCAM) in the form the backend delegates
7. ``fix_pooling``            (with ``input_size``) global mean, or NAFSSR's TLC box mean at that view size
8. ``split_views``            (NAFSSR) the intro conv of each view as a conv over the whole 6-channel input
                              whose weights are zero outside its view: no channel slice in the graph (quantized
                              slices feeding a conv fail to load in XNNPACK), the same sums

The stereo pair is one 6-channel tensor, left RGB then right RGB (upstream's layout), in and out: every target
takes and returns one tensor, the tiler cuts both views alike, and an app packs two planar RGB buffers one after
the other. SCAM attends along rows as batched matmuls ``(N*H, W, C) x (N*H, C, W)`` with softmax over the last
axis (each runtime's softmax subtracts the row maximum itself). The upsampling head stays a 3x3 conv and a
PixelShuffle (depth-to-space), and the residual a bilinear resize (``align_corners=False``, half-pixel centres),
both ops every target has.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from nafnet_edge.deploy.modules import ChannelNorm, DeployBlock, FixedPool, NormForm
from nafnet_edge.deploy.passes import (
    _norm_from,
    _rescaled,
    fixed_pool,
    fold_beta_gamma,
    fold_layernorm_affine,
    fold_norm_affine_into,
    fold_scale_into,
    scale_block_stream,
    set_norm_form,
    split_simple_gate,
)
from nafnet_edge.errors import OptionError
from nafnet_edge.model import SCAM, ChannelPool, NAFBlockSR, NAFNetConfig, NAFNetSR, tlc_kernel_sizes

if TYPE_CHECKING:
    from nafnet_edge.deploy.pipeline import DeployRecipe


class DeploySCAM(nn.Module):
    """SCAM whose norms, scales and beta/gamma the passes fold into its projections.

    ``Q_l = l_proj1(norm_l(x_l)) * scale``, ``Q_r = r_proj1(norm_r(x_r))``, ``A = Q_l Q_r^T`` per row;
    ``x_l + softmax(A) V_r * beta``, ``x_r + softmax(A^T) V_l * gamma`` with ``V_r = r_proj2(x_r)``,
    ``V_l = l_proj2(x_l)``. After the passes ``scale``, ``beta``, ``gamma`` and the norms' affine are gone.
    """

    def __init__(self, scam: SCAM) -> None:
        super().__init__()
        self.norm_l, self.norm_r = _norm_from(scam.norm_l), _norm_from(scam.norm_r)
        self.l_proj1, self.r_proj1 = scam.l_proj1, scam.r_proj1
        self.l_proj2, self.r_proj2 = scam.l_proj2, scam.r_proj2
        self.beta: nn.Parameter | None = scam.beta
        self.gamma: nn.Parameter | None = scam.gamma
        self.scale: float | None = float(scam.scale)

    def norms(self) -> tuple[ChannelNorm, ChannelNorm]:
        return self.norm_l, self.norm_r

    def forward(self, x_l: torch.Tensor, x_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q_l = self.l_proj1(self.norm_l(x_l))
        if self.scale is not None:
            q_l = q_l * self.scale
        q_r = self.r_proj1(self.norm_r(x_r))
        n, c, h, w = q_l.shape
        scores = torch.bmm(_rows(q_l), _columns(q_r))  # (N*H, W_left, W_right)
        r2l = torch.bmm(torch.softmax(scores, dim=-1), _rows(self.r_proj2(x_r)))
        l2r = torch.bmm(torch.softmax(scores.transpose(1, 2), dim=-1), _rows(self.l_proj2(x_l)))
        r2l, l2r = _unrows(r2l, n, h), _unrows(l2r, n, h)
        if self.beta is not None:
            r2l = r2l * self.beta
        if self.gamma is not None:
            l2r = l2r * self.gamma
        return x_l + r2l, x_r + l2r


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H, W, C): one matrix per image row."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n * h, w, c)


def _columns(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H, C, W): each row's matrix transposed."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 1, 3).reshape(n * h, c, w)


def _unrows(t: torch.Tensor, n: int, h: int) -> torch.Tensor:
    """(N*H, W, C) -> (N, C, H, W)."""
    _, w, c = t.shape
    return t.reshape(n, h, w, c).permute(0, 3, 1, 2)


class DeploySRBlock(nn.Module):
    """One body block: the NAFBlock (as a ``DeployBlock``) on every view, then SCAM between two views."""

    def __init__(self, blk: DeployBlock, fusion: DeploySCAM | None) -> None:
        super().__init__()
        self.blk = blk
        self.fusion = fusion

    def forward(self, *feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.blk(*feats) if isinstance(self.blk, PerView) else tuple(self.blk(x) for x in feats)
        if self.fusion is not None:
            feats = self.fusion(*feats)
        return feats


class DeploySR(nn.Module):
    """NAFNetSR / NAFSSR over deploy blocks: views on the channel axis in and out, output ``up_scale`` times the
    input size; the residual is the input resized bilinearly (half-pixel centres)."""

    recipe: DeployRecipe  # how the graph was made; set by ``deploy_sr``

    intro: nn.Conv2d | ViewIntro

    def __init__(self, *, intro: nn.Conv2d, body: nn.ModuleList, up: nn.Sequential, views: int, up_scale: int) -> None:
        super().__init__()
        self.intro, self.body, self.up = intro, body, up
        self.views, self.up_scale = views, up_scale
        self.view_channels = int(intro.in_channels)
        self.pad_multiple = 1  # no levels: any size

    @property
    def in_channels(self) -> int:
        """Channels of the graph's input (views stacked on the channel axis)."""
        return self.view_channels * self.views

    def blocks(self) -> list[DeployBlock]:
        return [cast(DeploySRBlock, b).blk for b in self.body]

    def attentions(self) -> list[DeploySCAM]:
        return [cast(DeploySCAM, b.fusion) for b in self.body if b.fusion is not None]

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        residual = F.interpolate(inp, scale_factor=self.up_scale, mode="bilinear", align_corners=False)
        if isinstance(self.intro, ViewIntro):
            feats = self.intro(inp)
        else:
            c = self.view_channels
            views = tuple(inp[:, i * c : (i + 1) * c] for i in range(self.views)) if self.views > 1 else (inp,)
            feats = tuple(self.intro(v) for v in views)
        for block in self.body:
            feats = block(*feats)
        out = self.up(*feats) if isinstance(self.up, PerView) else [self.up(f) for f in feats]
        return (torch.cat(out, dim=1) if len(out) > 1 else out[0]) + residual


class ViewIntro(nn.Module):
    """The intro conv of each view of a stacked stereo input as its own conv over all the input's channels, the
    weights zero outside the view: the per-view features without slicing the input."""

    def __init__(self, conv: nn.Conv2d, views: int) -> None:
        super().__init__()
        c = conv.in_channels
        self.convs = nn.ModuleList()
        for i in range(views):
            view = nn.Conv2d(c * views, conv.out_channels, 3, padding=1)  # the intro is a 3x3 'same' conv
            weight = torch.zeros_like(view.weight)
            weight[:, i * c : (i + 1) * c] = conv.weight
            view.weight = nn.Parameter(weight, requires_grad=False)
            view.bias = nn.Parameter(cast(torch.Tensor, conv.bias).detach().clone(), requires_grad=False)
            self.convs.append(view)

    def forward(self, inp: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(conv(inp) for conv in self.convs)


class PerView(nn.Module):
    """One copy of a module per view, each applied to its own view."""

    def __init__(self, module: nn.Module, views: int) -> None:
        super().__init__()
        self.views = nn.ModuleList([module] + [copy.deepcopy(module) for _ in range(views - 1)])

    def forward(self, *feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(m(x) for m, x in zip(self.views, feats, strict=True))


def unshared(graph: DeploySR) -> DeploySR:
    """A copy of ``graph`` whose views run their own copies of the modules they share (the body's blocks and the
    upsampling head): the same function with the weights once per view. For PT2E int8: XNNPACK refuses to load
    a convolution whose quantized weight also feeds another convolution."""
    graph = copy.deepcopy(graph)
    if graph.views > 1:
        for block in graph.body:
            block.blk = PerView(cast(nn.Module, block.blk), graph.views)
        graph.up = PerView(graph.up, graph.views)  # type: ignore[assignment]
    return graph


def to_deploy_sr(model: NAFNetSR) -> DeploySR:
    """An independent copy of ``model`` as deploy modules computing the same function (nothing folded yet)."""
    model = copy.deepcopy(model).eval()
    body = nn.ModuleList()
    for wrapper in model.body:
        sr = cast(NAFBlockSR, wrapper.module)
        blk = sr.blk
        d = DeployBlock()
        d.norm1, d.norm2 = _norm_from(blk.norm1), _norm_from(blk.norm2)
        d.conv1, d.conv2, d.conv3, d.conv4, d.conv5 = blk.conv1, blk.conv2, blk.conv3, blk.conv4, blk.conv5
        d.pool, d.sca = blk.sca[0], cast(nn.Conv2d, blk.sca[1])
        d.beta, d.gamma = blk.beta, blk.gamma
        body.append(DeploySRBlock(d, DeploySCAM(sr.fusion) if sr.fusion is not None else None))
    config = model.config
    graph = DeploySR(intro=model.intro, body=body, up=model.up, views=config.views, up_scale=config.up_scale)
    return graph.eval().requires_grad_(False)


# --- passes ------------------------------------------------------------------------------------------------------


def fold_scam_norm_affine(scam: DeploySCAM) -> None:
    """norm_l's weight/bias into l_proj1, norm_r's into r_proj1 (as ``fold_layernorm_affine`` does for blocks)."""
    fold_norm_affine_into(scam, scam.norm_l, "l_proj1")
    fold_norm_affine_into(scam, scam.norm_r, "r_proj1")


def fold_scam_beta_gamma(scam: DeploySCAM) -> None:
    """beta into r_proj2 and gamma into l_proj2: attention averages values per channel, so scaling the values'
    channels scales its output's."""
    fold_scale_into(scam, "beta", "r_proj2")
    fold_scale_into(scam, "gamma", "l_proj2")


def fold_attention_scale(scam: DeploySCAM) -> None:
    """SCAM's 1/sqrt(C) into l_proj1's weights and bias: the scores come out of the matmul already scaled."""
    if scam.scale is None:
        return
    conv = scam.l_proj1
    scam.l_proj1 = _rescaled(conv, scam.scale, scam.scale)
    scam.scale = None


def scale_sr_stream(graph: DeploySR, scale: float) -> None:
    """Carry the body's features divided by ``scale`` (a power of two, exact in floating point): intro, conv3,
    conv5 and the value projections (l/r_proj2, whose outputs are added into the stream) divided, ``up``'s weights
    multiplied, every norm's eps divided by ``scale**2`` (a norm's output does not change with its input's scale,
    so the query projections keep their weights)."""
    if not (1 <= scale <= 64 and float(scale).is_integer() and int(scale) & (int(scale) - 1) == 0):
        raise OptionError(f"stream scale must be a power of two from 1 to 64, got {scale}")
    if scale == 1:
        return
    inv = 1.0 / scale
    graph.intro = _rescaled(cast(nn.Conv2d, graph.intro), inv, inv)
    graph.up[0] = _rescaled(cast(nn.Conv2d, graph.up[0]), scale, 1.0)
    for block in graph.blocks():
        scale_block_stream(block, inv)
    for scam in graph.attentions():
        if scam.beta is not None or scam.gamma is not None:
            raise ValueError("fold SCAM's beta/gamma before scaling the residual stream")
        scam.l_proj2 = _rescaled(scam.l_proj2, 1.0, inv)
        scam.r_proj2 = _rescaled(scam.r_proj2, 1.0, inv)
        for norm in scam.norms():
            norm.eps = norm.eps * inv * inv


def fix_sr_pooling(graph: DeploySR, kernel: tuple[int, int] | None, input_size: tuple[int, int]) -> None:
    """Every block's pooling fixed for one view of ``input_size``: global mean, or TLC's box mean of ``kernel``
    (NAFSSR) clipped to the view and replicate-padded back, as ``ChannelPool`` computes it at that size."""
    for block in graph.blocks():
        if not isinstance(block.pool, FixedPool):
            block.pool = fixed_pool(kernel, input_size)


SRPass = Callable[[DeploySR, "SRSettings"], None]


@dataclass(frozen=True)
class SRSettings:
    """What the SR passes are parameterized by (``deploy_sr``'s keyword arguments; ``kernel``: NAFSSR's TLC)."""

    norm_form: NormForm
    input_size: tuple[int, int] | None
    stream_scale: float
    kernel: tuple[int, int] | None


def _each(block_pass: Callable[[DeployBlock], None], scam_pass: Callable[[DeploySCAM], None] | None) -> SRPass:
    def run(graph: DeploySR, settings: SRSettings) -> None:
        for block in graph.blocks():
            block_pass(block)
        for scam in graph.attentions() if scam_pass is not None else ():
            scam_pass(scam)  # type: ignore[misc]

    return run


def _attention_scale(graph: DeploySR, settings: SRSettings) -> None:
    for scam in graph.attentions():
        fold_attention_scale(scam)


def _stream(graph: DeploySR, settings: SRSettings) -> None:
    scale_sr_stream(graph, settings.stream_scale)


def _norm_form(graph: DeploySR, settings: SRSettings) -> None:
    for block in graph.blocks():
        set_norm_form(block, settings.norm_form)
    for scam in graph.attentions():
        for norm in scam.norms():
            norm.form = settings.norm_form


def _pooling(graph: DeploySR, settings: SRSettings) -> None:
    if settings.input_size is not None:
        fix_sr_pooling(graph, settings.kernel, settings.input_size)


def _split_views(graph: DeploySR, settings: SRSettings) -> None:
    if graph.views > 1 and not isinstance(graph.intro, ViewIntro):
        graph.intro = ViewIntro(graph.intro, graph.views)


SR_PASSES: list[tuple[str, SRPass]] = [
    ("fold_layernorm_affine", _each(fold_layernorm_affine, fold_scam_norm_affine)),
    ("fold_beta_gamma", _each(fold_beta_gamma, fold_scam_beta_gamma)),
    ("fold_attention_scale", _attention_scale),
    ("split_simple_gate", _each(split_simple_gate, None)),
    ("scale_residual_stream", _stream),
    ("set_norm_form", _norm_form),
    ("fix_pooling", _pooling),
    ("split_views", _split_views),
]


def deploy_sr(
    model: NAFNetSR,
    *,
    norm_form: NormForm = "reference",
    input_size: tuple[int, int] | None = None,
    stream_scale: float = 16.0,
    metadata: Mapping[str, str] | None = None,
) -> DeploySR:
    """The deploy graph of a NAFNetSR or NAFSSR (see the module docstring), with ``graph.recipe``; ``input_size`` is
    the low-resolution (height, width) of one view."""
    from nafnet_edge.deploy.pipeline import DeployRecipe, check_norm_form
    from nafnet_edge.manifest import IOSpec

    config: NAFNetConfig = model.config
    form = check_norm_form(norm_form)
    size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
    kernel = tlc_kernel_sizes(config)[0] if config.local else None
    settings = SRSettings(form, size, stream_scale, kernel)
    graph = to_deploy_sr(model)
    for _, run in SR_PASSES:
        run(graph, settings)
    graph.recipe = DeployRecipe(
        arch=config.class_name,  # type: ignore[arg-type]
        config=config.to_dict(),
        io=None if size is None else IOSpec.image(config.in_channels, size, scale=config.up_scale),
        stream_scale=float(stream_scale),
        norm_form=form,
        local_pooling=local_kernels(graph),
        passes=tuple(name for name, _ in SR_PASSES),
        metadata={str(k): str(v) for k, v in (metadata or {}).items()},
        input_size=size,
    )
    return graph


def local_kernels(graph: DeploySR) -> tuple[tuple[int, int], ...]:
    """Kernel sizes of the channel-attention pools that are not global, in graph order (the recipe's
    ``local_pooling``)."""
    pools = (m for m in graph.modules() if isinstance(m, FixedPool | ChannelPool))
    return tuple((int(p.kernel_size[0]), int(p.kernel_size[1])) for p in pools if p.kernel_size is not None)


def max_attention_score(graph: DeploySR, x: torch.Tensor) -> float:
    """The largest |score| SCAM's softmax sees on input ``x`` (a deploy graph with its scale folded or not):
    how far the scores are from fp16's limit (65504) and from exp's overflow without the row maximum."""
    found = [0.0]

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: object) -> None:
        scam = cast(DeploySCAM, module)
        q_l = scam.l_proj1(scam.norm_l(args[0])) * (scam.scale if scam.scale is not None else 1.0)
        q_r = scam.r_proj1(scam.norm_r(args[1]))
        found[0] = max(found[0], float(torch.bmm(_rows(q_l), _columns(q_r)).abs().max()))

    handles = [m.register_forward_hook(hook) for m in graph.attentions()]
    try:
        with torch.no_grad():
            graph(x)
    finally:
        for h in handles:
            h.remove()
    return found[0] if math.isfinite(found[0]) else math.inf


__all__ = [
    "SR_PASSES",
    "DeploySCAM",
    "DeploySR",
    "DeploySRBlock",
    "deploy_sr",
    "fix_sr_pooling",
    "fold_attention_scale",
    "fold_scam_beta_gamma",
    "fold_scam_norm_affine",
    "max_attention_score",
    "scale_sr_stream",
    "to_deploy_sr",
]
