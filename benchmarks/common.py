"""Shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this folder is on sys.path)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import sys
from pathlib import Path
from typing import Any

import torch

from nafnet_edge.model import RestorationNet, build_model
from nafnet_edge.releases import RELEASE_SHAPES


def random_release_shape(shape: str, *, seed: int = 0, beta_gamma_std: float = 0.1) -> RestorationNet:
    """A model of a released shape with random weights (speed and memory do not depend on the weights);
    beta/gamma are made non-zero so every block contributes."""
    torch.manual_seed(seed)
    model = build_model(RELEASE_SHAPES[shape]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("beta", "gamma")):
                p.normal_(0, beta_gamma_std)
    return model


PACKAGES = (
    "nafnet-edge", "torch", "onnxruntime", "openvino", "nncf", "executorch", "torchao", "coremltools", "litert-torch",
    "ai-edge-litert",
)  # fmt: skip


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def run_record(script: str, *, probe: bool = True) -> dict[str, Any]:
    """Where and how a results file was made: the script and its command line, the date, the machine (CPU model,
    ISA flags, cores, memory, sgemm probe, load) and the package versions."""
    from nafnet_edge.benchmark import machine

    return {
        "script": script,
        "command": " ".join(["python", script, *sys.argv[1:]]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(probe=probe),
        "versions": versions(),
    }


def write_results(path: Path, record: dict[str, Any], **results: Any) -> None:
    """Write ``record`` (from :func:`run_record`) and ``results`` to ``path`` as one JSON object."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**record, **results}, indent=2))
