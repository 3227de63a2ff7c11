"""One loop for every target: calibrate (PTQ) and fine-tune (QAT) a quantizer's prepared deploy graph.

- Data: a folder of images. Without ground truth the fp32 deploy graph is the teacher (its outputs are the
  targets: distillation, no labels needed); with ``pairs`` (degraded, clean) the clean images are the targets.
  Random crops of the artifact's input size, random flips.
- Loss: PSNR loss (10 log10 MSE). AdamW, small learning rate, cosine decay (``CosineAnnealingLR``); the
  quantizer's observers are frozen for the last part of training. The progress lines (a bar on a terminal) show
  the current fidelity (PSNR of the prepared module against the teacher on the batch, dB).
- Checkpoint and resume: the prepared module, the optimizer, the schedule and the step go to ``checkpoint`` every
  ``save_every`` steps (atomically) and are picked up again by ``resume=True``.
- Scale-out: under ``torchrun`` (``torch.distributed`` initialised from the environment; gloo on CPU, NCCL on
  GPUs) each rank draws its own crops and trains the prepared module wrapped in ``DistributedDataParallel``:
  it starts every rank from rank 0's state, averages the gradients and broadcasts rank 0's buffers (the
  observers' ranges) before each forward pass, so all ranks hold identical weights. Fixed seeds throughout.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from nafnet_edge.atomic import atomic_path
from nafnet_edge.errors import BadInputError, first_sentence
from nafnet_edge.images import is_image_path, read_image
from nafnet_edge.progress import Advance, backend_output, phase, task
from nafnet_edge.quantization.base import Quantizer

Method = Literal["qat", "ptq"]
HELD_OUT_SEED_OFFSET = 7919  # training draws with seed + 1000 x (rank + 1) + step


@dataclass(frozen=True)
class TrainConfig:
    method: Method = "qat"
    iters: int = 300
    batch: int = 4
    lr: float = 1e-3  # relative: each tensor's step is lr x its RMS (see _relative_groups)
    weight_decay: float = 0.0
    freeze_observers_at: float = 0.7  # fraction of iters after which quantization ranges stop moving
    calibration_batches: int = 8
    seed: int = 0
    save_every: int = 50


@dataclass(frozen=True)
class TrainImage:
    input: np.ndarray  # HxWxC float32 in [0, 1]
    target: np.ndarray | None = None


def load_training_images(
    folder: str | Path,
    crop: int,
    *,
    pairs: Path | None = None,
    channels: int = 3,
    scale: int = 1,
    views: int = 1,
) -> list[TrainImage]:
    """Images of ``folder`` (and, with ``pairs``, the same-named clean images there, ``scale`` times the size of
    the inputs for super-resolution), each at least ``crop``. For a stereo model (``views`` 2) each image becomes a
    synthetic pair, the left view without its right ``STEREO_SHIFT_PX`` columns and the right view moved by them,
    stacked on the channel axis as the model takes them (distillation only: no ground truth for such pairs)."""
    from nafnet_edge.validation import STEREO_SHIFT_PX

    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(f"--data {folder} is not a folder of images")
    if views > 1 and pairs is not None:
        raise BadInputError(
            "a stereo model trains by distillation from its fp32 graph on synthetic pairs made from --train-data: "
            "leave out --train-pairs"
        )
    files = sorted(p for p in folder.iterdir() if is_image_path(p))
    if not files:
        raise BadInputError(f"--data {folder} holds no PNG, JPEG or TIFF images")
    images = []
    for path in files:
        x = _as_channels(read_image(path).pixels, channels)
        if views > 1:
            x = np.concatenate([x[:, :-STEREO_SHIFT_PX], x[:, STEREO_SHIFT_PX:]], axis=2)
        y = None
        if pairs is not None:
            match = [t for t in Path(pairs).glob(f"{path.stem}.*") if is_image_path(t)]
            if not match:
                raise BadInputError(f"no clean image for {path.name} in {pairs}: name them like the inputs")
            y = _as_channels(read_image(match[0]).pixels, channels)
            if y.shape[:2] != (x.shape[0] * scale, x.shape[1] * scale):
                want = f"{x.shape[1] * scale}x{x.shape[0] * scale}"
                raise BadInputError(
                    f"{path.name}: the clean image is {y.shape[1]}x{y.shape[0]}, the input {x.shape[1]}x{x.shape[0]}"
                    + (f": a x{scale} model needs it {want}" if scale > 1 else ": they must be the same size")
                )
        if min(x.shape[:2]) < crop:
            raise BadInputError(
                f"{path.name} is {x.shape[1]}x{x.shape[0]}"
                + (f" as a stereo pair ({STEREO_SHIFT_PX} px shift)" if views > 1 else "")
                + f", smaller than the {crop}-px training crop (the artifact's input size): use larger images or "
                "a smaller --input-size"
            )
        images.append(TrainImage(x, y))
    return images


def _as_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    if pixels.shape[2] == channels:
        return pixels
    if channels == 3 and pixels.shape[2] == 1:
        return np.repeat(pixels, 3, axis=2)
    if channels == 1:
        return pixels.mean(axis=2, keepdims=True)
    raise BadInputError(f"cannot train a {channels}-channel model on {pixels.shape[2]}-channel images")


def batches(
    images: Sequence[TrainImage], crop: int, batch: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Endless random crops with random horizontal/vertical flips, as (input, target or None) NCHW batches."""
    rng = np.random.default_rng(seed)
    while True:
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        for _ in range(batch):
            image = images[int(rng.integers(len(images)))]
            h, w = image.input.shape[:2]
            top, left = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
            flips = (bool(rng.integers(2)), bool(rng.integers(2)))
            for src, dst in ((image.input, xs), (image.target, ys)):
                if src is None:
                    continue
                s = src.shape[0] // h  # the target of a super-resolution pair is s times the input
                patch = src[s * top : s * (top + crop), s * left : s * (left + crop)]
                patch = patch[::-1] if flips[0] else patch
                patch = patch[:, ::-1] if flips[1] else patch
                dst.append(np.ascontiguousarray(patch.transpose(2, 0, 1)))
        x = torch.from_numpy(np.stack(xs))
        yield x, (torch.from_numpy(np.stack(ys)) if ys else None)


