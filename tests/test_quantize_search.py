"""Keeping the most sensitive units in float until an int8 artifact meets its budget.

The tiny random model checks the mechanics (which ops stay float in each runtime's program); the embedded
denoiser checks that the sensitivity ranking predicts what keeping a unit really gains, and that the search in
``quantize`` keeps units until the artifact, validated in its runtime, meets the budget.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import artifact_dir, randomize, require

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
    graph = deploy(build_model(TINY), norm_form="conv-mean", input_size=(SIZE, SIZE))
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
    argv = ["quantize", "--target", "openvino", "--method", "ptq", "--train-data", str(KODAK_DIR), "-o", str(tmp_path)]
    assert main([*argv, "--keep-float", "ending,decoder.9"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--keep-float decoder.9: no such unit" in err and "decoders.0.0" in err
    assert not artifact_dir(tmp_path, "openvino", "int8").exists()


def _int8_conv_counts(converted: torch.fx.GraphModule) -> tuple[int, int]:
    from nafnet_edge.quantization.xnnpack import precision_summary

    summary = precision_summary(converted)
    return summary["int8_ops"].get("conv2d", 0), summary["fp32_ops"].get("conv2d", 0)


def test_xnnpack_keeps_the_units_ops_float_in_one_partition(tmp_path: Path) -> None:
    require("executorch")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from nafnet_edge.converters.executorch import ExecuTorchTarget

    graph = deploy(randomize(build_model(TINY)), norm_form="conv-mean", input_size=(SIZE, SIZE))
    calibration = [torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    counts = {}
    for kept in ((), KEPT):
        quantizer = get_quantizer("executorch", keep_float=kept)
        prepared = quantizer.prepare(graph, calibration[0], qat=False, calibration=calibration)
        with torch.no_grad():
            for x in calibration:
                prepared(x)
        counts[kept] = _int8_conv_counts(convert_pt2e(copy.deepcopy(prepared)))
    assert counts[KEPT][0] == counts[()][0] - 10 and counts[KEPT][1] == counts[()][1] + 10

    exported = quantizer.export(prepared, tmp_path, calibration[0])
    assert exported.info["kept_float"] == sorted(KEPT)
    assert exported.info["delegated_partitions"] == 1 and not exported.info["ops_outside_delegate"]
    runner = ExecuTorchTarget().load_runner(tmp_path)
    y = runner.run(calibration[0].numpy())
    with torch.no_grad():
        assert psnr_db(torch.from_numpy(y), graph(calibration[0])) > 30.0


def test_openvino_keeps_the_units_weights_float(tmp_path: Path) -> None:
    require("nncf")
    import openvino as ov

    graph = deploy(randomize(build_model(TINY)), norm_form="mvn", input_size=(SIZE, SIZE))
    example = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    ops = {}
    for kept in ((), KEPT):
        quantizer = get_quantizer("openvino", keep_float=kept)
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
    require("executorch")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    graph = deploy(load_checkpoint(None).model, norm_form="conv-mean", input_size=(SIZE, SIZE))
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
        quantizer = get_quantizer("executorch", keep_float=kept)
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
    argv = ["quantize", "--target", "executorch", "--method", "ptq", "--train-data", str(train), "-o", str(out)]
    argv += ["--val-pairs", str(val_in), str(val_gt), "--input-size", str(SIZE)]
    code = main([*argv, "--max-drift", "1", *extra])  # a budget on fidelity alone
    return code, json.loads((artifact_dir(out, "executorch", "int8") / "manifest.json").read_text())


@pytest.mark.slow
def test_search_keeps_sensitive_units_float_until_the_artifact_meets_its_budget(tmp_path: Path) -> None:
    require("executorch")
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
    assert search["kept_round"] == len(rounds) - 1 and search["stopped"] == "met the budget"
    assert [len(r["kept_float"]) for r in rounds] == [0, 1, 2, 4][: len(rounds)]
    ranked = list(search["sensitivity_db"])
    assert rounds[-1]["kept_float"] == manifest["quantization"]["kept_float"] == ranked[: len(rounds[-1]["kept_float"])]
    assert manifest["export"]["kept_float"] == sorted(rounds[-1]["kept_float"])
    assert manifest["validation"]["summary"]["fidelity_db_min"] >= all_int8 + MIN_SEARCH_GAIN_DB
    latency = search["latency_ms"]
    assert latency["first_round"] > 0 and latency["kept_round"] > 0 and latency["ratio"] > 0


# --- which round lands: the search's bookkeeping, with rounds faked (no quantizer, runtime or validation run) ---


class _FakeRounds:
    """Stands in for quantizing, exporting, loading and validating: round N (1-based) exports ``model.pte`` naming
    itself and its float units, and validates as ``measured[N - 1]`` = (drift dB or None, min fidelity dB)."""

    norm_form = "conv-mean"
    artifact = "model.pte"

    def __init__(self, measured: list[tuple[float | None, float]], *, max_drift_db: float) -> None:
        self.measured = measured
        self.max_drift_db = max_drift_db
        self.keep_float: frozenset[str] = frozenset()
        self.switches_units = True
        self.trains = True
        self.number = 0

    def quantizer(self, target: str, *, keep_float: tuple[str, ...] = (), **options: object) -> _FakeRounds:
        self.keep_float = frozenset(keep_float)
        return self

    def check_available(self) -> None:
        pass

    def quantize(self, *_: object) -> tuple[None, None, dict]:
        self.number += 1
        return None, None, {"method": "ptq", "calibration_batches": 1, "world_size": 1}

    def export(self, prepared: object, out_dir: Path, example: object, *, pixel_format: str | None = None) -> object:
        from nafnet_edge.converters import Exported

        (out_dir / self.artifact).write_text(f"round {self.number}: {sorted(self.keep_float)}")
        return Exported(files=[self.artifact], info={"kept_float": sorted(self.keep_float)})

    def load_runner(self, out_dir: Path, *, export: object = None) -> object:
        from nafnet_edge.converters import Session

        return Session(run=lambda x: np.sort(np.tile(x, 16), axis=None), runtime="fake", info={"runtime": "fake"})

    options = ()  # no target options of its own

    def needs_test_io(self, options: object) -> bool:
        return False

    def validate(self, *_: object, **__: object) -> object:
        drift, fidelity = self.measured[self.number - 1]
        summary = {"fidelity_db_min": fidelity, "max_abs_error": 0.01}
        failures = []
        if drift is not None:
            summary["drift_db_mean"] = drift
            if drift > self.max_drift_db:
                failures.append(f"drift {drift:.3f} dB > budget {self.max_drift_db:g} dB (--max-drift)")
        elif fidelity < 45.0:
            failures.append(f"fidelity {fidelity:.2f} dB < budget 45 dB (--min-fidelity)")
        report = {"passed": not failures, "failures": failures, "summary": summary}
        from nafnet_edge.manifest import ValidationSummary

        return type("Report", (), {"to_summary": lambda self: ValidationSummary.from_dict(report)})()


RANKED = ["decoders.1.0", "ending", "encoders.0.0", "intro", "ups.1", "decoders.0.0", "middle_blks.0"]


def _search(
    root: Path, monkeypatch: pytest.MonkeyPatch, measured: list[tuple[float | None, float]], *extra: str
) -> tuple[int, _FakeRounds]:
    from helpers import save_tiny_checkpoint

    import nafnet_edge.conversion as convert_module
    import nafnet_edge.quantization as quantization_module
    import nafnet_edge.quantization.search as search_module
    import nafnet_edge.quantization.sensitivity as sensitivity_module

    fake = _FakeRounds(measured, max_drift_db=0.1)
    monkeypatch.setattr(convert_module, "get_target", lambda target: fake)
    monkeypatch.setattr(quantization_module, "get_quantizer", fake.quantizer)
    monkeypatch.setattr(search_module, "quantize", fake.quantize)
    monkeypatch.setattr(convert_module, "run_validation", fake.validate)
    ranking = [(unit, 1.0 / (i + 1)) for i, unit in enumerate(RANKED)]
    monkeypatch.setattr(sensitivity_module, "rank_units", lambda *args, exclude=(): ranking)
    checkpoint = save_tiny_checkpoint(root / "tiny.pth")
    argv = ["quantize", str(checkpoint), "--target", "executorch", "--method", "ptq", "--train-data", str(KODAK_DIR)]
    argv += ["-o", str(root / "out"), "--input-size", str(SIZE), "--max-drift", "0.1"]
    return main([*argv, *extra]), fake


def _said(err: str) -> list[str]:
    """The progress lines and notes in ``err``, without their "nafnet-edge: [  1.2s] " or "nafnet-edge: note: "."""
    return [m[1] for m in re.finditer(r"^nafnet-edge: (?:\[ *[\d.]+s\]|note:) (.*)$", err, flags=re.M)]


def _round_results(err: str) -> list[str]:
    """The lines reporting a validated round's result ("... - misses the budget")."""
    return [line for line in _said(err) if re.match(r"executorch-int8: (search round \d+/\d+: )?.* dB - ", line)]


