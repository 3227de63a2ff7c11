"""Saving and loading deploy graphs: safetensors with the recipe in metadata, or a ``torch.export`` .pt2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nafnet_edge.atomic import atomic_path
from nafnet_edge.errors import CheckpointError, UsageError
from nafnet_edge.model import NAFNetConfig, build_model

if TYPE_CHECKING:
    from nafnet_edge.deploy.modules import DeployNAFNet
    from nafnet_edge.deploy.pipeline import DeployRecipe

DEPLOY_FORMAT = "nafnet-edge-deploy"


def recipe_metadata(recipe: DeployRecipe) -> dict[str, str]:
    """What a saved deploy graph stores of its ``DeployRecipe`` (str -> str), enough to rebuild its structure."""
    return {
        **recipe.metadata,
        "format": DEPLOY_FORMAT,
        "arch": recipe.arch,
        "config": json.dumps(recipe.config),
        "norm_form": recipe.norm_form,
        "input_size": json.dumps(list(recipe.input_size) if recipe.input_size else None),
        "stream_scale": repr(recipe.stream_scale),
        "passes": json.dumps(list(recipe.passes)),
    }


def build_graph(meta: dict[str, str]) -> DeployNAFNet:
    """An untrained deploy graph of the structure ``meta`` (see :func:`recipe_metadata`) describes."""
    from nafnet_edge.deploy import check_norm_form, deploy

    size = json.loads(meta["input_size"])
    with torch.device("meta"):
        skeleton = build_model(NAFNetConfig(**json.loads(meta["config"])))
    skeleton = skeleton.to_empty(device="cpu")
    return deploy(
        skeleton,
        norm_form=check_norm_form(meta["norm_form"]),
        input_size=tuple(size) if size else None,
        stream_scale=float(meta["stream_scale"]),
    )


def save_deploy(graph: DeployNAFNet, path: str | Path, *, extra: dict[str, str] | None = None) -> None:
    """Write the graph made by ``deploy`` to ``path`` (.safetensors: weights + its recipe; .pt2: a static
    torch.export program)."""
    path = Path(path)
    recipe = graph.recipe
    if path.suffix not in (".safetensors", ".pt2"):
        raise UsageError(f"{path}: write the deploy graph as .safetensors or .pt2")
    if path.suffix == ".pt2" and recipe.input_size is None:
        raise UsageError("a .pt2 export has a static shape: give --input-size (e.g. 512)")
    meta = {**recipe_metadata(recipe), **(extra or {})}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            state = {k: v.contiguous() for k, v in graph.state_dict().items()}
            save_file(state, str(tmp), metadata=meta)
        else:
            assert recipe.input_size is not None  # refused above: a .pt2 needs a static size
            example = torch.zeros(1, recipe.channels, *recipe.input_size)
            program = torch.export.export(graph.eval(), (example,))
            torch.export.save(program, str(tmp), extra_files={"nafnet_edge.json": json.dumps(meta)})


def load_deploy(path: str | Path) -> DeployNAFNet:
    """Rebuild a deploy graph saved as .safetensors by :func:`save_deploy`."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if meta.get("format") != DEPLOY_FORMAT:
        raise CheckpointError(f"{path} is not a deploy graph written by `nafnet-edge reparam`")
    if "norm_form" not in meta:
        raise CheckpointError(f"{path} was written by an earlier nafnet-edge: run `nafnet-edge reparam` again")
    graph = build_graph(meta)
    graph.load_state_dict(state, strict=True)
    return graph.eval().requires_grad_(False)
