"""Image I/O against tensor I/O: one checkpoint converted both ways per target, compared on 8-bit photos and timed.

For each target (ONNX, OpenVINO, ExecuTorch; Core ML for agreement only: off macOS it runs in the ML-program
evaluator, which says nothing about speed) the embedded default denoiser is converted twice into a temporary
folder with ``nafnet_edge.api.convert``: tensor I/O (float32 NCHW in [0, 1]) and image I/O (``io="image"``: uint8
NHWC pixels in the target's default pixel format, the scale, clamp and round inside the artifact). Then:

- agreement: the shipped Kodak photos with seeded sigma-25 noise, rounded to 8 bits (what a camera app hands
  over), are restored through both artifacts in their runtimes, tiled as ``nafnet-edge run`` does it; each
  output rounded to 8 bits (the tensor artifact's by the app's rule, clamp and round half to even), the two
  compared sample by sample: the share equal, the share within one level, the largest difference; and each
  against the fp32 PyTorch reference through the same tiler, rounded the same way. The same for one tile (the
  photo's top-left tile, no blending): there two fp32 artifacts differ only where a value falls on a rounding tie
  (an fp16 program scales and rounds in half precision), while over a tiled photo the blend of two rounded tiles
  is rounded again where tiles overlap. Core ML runs in the ML-program evaluator off macOS (slow), so it gets
  the ``--quick`` photos;
- latency: the median of the runtime call on each artifact's own input (``Session.call``: float32 NCHW, or uint8
  pixels) at the input size, in interleaved rounds (tensor, image, then image, tensor, ...), so both see the same
  machine noise; the ratio image / tensor says what moving the conversion into the artifact costs or saves.

    python benchmarks/image_io.py [--targets onnx openvino executorch coreml] [--runs 15] [--quick]
        [--input-size 256] [--json benchmarks/results/image_io.json]

About two minutes on a quiet 2-core machine (most of it converting and Core ML's evaluator); ``--quick`` uses
two photos cropped to 320 px. The artifacts are written to a temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import run_record, write_results  # benchmarks/common.py: the script folder is on sys.path

from nafnet_edge import api
from nafnet_edge.converters import NotRunnable, Session, SessionSettings, get_target
from nafnet_edge.images import RGBImage
from nafnet_edge.inference import restore_image_with
from nafnet_edge.manifest import Manifest, read_manifest
from nafnet_edge.pixels import example_input, level_agreement, quantized
from nafnet_edge.validation import default_images

TARGETS = ("onnx", "openvino", "executorch", "coreml")
TIMED = {"onnx", "openvino", "executorch"}  # Core ML: agreement only (not timed off macOS)
QUICK_PHOTOS, QUICK_CROP_PX = 2, 320  # --quick: two photos, centre crops of 2 x 2 tiles


def photos(quick: bool) -> list[tuple[str, np.ndarray]]:
    """The shipped Kodak photos with validation's seeded sigma-25 noise, rounded to 8 bits: (name, H x W x 3)."""
    chosen = default_images(3)[:QUICK_PHOTOS] if quick else default_images(3)
    out = []
    for image in chosen:
        pixels = image.input
        if quick:
            h, w = pixels.shape[:2]
            top, left = max(0, (h - QUICK_CROP_PX) // 2), max(0, (w - QUICK_CROP_PX) // 2)
            pixels = pixels[top : top + QUICK_CROP_PX, left : left + QUICK_CROP_PX]
        out.append((image.name, quantized(pixels)))
    return out


def one_tile(session: Session, pixels: np.ndarray, manifest: Manifest) -> np.ndarray:
    """The top-left tile of ``pixels`` (zero-padded where the photo is smaller) through ``session.run`` once."""
    h, w = manifest.io.input_size
    x = np.zeros((1, manifest.io.channels, h, w), np.float32)
    crop = pixels[:h, :w].transpose(2, 0, 1)
    x[0, :, : crop.shape[1], : crop.shape[2]] = crop
    return session.run(x)


def restore(run: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, manifest: Manifest) -> np.ndarray:
    """``pixels`` restored through ``run`` (float32 NCHW tiles) as ``nafnet-edge run`` does it, in [0, 1] floats."""
    image = RGBImage(pixels, None, 8)
    out = restore_image_with(
        run,
        image,
        channels=manifest.io.channels,
        tile=manifest.io.input_size,
        overlap_px=manifest.tiling.overlap_px,
        multiple=manifest.padding_multiple,
    )
    return out.pixels


def describe(inputs: list[tuple[str, np.ndarray]]) -> str:
    h, w = inputs[0][1].shape[:2]
    return f"{len(inputs)} Kodak photos {h}x{w}"


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, float | int]:
    """8-bit agreement over several images: the least share within one level, the mean share equal, the largest
    difference."""
    each = [level_agreement(x, y) for x, y in zip(a, b, strict=True)]
    return {
        "within_one_level_share_min": min(float(e["within_one_level_share"]) for e in each),
        "exact_share_mean": float(np.mean([e["exact_share"] for e in each])),
        "max_level_diff": max(int(e["max_level_diff"]) for e in each),
    }


