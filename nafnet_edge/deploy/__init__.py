"""The deploy graph: a trained NAFNet or Baseline rewritten, exactly, into the form every backend lowers well.

``deploy(model, norm_form=..., input_size=...)`` copies the model into deploy modules (``to_deploy_modules``:
same function, modules the passes can rewrite, no dropout or training parts) and runs ``PASSES`` in order:

1. ``fold_layernorm_affine``  LayerNorm weight/bias into the following 1x1 convs (conv1, conv4)
2. ``fold_beta_gamma``        beta into conv3, gamma into conv5
3. ``split_simple_gate``      each SimpleGate half from its own convs: no channel slice/chunk left (NAFNet only)
4. ``transposed_conv_upsampling``  1x1 conv + PixelShuffle(2) as one ConvTranspose2d(k=2, s=2)
5. ``scale_residual_stream``  the residual stream divided by a power of two (weights rescaled, eps / s^2), so
                              the norms' fp16 reductions cannot overflow; no op added
6. ``set_norm_form``          the channel normalization in the form the backend delegates
7. ``fix_pooling``            (with ``input_size``) global mean or TLC box mean fixed for that size, no cumsum

The result carries ``graph.recipe`` (a ``DeployRecipe``: architecture, config, norm form, stream scale, TLC
pooling at the export size, the passes run, the metadata artifacts embed). It expects inputs already
zero-padded to ``pad_multiple``; wrap it in ``PadCrop`` to get the original model's any-size contract.
"""

from __future__ import annotations

from nafnet_edge.deploy.modules import (
    ChannelNorm,
    DeployBaselineBlock,
    DeployBlock,
    DeployNAFNet,
    FixedPool,
    NormForm,
    PadCrop,
)
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
from nafnet_edge.deploy.pipeline import (
    DEFAULT_STREAM_SCALE,
    NORM_FORM_NAMES,
    PASSES,
    DeployRecipe,
    DeploySettings,
    Pass,
    check_norm_form,
    deploy,
    local_pooling,
)

__all__ = [
    "DEFAULT_STREAM_SCALE",
    "NORM_FORM_NAMES",
    "PASSES",
    "ChannelNorm",
    "DeployBaselineBlock",
    "DeployBlock",
    "DeployNAFNet",
    "DeployRecipe",
    "DeploySettings",
    "FixedPool",
    "NormForm",
    "Pass",
    "PadCrop",
    "deploy",
    "fix_pooling",
    "fold_beta_gamma",
    "fold_layernorm_affine",
    "local_pooling",
    "check_norm_form",
    "scale_residual_stream",
    "set_norm_form",
    "split_simple_gate",
    "to_deploy_modules",
    "transposed_conv_upsampling",
]
