"""Shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this folder is on sys.path)."""

from __future__ import annotations

import torch

from nafnet_edge.model import NAFNet, build_model
from nafnet_edge.releases import RELEASE_SHAPES


def random_release_shape(shape: str, *, seed: int = 0, beta_gamma_std: float = 0.1) -> NAFNet:
    """A model of a released shape with random weights (speed and memory do not depend on the weights);
    beta/gamma are made non-zero so every block contributes."""
    torch.manual_seed(seed)
    model = build_model(RELEASE_SHAPES[shape]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("beta", "gamma")):
                p.normal_(0, beta_gamma_std)
    return model