def _landed(root: Path) -> tuple[str, dict, str]:
    directory = artifact_dir(root / "out", "executorch", "int8")
    manifest = json.loads((directory / "manifest.json").read_text())
    assert sorted(p.name for p in directory.iterdir()) == ["USAGE.md", "manifest.json", "model.pte"]
    return (directory / "model.pte").read_text(), manifest, (directory / "USAGE.md").read_text()


def test_search_keeps_its_best_round_and_stops_at_a_worse_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from nafnet_edge.errors import EXIT_BUDGET

    drifts = [0.525, 0.505, 0.483, 0.461, 1.639, 0.01, 0.01]  # the last two are never reached
    code, fake = _search(tmp_path, monkeypatch, [(d, 40.0) for d in drifts], "--search-rounds", "6")
    err = capsys.readouterr().err
    assert code == EXIT_BUDGET and fake.number == 5, err
    pte, manifest, usage = _landed(tmp_path)
    kept = ["decoders.1.0", "ending", "encoders.0.0", "intro"]  # round 4: 1, 2, 4 more units after round 1
    assert pte == f"round 4: {sorted(kept)}"
    assert manifest["quantization"]["kept_float"] == kept and manifest["export"]["kept_float"] == sorted(kept)
    assert manifest["validation"]["summary"]["drift_db_mean"] == 0.461
    search = manifest["quantization"]["search"]
    assert [r["drift_db_mean"] for r in search["rounds"]] == drifts[:5]
    assert search["kept_round"] == 3 and search["rounds"][3]["kept_float"] == kept
    assert search["stopped"] == "round 5 was worse than round 4"
    assert "latency_ms" in search and search["latency_ms"]["kept_round"] > 0

    said = _said(err)
    assert [line for line in said if re.fullmatch(r"executorch-int8: search round \d+/7: [^:]*", line)] == [
        "executorch-int8: search round 1/7: all units int8",  # each round is announced before it runs
        "executorch-int8: search round 2/7: keeping 1 unit float (decoders.1.0)",
        "executorch-int8: search round 3/7: keeping 2 units float (decoders.1.0, ending)",
        "executorch-int8: search round 4/7: keeping 4 units float (decoders.1.0, ending, encoders.0.0, intro)",
        "executorch-int8: search round 5/7: keeping 7 units float (decoders.1.0, ending, encoders.0.0, intro, "
        "ups.1, decoders.0.0, middle_blks.0)",
    ], err
    assert _round_results(err) == [
        "executorch-int8: search round 1/7: all units int8: drift +0.525 dB, fidelity 40.0 dB - misses the budget",
        "executorch-int8: search round 2/7: 1 unit float (decoders.1.0): drift +0.505 dB, fidelity 40.0 dB - misses "
        "the budget, best so far",
        "executorch-int8: search round 3/7: 2 units float (decoders.1.0, ending): drift +0.483 dB, fidelity 40.0 dB "
        "- misses the budget, best so far",
        "executorch-int8: search round 4/7: 4 units float (decoders.1.0, ending, encoders.0.0, intro): drift "
        "+0.461 dB, fidelity 40.0 dB - misses the budget, best so far",
        "executorch-int8: search round 5/7: 7 units float (decoders.1.0, ending, encoders.0.0, intro, ups.1, "
        "decoders.0.0, middle_blks.0): drift +1.639 dB, fidelity 40.0 dB - worse than round 4: stopping, keeping "
        "round 4",
    ]
    advice = [line for line in said if "Try next:" in line]
    assert advice == [
        "executorch-int8 missed its budget in 5 round(s) (round 5 was worse than round 4); kept round 4: drift "
        "0.461 dB > budget 0.1 dB (--max-drift). Try next: QAT (--method qat); more or more representative "
        "--train-data (images like the ones it will restore, degradation included); either of those with --keep-float "
        "decoders.1.0,ending,encoders.0.0,intro (the units this artifact keeps float); or accept a looser "
        "--max-drift / --min-fidelity"
    ]
    assert usage.startswith(
        "> **FAILED its accuracy budget** in validation in its runtime (`manifest.json`, `validation`): drift "
        "0.461 dB > budget 0.1 dB (--max-drift).\n> Try next: QAT (--method qat); "
    )
    assert "\n# ExecuTorch (XNNPACK): how to run this artifact\n" in usage


