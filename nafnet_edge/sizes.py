"""Image sizes as users type them (``256``, ``512x768``), for the CLI and the targets' own options; torch-free."""

from __future__ import annotations

import argparse

MAX_SIDE_PX = 16384  # an artifact's fixed input size (tiles); larger frames are tiled


def parse_size(text: str, *, max_side: int | None = None) -> tuple[int, int]:
    """'256' -> (256, 256); '512x768' -> (512, 768) as (height, width); each side at most ``max_side``
    (default :data:`MAX_SIDE_PX`). Bad text raises ``argparse.ArgumentTypeError`` (a usage error)."""
    max_side = MAX_SIDE_PX if max_side is None else max_side
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 256 or 512x768 (height x width), got {text!r}")
    if max(parts) > max_side:
        raise argparse.ArgumentTypeError(f"expected at most {max_side} px per side, got {text!r}")
    return parts[0], parts[1]
