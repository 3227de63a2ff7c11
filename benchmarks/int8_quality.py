"""INT8 quality on real photos: fp32, PTQ and QAT artifacts of the embedded denoiser, each run in its runtime.

The embedded default (width 16, trained on CBSD68 with sigma 5-50 noise) restores Kodak24 with sigma-25 noise
(held out from its training). For every target the script runs the tool's own commands, in process:

    nafnet-edge convert  --target T                           (fp32 artifact)
    nafnet-edge quantize --target T --method ptq --train-data TRAIN (calibration only)
    nafnet-edge quantize --target T --method qat --train-data TRAIN (distillation from the fp32 teacher, no labels)

each validated against the clean images (``--val-pairs``): PSNR of the artifact's output vs ground truth, the
same for the fp32 PyTorch reference, and drift = reference - artifact (the int8 budget is 0.1 dB). Training
images are CBSD68 with seeded sigma-25 noise written as 8-bit PNGs (what a camera app feeds the model), never
a Kodak image.

    python benchmarks/int8_quality.py [--train ../shared/data/CBSD68] [--eval ../shared/data/Kodak24]
        [--targets executorch openvino] [--iters 300] [--input-size 128] [--json results/int8_quality.json]
        [--float-parts [--only-ptq]]

``--float-parts`` adds PTQ artifacts with the float part fixed to each choice ``quantize`` can time (ExecuTorch
norms fp32 / fp16, OpenVINO remainder f32 / bf16), to show what the choice does to quality on any CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from common import run_record, write_results  # benchmarks/common.py: the script folder is on sys.path

from nafnet_edge.cli import main as nafnet_edge
from nafnet_edge.images import RGBImage, read_image, write_image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def add_noise(src: Path, dst: Path, sigma: float, seed: int) -> None:
    """Every image of ``src`` with Gaussian noise (sigma on the 0-255 scale), clipped, as 8-bit PNG in ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for path in sorted(p for p in src.iterdir() if p.suffix.lower() == ".png"):
        image = read_image(path)
        noisy = np.clip(image.pixels + rng.normal(0, sigma / 255, image.pixels.shape), 0, 1).astype(np.float32)
        write_image(dst / f"{path.stem}.png", RGBImage(noisy, None, 8))


def run(argv: list[str]) -> tuple[int, dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = nafnet_edge([*argv, "--json"])
    if not out.getvalue().strip():
        raise SystemExit(f"nafnet-edge {' '.join(argv)} printed no report (exit code {code})")
    report = json.loads(out.getvalue())
    return code, report["artifacts"][0] if "artifacts" in report else report


# PTQ variants with the float part of the int8 artifact fixed (the default, auto, times them on the CPU at hand)
FLOAT_PARTS = {
    "executorch": (("fp32 norms", "--norm-precision", "fp32"), ("fp16 norms", "--norm-precision", "fp16")),
    "openvino": (
        ("f32 remainder", "--inference-precision", "f32"),
        ("bf16 remainder", "--inference-precision", "bf16"),
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, default=SHARED / "CBSD68", help="clean training photos")
    ap.add_argument("--eval", type=Path, default=SHARED / "Kodak24", help="clean evaluation photos (held out)")
    ap.add_argument("--sigma", type=float, default=25.0)
    ap.add_argument("--targets", nargs="+", default=["executorch", "openvino"])
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--lr", type=float, default=None, help="QAT learning rate (the command's default)")
    ap.add_argument("--input-size", type=int, default=128, help="artifact tile and training crop")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--float-parts", action="store_true", help="also PTQ with each fixed float-part precision")
    ap.add_argument("--only-ptq", action="store_true", help="leave out QAT")
    ap.add_argument("--search-rounds", type=int, help="passed to quantize (0: no --max-drift search)")
    ap.add_argument("--variants", nargs="*", help="only these rows (names as printed)")
    args = ap.parse_args()
    record = run_record("benchmarks/int8_quality.py", probe=False)
    work = Path(tempfile.mkdtemp(prefix="int8-quality-"))
    add_noise(args.train, work / "train", args.sigma, seed=1)
    add_noise(args.eval, work / "eval-noisy", args.sigma, seed=2)
    size = ["--input-size", str(args.input_size)]
    pairs = [str(work / "eval-noisy"), str(args.eval)]
    train = ["--train-data", str(work / "train")]
    variants = {  # each validated on the held-out pairs
        "fp32": ["convert", "--precision", "fp32", "--val-pairs", *pairs],
        "PTQ int8": ["quantize", "--method", "ptq", *train, "--val-pairs", *pairs],
        "QAT int8": ["quantize", "--method", "qat", *train, "--steps", str(args.iters), "--val-pairs", *pairs]
        + (["--lr", str(args.lr)] if args.lr else []),
    }
    if args.only_ptq:
        del variants["QAT int8"]
    if args.search_rounds is not None:  # 0: plain PTQ / QAT, no units kept float to meet the budget
        variants = {
            k: [*v, "--search-rounds", str(args.search_rounds)] if k != "fp32" else v for k, v in variants.items()
        }
    rows = []
    for target in args.targets:
        extra = {
            f"PTQ int8, {label}": [*variants["PTQ int8"], flag, value]
            for label, flag, value in FLOAT_PARTS.get(target, ())
            if args.float_parts
        }
        for name, argv in {**variants, **extra}.items():
            if args.variants and name not in args.variants:
                continue
            t = time.perf_counter()
            code, report = run(
                [*argv, "--target", target, "-o", str(work / "-".join(name.replace(",", "").split())), *size]
            )
            v = report["validation"]
            manifest = json.loads((Path(report["directory"]) / "manifest.json").read_text())
            search = manifest.get("quantization", {}).get("search", {})
            export = manifest.get("export", {})
            row = {
                "target": target,
                "variant": name,
                "float_part": export.get("norm_precision") or export.get("inference_precision"),
                "exit_code": code,
                "passed": report["passed"],
                "psnr_gt_db": v["artifact_psnr_db_mean"],
                "reference_psnr_gt_db": v["reference_psnr_db_mean"],
                "drift_db": v["drift_db_mean"],
                "fidelity_db_min": v["fidelity_db_min"],
                "ssim": v["artifact_ssim_mean"],
                "seconds": time.perf_counter() - t,
                "kept_float": manifest.get("quantization", {}).get("kept_float", []),
                "search_rounds": search.get("rounds", []),
                "kept_latency_ratio": search.get("latency_ms", {}).get("ratio"),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    n = sum(1 for p in args.eval.iterdir() if p.suffix.lower() == ".png")
    print(f"\nKodak24-style evaluation: {n} photos from {args.eval}, sigma {args.sigma:g}, tiles {args.input_size} px")
    print(f"{'target':<12}{'variant':<26}{'PSNR vs GT':>12}{'fp32 ref':>10}{'drift':>9}{'fidelity':>10}{'SSIM':>8}")
    for r in rows:
        print(
            f"{r['target']:<12}{r['variant']:<26}{r['psnr_gt_db']:>10.3f}dB{r['reference_psnr_gt_db']:>8.3f}dB"
            f"{r['drift_db']:>+8.3f}{r['fidelity_db_min']:>8.1f}dB{r['ssim']:>8.4f}"
            + ("" if r["passed"] else "  (over budget)")
            + (f"  float: {', '.join(r['kept_float'])} (latency x{r['kept_latency_ratio']})" if r["kept_float"] else "")
        )
    if args.json:
        write_results(args.json, record, sigma=args.sigma, iters=args.iters, rows=rows)


if __name__ == "__main__":
    main()