def test_search_stops_at_the_round_that_meets_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from nafnet_edge.manifest import Manifest
    from nafnet_edge.usage import usage_note

    code, fake = _search(tmp_path, monkeypatch, [(0.3, 40.0), (0.2, 41.0), (0.05, 44.0), (0.01, 50.0)])
    err = capsys.readouterr().err
    assert code == 0 and fake.number == 3, err
    pte, manifest, usage = _landed(tmp_path)
    assert pte == "round 3: ['decoders.1.0', 'ending']" and manifest["validation"]["passed"]
    assert manifest["quantization"]["search"]["kept_round"] == 2
    assert manifest["quantization"]["search"]["stopped"] == "met the budget"
    assert _round_results(err)[-1] == (
        "executorch-int8: search round 3/5: 2 units float (decoders.1.0, ending): drift +0.050 dB, fidelity 44.0 dB "
        "- meets the budget"
    )
    assert "Try next" not in err and usage.startswith("# ExecuTorch (XNNPACK): how to run this artifact\n")

    # any precision's USAGE.md leads with a missed budget
    manifest["precision"] = "fp16"
    manifest["validation"].update(passed=False, failures=["fidelity 51.20 dB < budget 60 dB (--min-fidelity)"])
    assert usage_note("onnx", Manifest.from_dict(manifest)).startswith(
        "> **FAILED its accuracy budget** in validation in its runtime (`manifest.json`, `validation`): fidelity "
        "51.20 dB < budget 60 dB (--min-fidelity).\n> Try next: convert with --precision fp32, or accept a looser "
        "--max-drift / --min-fidelity.\n\n# ONNX: how to run this artifact\n"
    )


