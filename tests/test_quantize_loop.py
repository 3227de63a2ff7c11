"""The shared PTQ/QAT loop: training data checks, crops, the PSNR loss, and the quantize command's errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from nafnet_edge.cli import main
from nafnet_edge.errors import EXIT_BAD_INPUT, EXIT_USAGE, BadInputError, ImageError
from nafnet_edge.quantization.train import batches, load_training_images, psnr_loss

KODAK = sorted((Path(__file__).resolve().parents[1] / "nafnet_edge" / "data" / "kodak").glob("*.png"))


def test_training_images_and_pairs_load(tmp_path: Path) -> None:
    noisy, clean = tmp_path / "noisy", tmp_path / "clean"
    noisy.mkdir(), clean.mkdir()
    for path in KODAK[:2]:
        image = cv2.imread(str(path))
        cv2.imwrite(str(clean / path.name), image)
        cv2.imwrite(str(noisy / path.name), np.clip(image.astype(np.int16) + 10, 0, 255).astype(np.uint8))
    images = load_training_images(noisy, 64, pairs=clean)
    assert len(images) == 2 and images[0].target is not None
    x, y = next(batches(images, 64, 3, seed=0))
    assert x.shape == y.shape == (3, 3, 64, 64)
    d = x - y  # crops and flips of input and ground truth stay aligned: every pixel differs by 0..10 levels
    assert float(d.min()) >= -1e-6 and float(d.max()) <= 10 / 255 + 1e-6 and float(d.mean()) > 5 / 255
    a, _ = next(batches(images, 64, 3, seed=0))
    assert torch.equal(a, x)  # fixed seed, same crops


@pytest.mark.parametrize("case", ["missing", "empty", "not-images", "unreadable", "too-small", "unpaired"])
def test_bad_training_data_gives_clear_errors(case: str, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    pairs = None
    if case == "missing":
        folder = tmp_path / "nowhere"
        expected: tuple[type[Exception], str] = (BadInputError, "not a folder")
    elif case == "empty":
        expected = (BadInputError, "holds no PNG")
    elif case == "not-images":
        (folder / "notes.txt").write_text("hello")
        expected = (BadInputError, "holds no PNG")
    elif case == "unreadable":
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
        expected = (ImageError, "broken.png")
    elif case == "too-small":
        cv2.imwrite(str(folder / "small.png"), np.zeros((40, 50, 3), np.uint8))
        expected = (BadInputError, "smaller than the 64-px training crop")
    else:
        cv2.imwrite(str(folder / "a.png"), np.zeros((80, 80, 3), np.uint8))
        pairs = tmp_path / "clean"
        pairs.mkdir()
        expected = (BadInputError, "no clean image for a.png")
    with pytest.raises(expected[0], match=expected[1]):
        load_training_images(folder, 64, pairs=pairs)


def test_psnr_loss_is_minus_psnr() -> None:
    a = torch.zeros(1, 3, 8, 8)
    assert float(psnr_loss(a + 0.1, a)) == pytest.approx(-20.0, abs=1e-4)


def test_quantize_command_errors(tmp_path: Path, capsys) -> None:
    (tmp_path / "data").mkdir()
    code = main(["quantize", "--target", "openvino", "--train-data", str(tmp_path / "data"), "-o", str(tmp_path / "o")])
    assert code == EXIT_BAD_INPUT and "holds no PNG" in capsys.readouterr().err
    assert main(["convert", "--target", "onnx", "--precision", "int8", "-o", str(tmp_path / "o")]) == EXIT_USAGE
    assert "--train-data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--target", "onnx", "--train-data", str(tmp_path / "data")])
    assert e.value.code == EXIT_USAGE
