"""Deploy graph vs original graph, fp32, side by side in one run: ExecuTorch XNNPACK, OpenVINO f32, onnxruntime.

For the NAFNet-SIDD-width32 and GoPro-width32 shapes at 256x256 (random weights: speed only), and any other
released shape of the family (e.g. Baseline-SIDD-width32; NAFSSR-S-x2 on a --sr-size stereo pair). Runs are
interleaved (original, deploy, original, ...) so both variants see the same machine noise; the table shows
medians and the speed-up ratio, plus the distance to the fp32 compute floor measured by a matmul probe.

    python benchmarks/deploy_speed.py [--runs 15] [--shapes SIDD-width32 GoPro-width32] [--skip onnxruntime]
    python benchmarks/deploy_speed.py --shapes Baseline-SIDD-width32 NAFSSR-S-x2 \\
        --json benchmarks/results/deploy_speed_family.json
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import (  # benchmarks/common.py: the script folder is on sys.path
    random_release_shape,
    run_record,
    write_results,
)

from nafnet_edge.benchmark import sgemm_gflops
from nafnet_edge.complexity import count_macs
from nafnet_edge.converters import get_target
from nafnet_edge.deploy import deploy
from nafnet_edge.releases import RELEASE_SHAPES

Runner = Callable[[np.ndarray], np.ndarray]


def time_interleaved(
    runners: dict[str, Runner], a: np.ndarray, runs: int, times: dict[str, list[float]], peak: float
) -> float:
    """``runs`` rounds of one run of every runner, appending ms to ``times``; returns the best sgemm rate seen
    (``peak`` or a probe taken between rounds)."""
    for _ in range(runs):
        peak = max(peak, sgemm_gflops(repeats=1))
        for k, run in runners.items():
            t = time.perf_counter()
            run(a)
            times[k].append((time.perf_counter() - t) * 1e3)
    return peak


def xnnpack_runner(model: torch.nn.Module, x: torch.Tensor) -> Runner:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    program = to_edge_transform_and_lower(torch.export.export(model, (x,)), partitioner=[XnnpackPartitioner()])
    buffer = program.to_executorch().buffer
    loaded = Runtime.get().load_program(buffer)
    method = loaded.load_method("forward")
    keep_alive = (buffer, loaded)  # the runtime does not own the program bytes

    def run(a: np.ndarray) -> np.ndarray:
        assert keep_alive
        return method.execute([torch.from_numpy(a)])[0].numpy()

    return run


def openvino_runner(model: torch.nn.Module, x: torch.Tensor) -> Runner:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(ov.convert_model(model, example_input=x), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) in ("f32", "<Type: 'float32'>")
    request = compiled.create_infer_request()
    return lambda a: request.infer({0: a})[0]


def onnxruntime_runner(model: torch.nn.Module, x: torch.Tensor) -> Runner:
    import onnxruntime as ort

    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, opset_version=17, dynamo=False, input_names=["image"])
    opts = ort.SessionOptions()
    session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    return lambda a: session.run(None, {"image": a})[0]


BACKENDS = {
    "xnnpack": ("ExecuTorch XNNPACK fp32", "executorch", xnnpack_runner),
    "openvino": ("OpenVINO f32 (pinned)", "openvino", openvino_runner),
    "onnxruntime": ("onnxruntime fp32", "onnx", onnxruntime_runner),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--sr-size", type=int, default=128, help="input side of super-resolution shapes (low resolution)")
    ap.add_argument("--shapes", nargs="+", default=["SIDD-width32", "GoPro-width32"], choices=list(RELEASE_SHAPES))
    ap.add_argument("--skip", nargs="*", default=[], choices=list(BACKENDS))
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    record = run_record("benchmarks/deploy_speed.py", probe=False)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(torch.get_num_threads())
    peak = sgemm_gflops()
    print(f"sgemm probe: {peak:.0f} GFLOP/s fp32; {args.runs} interleaved runs each; medians in ms", flush=True)
    header = f"{'shape':<22}{'runtime':<26}{'original':>10}{'deploy':>10}{'speed-up':>10}{'max err':>10}{'floor':>8}"
    print(header)
    print("-" * len(header))
    rows = []
    for shape in args.shapes:
        model = random_release_shape(shape)
        size = args.sr_size if model.config.up_scale > 1 else args.size
        x = torch.rand(1, model.config.in_channels, size, size)
        a = x.numpy()
        macs = count_macs(model.config, size, size)
        for key, (label, target, make) in BACKENDS.items():
            if key in args.skip:
                continue
            graph = deploy(model, norm_form=get_target(target).norm_form, input_size=(size, size))
            runners = {"original": make(model, x), "deploy": make(graph, x)}
            err = float(np.abs(runners["deploy"](a) - runners["original"](a)).max())
            times: dict[str, list[float]] = {k: [] for k in runners}
            for k in runners:  # warm-up
                runners[k](a)
            peak = time_interleaved(runners, a, args.runs, times, peak)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {
                "shape": shape,
                "class": model.config.class_name,
                "input": list(x.shape),
                "runtime": label,
                "original_ms": med["original"],
                "deploy_ms": med["deploy"],
                "speedup": med["original"] / med["deploy"],
                "max_abs_err": err,
                "macs": macs,
            }
            rows.append(row)
            print(
                f"{shape:<22}{label:<26}{med['original']:>10.1f}{med['deploy']:>10.1f}{row['speedup']:>9.2f}x"
                f"{err:>10.1e}{med['deploy'] / (2 * macs / (peak * 1e9) * 1e3):>7.2f}x (so far)",
                flush=True,
            )
    print(f"floor = fp32 compute floor: GMACs x 2 / best sgemm probe of the whole run, {peak:.0f} GFLOP/s:")
    for row in rows:
        row["floor_ms"] = 2 * row["macs"] / (peak * 1e9) * 1e3
        row["deploy_over_floor"] = row["deploy_ms"] / row["floor_ms"]
        print(
            f"{row['shape']:<22}{row['runtime']:<26} floor {row['floor_ms']:6.1f} ms, deploy at "
            f"{row['deploy_over_floor']:.2f}x"
        )
    if args.json:
        write_results(args.json, record, sgemm_gflops=peak, rows=rows)


if __name__ == "__main__":
    main()
