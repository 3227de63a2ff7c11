"""Train the small shipped super-resolution model: NAFNet-SR, one view, x2 (bicubic degradation).

Training images: CBSD68 (68 images); held-out evaluation: Kodak24 (24 images), both from ``../shared/data``.
Low-resolution images are made once per image by bicubic downscaling with Pillow's ``Image.resize(BICUBIC)`` on
the 8-bit image (cubic kernel a = -0.5 widened by the scale factor, so it antialiases like MATLAB's ``imresize``;
borders differ slightly: Pillow renormalises the kernel at the edge, MATLAB mirrors), rounded to 8 bits like a
saved file. HR images are first cropped to a multiple of the scale, so an LR pixel maps to an exact HR block.

Held-out score: whole Kodak24 images (500x500), output clamped and rounded to 8 bits, PSNR (data range 1.0) on
RGB and on the Y channel (ITU-R BT.601, as MATLAB's ``rgb2ycbcr``), both with a border of ``scale`` pixels shaved,
for the model and for Pillow's bicubic upsampling of the same LR image. The result is written as safetensors with the
configuration in its metadata, and the table as JSON next to it.

    python scripts/train_sr.py --data ../shared/data --iters 3000 --threads 1 \
        --out nafnet_edge/weights/nafnet-edge-sr-x2.safetensors

Runs on CPU or CUDA; ``--threads 1`` leaves the other cores free.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from nafnet_edge.atomic import atomic_path
from nafnet_edge.model import NAFNetConfig, NAFNetSR

SCALE = 2


def machine() -> str:
    """The CPU model (Linux), else the platform; the GPU when training ran on one."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
        return f"{name}, {os.cpu_count()} logical CPUs"
    except (OSError, StopIteration):
        return f"{platform.machine()} {platform.system()}"


def sr_config(width: int, blocks: int, lr_crop: int) -> NAFNetConfig:
    return NAFNetConfig(
        arch="nafnet-sr",
        width=width,
        enc_blk_nums=(),
        dec_blk_nums=(),
        middle_blk_num=blocks,
        up_scale=SCALE,
        fusion=False,
        train_size=(lr_crop, lr_crop),
    )