def open_session(directory: Path, manifest: Manifest, *, timing: bool) -> Session:
    target = get_target(manifest.target)
    return target.open_session(directory, export=manifest.export, settings=SessionSettings(timing=timing))


def time_interleaved(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """``rounds`` rounds of one call each, the order reversed every other round; milliseconds per call."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    order = list(calls)
    for i in range(rounds):
        for k in order if i % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            calls[k]()
            times[k].append((time.perf_counter() - started) * 1e3)
    return times


def quiet() -> contextlib.AbstractContextManager[Any]:
    """The converters' and runtimes' own chatter kept off the table (nafnet_edge.progress captures it)."""
    from nafnet_edge import progress

    return progress.backend_output()


Photos = list[tuple[str, np.ndarray]]


def convert_both(target: str, loaded: Any, work: Path, size: int) -> dict[str, tuple[Path, Manifest]]:
    """The tensor-I/O and image-I/O artifacts of ``target`` (its default precision and pixel format), unvalidated:
    this script measures them itself."""
    built = {}
    for io in ("tensor", "image"):
        with quiet():
            result = api.convert(loaded, target=target, output=work, input_size=size, io=io, validate=False)
        built[io] = (result.directory, read_manifest(result.directory))
    return built


def compare(built: dict[str, tuple[Path, Manifest]], inputs: Photos, reference: list[np.ndarray]) -> dict[str, Any]:
    """The agreement of the two artifacts' 8-bit outputs with each other (tiled photos, and one tile) and with the
    reference."""
    with quiet():
        sessions = {io: open_session(d, m, timing=False) for io, (d, m) in built.items()}
        outputs = {io: [restore(s.run, p, built[io][1]) for _, p in inputs] for io, s in sessions.items()}
        tiles = {io: [one_tile(s, p, built[io][1]) for _, p in inputs] for io, s in sessions.items()}
    return {
        "runtime": sessions["tensor"].runtime,
        "image_vs_tensor": agreement(outputs["image"], outputs["tensor"]),
        "image_vs_tensor_one_tile": agreement(tiles["image"], tiles["tensor"]),
        "tensor_vs_reference": agreement(outputs["tensor"], reference),
        "image_vs_reference": agreement(outputs["image"], reference),
    }


def latency(built: dict[str, tuple[Path, Manifest]], rounds: int) -> dict[str, Any]:
    """Medians of the runtime call on each artifact's own input, interleaved; or why it cannot be timed here."""
    try:
        with quiet():
            sessions = {io: open_session(d, m, timing=True) for io, (d, m) in built.items()}
    except NotRunnable as e:
        return {"not_timed": str(e)}
    x = {io: example_input(m.io.input.shape, m.io.input.dtype) for io, (_, m) in built.items()}
    calls = {io: (lambda s=s, a=x[io]: s.call(a)) for io, s in sessions.items()}
    for call in calls.values():  # warm-up
        call()
        call()
    medians = {io: statistics.median(t) for io, t in time_interleaved(calls, rounds).items()}
    return {
        "tensor_ms": round(medians["tensor"], 3),
        "image_ms": round(medians["image"], 3),
        "image_over_tensor": round(medians["image"] / medians["tensor"], 3),
        "rounds": rounds,
    }


def print_table(rows: list[dict[str, Any]], photos_shown: str) -> None:
    header = (
        f"{'target':<12}{'prec':<6}{'pixels':<8}{'tensor ms':>10}{'image ms':>10}{'image/tensor':>13}"
        f"{'<=1 level':>11}{'equal':>9}{'max':>5}{'tile equal':>12}{'ref: tensor':>13}{'ref: image':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        a, t, i = r["image_vs_tensor"], r["tensor_vs_reference"], r["image_vs_reference"]
        one = r["image_vs_tensor_one_tile"]
        ms = (
            f"{r['tensor_ms']:>10.2f}{r['image_ms']:>10.2f}{r['image_over_tensor']:>12.3f}x"
            if "tensor_ms" in r
            else f"{'-':>10}{'-':>10}{'-':>13}"
        )
        print(
            f"{r['target']:<12}{r['precision']:<6}{r['pixel_format']:<8}{ms}"
            f"{a['within_one_level_share_min']:>10.3%} {a['exact_share_mean']:>8.2%}{a['max_level_diff']:>5}"
            f"{one['exact_share_mean']:>11.4%} {t['within_one_level_share_min']:>12.3%}"
            f"{i['within_one_level_share_min']:>11.3%}" + ("" if r["photos"] == photos_shown else f"  ({r['photos']})")
        )
    print(
        "<=1 level, equal, max: the image artifact's 8-bit output against the tensor artifact's rounded by the app "
        "(least share within one level over the photos, mean share equal, largest difference in levels); tile "
        "equal: the same on one tile, no blending; ref: the least share within one level of the fp32 PyTorch "
        "reference rounded the same way."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    ap.add_argument("--runs", type=int, default=15, help="interleaved timing rounds (each: one call of each I/O)")
    ap.add_argument("--input-size", type=int, default=256, help="the artifacts' input size (tile)")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_PHOTOS} photos cropped to {QUICK_CROP_PX} px")
    ap.add_argument("--json", type=Path, help="write the rows here (benchmarks/results/image_io.json)")
    args = ap.parse_args()
    record = run_record("benchmarks/image_io.py", probe=False)
    warnings.filterwarnings("ignore")
    loaded = api.load()
    model = loaded.model.float().eval()

    def reference_run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    photo_sets = {quick: photos(quick) for quick in {args.quick, True}}
    shown = describe(photo_sets[args.quick])
    size = args.input_size
    print(
        f"{loaded.config.width}-wide default denoiser, {size} px artifacts; {shown}, sigma-25 noise rounded to 8 "
        f"bits; {args.runs} interleaved rounds",
        flush=True,
    )
    references: dict[bool, list[np.ndarray]] = {}
    rows = []
    work = Path(tempfile.mkdtemp(prefix="image-io-"))
    try:
        for target in args.targets:
            try:
                get_target(target).check_available()
            except Exception as e:  # a missing extra: the other targets still run
                print(f"{target}: skipped ({e})", flush=True)
                continue
            started = time.perf_counter()
            built = convert_both(target, loaded, work, size)
            convert_s = time.perf_counter() - started
            tensor_m, image_m = built["tensor"][1], built["image"][1]
            timed = target in TIMED
            quick = args.quick or not timed
            inputs = photo_sets[quick]
            if quick not in references:
                references[quick] = [restore(reference_run, pixels, tensor_m) for _, pixels in inputs]
            started = time.perf_counter()
            row: dict[str, Any] = {
                "target": target,
                "precision": tensor_m.precision,
                "pixel_format": image_m.io.pixel_format,
                "input_size": size,
                "photos": describe(inputs),
                **compare(built, inputs, references[quick]),
            }
            row.update(convert_s=round(convert_s, 1), restore_s=round(time.perf_counter() - started, 1))
            if timed:
                row.update(latency(built, args.runs))
            else:
                row["not_timed"] = "off macOS it runs in the ML-program evaluator, which says nothing about speed"
            rows.append(row)
            a = row["image_vs_tensor"]
            timing = (
                f"tensor {row['tensor_ms']:.2f} ms, image {row['image_ms']:.2f} ms, x{row['image_over_tensor']:.3f}"
                if "tensor_ms" in row
                else "not timed"
            )
            print(
                f"{target} {row['precision']} ({row['pixel_format']}): image vs tensor "
                f"{a['within_one_level_share_min']:.4%} within 1 level, {a['exact_share_mean']:.2%} equal, "
                f"max {a['max_level_diff']}; {timing}",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print_table(rows, shown)
    if args.json:
        settings = {
            "input_size": size,
            "runs": args.runs,
            "photos": [name for name, _ in photo_sets[args.quick]],
            "photo_size": list(photo_sets[args.quick][0][1].shape[:2]),
            "noise": "sigma 25/255, seeded (validation's), rounded to 8 bits",
            "quick": args.quick,
            "model": f"embedded default, width {loaded.config.width}",
        }
        write_results(args.json, record, settings=settings, rows=rows)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
