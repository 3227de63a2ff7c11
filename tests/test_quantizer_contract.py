"""The contract every int8 quantizer keeps, written once and run for each registered quantizer (as NNCF's template
tests are): ``prepare`` keeps the graph's shapes and leaves the caller's graph alone, QAT trains through the fake
quantizers and ``freeze_observers`` fixes the ranges, ``keep_float`` leaves its unit unquantized, ``export`` writes
the declared artifact, and that artifact runs in its own runtime (the target's runner, as validation loads it)
close to the fp32 deploy graph.

Width-8 two-level model with randomized weights at 32x32, calibrated on Kodak crops and evaluated on other
regions of the same photos. What is particular to one target (its op counts, scheme, modes) stays in
``test_quantize_<target>.py``. PSNR uses data range 1.0 (float images in [0, 1]).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import KODAK, randomize, running_in_ci

from nafnet_edge.converters.base import Exported
from nafnet_edge.deploy import DeployNAFNet, deploy
from nafnet_edge.errors import MissingBackendError
from nafnet_edge.images import read_image
from nafnet_edge.model import NAFNetConfig, build_model
from nafnet_edge.quantization import Quantizer, get_quantizer, quantizer_targets

TINY = NAFNetConfig(width=8, enc_blk_nums=(1, 1), middle_blk_num=1, dec_blk_nums=(1, 1))
SIZE = 32
KEPT_UNIT = "ending"  # one conv whose weights every quantizer quantizes
# the int8 artifact in its runtime vs the fp32 deploy graph; measured 45.0-45.4 dB (coreml), 42.5-43.7 dB
# (executorch), 42.8-44.9 dB (openvino), 47.3-47.9 dB (litert) on these crops
MIN_PSNR_DB = 38.0
MAX_PSNR_DB = 80.0  # above this the artifact is not quantized


def crop(index: int, top: int, left: int) -> torch.Tensor:
    photos = sorted(KODAK.glob("*.png"))
    pixels = read_image(photos[index]).pixels[top : top + SIZE, left : left + SIZE]
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]


def psnr_db(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float(10 * np.log10(1.0 / mse))


def active_quantizers(modules: list[torch.nn.Module]) -> int:
    """How many of ``modules`` (a unit's quantizers) quantize: torchao's fake quantizers or NNCF's."""
    count = 0
    for m in modules:
        if hasattr(m, "is_enabled_quantization"):  # NNCF
            count += bool(m.is_enabled_quantization())
        else:  # torchao
            count += bool(m.fake_quant_enabled[0])  # type: ignore[index]
    return count


@dataclass
class Case:
    target: str
    quantizer: Quantizer
    graph: DeployNAFNet
    calibration: list[torch.Tensor]
    held_out: list[torch.Tensor]
    prepared: torch.nn.Module  # PTQ-calibrated
    exported: Exported
    out_dir: Path


@pytest.fixture(scope="module", params=quantizer_targets())
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    target = request.param
    quantizer = get_quantizer(target)
    try:
        quantizer.check_available()
    except MissingBackendError as e:
        if running_in_ci():  # every extra is installed there: a missing backend is a broken install
            raise
        pytest.skip(str(e))
    graph = deploy(randomize(build_model(TINY)), norm_form=quantizer.norm_form, input_size=(SIZE, SIZE))
    calibration = [crop(i, 100, 50) for i in range(4)]
    prepared = quantizer.prepare(graph, calibration[0], qat=False, calibration=calibration)
    with torch.no_grad():  # what the shared loop does: one pass over all calibration crops
        prepared(torch.cat(calibration))
    out_dir = tmp_path_factory.mktemp(f"{target}-int8")
    exported = quantizer.export(prepared, out_dir, calibration[0])
    held_out = [crop(i, 300, 300) for i in range(4)]  # regions calibration never saw
    return Case(target, quantizer, graph, calibration, held_out, prepared, exported, out_dir)


@pytest.fixture(scope="module")
def qat(case: Case) -> tuple[Quantizer, torch.nn.Module]:
    """A QAT-prepared copy of the case's graph, all units quantized."""
    quantizer = get_quantizer(case.target)
    return quantizer, quantizer.prepare(case.graph, case.calibration[0], qat=True, calibration=case.calibration[:2])


class TestQuantizerContract:
    def test_registry_builds_it_for_its_target(self, case: Case) -> None:
        quantizer = get_quantizer(case.target, keep_float=[KEPT_UNIT])
        assert type(quantizer) is type(case.quantizer) and quantizer.keep_float == frozenset({KEPT_UNIT})
        assert case.quantizer.keep_float == frozenset()
        with pytest.raises(TypeError):
            type(quantizer)([KEPT_UNIT])  # type: ignore[call-arg, misc]  # keyword-only

    def test_prepare_keeps_shapes_for_any_batch(self, case: Case) -> None:
        batch = torch.cat(case.held_out[:2])
        prepared = copy.deepcopy(case.prepared)  # observers would take these inputs in
        with torch.no_grad():
            out = prepared(batch)
            assert out.shape == case.graph(batch).shape == batch.shape
        assert not any(p.requires_grad for p in case.prepared.parameters())  # PTQ trains nothing

    def test_keep_float_leaves_the_unit_unquantized(self, case: Case, qat: tuple[Quantizer, torch.nn.Module]) -> None:
        quantizer, prepared = qat
        units = quantizer.unit_quantizers(prepared, [KEPT_UNIT], case.calibration[0])
        assert active_quantizers(units[KEPT_UNIT]) > 0
        quantizer = get_quantizer(case.target, keep_float=[KEPT_UNIT])
        prepared = quantizer.prepare(case.graph, case.calibration[0], qat=True, calibration=case.calibration[:2])
        units = quantizer.unit_quantizers(prepared, [KEPT_UNIT], case.calibration[0])
        assert active_quantizers(units[KEPT_UNIT]) == 0

    def test_qat_trains_a_copy_and_freezing_fixes_the_ranges(
        self, case: Case, qat: tuple[Quantizer, torch.nn.Module]
    ) -> None:
        quantizer, prepared = qat
        before = copy.deepcopy(case.graph.state_dict())
        x = torch.cat(case.calibration[2:])
        quantizer.set_training(prepared, True)
        with torch.no_grad():
            target = case.graph(x)
        torch.nn.functional.mse_loss(prepared(x), target).backward()
        trained = [p for p in prepared.parameters() if p.requires_grad]
        assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
        assert sum(float(p.grad.abs().sum()) for p in trained) > 0  # type: ignore[union-attr]
        torch.optim.SGD(trained, lr=0.1).step()
        after = case.graph.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # training moves the prepared copy only

        quantizer.freeze_observers(prepared)
        frozen = copy.deepcopy(prepared.state_dict())
        with torch.no_grad():
            prepared(x * 3.0)  # ranges would grow if they still followed the data
        assert all(torch.equal(v, prepared.state_dict()[k]) for k, v in frozen.items())

    def test_export_writes_the_declared_artifact(self, case: Case) -> None:
        assert case.quantizer.artifact in case.exported.files
        for name in case.exported.files:
            assert (case.out_dir / name).exists(), name
        assert case.exported.info["kept_float"] == []

    def test_artifact_runs_in_its_runtime_close_to_the_fp32_graph(self, case: Case) -> None:
        from nafnet_edge.converters import get_target

        runner = get_target(case.quantizer.target).load_runner(case.out_dir, export=case.exported.info)
        for x in case.held_out:
            y = runner.run(x.numpy())
            assert y.shape == tuple(x.shape) and y.dtype == np.float32 and np.isfinite(y).all()
            with torch.no_grad():
                reference = case.graph(x).numpy()
            assert MIN_PSNR_DB < psnr_db(y, reference) < MAX_PSNR_DB
