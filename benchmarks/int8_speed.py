"""INT8 against fp32 in the same runtime, side by side in one run: ExecuTorch XNNPACK and OpenVINO CPU.

For the NAFNet-SIDD-width32 and GoPro-width32 shapes at 256x256 (random weights: speed only). Per runtime, every
variant is timed in the same interleaved rounds (one run of each, then the next round), medians in ms:

- original fp32: the upstream graph, exported as is (OpenVINO also with the plugin's default precision hint,
  bf16 where the CPU has it: the number an app team gets without asking for anything);
- deploy fp32: the reparameterized graph (``nafnet_edge.deploy``);
- naive PTQ: the upstream graph quantized the usual way (PT2E XNNPACKQuantizer, symmetric per-channel; NNCF
  ``quantize`` of the OpenVINO model with its defaults), the baseline;
- int8, units float: the nafnet-edge int8 artifact (below) with the units the ``--max-drift`` search kept on the
  embedded denoiser left float (``--keep-float``), to show what meeting the 0.1 dB budget costs in latency;
- int8, fp32 norms (XNNPACK) / int8, f32 remainder (OpenVINO): the artifact with its float part fixed to fp32,
  as it was before the float part was timed per CPU; int8, fp16 norms / centred norms / bf16 remainder: fixed
  to each alternative (bf16 only where the CPU has it);
- nafnet-edge int8: the artifact ``nafnet-edge quantize`` writes (our quantizer on the deploy graph, exported
  and opened by the target's session with what its export record ships: the float part timed on this CPU,
  ``--norm-precision auto`` / ``--inference-precision auto``). ``--qat-iters N`` fine-tunes it first; QAT changes
  values, not the op graph, so the default times the PTQ-calibrated export of the same graph.

Ratios are against the original fp32 graph of the same runtime; "floor" is the int8 compute floor, GMACs x 2 /
(4 x the best fp32 sgemm probe of the run), int8 dot products at 4x the fp32 rate. The machine (CPU model and the
ISA flags that decide the kernels: AVX512-FP16, AVX512-BF16, AMX, VNNI) is printed first and recorded; ratios
differ between Intel CPUs with AMX and AMD Zen 4. ``--profile RUNS`` adds the per-operator profile of ours.

    python benchmarks/int8_speed.py [--runs 11] [--shapes SIDD-width32 GoPro-width32] [--skip openvino]
        [--profile 5] [--json results/int8_speed.json]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import random_release_shape, run_record, write_results
from deploy_speed import Runner, openvino_runner, sgemm_gflops, time_interleaved, xnnpack_runner

from nafnet_edge.complexity import count_macs
from nafnet_edge.deploy import deploy
from nafnet_edge.images import read_image
from nafnet_edge.quantization import get_quantizer
from nafnet_edge.quantization.train import TrainConfig, TrainImage, quantize_graph
from nafnet_edge.releases import RELEASE_SHAPES
from nafnet_edge.validation import psnr

KODAK = Path(__file__).resolve().parents[1] / "nafnet_edge" / "data" / "kodak"
CALIBRATION_CROPS = 2  # speed does not depend on the ranges; calibrating and tracing dominate the set-up time


def calibration_images(min_size: int = 0) -> list[TrainImage]:
    """The shipped Kodak crops, mirrored out to at least ``min_size`` (speed does not depend on the ranges;
    tiles larger than the shipped crops still need a calibration crop of their size)."""
    images = []
    for path in sorted(KODAK.glob("*.png")):
        pixels = read_image(path).pixels
        while min(pixels.shape[:2]) < min_size:
            h, w = pixels.shape[:2]
            pixels = np.pad(
                pixels, ((0, min(h, max(0, min_size - h))), (0, min(w, max(0, min_size - w))), (0, 0)), mode="symmetric"
            )
        images.append(TrainImage(pixels))
    return images


def calibration_crops(size: int, n: int = CALIBRATION_CROPS) -> list[torch.Tensor]:
    rng = np.random.default_rng(0)
    crops = []
    for image in calibration_images() * (n // 4 + 1):
        h, w = image.input.shape[:2]
        top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        patch = image.input[top : top + size, left : left + size].transpose(2, 0, 1)
        crops.append(torch.from_numpy(np.ascontiguousarray(patch))[None])
    return crops[:n]


def ours_session(
    target: str,
    model: torch.nn.Module,
    size: int,
    qat_iters: int,
    keep: list[object],
    keep_float: tuple[str, ...] = (),
    **options: str,
) -> Any:
    """The int8 artifact as ``nafnet-edge quantize`` writes it (``keep_float``: units left float, as the
    ``--max-drift`` search leaves them; ``options``: the quantizer's, ``norm_precision`` or
    ``inference_precision``), opened by its target's session with what it ships with (the export record).
    Variants that differ only in their export options share one calibrated module."""
    from nafnet_edge.converters import get_target

    key = (target, id(model), size, qat_iters, keep_float)
    if key not in _PREPARED:
        quantizer = get_quantizer(target, keep_float=keep_float)
        graph = deploy(model, norm_form=get_target(target).norm_form, input_size=(size, size))  # type: ignore[arg-type]
        method = "qat" if qat_iters else "ptq"
        config = TrainConfig(method=method, iters=max(qat_iters, 1), batch=1, calibration_batches=CALIBRATION_CROPS)
        _PREPARED[key] = quantize_graph(quantizer, graph, calibration_images(size), size, config, progress=False)[0]
    out = Path(tempfile.mkdtemp(prefix="int8-speed-"))
    keep.append(out)
    quantizer = get_quantizer(target, keep_float=keep_float, **options)
    exported = quantizer.export(_PREPARED[key], out, torch.rand(1, 3, size, size))
    session = get_target(target).open_session(out, export=exported.info)
    session.info["export"] = exported.info
    keep.append(session)
    return session


_PREPARED: dict[tuple[Any, ...], torch.nn.Module] = {}


def naive_xnnpack_runner(model: torch.nn.Module, x: torch.Tensor) -> Runner:
    """PT2E PTQ of the upstream graph with ExecuTorch's XNNPACK quantizer, defaults, lowered to XNNPACK."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(model, (x,)).module(), quantizer)  # type: ignore[arg-type]
    with torch.no_grad():
        for crop in calibration_crops(x.shape[-1]):
            prepared(crop)
    return xnnpack_runner(convert_pt2e(prepared), x)


