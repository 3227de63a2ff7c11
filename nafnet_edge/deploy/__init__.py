"""The deploy graph: a trained NAFNet rewritten, exactly, into the form every backend lowers well.

``deploy(model, target=..., input_size=...)`` copies the model and applies, in order:

1. ``to_deploy_modules``      same function, modules the passes can rewrite (no dropout or training parts)
2. ``fold_layernorm_affine``  LayerNorm weight/bias into the following 1x1 convs (conv1, conv4)
3. ``fold_beta_gamma``        beta into conv3, gamma into conv5
4. ``split_simple_gate``      each SimpleGate half from its own convs: no channel slice/chunk left
5. ``transposed_conv_upsampling``  1x1 conv + PixelShuffle(2) as one ConvTranspose2d(k=2, s=2)
6. ``scale_residual_stream``  the residual stream divided by a power of two (weights rescaled, eps / s^2), so
                              the norms' fp16 reductions cannot overflow; no op added
7. ``set_norm_form``          the channel normalization in the form the target delegates
8. ``fix_pooling``            (with ``input_size``) global mean or TLC box mean fixed for that size, no cumsum

The result expects inputs already zero-padded to ``pad_multiple``; wrap it in ``PadCrop`` to get the
original model's any-size contract.
"""

from __future__ import annotations

from typing import Literal

from nafnet_edge.deploy.modules import ChannelNorm, DeployBlock, DeployNAFNet, FixedPool, NormForm, PadCrop
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
from nafnet_edge.model import NAFNet

Target = Literal["generic", "xnnpack", "coreml", "openvino", "onnx"]
NORM_FORMS: dict[str, NormForm] = {
    "generic": "reference",
    "xnnpack": "conv-mean",
    "coreml": "layer-norm",
    "openvino": "mvn",
    "onnx": "mvn",
}
DEFAULT_STREAM_SCALE = 16.0  # |x| up to 4096 keeps the norms' squares below fp16's 65504

TRANSFORMATIONS = (
    "fold_layernorm_affine",
    "fold_beta_gamma",
    "split_simple_gate",
    "transposed_conv_upsampling",
    "scale_residual_stream",
    "set_norm_form",
    "fix_pooling",
)


def deploy(
    model: NAFNet,
    *,
    target: Target = "generic",
    input_size: tuple[int, int] | None = None,
    stream_scale: float = DEFAULT_STREAM_SCALE,
) -> DeployNAFNet:
    """A new inference-only module computing ``model``'s function; ``model`` itself is left untouched.

    ``input_size`` (padded height, width) fixes TLC pooling for a static-shape export; without it, pooling
    keeps the original shape-dependent rule. ``stream_scale`` (a power of two, 1 to 64) divides the residual
    stream for fp16 safety; it changes weights, not the op count.
    """
    if target not in NORM_FORMS:
        raise OptionError(f"unknown deploy target {target!r}; choose one of {', '.join(NORM_FORMS)}")
    graph = to_deploy_modules(model)
    for block in graph.blocks():
        fold_layernorm_affine(block)
        fold_beta_gamma(block)
        split_simple_gate(block)
    transposed_conv_upsampling(graph)
    scale_residual_stream(graph, stream_scale)
    for block in graph.blocks():
        set_norm_form(block, NORM_FORMS[target])
    if input_size is not None:
        fix_pooling(graph, input_size)
    return graph


__all__ = [
    "DEFAULT_STREAM_SCALE",
    "ChannelNorm",
    "DeployBlock",
    "DeployNAFNet",
    "FixedPool",
    "PadCrop",
    "NORM_FORMS",
    "TRANSFORMATIONS",
    "deploy",
    "fix_pooling",
    "fold_beta_gamma",
    "fold_layernorm_affine",
    "scale_residual_stream",
    "set_norm_form",
    "split_simple_gate",
    "to_deploy_modules",
    "transposed_conv_upsampling",
]
