"""The deploy recipe: the ordered pass list ``deploy`` runs, and the typed record it leaves on the graph.

``PASSES`` is the pass manager: an ordered list of ``(name, pass)``; each pass takes the graph and the
``DeploySettings`` and rewrites the graph in place, keeping its function. ``deploy`` runs exactly these, in this
order, after copying the model into deploy modules (``to_deploy_modules``), and records their names in
``graph.recipe.passes`` (and so in every manifest's ``deploy.passes``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

from nafnet_edge.deploy.modules import AnyDeployBlock, DeployNAFNet, FixedPool, NormForm
from nafnet_edge.deploy.passes import (
    fix_pooling,
    fold_beta_gamma,
    fold_layernorm_affine,
    scale_residual_stream,
    set_norm_form,
    split_simple_gate,
    to_deploy_modules,
    transposed_conv_upsampling,
)
from nafnet_edge.errors import OptionError
from nafnet_edge.model import ChannelPool, NAFNetConfig, RestorationNet, UNet

if TYPE_CHECKING:
    from nafnet_edge.manifest import IOSpec

Arch = Literal["NAFNet", "NAFNetLocal", "Baseline", "BaselineLocal"]
DEPLOY_FAMILIES = ("nafnet", "baseline")  # the U-Nets: NAFNet, Baseline and their TLC classes
NORM_FORM_NAMES: tuple[NormForm, ...] = get_args(NormForm)
DEFAULT_STREAM_SCALE = 16.0  # |x| up to 4096 keeps the norms' squares below fp16's 65504


@dataclass(frozen=True)
class DeploySettings:
    """What the passes are parameterized by (``deploy``'s keyword arguments)."""

    norm_form: NormForm = "reference"
    input_size: tuple[int, int] | None = None  # padded height, width; None keeps shape-dependent pooling
    stream_scale: float = DEFAULT_STREAM_SCALE


Pass = Callable[[DeployNAFNet, DeploySettings], None]


def _per_block(rewrite: Callable[[AnyDeployBlock], None]) -> Pass:
    """A block rewrite applied to every block, as a graph pass."""

    def run(graph: DeployNAFNet, settings: DeploySettings) -> None:
        for block in graph.blocks():
            rewrite(block)

    run.__name__ = rewrite.__name__
    run.__doc__ = rewrite.__doc__
    return run


def _upsampling(graph: DeployNAFNet, settings: DeploySettings) -> None:
    transposed_conv_upsampling(graph)


def _stream_scale(graph: DeployNAFNet, settings: DeploySettings) -> None:
    scale_residual_stream(graph, settings.stream_scale)


def _norm_form(graph: DeployNAFNet, settings: DeploySettings) -> None:
    for block in graph.blocks():
        set_norm_form(block, settings.norm_form)


def _pooling(graph: DeployNAFNet, settings: DeploySettings) -> None:
    if settings.input_size is not None:  # without a size, pooling keeps the original shape-dependent rule
        fix_pooling(graph, settings.input_size)


PASSES: list[tuple[str, Pass]] = [
    ("fold_layernorm_affine", _per_block(fold_layernorm_affine)),
    ("fold_beta_gamma", _per_block(fold_beta_gamma)),
    ("split_simple_gate", _per_block(split_simple_gate)),
    ("transposed_conv_upsampling", _upsampling),
    ("scale_residual_stream", _stream_scale),
    ("set_norm_form", _norm_form),
    ("fix_pooling", _pooling),
]


@dataclass(frozen=True)
class DeployRecipe:
    """How a deploy graph was made and what every artifact of it embeds; ``deploy`` sets it as ``graph.recipe``.

    ``local_pooling`` lists the kernel (height, width) of every channel-attention pool that is not global, in
    graph order: TLC's box means at the export size (empty for NAFNet, and for TLC where the size is within the
    kernels). ``metadata`` holds the str -> str manifest essentials that exporters write into the artifact.
    ``io`` describes the graph's tensors when the input size is fixed (None otherwise).
    """

    arch: Arch
    config: dict[str, Any]  # NAFNetConfig.to_dict()
    io: IOSpec | None
    stream_scale: float
    norm_form: NormForm
    local_pooling: tuple[tuple[int, int], ...]
    passes: tuple[str, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)
    input_size: tuple[int, int] | None = None  # padded height, width that pooling is fixed for

    @property
    def model_config(self) -> NAFNetConfig:
        return NAFNetConfig(**self.config)

    @property
    def channels(self) -> int:
        return int(self.config["img_channels"])

    @property
    def pad_multiple(self) -> int:
        return self.model_config.pad_multiple

    @property
    def is_tlc(self) -> bool:
        """TLC (NAFNetLocal, BaselineLocal): pooling depends on the input size even where it is global at this
        one."""
        return self.model_config.local


def check_norm_form(name: str) -> NormForm:
    """``name`` as a norm form; an ``OptionError`` naming the forms otherwise."""
    if name not in NORM_FORM_NAMES:
        raise OptionError(f"unknown deploy norm form {name!r}; choose one of {', '.join(NORM_FORM_NAMES)}")
    return name  # narrowed to NormForm by the membership test


def local_pooling(graph: DeployNAFNet) -> tuple[tuple[int, int], ...]:
    """Kernel sizes of the channel-attention pools that are not global, in graph order."""
    pools = (m for m in graph.modules() if isinstance(m, FixedPool | ChannelPool))
    return tuple((int(p.kernel_size[0]), int(p.kernel_size[1])) for p in pools if p.kernel_size is not None)


def io_spec(channels: int, input_size: tuple[int, int] | None) -> IOSpec | None:
    """The graph's tensors (image in, restored image out, same size); None without a fixed input size."""
    if input_size is None:
        return None
    from nafnet_edge.manifest import IOSpec

    return IOSpec.image(channels, input_size)


def deploy(
    model: RestorationNet,
    *,
    norm_form: NormForm = "reference",
    input_size: tuple[int, int] | None = None,
    stream_scale: float = DEFAULT_STREAM_SCALE,
    metadata: Mapping[str, str] | None = None,
) -> DeployNAFNet:
    """A new inference-only module computing ``model``'s function, with ``graph.recipe`` saying how it was made;
    ``model`` itself is left untouched.

    Runs ``PASSES`` in order. ``norm_form`` is the channel-norm form the backend delegates (a Target's
    ``norm_form``). ``input_size`` (padded height, width) fixes TLC pooling for a static-shape export; without it,
    pooling keeps the original shape-dependent rule. ``stream_scale`` (a power of two, 1 to 64) divides the
    residual stream for fp16 safety; it changes weights, not the op count. ``metadata`` (str -> str) is what
    exporters embed in the artifact.
    """
    if model.config.family == "nafnet-sr":  # NAFNetSR, NAFSSR: their own graph, with what exporters read of this one
        from nafnet_edge.deploy.sr import deploy_sr

        sr = deploy_sr(
            model,  # type: ignore[arg-type]  # the family's classes are NAFNetSR's
            norm_form=norm_form,
            input_size=input_size,
            stream_scale=stream_scale,
            metadata=metadata,
        )
        return cast(DeployNAFNet, sr)
    if not isinstance(model, UNet) or model.config.family not in DEPLOY_FAMILIES:
        raise OptionError(
            f"no deploy graph for {model.config.class_name} yet: NAFNet, NAFNetLocal, Baseline and BaselineLocal only"
        )
    form = check_norm_form(norm_form)
    settings = DeploySettings(
        norm_form=form,
        input_size=None if input_size is None else (int(input_size[0]), int(input_size[1])),
        stream_scale=stream_scale,
    )
    graph = to_deploy_modules(model)
    for _, run in PASSES:
        run(graph, settings)
    config: NAFNetConfig = model.config
    graph.recipe = DeployRecipe(
        arch=config.class_name,  # type: ignore[arg-type]  # a U-Net's: one of Arch
        config=config.to_dict(),
        io=io_spec(config.img_channels, settings.input_size),
        stream_scale=float(stream_scale),
        norm_form=form,
        local_pooling=local_pooling(graph),
        passes=tuple(name for name, _ in PASSES),
        metadata={str(k): str(v) for k, v in (metadata or {}).items()},
        input_size=settings.input_size,
    )
    return graph
