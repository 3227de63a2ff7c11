"""A target is one class and one registration: a dummy target defined here alone reaches every stage of the CLI
(convert one or all, its option in --help and refused for other targets, USAGE.md, bench, report)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from nafnet_edge import converters
from nafnet_edge.cli import main
from nafnet_edge.converters import Exported, ExportOptions, Session, SessionSettings, Target, TargetOption
from nafnet_edge.errors import EXIT_USAGE

SIZE = "64"  # the tiny model's input size: a multiple of its padding multiple, over the default 32 px overlap


class EchoTarget(Target):
    """The deploy graph saved as weights plus recipe (``nafnet_edge.deploy.io``) and run again in PyTorch, its
    output multiplied by ``--echo-gain``: a real runner, so validation and bench measure something."""

    name: ClassVar[str] = "echo"
    norm_form: ClassVar[str] = "reference"
    artifact: ClassVar[str] = "model.safetensors"
    file_kind: ClassVar[str] = "echo model"
    color: ClassVar[str] = "#123abc"
    options: ClassVar[tuple[TargetOption, ...]] = (
        TargetOption("--echo-gain", "gain", "multiply the output by G (1.0)", 1.0, type=float, metavar="G"),
    )
    usage_title: ClassVar[str] = "Echo"
    usage_body: ClassVar[str] = "## Echo\n\nLoad `{artifact}` with `load_deploy` and call it on {h}x{w} tiles.\n"

    def export(self, graph: torch.nn.Module, out_dir: Path, options: ExportOptions) -> Exported:
        from nafnet_edge.deploy.io import save_deploy

        save_deploy(graph, out_dir / self.artifact)
        return Exported([self.artifact], {"gain": self.setting(options, "gain")})

    def open_session(
        self, out_dir: Path, *, export: Mapping[str, Any] | None = None, settings: SessionSettings | None = None
    ) -> Session:
        from nafnet_edge.deploy.io import load_deploy

        graph = load_deploy(self.artifact_path(out_dir))
        gain = float((export or {}).get("gain", 1.0))

        def run(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return (graph(torch.from_numpy(x)) * gain).numpy().astype(np.float32)

        return Session(run, "torch (echo)", {"torch": torch.__version__, "gain": gain}, keep=graph)


@pytest.fixture
def echo(monkeypatch) -> Iterator[type[Target]]:
    """``EchoTarget`` registered for one test: ``register`` adds it to a copy of the registry that the test's end
    puts back."""
    monkeypatch.setattr(converters, "TARGETS", dict(converters.TARGETS))
    yield converters.register(EchoTarget)


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NAFNET_EDGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def checkpoint(tiny_checkpoint: Path) -> Path:
    """The session's randomized width-8 two-level NAFNet (read-only)."""
    return tiny_checkpoint


@pytest.fixture
def data(kodak_data: Path) -> Path:
    """Two real crops (read-only): validation stays quick."""
    return kodak_data


def _convert(checkpoint: Path, data: Path, out: Path, *argv: str) -> int:
    return main(["convert", str(checkpoint), "-o", str(out), "--input-size", SIZE, "--val-data", str(data), *argv])


def test_a_registered_target_is_converted_validated_and_described(
    echo, checkpoint: Path, data: Path, tmp_path: Path
) -> None:
    assert _convert(checkpoint, data, tmp_path / "out", "--target", "echo", "--echo-gain", "1.0") == 0
    directory = tmp_path / "out" / "echo-fp32"
    assert (directory / "model.safetensors").is_file()
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["target"] == "echo" and manifest["files"] == ["model.safetensors"]
    assert manifest["export"]["gain"] == 1.0 and manifest["runtime"]["gain"] == 1.0
    assert manifest["validation"]["passed"]  # the deploy graph run again: as close to the reference as fp32 gets
    usage = (directory / "USAGE.md").read_text()
    assert "# Echo" in usage and "Load `model.safetensors` with `load_deploy` and call it on 64x64 tiles." in usage


def test_its_option_reaches_its_export_and_validation_judges_it(
    echo, checkpoint: Path, data: Path, tmp_path: Path
) -> None:
    assert (
        _convert(checkpoint, data, tmp_path / "out", "--target", "echo", "--echo-gain", "1.5") == 3
    )  # a missed budget
    manifest = json.loads((tmp_path / "out" / "echo-fp32" / "manifest.json").read_text())
    assert manifest["export"]["gain"] == 1.5 and not manifest["validation"]["passed"]


def test_all_includes_it_and_gives_its_option_to_it_alone(
    echo, checkpoint: Path, data: Path, tmp_path: Path, monkeypatch
) -> None:
    for name in [n for n in converters.TARGETS if n not in ("onnx", "echo")]:  # keep --target all quick
        monkeypatch.delitem(converters.TARGETS, name)
    assert _convert(checkpoint, data, tmp_path / "out", "--target", "all", "--no-validate", "--echo-gain", "2") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["echo-fp32", "onnx-fp32"]
    echoed = json.loads((tmp_path / "out" / "echo-fp32" / "manifest.json").read_text())
    assert echoed["export"]["gain"] == 2.0
    assert "gain" not in json.loads((tmp_path / "out" / "onnx-fp32" / "manifest.json").read_text())["export"]


def test_help_lists_it_and_its_option(echo, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["convert", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "echo" in out.split("--target")[1].split("}")[0]  # among the choices
    assert "Echo options:" in out and "--echo-gain G" in out and "Echo: multiply the output by G" in out


def test_its_option_is_refused_for_another_target(echo, checkpoint: Path, data: Path, tmp_path: Path, capsys) -> None:
    assert _convert(checkpoint, data, tmp_path / "out", "--target", "onnx", "--echo-gain", "2") == EXIT_USAGE
    assert capsys.readouterr().err == "nafnet-edge: error: --echo-gain is an option of --target echo\n"
    assert not (tmp_path / "out").exists()


def test_bench_and_report_show_it(echo, checkpoint: Path, data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert _convert(checkpoint, data, out, "--target", "echo") == 0
    capsys.readouterr()
    bench = ["bench", str(out / "echo-fp32"), "--save", "--runs", "2", "--warmup", "0", "--no-profile"]
    bench.append("--no-baseline")
    assert main(bench) == 0
    table = capsys.readouterr().out
    assert any(line.split()[:1] == ["echo"] for line in table.splitlines()), table
    measured = json.loads((out / "echo-fp32" / "bench.json").read_text())
    assert measured["target"] == "echo" and measured["runtime"] == "torch (echo)"

    assert main(["report", str(out), "--images", "1", "--val-data", str(data)]) == 0
    page = (out / "report.html").read_text()
    assert '<tr class="artifact" data-target="echo">' in page  # its row in the table
    assert "<td>torch (echo)</td>" in page  # with the runtime its session reported
    assert EchoTarget.color in page  # and its colour in the charts