def load_pair(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(HR, LR) float32 HWC in [0, 1]; HR cropped to a multiple of the scale, LR its 8-bit bicubic downscale."""
    img = Image.open(path).convert("RGB")
    w, h = img.width // SCALE * SCALE, img.height // SCALE * SCALE
    hr = img.crop((0, 0, w, h))
    lr = hr.resize((w // SCALE, h // SCALE), Image.Resampling.BICUBIC)
    return np.asarray(hr, dtype=np.float32) / 255.0, np.asarray(lr, dtype=np.float32) / 255.0


def bicubic_up(lr: np.ndarray) -> np.ndarray:
    img = Image.fromarray(np.round(lr * 255).astype(np.uint8))
    up = img.resize((img.width * SCALE, img.height * SCALE), Image.Resampling.BICUBIC)
    return np.asarray(up, dtype=np.float32) / 255.0


def luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 Y in [16/255, 235/255], as MATLAB's rgb2ycbcr on [0, 1] input."""
    return (16.0 + rgb.astype(np.float64) @ np.array([65.481, 128.553, 24.966])) / 255.0


def psnr(a: np.ndarray, b: np.ndarray, shave: int) -> float:
    """PSNR in dB with data range 1.0, ``shave`` border pixels excluded."""
    a, b = a[shave:-shave, shave:-shave], b[shave:-shave, shave:-shave]
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def random_batch(
    pairs: list[tuple[np.ndarray, np.ndarray]], batch: int, lr_crop: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    lrs, hrs = [], []
    for _ in range(batch):
        hr, lr = pairs[int(torch.randint(len(pairs), (1,), generator=gen))]
        y = int(torch.randint(lr.shape[0] - lr_crop + 1, (1,), generator=gen))
        x = int(torch.randint(lr.shape[1] - lr_crop + 1, (1,), generator=gen))
        t_lr = torch.from_numpy(lr[y : y + lr_crop, x : x + lr_crop]).permute(2, 0, 1)
        hy, hx, hc = y * SCALE, x * SCALE, lr_crop * SCALE
        t_hr = torch.from_numpy(hr[hy : hy + hc, hx : hx + hc]).permute(2, 0, 1)
        k = int(torch.randint(8, (1,), generator=gen))
        t_lr, t_hr = torch.rot90(t_lr, k % 4, (1, 2)), torch.rot90(t_hr, k % 4, (1, 2))
        if k >= 4:
            t_lr, t_hr = t_lr.flip(2), t_hr.flip(2)
        lrs.append(t_lr)
        hrs.append(t_hr)
    return torch.stack(lrs), torch.stack(hrs)


@torch.inference_mode()
def evaluate(
    model: NAFNetSR, pairs: list[tuple[np.ndarray, np.ndarray]], device: torch.device
) -> dict[str, dict[str, float]]:
    """Mean PSNR of bicubic upsampling and of the model against the HR images (8-bit outputs, shave = scale)."""
    model.eval()
    scores: dict[str, dict[str, list[float]]] = {m: {"rgb": [], "y": []} for m in ("bicubic", "model")}
    for hr, lr in pairs:
        x = torch.from_numpy(lr).permute(2, 0, 1)[None].to(device)
        out = model(x).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
        for name, sr in (("bicubic", bicubic_up(lr)), ("model", np.round(out * 255) / 255)):
            scores[name]["rgb"].append(psnr(sr, hr, SCALE))
            scores[name]["y"].append(psnr(luma(sr), luma(hr), SCALE))
    model.train()
    return {
        name: {f"psnr_{ch}_db": round(float(np.mean(v)), 2) for ch, v in per.items()} for name, per in scores.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("nafnet_edge/weights/nafnet-edge-sr-x2.safetensors"))
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=96, help="HR crop side (the LR crop is crop / scale)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--eval-only-timing", action="store_true", help="time 20 iterations and exit")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.crop % SCALE:
        raise SystemExit(f"--crop must be a multiple of the scale {SCALE}")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train = [load_pair(p) for p in sorted((args.data / "CBSD68").glob("*.png"))]
    held_out = [load_pair(p) for p in sorted((args.data / "Kodak24").glob("*.png"))]
    if not train or not held_out:
        raise SystemExit(f"no CBSD68/Kodak24 images under {args.data}")

    lr_crop = args.crop // SCALE
    config = sr_config(args.width, args.blocks, lr_crop)
    model = NAFNetSR(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.iters, eta_min=1e-6)
    gen = torch.Generator().manual_seed(args.seed)
    iters = 20 if args.eval_only_timing else args.iters
    start = time.time()
    bar = tqdm(range(iters), desc="train", mininterval=30)
    for _ in bar:
        lr_img, hr_img = random_batch(train, args.batch, lr_crop, gen)
        loss = F.l1_loss(model(lr_img.to(device)), hr_img.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(l1=f"{loss.item():.4f}", refresh=False)
    seconds = time.time() - start
    if args.eval_only_timing:
        params = sum(p.numel() for p in model.parameters())
        print(f"{iters / seconds:.2f} it/s, {params} parameters")
        return

    table = evaluate(model, held_out, device)
    for name, row in table.items():
        print(f"Kodak24 x{SCALE} {name}: RGB {row['psnr_rgb_db']:.2f} dB, Y {row['psnr_y_db']:.2f} dB")

    training = {
        "train_images": "CBSD68 (68)",
        "eval_images": "Kodak24 (24 whole 500x500 images), held out",
        "degradation": f"Pillow Image.resize(BICUBIC) x1/{SCALE} of the 8-bit image, rounded to 8 bits",
        "metric": f"PSNR, data range 1.0, 8-bit outputs, border of {SCALE} px shaved; Y = BT.601 luma",
        "loss": "L1",
        "iters": args.iters,
        "batch": args.batch,
        "hr_crop": args.crop,
        "lr": args.lr,
        "optimizer": "AdamW (no weight decay), cosine schedule",
        "seed": args.seed,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": machine(),
        "minutes": round(seconds / 60, 1),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": "nafnet-edge",
        "config": json.dumps(config.to_dict()),
        "task": f"super-resolution x{SCALE} (sRGB, bicubic degradation)",
        "training": json.dumps(training),
        "kodak24_psnr": json.dumps(table),
    }
    with atomic_path(args.out) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    card = args.out.with_suffix(".json")
    card.write_text(json.dumps({"config": config.to_dict(), "training": training, "kodak24": table}, indent=2) + "\n")
    print(f"wrote {args.out} and {card}")


if __name__ == "__main__":
    main()
