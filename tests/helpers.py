"""Shared test helpers (tests/ is on sys.path through pytest's `pythonpath` setting)."""

from __future__ import annotations

import importlib
import os
import re
import runpy
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from nafnet_edge.cli import main
from nafnet_edge.errors import EXIT_BAD_INPUT
from nafnet_edge.model import NAFNet, NAFNetConfig

KODAK = Path(__file__).resolve().parents[1] / "nafnet_edge" / "data" / "kodak"  # the shipped Kodak photos
TINY_CONFIG = NAFNetConfig(width=8, enc_blk_nums=(1, 1), middle_blk_num=1, dec_blk_nums=(1, 1))  # pads to 4


def artifact_dir(out: Path, target: str, precision: str | None = None) -> Path:
    """``out/<target>-<precision>``, where ``convert -o out`` writes an artifact (``precision`` None: the target's
    default precision, which convert uses when none is asked for)."""
    from nafnet_edge.converters import target_class
    from nafnet_edge.manifest import artifact_dirname

    return Path(out) / artifact_dirname(target, precision or target_class(target).default_precision)


@dataclass(frozen=True)
class Converted:
    """The session's shared artifacts (conftest ``converted_artifacts``): ``out/<target>-<precision>/`` (each
    target's default precision) as convert wrote them, from ``checkpoint``, validated on ``data``; ``stdout`` is
    what convert printed for each target."""

    out: Path
    checkpoint: Path
    data: Path
    stdout: dict[str, str]

    @property
    def targets(self) -> list[str]:
        return list(self.stdout)

    def dir(self, target: str) -> Path:
        """The shared artifact directory of ``target``."""
        return artifact_dir(self.out, target)


PROGRESS_LINE = re.compile(r"nafnet-edge: \[ *\d+\.\ds\] ")  # nafnet_edge.progress's phase and task lines


def without_progress(err: str) -> str:
    """``err`` without the progress lines (``nafnet-edge: [  1.2s] coreml-fp16: export``): the messages (errors,
    warnings, notes) a test asserts on."""
    return "".join(line for line in err.splitlines(keepends=True) if not PROGRESS_LINE.match(line))


def running_in_ci() -> bool:
    """``CI=true`` (set by GitHub Actions and by .ci/run): every extra is installed, so a missing module is a
    broken install to report, never a reason to skip."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(module: str) -> ModuleType:
    """Import an optional backend a test needs: skipped where its extra is not installed, but under CI (which
    installs ``.[all,test]``) a failed import fails the test, or the whole test file when called at module level."""
    if not running_in_ci():
        return pytest.importorskip(module)
    try:
        return importlib.import_module(module)
    except ImportError as e:
        error = e
    pytest.fail(f"cannot import {module} under CI=true, where every extra is installed: {error}", pytrace=False)


def randomize(model: NAFNet, seed: int = 0) -> NAFNet:
    """Non-trivial values everywhere, at image-range magnitudes: beta/gamma and LayerNorm affine away from
    their init, convs at half the default scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("beta", "gamma")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif ".norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 / p[0].numel() ** 0.5)
    return model.eval()


def save_tiny_checkpoint(path: Path) -> Path:
    """A randomized width-8, two-level NAFNet (``TINY_CONFIG``) saved as an official ``{'params': ...}`` file."""
    model = randomize(NAFNet(TINY_CONFIG))
    torch.save({"params": model.state_dict()}, path)
    return path


def inspect_refused(path: Path, capsys, *needles: str) -> str:
    """``nafnet-edge inspect PATH`` exits 5 with one stderr line naming the file and containing ``needles``."""
    assert main(["inspect", str(path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("nafnet-edge: error: ") and err.count("\n") == 1, err
    assert path.name in err, err
    for needle in needles:
        assert needle in err, err
    return err


def parser_with(build, command: str, func):
    """``build`` (cli.build_parser) with ``command`` dispatching to ``func``, to monkeypatch into the CLI."""

    def build_patched():
        parser = build()
        sub = next(a for a in parser._actions if a.dest == "command")
        sub.choices[command].set_defaults(func=func)
        return parser

    return build_patched


def kodak_crops(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    """``folder`` holding one crop (height, width) of each of the shipped Kodak photos in turn, as PNG."""
    import cv2

    photos = sorted(KODAK.glob("*.png"))
    folder.mkdir()
    for i, (h, w) in enumerate(sizes):
        image = cv2.imread(str(photos[i]))[100 : 100 + h, 80 : 80 + w]
        cv2.imwrite(str(folder / f"crop{i}.png"), image)
    return folder


def run_usage_python(folder: Path, photo: Path) -> np.ndarray:
    """Run the first Python block of ``folder``'s USAGE.md as written, in ``folder`` (a copy of an artifact
    directory), on ``photo`` copied there as photo.png; the restored.png it writes, as OpenCV reads it."""
    import cv2

    code = (folder / "USAGE.md").read_text().split("```python\n")[1].split("```")[0]
    shutil.copy(photo, folder / "photo.png")
    (folder / "snippet.py").write_text(code)
    cwd = os.getcwd()
    try:
        os.chdir(folder)
        runpy.run_path(str(folder / "snippet.py"))
    finally:
        os.chdir(cwd)
    return cv2.imread(str(folder / "restored.png"))