def naive_openvino_runner(model: torch.nn.Module, x: torch.Tensor) -> Runner:
    """NNCF PTQ of the upstream graph's OpenVINO model with NNCF's defaults, compiled with the default hint."""
    import nncf
    import openvino as ov

    crops = [c.numpy() for c in calibration_crops(x.shape[-1])]
    quantized = nncf.quantize(ov.convert_model(model, example_input=x), nncf.Dataset(crops), subset_size=len(crops))
    request = ov.Core().compile_model(quantized, "CPU").create_infer_request()
    return lambda a: request.infer({0: a})[0]


def openvino_default_runner(model: torch.nn.Module, x: torch.Tensor) -> Runner:
    import openvino as ov

    request = ov.Core().compile_model(ov.convert_model(model, example_input=x), "CPU").create_infer_request()
    return lambda a: request.infer({0: a})[0]


BEFORE = {"xnnpack": {"norm_precision": "fp32"}, "openvino": {"inference_precision": "f32"}}
OURS = "nafnet-edge int8"
BEFORE_LABEL = "int8, fp32 float part"  # fp32 norms / f32 remainder: the float part fixed, not timed per CPU


def variants(runtime: str, model: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace, keep: list[object]):
    size = x.shape[-1]
    target = "executorch" if runtime == "xnnpack" else "openvino"

    def ours(keep_float: tuple[str, ...] = (), **options: str) -> Callable[[], Any]:
        return lambda: ours_session(target, model, size, args.qat_iters, keep, keep_float, **options)

    int8: dict[str, Callable[[], Any]] = {BEFORE_LABEL: ours(**BEFORE[runtime])}
    if runtime == "xnnpack":
        graph = deploy(model, norm_form="conv-mean", input_size=(size, size))
        if args.all_float_parts:
            int8["int8, fp16 norms"] = ours(norm_precision="fp16")
            int8["int8, centred norms"] = ours(norm_precision="fp32-centred")
        return {
            "original fp32": lambda: xnnpack_runner(model, x),
            "deploy fp32": lambda: xnnpack_runner(graph, x),
            "naive PTQ int8": lambda: naive_xnnpack_runner(model, x),
            **int8,
            OURS: ours(),
            **({KEPT_LABEL: ours(args.keep_float)} if args.keep_float else {}),
        }
    graph = deploy(model, norm_form="mvn", input_size=(size, size))
    if "BF16" in openvino_capabilities():
        int8["int8, bf16 remainder"] = ours(inference_precision="bf16")
    return {
        "original fp32": lambda: openvino_runner(model, x),
        "original default hint": lambda: openvino_default_runner(model, x),
        "deploy fp32": lambda: openvino_runner(graph, x),
        "naive PTQ int8": lambda: naive_openvino_runner(model, x),
        **int8,
        OURS: ours(),
        **({KEPT_LABEL: ours(args.keep_float)} if args.keep_float else {}),
    }


