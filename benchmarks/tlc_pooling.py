"""What TLC's local pooling costs, before and after its box means stopped being one 2-D average pool.

TLC (NAFNetLocal: the GoPro and REDS releases) pools each channel-attention input with a stride-1 box mean whose
kernel was fixed at the training size (384 x 384 at full resolution for 256 px training crops). Written as one
``avg_pool2d`` that is k1 * k2 reads a pixel; now the reference model sums a float64 integral image (four lookups a
pixel) and deploy graphs use two 1-D average pools (k1 + k2 reads) with the replicate edges copied by constant
0/1 products. Two measurements, GoPro-width32 shape with random weights (speed only), fp32:

- ``run``: a 1280x720 frame through ``nafnet_edge.inference.restore_tensor`` as ``nafnet-edge run`` does it
  (default tiles 512, overlap 64): BEFORE = ``ChannelPool`` with the old ``avg_pool2d`` body (monkeypatched here),
  AFTER = the package as it is. BEFORE takes minutes: it runs ``--before-runs`` times (default once) and
  ``--frame`` shrinks the frame (kernels are local only where a tile exceeds 384 px).
- ``deploy``: the exported ``--size`` (512) deploy graph in ExecuTorch XNNPACK (fp32) and OpenVINO (f32, pinned),
  exported with the project's converters: BEFORE = ``FixedPool`` as one 2-D ``avg_pool2d`` plus a replicate pad
  (monkeypatched while exporting), AFTER = the package's ``FixedPool``.

Runs are interleaved (before, after, after, ...) and the table gives medians and after / before.

    python benchmarks/tlc_pooling.py [--frame 1280x720] [--size 512] [--runs 5] [--before-runs 1]
        [--sections run deploy] [--skip openvino] [--json benchmarks/results/tlc_pooling.json]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import random_release_shape, run_record, write_results  # benchmarks/common.py: on sys.path

from nafnet_edge import defaults
from nafnet_edge import model as model_module
from nafnet_edge.deploy import FixedPool, deploy
from nafnet_edge.inference import restore_tensor

SHAPE = "GoPro-width32"
TARGETS = {"xnnpack": ("executorch", "ExecuTorch XNNPACK fp32"), "openvino": ("openvino", "OpenVINO f32 (pinned)")}


def _old_box_mean(x: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """BEFORE: the valid box mean as one 2-D average pool (k1 * k2 reads a pixel)."""
    return F.avg_pool2d(x, kernel, stride=1)


def _old_fixed_pool(self: FixedPool, x: torch.Tensor) -> torch.Tensor:
    """BEFORE: FixedPool as one 2-D average pool and a replicate pad."""
    if self.kernel_size is None:
        return x.mean((2, 3), keepdim=True)
    out = F.avg_pool2d(x, self.kernel_size, stride=1)
    return F.pad(out, self.pad, mode="replicate") if any(self.pad) else out


@contextmanager
def old_pooling() -> Iterator[None]:
    """BEFORE, monkeypatched: ChannelPool's box means (eager and traced) and FixedPool's forward as they were."""
    saved = model_module.integral_box_mean, model_module.separable_box_mean, FixedPool.forward
    model_module.integral_box_mean = _old_box_mean
    model_module.separable_box_mean = _old_box_mean
    FixedPool.forward = _old_fixed_pool  # type: ignore[method-assign]
    try:
        yield
    finally:
        model_module.integral_box_mean, model_module.separable_box_mean, FixedPool.forward = saved  # type: ignore[method-assign]


def interleaved(runs: dict[str, tuple[Callable[[], Any], int]]) -> dict[str, list[float]]:
    """Rounds of one call of every variant that still has runs left (``name -> (call, runs)``); ms per call."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(max(n for _, n in runs.values())):
        for name, (call, n) in runs.items():
            if round_ < n:
                started = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - started) * 1e3)
    return times


def row(section: str, variant: str, times: dict[str, list[float]], **extra: Any) -> dict[str, Any]:
    before, after = statistics.median(times["before"]), statistics.median(times["after"])
    return {
        "section": section,
        "variant": variant,
        "before_ms": before,
        "after_ms": after,
        "after_over_before": after / before,
        "before_runs": len(times["before"]),
        "after_runs": len(times["after"]),
        **extra,
    }


def print_row(r: dict[str, Any]) -> None:
    notes = ", ".join(f"{k} {v}" for k, v in r.items() if k.startswith(("partitions", "max_abs")))
    print(
        f"{r['section']:<8}{r['variant']:<40}{r['before_ms']:>12.1f}{r['after_ms']:>10.1f}"
        f"{r['after_over_before']:>9.3f}x  {r['before_runs']}/{r['after_runs']} runs  {notes}",
        flush=True,
    )


