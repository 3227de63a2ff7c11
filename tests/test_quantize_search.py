"""Keeping the most sensitive units in float until an int8 artifact meets its budget.

The tiny random model checks the mechanics (which ops stay float in each runtime's program); the embedded
denoiser checks that the sensitivity ranking predicts what keeping a unit really gains, and that the search in
``quantize`` keeps units until the artifact, validated in its runtime, meets the budget.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import randomize

from nafnet_edge.checkpoint import load_checkpoint
from nafnet_edge.cli import main
from nafnet_edge.deploy import deploy
from nafnet_edge.errors import EXIT_USAGE
from nafnet_edge.model import NAFNetConfig, build_model
from nafnet_edge.quantization import get_quantizer
from nafnet_edge.quantization.sensitivity import check_units, graph_units, rank_units
from nafnet_edge.quantization.train import TrainConfig, calibration_crops, held_out_crops, load_training_images

KODAK_DIR = Path(__file__).resolve().parents[1] / "nafnet_edge" / "data" / "kodak"
TINY = NAFNetConfig(width=8, enc_blk_nums=(1, 1), middle_blk_num=1, dec_blk_nums=(1, 1))
SIZE = 64
KEPT = ("decoders.1.0", "ending")  # one block (9 convs outside its norms) and one conv
MIN_REAL_GAIN_DB = 0.3  # keeping the top-ranked unit of the embedded denoiser float; measured 0.61 dB (XNNPACK PTQ)
MAX_PREDICTION_ERROR_DB = 0.3  # ranking's prediction vs that real gain; measured 0.67 vs 0.61 dB
MIN_SEARCH_GAIN_DB = 0.4  # budget above the all-int8 artifact's fidelity the search must reach (1-2 units)


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / ((a.double() - b.double()) ** 2).mean()))


def noisy(x: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + 25 / 255 * torch.randn(x.shape, generator=g)).clamp(0, 1)


def test_units_of_the_deploy_graph_in_execution_order() -> None:
    graph = deploy(build_model(TINY), target="xnnpack", input_size=(SIZE, SIZE))
    assert graph_units(graph) == [
        "intro",
        "encoders.0.0",
        "downs.0",
        "encoders.1.0",
        "downs.1",
        "middle_blks.0",
        "ups.0",
        "decoders.0.0",
        "ups.1",
        "decoders.1.0",
        "ending",
    ]
    for name in graph_units(graph):
        graph.get_submodule(name)  # each is a module of the graph
    with pytest.raises(ValueError, match=r"encoders\.2\.0: no such unit; this model has intro, encoders\.0\.0"):
        check_units(graph, ["encoders.2.0"])


def test_quantize_refuses_an_unknown_unit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["quantize", "--target", "openvino", "--method", "ptq", "--data", str(KODAK_DIR), "-o", str(tmp_path)]
    assert main([*argv, "--keep-float", "ending,decoder.9"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--keep-float decoder.9: no such unit" in err and "decoders.0.0" in err
    assert not (tmp_path / "openvino").exists()


def _int8_conv_counts(converted: torch.fx.GraphModule) -> tuple[int, int]:
    from nafnet_edge.quantization.xnnpack import precision_summary

    summary = precision_summary(converted)
    return summary["int8_ops"].get("conv2d", 0), summary["fp32_ops"].get("conv2d", 0)


def test_xnnpack_keeps_the_units_ops_float_in_one_partition(tmp_path: Path) -> None:
    pytest.importorskip("executorch")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from nafnet_edge.converters.executorch import ExecuTorchConverter

    graph = deploy(randomize(build_model(TINY)), target="xnnpack", input_size=(SIZE, SIZE))
    calibration = [torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    counts = {}
    for kept in ((), KEPT):
        quantizer = get_quantizer("executorch")
        quantizer.keep_float = frozenset(kept)
        prepared = quantizer.prepare(graph, calibration[0], qat=False, calibration=calibration)
        with torch.no_grad():
            for x in calibration:
                prepared(x)
        counts[kept] = _int8_conv_counts(convert_pt2e(copy.deepcopy(prepared)))
    assert counts[KEPT][0] == counts[()][0] - 10 and counts[KEPT][1] == counts[()][1] + 10

    exported = quantizer.export(prepared, tmp_path, calibration[0])
    assert exported.info["kept_float"] == sorted(KEPT)
    assert exported.info["delegated_partitions"] == 1 and not exported.info["ops_outside_delegate"]
    runner = ExecuTorchConverter().load_runner(tmp_path, {"files": exported.files})
    y = runner.run(calibration[0].numpy())
    with torch.no_grad():
        assert psnr_db(torch.from_numpy(y), graph(calibration[0])) > 30.0


def test_openvino_keeps_the_units_weights_float(tmp_path: Path) -> None:
    pytest.importorskip("nncf")
    import openvino as ov

    graph = deploy(randomize(build_model(TINY)), target="openvino", input_size=(SIZE, SIZE))
    example = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    ops = {}
    for kept in ((), KEPT):
        quantizer = get_quantizer("openvino")
        quantizer.keep_float = frozenset(kept)
        prepared = quantizer.prepare(graph, example, qat=False)
        out = tmp_path / ("kept" if kept else "all")
        out.mkdir()
        exported = quantizer.export(prepared, out, example)
        assert exported.info["kept_float"] == sorted(kept)
        model = ov.Core().read_model(str(out / "model.xml"))
        ops[kept] = Counter(op.get_type_name() for op in model.get_ops())
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        with torch.no_grad():
            assert psnr_db(torch.from_numpy(compiled(example.numpy())[0]), graph(example)) > 30.0
    # the block's 9 convs and the ending's weights lose their quantizers, and so do the block's activations
    assert ops[KEPT]["FakeQuantize"] <= ops[()]["FakeQuantize"] - 10 - 9


def test_ranking_predicts_what_keeping_the_top_unit_gains() -> None:
    pytest.importorskip("executorch")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    graph = deploy(load_checkpoint(None).model, target="xnnpack", input_size=(SIZE, SIZE))
    images = load_training_images(KODAK_DIR, SIZE)
    config = TrainConfig(method="ptq")
    calibration = [noisy(x, i) for i, x in enumerate(calibration_crops(images, SIZE, config))]
    crops = noisy(held_out_crops(images, SIZE, config, 8), 100)
    ranking = rank_units(get_quantizer("executorch"), graph, crops, calibration)
    assert sorted(u for u, _ in ranking) == sorted(graph_units(graph))
    top, predicted = ranking[0]
    with torch.no_grad():
        teacher = graph(crops)
    fidelity = {}
    for kept in ((), (top,)):
        quantizer = get_quantizer("executorch")
        quantizer.keep_float = frozenset(kept)
        prepared = quantizer.prepare(graph, crops[:1], qat=False, calibration=calibration)
        with torch.no_grad():
            for x in calibration:
                prepared(x)
            fidelity[kept] = psnr_db(convert_pt2e(copy.deepcopy(prepared))(crops), teacher)
    real = fidelity[(top,)] - fidelity[()]
    assert real >= MIN_REAL_GAIN_DB, (top, fidelity)
    assert abs(real - predicted) <= MAX_PREDICTION_ERROR_DB, (top, predicted, real)


def _noisy_folders(root: Path) -> tuple[Path, Path, Path]:
    """Training images (the shipped Kodak photos with sigma-25 noise: what the denoiser will see; calibrating on
    clean photos leaves the noisy inputs' ranges clipped) and validation pairs (noisy and clean 128-px crops)."""
    from nafnet_edge.images import RGBImage, read_image, write_image

    train, val_in, val_gt = root / "train", root / "val-noisy", root / "val-clean"
    for folder in (train, val_in, val_gt):
        folder.mkdir()
    rng = np.random.default_rng(0)
    for path in sorted(KODAK_DIR.glob("*.png")):
        clean = read_image(path).pixels
        noise = rng.normal(0, 25 / 255, clean.shape)
        write_image(train / path.name, RGBImage(np.clip(clean + noise, 0, 1).astype(np.float32), None, 8))
        crop = clean[100:228, 200:328]
        write_image(val_gt / path.name, RGBImage(crop, None, 8))
        write_image(val_in / path.name, RGBImage(np.clip(crop + noise[:128, :128], 0, 1).astype(np.float32), None, 8))
    return train, val_in, val_gt


def _quantize(root: Path, name: str, *extra: str) -> tuple[int, dict]:
    out = root / name
    train, val_in, val_gt = root / "train", root / "val-noisy", root / "val-clean"
    argv = ["quantize", "--target", "executorch", "--method", "ptq", "--data", str(train), "-o", str(out)]
    argv += ["--val-pairs", str(val_in), str(val_gt), "--input-size", str(SIZE)]
    code = main([*argv, "--max-drift", "1", *extra])  # a budget on fidelity alone
    return code, json.loads((out / "executorch" / "manifest.json").read_text())


def test_search_keeps_sensitive_units_float_until_the_artifact_meets_its_budget(tmp_path: Path) -> None:
    pytest.importorskip("executorch")
    _noisy_folders(tmp_path)
    code, manifest = _quantize(tmp_path, "int8", "--search-rounds", "0")
    assert code == 0 and "sensitivity_db" not in manifest["quantization"]["search"]
    all_int8 = manifest["validation"]["summary"]["fidelity_db_min"]

    budget = f"{all_int8 + MIN_SEARCH_GAIN_DB:.2f}"
    code, manifest = _quantize(tmp_path, "search", "--min-fidelity", budget, "--search-rounds", "3")
    search = manifest["quantization"]["search"]
    rounds = search["rounds"]
    assert code == 0 and manifest["validation"]["passed"], rounds
    assert np.isclose(rounds[0]["fidelity_db_min"], all_int8)  # the same all-int8 artifact first
    assert not rounds[0]["passed"] and rounds[-1]["passed"] and len(rounds) >= 2
    assert [len(r["kept_float"]) for r in rounds] == [0, 1, 2, 4][: len(rounds)]
    ranked = list(search["sensitivity_db"])
    assert rounds[-1]["kept_float"] == manifest["quantization"]["kept_float"] == ranked[: len(rounds[-1]["kept_float"])]
    assert manifest["export"]["kept_float"] == sorted(rounds[-1]["kept_float"])
    assert manifest["validation"]["summary"]["fidelity_db_min"] >= all_int8 + MIN_SEARCH_GAIN_DB
    latency = search["latency_ms"]
    assert latency["first_round"] > 0 and latency["last_round"] > 0 and latency["ratio"] > 0