def openvino_capabilities() -> list[str]:
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def shipped_choice(session: Any) -> str:
    """What an int8 artifact's float part runs in, as its export record says (norms for ExecuTorch, the
    inference precision for OpenVINO)."""
    export = session.info.get("export", {})
    if "norm_kernels" in export:
        chosen = ", ".join(f"{n} {k} norms" for k, n in export["norm_kernels"].items())
        timed = export.get("norm_timings", {}).get("median_ms")
    else:
        chosen = str(export.get("inference_precision", ""))
        timed = export.get("inference_precision_timings", {}).get("median_ms")
    if timed:  # what auto measured when it chose
        chosen += " (timed: " + ", ".join(f"{k} {v:.1f} ms" for k, v in timed.items()) + ")"
    return chosen


LABELS = {"xnnpack": "ExecuTorch XNNPACK", "openvino": "OpenVINO CPU"}
KEPT_LABEL = "int8, units float"
# what the --max-drift search kept on the embedded denoiser (Kodak24 sigma 25: XNNPACK QAT, OpenVINO PTQ)
KEPT_BY_SEARCH = ("decoders.3.0", "encoders.0.0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--shapes", nargs="+", default=["SIDD-width32", "GoPro-width32"], choices=list(RELEASE_SHAPES))
    ap.add_argument("--skip", nargs="*", default=[], choices=list(LABELS))
    ap.add_argument("--qat-iters", type=int, default=0, help="QAT steps before exporting ours (0: PTQ calibration)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--profile", type=int, default=0, metavar="RUNS", help="per-operator profile of ours (RUNS runs)")
    ap.add_argument(
        "--keep-float",
        type=lambda text: tuple(text.split(",")),
        default=(),
        metavar="UNITS",
        help=f"add a '{KEPT_LABEL}' variant leaving these units float (the search kept {','.join(KEPT_BY_SEARCH)})",
    )
    ap.add_argument("--leave-out", nargs="*", default=[], metavar="VARIANT", help="variants not to build and time")
    ap.add_argument(
        "--all-float-parts",
        action="store_true",
        help="ExecuTorch: also fp16 and centred norms fixed (auto times fp32 against fp16 itself; it records both)",
    )
    args = ap.parse_args()
    record = run_record("benchmarks/int8_speed.py", probe=False)
    warnings.filterwarnings("ignore")
    cpu = record["machine"]
    print(f"machine: {cpu['cpu']}; ISA: {' '.join(cpu.get('isa', [])) or 'unknown'}; {cpu.get('cores')} cores")
    peak = sgemm_gflops()
    print(f"sgemm probe: {peak:.0f} GFLOP/s fp32; {args.runs} interleaved runs; medians in ms", flush=True)
    rows = []
    profiles: list[dict[str, Any]] = []
    keep: list[object] = []
    for shape in args.shapes:
        model = random_release_shape(shape)
        x = torch.rand(1, 3, args.size, args.size)
        a = x.numpy()
        macs = count_macs(model.config, args.size, args.size)
        for runtime, label in LABELS.items():
            if runtime in args.skip:
                continue
            chosen = variants(runtime, model, x, args, keep).items()
            made = {name: make() for name, make in chosen if name not in args.leave_out or name == "original fp32"}
            sessions = {k: v for k, v in made.items() if not callable(v)}
            runners = {k: v.run if k in sessions else v for k, v in made.items()}
            reference = runners["original fp32"](a)
            drift = {k: psnr(r(a), reference) for k, r in runners.items()}
            times: dict[str, list[float]] = {k: [] for k in runners}
            peak = time_interleaved(runners, a, args.runs, times, peak)
            med = {k: statistics.median(v) for k, v in times.items()}
            for k in runners:
                rows.append(
                    {
                        "shape": shape,
                        "runtime": label,
                        "variant": k,
                        "ms": med[k],
                        "ms_runs": times[k],
                        "vs_original_fp32": med[k] / med["original fp32"],
                        "psnr_vs_original_fp32_db": drift[k],
                        "macs": macs,
                        **({"float_part": shipped_choice(sessions[k])} if k in sessions else {}),
                        **({"export": sessions[k].info["export"]} if k == OURS else {}),
                    }
                )
            if args.profile and OURS in sessions and sessions[OURS].profile is not None:
                profiles.append({"shape": shape, "runtime": label, **sessions[OURS].profile(a, args.profile)})
            print(f"{shape} / {label}: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()), flush=True)
    floor = {
        shape: 2 * count_macs(RELEASE_SHAPES[shape], args.size, args.size) / (4 * peak * 1e9) * 1e3
        for shape in args.shapes
    }
    print(f"\nint8 floor = GMACs x 2 / (4 x {peak:.0f} GFLOP/s), the best fp32 sgemm probe of the run")
    header = (
        f"{'shape':<14}{'runtime':<20}{'variant':<23}{'ms':>8}{'x orig fp32':>12}{'x floor':>9}{'PSNR vs fp32':>14}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        row["int8_floor_ms"] = floor[row["shape"]]
        row["vs_int8_floor"] = row["ms"] / row["int8_floor_ms"]
        db = row["psnr_vs_original_fp32_db"]
        print(
            f"{row['shape']:<14}{row['runtime']:<20}{row['variant']:<23}{row['ms']:>8.1f}{row['vs_original_fp32']:>11.2f}x"
            f"{row['vs_int8_floor']:>8.2f}x{('exact' if db > 100 else f'{db:.1f} dB'):>14}"
        )
    print("(random weights: the PSNR column only shows which variants are quantized, not their quality)")
    for row in rows:
        if "float_part" in row:
            print(f"{row['shape']} / {row['runtime']} / {row['variant']}: float part {row['float_part']}")
    for profile in profiles:
        print(f"\n{profile['shape']} / {profile['runtime']} / {OURS}: {profile.get('source', '')}")
        print(f"  total {profile['total_ms']:.1f} ms")
        for op in profile["top"][:12]:
            print(f"  {op['op']:<48}{op['ms']:>8.2f} ms{op['share']:>7.1%}  x{op['count']}")
    if args.json:
        write_results(args.json, record, sgemm_gflops=peak, runs=args.runs, rows=rows, profiles=profiles)


if __name__ == "__main__":
    main()
