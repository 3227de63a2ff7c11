"""The model classes of the NAFNet family by name: no torch, so manifests and reports can use it."""

from __future__ import annotations

from typing import Literal

Arch = Literal["nafnet", "nafnet-local", "baseline", "baseline-local", "nafnet-sr", "nafssr"]
ARCHS: tuple[Arch, ...] = ("nafnet", "nafnet-local", "baseline", "baseline-local", "nafnet-sr", "nafssr")
Family = Literal["nafnet", "baseline", "nafnet-sr"]
LOCAL_ARCHS: frozenset[str] = frozenset({"nafnet-local", "baseline-local", "nafssr"})
CLASS_NAMES: dict[str, str] = {
    "nafnet": "NAFNet",
    "nafnet-local": "NAFNetLocal",
    "baseline": "Baseline",
    "baseline-local": "BaselineLocal",
    "nafnet-sr": "NAFNetSR",
    "nafssr": "NAFSSR",
}
FAMILIES: dict[str, Family] = {
    "nafnet": "nafnet",
    "nafnet-local": "nafnet",
    "baseline": "baseline",
    "baseline-local": "baseline",
    "nafnet-sr": "nafnet-sr",
    "nafssr": "nafnet-sr",
}
DEFAULT_TRAIN_SIZES: dict[Family, tuple[int, int]] = {
    "nafnet": (256, 256),
    "baseline": (256, 256),
    "nafnet-sr": (30, 90),  # NAFSSR's (1, 6, 30, 90): one view of the training pair
}


def local_arch(arch: Arch) -> Arch:
    """The TLC variant of ``arch`` (NAFNetSR's is NAFSSR, which holds only for a stereo checkpoint)."""
    locals_: dict[str, Arch] = {"nafnet": "nafnet-local", "baseline": "baseline-local", "nafnet-sr": "nafssr"}
    return locals_.get(arch, arch)
