"""The deploy graph: a trained NAFNet rewritten, exactly, into the form every backend lowers well.

``deploy(model, target=..., input_size=...)`` copies the model and applies, in order:

1. ``to_deploy_modules``      same function, modules the passes can rewrite (no dropout or training parts)
2. ``fold_layernorm_affine``  LayerNorm weight/bias into the following 1x1 convs (conv1, conv4)
3. ``fold_beta_gamma``        beta into conv3, gamma into conv5
4. ``split_simple_gate``      each SimpleGate half from its own convs: no channel slice/chunk left
5. ``set_norm_form``          the channel normalization in the form the target delegates, pre-scaled by a
                              power of two so fp16 reductions cannot overflow
6. ``fix_pooling``            (with ``input_size``) global mean or TLC box mean fixed for that size, no cumsum

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
    set_norm_form,
    split_simple_gate,
    to_deploy_modules,
)
from nafnet_edge.model import NAFNet

Target = Literal["generic", "xnnpack", "coreml", "openvino", "onnx"]
NORM_FORMS: dict[str, NormForm] = {
    "generic": "reference",
    "xnnpack": "conv-mean",
    "coreml": "layer-norm",
    "openvino": "mvn",
    "onnx": "mvn",
}
DEFAULT_NORM_SCALE = 128.0
NORM_SCALES = {"openvino": 1.0}  # MVN is fused and computed by the plugin; elsewhere pre-scale for fp16

TRANSFORMATIONS = (
    "fold_layernorm_affine",
    "fold_beta_gamma",
    "split_simple_gate",
    "set_norm_form",
    "fix_pooling",
)


def deploy(
    model: NAFNet,
    *,
    target: Target = "generic",
    input_size: tuple[int, int] | None = None,
    norm_scale: float | None = None,
) -> DeployNAFNet:
    """A new inference-only module computing ``model``'s function; ``model`` itself is left untouched.

    ``input_size`` (padded height, width) fixes TLC pooling for a static-shape export; without it, pooling
    keeps the original shape-dependent rule. ``norm_scale`` (a power of two) is the fp16-safety pre-scale;
    by default 128, and 1 for OpenVINO, whose fused MVN op needs the plain pattern.
    """
    if target not in NORM_FORMS:
        raise ValueError(f"unknown deploy target {target!r}; choose one of {', '.join(NORM_FORMS)}")
    if norm_scale is None:
        norm_scale = NORM_SCALES.get(target, DEFAULT_NORM_SCALE)
    graph = to_deploy_modules(model)
    for block in graph.blocks():
        fold_layernorm_affine(block)
        fold_beta_gamma(block)
        split_simple_gate(block)
        set_norm_form(block, NORM_FORMS[target], scale=norm_scale)
    if input_size is not None:
        fix_pooling(graph, input_size)
    return graph


__all__ = [
    "DEFAULT_NORM_SCALE",
    "NORM_SCALES",
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
    "set_norm_form",
    "split_simple_gate",
    "to_deploy_modules",
]