def bench_run(frame: tuple[int, int], runs: int, before_runs: int) -> dict[str, Any]:
    model = random_release_shape(SHAPE)
    w, h = frame
    image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    kwargs = {"tile_px": defaults.RUN_TILE_PX, "overlap_px": defaults.RUN_OVERLAP_PX, "batch": defaults.TILE_BATCH}
    outputs: dict[str, torch.Tensor] = {}

    def before() -> None:
        with old_pooling():
            outputs["before"] = restore_tensor(model, image, **kwargs)

    def after() -> None:
        outputs["after"] = restore_tensor(model, image, **kwargs)

    after()  # warm-up
    times = interleaved({"before": (before, before_runs), "after": (after, runs)})
    diff = float((outputs["before"] - outputs["after"]).abs().max())
    tiles = f"tiles {kwargs['tile_px']}/{kwargs['overlap_px']}"
    return row("run", f"PyTorch eager {w}x{h}, {tiles}", times, max_abs_diff=diff)


def bench_deploy(size: int, runs: int, before_runs: int, skip: list[str]) -> list[dict[str, Any]]:
    from nafnet_edge.converters import ExportOptions, get_target

    model = random_release_shape(SHAPE)
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    rows = []
    for key, (target_name, label) in TARGETS.items():
        if key in skip:
            continue
        target = get_target(target_name)
        target.check_available()
        graph = deploy(model, norm_form=target.norm_form, input_size=(size, size))  # type: ignore[arg-type]
        runners, infos = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for variant in ("before", "after"):
                out = Path(tmp) / variant
                out.mkdir()
                started = time.perf_counter()
                if variant == "before":
                    with old_pooling():
                        infos[variant] = target.export(graph, out, ExportOptions(input_size=(size, size))).info
                else:
                    infos[variant] = target.export(graph, out, ExportOptions(input_size=(size, size))).info
                print(f"  {label}: exported {variant} in {time.perf_counter() - started:.0f} s", flush=True)
                runners[variant] = target.load_runner(out, export=infos[variant])
            outs = {k: r.run(x) for k, r in runners.items()}  # also the warm-up
            times = interleaved(
                {k: (lambda r=r: r.run(x), before_runs if k == "before" else runs) for k, r in runners.items()}
            )
        extra: dict[str, Any] = {"max_abs_diff": float(np.abs(outs["before"] - outs["after"]).max())}
        if key == "xnnpack":
            extra |= {f"partitions_{k}": info.get("delegated_partitions") for k, info in infos.items()}
        rows.append(row("deploy", f"{label} {size}x{size}", times, **extra))
        print_row(rows[-1])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frame", default="1280x720", help="run section: frame WIDTHxHEIGHT (default 1280x720)")
    ap.add_argument("--size", type=int, default=512, help="deploy section: square input size (default 512)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs of AFTER (default 5)")
    ap.add_argument("--before-runs", type=int, default=1, help="timed runs of BEFORE, the slow one (default 1)")
    ap.add_argument("--sections", nargs="+", default=["run", "deploy"], choices=["run", "deploy"])
    ap.add_argument("--skip", nargs="*", default=[], choices=list(TARGETS))
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    frame = tuple(int(v) for v in args.frame.lower().split("x"))
    if len(frame) != 2 or min(frame) < 16 or args.size % 16 or min(args.runs, args.before_runs) < 1:
        ap.error("--frame is WIDTHxHEIGHT of at least 16 px, --size a multiple of 16, runs at least 1")
    record = run_record("benchmarks/tlc_pooling.py")
    warnings.filterwarnings("ignore")
    m = record["machine"]
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, ISA {', '.join(m['isa']) or '-'}, sgemm {m['sgemm_gflops']} GFLOP/s"
    )
    print(
        f"{SHAPE} shape, random weights, fp32; BEFORE = TLC box means as one 2-D avg_pool2d (monkeypatched), "
        f"AFTER = this package; BEFORE runs {args.before_runs}x, AFTER {args.runs}x, interleaved; medians in ms",
        flush=True,
    )
    header = f"{'section':<8}{'variant':<40}{'before ms':>12}{'after ms':>10}{'after/bef':>10}"
    print(header + "\n" + "-" * len(header), flush=True)
    rows = []
    if "run" in args.sections:
        rows.append(bench_run(frame, args.runs, args.before_runs))  # type: ignore[arg-type]
        print_row(rows[-1])
    if "deploy" in args.sections:
        rows += bench_deploy(args.size, args.runs, args.before_runs, args.skip)
    if args.json:
        settings = {"shape": SHAPE, "frame": args.frame, "size": args.size, "runs": args.runs}
        write_results(args.json, record, settings=settings | {"before_runs": args.before_runs}, rows=rows)


if __name__ == "__main__":
    main()
