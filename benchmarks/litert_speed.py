"""LiteRT against ExecuTorch (XNNPACK) on CPU, fp32 and int8, side by side in one run.

For the NAFNet-SIDD-width32 shape at 256x256 (random weights: speed only), four artifacts made as the tool makes
them, each loaded through its target's session (the runtime validation and ``bench`` use), all with the same
number of threads:

- ExecuTorch fp32: ``convert --target executorch`` (deploy graph, norm form conv-mean, one XNNPACK partition);
- ExecuTorch int8: ``quantize --target executorch`` (PT2E XNNPACKQuantizer, PTQ), lowered to XNNPACK;
- LiteRT fp32: ``convert --target litert`` (deploy graph, norm form mvn), run by LiteRT's interpreter, whose
  XNNPACK delegate takes the whole graph;
- LiteRT int8: ``quantize --target litert`` (PT2E with litert-torch's quantizer, PTQ).

int8 is calibrated on two crops of the shipped Kodak photos (latency does not depend on the ranges). The timing is
interleaved: every round runs each artifact once, after one warm-up run each; medians in ms and the ratio to
ExecuTorch fp32 of the same run. PSNR against the fp32 deploy graph in PyTorch shows which artifacts are quantized
(random weights: not their quality). The record keeps the CPU model and ISA flags.

    python benchmarks/litert_speed.py [--runs 15] [--size 256] [--shape SIDD-width32] [--threads N]
        [--json benchmarks/results/litert_speed.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from common import random_release_shape, run_record, write_results
from deploy_speed import Runner, sgemm_gflops, time_interleaved
from int8_speed import CALIBRATION_CROPS, calibration_images

from nafnet_edge.complexity import count_macs
from nafnet_edge.converters import get_target
from nafnet_edge.converters.base import ExportOptions, SessionSettings
from nafnet_edge.deploy import DeployNAFNet, deploy
from nafnet_edge.model import NAFNet
from nafnet_edge.quantization import get_quantizer
from nafnet_edge.quantization.train import TrainConfig, quantize_graph
from nafnet_edge.releases import RELEASE_SHAPES
from nafnet_edge.validation import psnr

VARIANTS = (  # label, target, precision; the first is the reference of the ratios
    ("ExecuTorch fp32", "executorch", "fp32"),
    ("ExecuTorch int8", "executorch", "int8"),
    ("LiteRT fp32", "litert", "fp32"),
    ("LiteRT int8", "litert", "int8"),
)
REFERENCE = VARIANTS[0][0]


def artifact(model: NAFNet, target: str, precision: str, size: int, out: Path) -> tuple[DeployNAFNet, dict[str, Any]]:
    """Write ``target``'s artifact of ``model`` at ``precision`` into ``out`` as ``convert`` / ``quantize`` (PTQ)
    would; the deploy graph it came from and the export's record."""
    converter = get_target(target)
    graph = deploy(model, norm_form=converter.norm_form, input_size=(size, size))
    if precision != "int8":
        return graph, converter.export(graph, out, ExportOptions(input_size=(size, size))).info
    quantizer = get_quantizer(target)
    config = TrainConfig(method="ptq", iters=1, batch=1, calibration_batches=CALIBRATION_CROPS)
    prepared, _ = quantize_graph(quantizer, graph, calibration_images(size), size, config, progress=False)
    return graph, quantizer.export(prepared, out, torch.rand(1, 3, size, size)).info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15, help="interleaved rounds (default: %(default)s)")
    ap.add_argument("--size", type=int, default=256, help="input height and width (default: %(default)s)")
    ap.add_argument("--shape", default="SIDD-width32", choices=list(RELEASE_SHAPES))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="runtime threads (default: all cores)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    record = run_record("benchmarks/litert_speed.py")
    warnings.filterwarnings("ignore")
    model = random_release_shape(args.shape)
    x = torch.rand(1, 3, args.size, args.size)
    a = x.numpy()
    settings = SessionSettings(threads=args.threads)
    runners: dict[str, Runner] = {}
    info: dict[str, dict[str, Any]] = {}
    drift: dict[str, float] = {}
    keep: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="litert-speed-") as tmp:
        for label, target, precision in VARIANTS:
            out = Path(tmp) / f"{target}-{precision}"
            out.mkdir()
            graph, export = artifact(model, target, precision, args.size, out)
            session = get_target(target).open_session(out, export=export, settings=settings)
            keep.append(session)
            runners[label] = session.run
            info[label] = {"session": session.info, "export": _export_summary(export)}
            with torch.no_grad():
                drift[label] = psnr(session.run(a), graph(x).numpy())
            print(f"{label}: ready ({session.info.get('threads', '?')} threads)", flush=True)
        for run in runners.values():  # warm-up
            run(a)
        times: dict[str, list[float]] = {k: [] for k in runners}
        peak = time_interleaved(runners, a, args.runs, times, sgemm_gflops())
    med = {k: statistics.median(v) for k, v in times.items()}
    macs = count_macs(model.config, args.size, args.size)
    rows = [
        {
            "shape": args.shape,
            "size": args.size,
            "variant": label,
            "target": target,
            "precision": precision,
            "ms": med[label],
            "ms_runs": times[label],
            "vs_executorch_fp32": med[label] / med[REFERENCE],
            "psnr_vs_deploy_fp32_db": drift[label],
            "macs": macs,
            **info[label],
        }
        for label, target, precision in VARIANTS
    ]
    print(f"\n{args.shape} at {args.size}x{args.size}, {args.threads} threads, {args.runs} interleaved runs, medians")
    header = f"{'variant':<18}{'ms':>9}{'x ExecuTorch fp32':>19}{'PSNR vs fp32':>14}"
    print(header)
    print("-" * len(header))
    for row in rows:
        value = row["psnr_vs_deploy_fp32_db"]
        quality = "exact" if value > 100 else f"{value:.1f} dB"
        print(f"{row['variant']:<18}{row['ms']:>9.1f}{row['vs_executorch_fp32']:>18.2f}x{quality:>14}")
    print("(random weights: the PSNR column only shows which variants are quantized, not their quality)")
    if args.json:
        settings_record = {"shape": args.shape, "size": args.size, "threads": args.threads, "runs": args.runs}
        write_results(args.json, record, sgemm_gflops=peak, settings=settings_record, rows=rows)


def _export_summary(export: dict[str, Any]) -> dict[str, Any]:
    """What the rows keep of an export record: the op split and the delegation, not the whole histogram."""
    keys = ("int8_ops", "fp32_ops", "int8_fp32_conversions", "delegated_partitions", "file_bytes", "program_bytes")
    return {k: export[k] for k in keys if k in export}


if __name__ == "__main__":
    main()
