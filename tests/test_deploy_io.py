"""`nafnet-edge reparam` and the deploy-graph files it writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nafnet_edge.checkpoint import load_checkpoint
from nafnet_edge.cli import main
from nafnet_edge.deploy import PASSES, PadCrop
from nafnet_edge.deploy.io import load_deploy
from nafnet_edge.errors import EXIT_BAD_INPUT, EXIT_USAGE, CheckpointError
from nafnet_edge.model import NAFNet, NAFNetConfig

CFG = NAFNetConfig(width=8, enc_blk_nums=(1, 1), middle_blk_num=1, dec_blk_nums=(1, 1))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = NAFNet(CFG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("beta", "gamma")) or ".norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"params": model.state_dict()}, path)
    return path


def test_reparam_safetensors_round_trip_is_exact(ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "deploy.safetensors"
    assert (
        main(
            [
                "reparam",
                str(ckpt),
                "-o",
                str(out),
                "--target",
                "executorch",
                "--arch",
                "nafnet-local",
                "--train-size",
                "32",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "max abs error vs the original" in err
    assert f"passes: {', '.join(name for name, _ in PASSES)}" in err  # what deploy ran, in its order
    graph = load_deploy(out)
    assert (graph.recipe.arch, graph.recipe.norm_form) == ("NAFNetLocal", "conv-mean")
    original = load_checkpoint(ckpt, arch="nafnet-local", train_size=(32, 32)).model
    x = torch.rand(1, 3, 70, 90)
    with torch.no_grad():
        assert float((PadCrop(graph)(x) - original(x)).abs().max()) <= 1e-5
    assert [p.name for p in tmp_path.iterdir()] == ["deploy.safetensors"]  # no temporary file left behind
    assert main(["inspect", str(out)]) == EXIT_BAD_INPUT
    assert "deploy graph written by `nafnet-edge reparam`" in capsys.readouterr().err


def test_reparam_pt2_is_a_static_exported_program(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy.pt2"
    assert main(["reparam", str(ckpt), "-o", str(out), "--target", "coreml", "--input-size", "64x96"]) == 0
    program = torch.export.load(str(out)).module()
    original = load_checkpoint(ckpt).model
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        assert float((program(x) - original(x)).abs().max()) <= 1e-5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-o", "x.pt2"], "static shape: give --input-size"),
        (["-o", "x.safetensors", "--input-size", "70"], "must be a multiple of 4"),
        (["-o", "x.onnx"], "as .safetensors or .pt2"),
        (["-o", "x.safetensors", "--stream-scale", "3"], "power of two"),
    ],
)
def test_reparam_usage_errors(ckpt: Path, tmp_path: Path, monkeypatch, capsys, extra: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["reparam", str(ckpt), *extra])
    except SystemExit as e:  # refused by argparse, before anything loads
        code = e.code
    assert code == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_reparam_takes_target_names(ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "deploy.safetensors"
    assert main(["reparam", str(ckpt), "-o", str(out), "--target", "executorch", "--input-size", "64"]) == 0
    assert "(conv-mean norms; passes: " in capsys.readouterr().err
    assert load_deploy(out).recipe.norm_form == "conv-mean"


def test_deploy_files_of_earlier_releases_are_refused_with_what_to_do(ckpt: Path, tmp_path: Path) -> None:
    """Files written before norm forms had names (a deploy ``target`` label instead) are rebuilt, not guessed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = tmp_path / "deploy.safetensors"
    assert main(["reparam", str(ckpt), "-o", str(out), "--target", "coreml"]) == 0
    with safe_open(str(out), framework="pt") as f:
        meta = dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    old = {k: v for k, v in meta.items() if k not in ("norm_form", "arch", "passes")} | {"target": "coreml"}
    save_file(state, str(out), metadata=old)
    with pytest.raises(CheckpointError, match="written by an earlier nafnet-edge: run `nafnet-edge reparam` again"):
        load_deploy(out)