def calibration_crops(images: Sequence[TrainImage], crop: int, config: TrainConfig) -> list[torch.Tensor]:
    """The crops PTQ calibrates on (and QAT starts its ranges from), one per batch."""
    return [x for x, _ in itertools.islice(batches(images, crop, 1, config.seed), config.calibration_batches)]


def held_out_crops(images: Sequence[TrainImage], crop: int, config: TrainConfig, n: int) -> torch.Tensor:
    """``n`` crops drawn with a seed of their own, apart from calibration's and training's (one NCHW batch)."""
    return next(batches(images, crop, n, config.seed + HELD_OUT_SEED_OFFSET))[0]


def psnr_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """10 log10(MSE): minimising it maximises PSNR (data range 1)."""
    return 10.0 * torch.log10(((output - target) ** 2).mean() + 1e-10)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the process group ``torchrun`` describes in the environment (a no-op for one process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return _world()


def _data_parallel(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` wrapped for data-parallel training across the process group (``module`` itself for one
    process). Unused parameters are expected: the ranges of quantizers switched off (``keep_float``) or frozen
    mid-training (``freeze_observers``) get no gradients."""
    if _world()[1] == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)


def _broadcast_buffers(module: torch.nn.Module) -> None:
    """Every rank takes rank 0's buffers: the last forward pass moved each rank's observers on its own crops."""
    if _world()[1] == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


def quantize_graph(
    quantizer: Quantizer,
    graph: torch.nn.Module,
    images: Sequence[TrainImage],
    crop: int,
    config: TrainConfig,
    *,
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    label: str = "int8",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Calibrate (and with QAT fine-tune) ``graph`` for ``quantizer``; returns the prepared module and a log.
    With ``progress`` (on rank 0 only) the phases are announced, their lines starting with ``label``; the
    quantizer's own output is captured (:func:`nafnet_edge.progress.backend_output`)."""
    rank, world = _world()
    show = progress and rank == 0
    torch.manual_seed(config.seed)
    teacher = copy.deepcopy(graph).eval()  # the fp32 function QAT distils from, untouched by training
    example = torch.rand(1, images[0].input.shape[2], crop, crop)
    calibration = calibration_crops(images, crop, config)
    if show:
        phase(f"{label}: calibrate on {len(calibration)} crop(s)")
    with backend_output():
        prepared = quantizer.prepare(graph, example, qat=config.method == "qat", calibration=calibration)
        quantizer.set_training(prepared, False)
        with torch.no_grad():  # one batch of all calibration crops: QAT's moving-average observers start from
            prepared(torch.cat(calibration))  # the range of every crop, not of the first one
    log: dict[str, Any] = {"method": config.method, "calibration_batches": len(calibration), "world_size": world}
    if config.method == "ptq":
        return prepared, log

    optimizer = torch.optim.AdamW(_relative_groups(prepared, config.lr), weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.iters)
    start = 0
    if resume and checkpoint is not None and checkpoint.is_file():
        try:
            state = torch.load(checkpoint, weights_only=True)
            prepared.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            schedule.T_max = config.iters  # the decay goes on from the saved rate and ends at this run's --iters
            start = int(state["step"])
        except Exception as e:  # damaged, or written for another model, target or --keep-float
            raise BadInputError(
                f"--resume: {checkpoint} is damaged or belongs to another model or settings ({first_sentence(e)}); "
                "delete it to start over, or resume with the settings it was trained with"
            ) from None
    model = _data_parallel(prepared)  # starts every rank from rank 0's weights and ranges
    freeze_at = int(config.freeze_observers_at * config.iters)
    stream = batches(images, crop, config.batch, config.seed + 1000 * (rank + 1) + start)
    fidelity = float("nan")
    saving = checkpoint if rank == 0 else None
    steps = task(f"{label}: {config.method} training", total=config.iters - start, unit="step") if show else _silent()
    with steps as advance, backend_output():
        for step in range(start, config.iters):
            if step >= freeze_at:
                quantizer.freeze_observers(prepared)
            x, y = next(stream)
            with torch.no_grad():
                teacher_out = teacher(x)
            quantizer.set_training(prepared, True)
            out = model(x)
            loss = psnr_loss(out, y if y is not None else teacher_out)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # data-parallel: averages the gradients across ranks
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                fidelity = -float(psnr_loss(out.detach(), teacher_out))
            advance(1, info=f"fidelity {fidelity:.2f} dB")
            if saving is not None and ((step + 1) % config.save_every == 0 or step + 1 == config.iters):
                with atomic_path(saving) as tmp:
                    state = {"model": prepared.state_dict(), "optimizer": optimizer.state_dict()}
                    torch.save({**state, "schedule": schedule.state_dict(), "step": step + 1}, tmp)
    _broadcast_buffers(prepared)
    quantizer.set_training(prepared, False)
    log.update(iters=config.iters, resumed_from=start, last_batch_fidelity_db=fidelity, lr=config.lr)
    return prepared, log


@contextmanager
def _silent() -> Iterator[Advance]:
    """A task that shows nothing (other ranks, ``progress=False``)."""

    def advance(n: int = 1, *, info: str | None = None) -> None:
        pass

    yield advance


def _relative_groups(module: torch.nn.Module, lr: float) -> list[dict[str, Any]]:
    """One optimizer group per trainable tensor, its learning rate ``lr`` times the tensor's RMS.

    Adam moves every parameter by about its learning rate per step, whatever the parameter's size, and a deploy
    graph's tensors span six orders of magnitude (weights writing the residual stream divided by its scale,
    folded norms; the trained default denoiser has weight rows below 1e-5). One absolute rate either leaves the
    large tensors untrained or randomizes the small ones: on that model 150 steps at 2e-5 took the int8 program
    from 45.9 dB (PTQ) to 44.2 dB against fp32. Scaled per tensor, ``lr`` is a relative step size.
    """
    groups = []
    for p in module.parameters():
        if p.requires_grad:
            rms = float(p.detach().float().pow(2).mean().sqrt()) if p.numel() else 0.0
            groups.append({"params": [p], "lr": lr * max(rms, 1e-8)})
    return groups
