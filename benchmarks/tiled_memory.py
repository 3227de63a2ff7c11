"""Peak memory and time of tiled reference inference on a camera-size frame (default 4000x3000, 12 MP).

Each configuration runs in its own process so that its peak resident memory (ru_maxrss) is its own. The
model has the NAFNet-SIDD-width32 shape (29.16 M params) with random weights: memory and time do not
depend on the weights. Whole-frame rows use smaller frames to show how untiled memory grows.

    python benchmarks/tiled_memory.py                 # 12 MP frame, tiles 256/512/1024, whole 1 and 3 MP
    python benchmarks/tiled_memory.py --quick         # 2 MP frame, for a smoke run
    python benchmarks/tiled_memory.py --json benchmarks/results/tiled_memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import run_record, write_results  # benchmarks/common.py: the script folder is on sys.path

BUDGET_MB = 4096


def child(height: int, width: int, tile: int, overlap: int, batch: int) -> None:
    import torch
    from common import random_release_shape

    from nafnet_edge.inference import restore_tensor

    model = random_release_shape("SIDD-width32")
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    image = torch.rand(1, 3, height, width)
    start = time.perf_counter()
    out = restore_tensor(model, image, tile_px=tile, overlap_px=overlap, batch=batch)
    seconds = time.perf_counter() - start
    assert out.shape == image.shape and bool(torch.isfinite(out).all())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak_mb, "model_and_runtime_mb": base_mb, "seconds": seconds}))


def measure(height: int, width: int, tile: int, overlap: int, batch: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", f"{height},{width},{tile},{overlap},{batch}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="a 2 MP frame instead of 12 MP")
    ap.add_argument("--json", type=Path, help="also write the rows to this file")
    args = ap.parse_args()
    record = run_record("benchmarks/tiled_memory.py", probe=False)
    if args.child:
        child(*(int(v) for v in args.child.split(",")))
        return

    h, w = (1200, 1600) if args.quick else (3000, 4000)
    rows = [
        (f"{w}x{h}", h, w, 256, 32, 1),
        (f"{w}x{h}", h, w, 512, 64, 1),
        (f"{w}x{h}", h, w, 1024, 64, 1),
        ("1024x1024 whole", 1024, 1024, 0, 0, 1),
        ("2048x1536 whole", 1536, 2048, 0, 0, 1),
    ]
    if args.quick:
        rows = rows[:2] + rows[3:4]
    results = []
    print(f"NAFNet-SIDD-width32 shape, fp32 PyTorch eager on CPU; budget {BUDGET_MB} MB", flush=True)
    header = f"{'frame':<18}{'tile':>6}{'overlap':>9}{'peak MB':>10}{'x budget':>10}{'s':>8}{'MP/s':>7}"
    print(header)
    print("-" * len(header))
    for label, hh, ww, tile, overlap, batch in rows:
        r = measure(hh, ww, tile, overlap, batch)
        mp_s = hh * ww / 1e6 / r["seconds"]
        results.append({"frame": label, "height": hh, "width": ww, "tile": tile, "overlap": overlap, **r})
        print(
            f"{label:<18}{tile or '-':>6}{overlap if tile else '-':>9}{r['peak_mb']:>10.0f}"
            f"{r['peak_mb'] / BUDGET_MB:>10.2f}{r['seconds']:>8.1f}{mp_s:>7.3f}",
            flush=True,
        )
    if args.json:
        write_results(args.json, record, rows=results)


if __name__ == "__main__":
    main()
