"""Train the embedded default model: a small sRGB Gaussian denoiser (sigma 5-50 on the 0-255 scale).

Training images: CBSD68 (68 images); held-out evaluation: Kodak24 (24 images), both from
``../shared/data`` (FFDNet test sets). Noise is additive white Gaussian, not clipped, the usual benchmark
convention. The result is written as safetensors with the configuration in its metadata, and the
held-out PSNR table (sigma 15/25/50, fixed noise seed) as JSON next to it.

    python scripts/train_default_denoiser.py --data ../shared/data --iters 4000 --batch 12 --crop 112 \
        --out nafnet_edge/weights/nafnet-edge-denoise-s.safetensors

Runs on CPU (2 cores: about 40 minutes at the defaults) or CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from nafnet_edge.atomic import atomic_path
from nafnet_edge.model import NAFNet, NAFNetConfig

DEFAULT_CONFIG = NAFNetConfig(width=16, enc_blk_nums=(1, 1, 2, 2), middle_blk_num=2, dec_blk_nums=(1, 1, 1, 1))
EVAL_SIGMAS = (15, 25, 50)
EVAL_SEED = 0


def load_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB with data range 1.0."""
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def noisy_version(clean: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (clean + rng.normal(0.0, sigma / 255.0, clean.shape)).astype(np.float32)


def random_batch(images: list[np.ndarray], batch: int, crop: int, gen: torch.Generator) -> torch.Tensor:
    out = []
    for _ in range(batch):
        img = images[int(torch.randint(len(images), (1,), generator=gen))]
        h, w = img.shape[:2]
        y = int(torch.randint(h - crop + 1, (1,), generator=gen))
        x = int(torch.randint(w - crop + 1, (1,), generator=gen))
        t = torch.from_numpy(img[y : y + crop, x : x + crop]).permute(2, 0, 1)
        k = int(torch.randint(8, (1,), generator=gen))
        t = torch.rot90(t, k % 4, (1, 2))
        if k >= 4:
            t = t.flip(2)
        out.append(t)
    return torch.stack(out)


def psnr_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative PSNR per image, averaged (the loss NAFNet trains with)."""
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(mse + 1e-8).mean()


@torch.inference_mode()
def evaluate(model: NAFNet, images: list[np.ndarray], sigma: float, device: torch.device) -> tuple[float, float]:
    """Mean PSNR (noisy input, restored output) against the clean images, output clamped to [0, 1]."""
    model.eval()
    noisy_scores, out_scores = [], []
    for i, clean in enumerate(images):
        noisy = noisy_version(clean, sigma, EVAL_SEED * 1000 + i)
        x = torch.from_numpy(noisy).permute(2, 0, 1)[None].to(device)
        y = model(x).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
        y = np.round(y * 255) / 255  # score the 8-bit image a user would save
        noisy_scores.append(psnr(np.clip(noisy, 0, 1), clean))
        out_scores.append(psnr(y, clean))
    model.train()
    return float(np.mean(noisy_scores)), float(np.mean(out_scores))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("nafnet_edge/weights/nafnet-edge-denoise-s.safetensors"))
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--sigma-min", type=float, default=5.0)
    ap.add_argument("--sigma-max", type=float, default=50.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train = [load_rgb(p) for p in sorted((args.data / "CBSD68").glob("*.png"))]
    held_out = [load_rgb(p) for p in sorted((args.data / "Kodak24").glob("*.png"))]
    if not train or not held_out:
        raise SystemExit(f"no CBSD68/Kodak24 images under {args.data}")

    model = NAFNet(DEFAULT_CONFIG).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.9))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.iters, eta_min=1e-6)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    bar = tqdm(range(args.iters), desc="train", mininterval=10)
    for _ in bar:
        clean = random_batch(train, args.batch, args.crop, gen).to(device)
        sigma = torch.empty(args.batch, 1, 1, 1).uniform_(args.sigma_min, args.sigma_max, generator=gen) / 255.0
        noisy = clean + torch.randn(clean.shape, generator=gen) * sigma
        loss = psnr_loss(model(noisy.to(device)), clean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01 * math.sqrt(sum(p.numel() for p in model.parameters())))
        opt.step()
        sched.step()
        bar.set_postfix(psnr=f"{-loss.item():.2f}", refresh=False)

    minutes = (time.time() - start) / 60
    table = {}
    for sigma in EVAL_SIGMAS:
        noisy_psnr, out_psnr = evaluate(model, held_out, sigma, device)
        table[str(sigma)] = {"noisy_psnr_db": round(noisy_psnr, 2), "restored_psnr_db": round(out_psnr, 2)}
        print(f"Kodak24 sigma {sigma}: noisy {noisy_psnr:.2f} dB -> restored {out_psnr:.2f} dB")

    training = {
        "train_images": "CBSD68 (68)",
        "eval_images": "Kodak24 (24), held out",
        "noise": f"AWGN sigma U({args.sigma_min:g}, {args.sigma_max:g})/255, not clipped",
        "iters": args.iters,
        "batch": args.batch,
        "crop": args.crop,
        "lr": args.lr,
        "seed": args.seed,
        "device": str(device),
        "minutes": round(minutes, 1),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": "nafnet-edge",
        "config": json.dumps(DEFAULT_CONFIG.to_dict()),
        "task": "denoising (sRGB, Gaussian sigma 5-50)",
        "training": json.dumps(training),
        "kodak24_psnr": json.dumps(table),
    }
    with atomic_path(args.out) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    card = args.out.with_suffix(".json")
    card.write_text(json.dumps({"config": DEFAULT_CONFIG.to_dict(), "training": training, "kodak24": table}, indent=2))
    print(f"wrote {args.out} and {card}")


if __name__ == "__main__":
    main()
