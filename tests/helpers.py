"""Shared test helpers (tests/ is on sys.path through pytest's `pythonpath` setting)."""

from __future__ import annotations

import torch

from nafnet_edge.model import NAFNet


def randomize(model: NAFNet, seed: int = 0) -> NAFNet:
    """Non-trivial values everywhere, at image-range magnitudes: beta/gamma and LayerNorm affine away from
    their init, convs at half the default scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("beta", "gamma")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif ".norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 / p[0].numel() ** 0.5)
    return model.eval()
