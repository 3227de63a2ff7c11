"""Saving and loading deploy graphs: safetensors with the recipe in metadata, or a ``torch.export`` .pt2."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from nafnet_edge.atomic import atomic_path
from nafnet_edge.errors import CheckpointError, UsageError
from nafnet_edge.model import NAFNetConfig, build_model

DEPLOY_FORMAT = "nafnet-edge-deploy"


@dataclass(frozen=True)
class DeployRecipe:
    """What is needed to rebuild a deploy graph's structure; stored in the file's metadata."""

    config: NAFNetConfig
    target: str
    input_size: tuple[int, int] | None
    stream_scale: float

    def to_metadata(self) -> dict[str, str]:
        return {
            "format": DEPLOY_FORMAT,
            "config": json.dumps(self.config.to_dict()),
            "target": self.target,
            "input_size": json.dumps(list(self.input_size) if self.input_size else None),
            "stream_scale": repr(self.stream_scale),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> DeployRecipe:
        cfg = json.loads(meta["config"])
        size = json.loads(meta["input_size"])
        return cls(
            config=NAFNetConfig(**cfg),
            target=meta["target"],
            input_size=tuple(size) if size else None,  # type: ignore[arg-type]
            stream_scale=float(meta["stream_scale"]),
        )


def build_graph(recipe: DeployRecipe):  # -> DeployNAFNet
    from nafnet_edge.deploy import deploy

    with torch.device("meta"):
        skeleton = build_model(recipe.config)
    skeleton = skeleton.to_empty(device="cpu")
    return deploy(skeleton, target=recipe.target, input_size=recipe.input_size, stream_scale=recipe.stream_scale)  # type: ignore[arg-type]


def save_deploy(
    graph: torch.nn.Module, path: str | Path, recipe: DeployRecipe, *, extra: dict[str, str] | None = None
) -> None:
    """Write the graph to ``path`` (.safetensors: weights + recipe; .pt2: a static torch.export program)."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".pt2"):
        raise UsageError(f"{path}: write the deploy graph as .safetensors or .pt2")
    if path.suffix == ".pt2" and recipe.input_size is None:
        raise UsageError("a .pt2 export has a static shape: give --input-size (e.g. 512)")
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            state = {k: v.contiguous() for k, v in graph.state_dict().items()}
            save_file(state, str(tmp), metadata={**recipe.to_metadata(), **(extra or {})})
        else:
            example = torch.zeros(1, recipe.config.img_channels, *recipe.input_size)  # type: ignore[misc]
            program = torch.export.export(graph.eval(), (example,))
            torch.export.save(program, str(tmp), extra_files={"nafnet_edge.json": json.dumps(recipe.to_metadata())})


def load_deploy(path: str | Path):  # -> DeployNAFNet
    """Rebuild a deploy graph saved as .safetensors by :func:`save_deploy`."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if meta.get("format") != DEPLOY_FORMAT:
        raise CheckpointError(f"{path} is not a deploy graph written by `nafnet-edge reparam`")
    graph = build_graph(DeployRecipe.from_metadata(meta))
    graph.load_state_dict(state, strict=True)
    return graph.eval().requires_grad_(False)