@pytest.mark.parametrize(
    ("measured", "extra", "ran", "kept", "stopped", "keep_float_advice"),
    [
        pytest.param(  # without ground truth, rounds compare by their minimum fidelity
            [(None, 40.0), (None, 42.0), (None, 41.5), (None, 50.0)],
            (),
            3,
            ["decoders.1.0"],
            "round 3 was worse than round 2",
            "either of those with --keep-float decoders.1.0 (the units this artifact keeps float)",
            id="fidelity",
        ),
        pytest.param(
            [(0.5, 40.0), (0.4, 40.0), (0.01, 50.0)],
            ("--search-rounds", "1"),
            2,
            ["decoders.1.0"],
            "--search-rounds 1 spent",
            "--keep-float decoders.1.0,ending (the next most sensitive units)",
            id="rounds-spent",
        ),
        pytest.param(
            [(0.5, 40.0), (0.4, 40.0)],
            ("--search-rounds", "0"),
            1,
            [],
            "search off",
            "--keep-float UNITS (units to leave float; --search-rounds N picks the most sensitive)",
            id="search-off",
        ),
    ],
)
def test_search_misses_keep_the_best_round_and_say_what_to_try(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    measured: list[tuple[float | None, float]],
    extra: tuple[str, ...],
    ran: int,
    kept: list[str],
    stopped: str,
    keep_float_advice: str,
) -> None:
    from nafnet_edge.errors import EXIT_BUDGET

    code, fake = _search(tmp_path, monkeypatch, measured, *extra)
    err = capsys.readouterr().err
    assert code == EXIT_BUDGET and fake.number == ran, err
    pte, manifest, usage = _landed(tmp_path)
    assert pte == f"round {len(kept) + 1}: {kept}" and manifest["quantization"]["kept_float"] == kept
    search = manifest["quantization"]["search"]
    assert len(search["rounds"]) == ran and search["kept_round"] == len(kept) and search["stopped"] == stopped
    assert len(_round_results(err)) == ran, err
    advice = [line for line in _said(err) if "Try next:" in line]
    assert len(advice) == 1 and f"({stopped}); kept round {len(kept) + 1}: " in advice[0], err
    assert f"; {keep_float_advice}; or accept a looser --max-drift / --min-fidelity" in advice[0]
    assert usage.startswith("> **FAILED its accuracy budget**") and keep_float_advice in usage.splitlines()[1]
