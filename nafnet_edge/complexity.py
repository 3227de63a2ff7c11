"""Parameter and multiply-accumulate counts, computed on the meta device (no memory, no arithmetic)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from nafnet_edge.model import NAFNetConfig, build_model


def count_macs(config: NAFNetConfig, height: int = 256, width: int = 256) -> int:
    """Multiply-accumulates of one forward pass on a 1 x C x height x width input (convolutions; the
    convention behind the GMACs in the NAFNet paper: 16.05 for SIDD-width32 at 256x256)."""
    with torch.device("meta"):
        model = build_model(config)
        x = torch.empty(1, config.in_channels, height, width)
        with FlopCounterMode(display=False) as counter:
            model(x)
    return counter.get_total_flops() // 2
