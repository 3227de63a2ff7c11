"""The `nafnet-edge` command end to end: start-up cost, inspect, run, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from nafnet_edge.cli import main
from nafnet_edge.errors import EXIT_BAD_INPUT, EXIT_USAGE
from nafnet_edge.model import NAFNet, NAFNetConfig

KODAK = sorted(Path(str(resources.files("nafnet_edge") / "data" / "kodak")).glob("*.png"))
INSPECT_KEYS = [
    "arch",
    "img_channels",
    "width",
    "enc_blk_nums",
    "middle_blk_num",
    "dec_blk_nums",
    "params",
    "gmacs",
    "release",
    "sha256",
    "param_key",
]


def test_help_imports_no_heavy_module() -> None:
    code = (
        "import sys\n"
        "from nafnet_edge.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'coremltools', 'executorch', 'openvino', 'nncf', 'onnxruntime', 'cv2')"
        " if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "inspect" in out and "run" in out
    assert "HEAVY []" in out


def test_inspect_json_of_the_embedded_default(capsys) -> None:
    assert main(["inspect", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert list(info)[: len(INSPECT_KEYS)] == INSPECT_KEYS
    assert info["arch"] == "nafnet" and info["release"] is None and info["embedded_default"] is True
    assert info["params"] == sum(p.numel() for p in NAFNet(NAFNetConfig(**_cfg(info))).parameters())
    assert len(info["sha256"]) == 64 and info["gmacs"] > 0


def _cfg(info: dict) -> dict:
    keys = ("img_channels", "width", "enc_blk_nums", "middle_blk_num", "dec_blk_nums", "dw_expand", "ffn_expand")
    return {k: info[k] for k in keys}


def test_inspect_text_reports_layout_and_gmacs_at_a_chosen_size(tmp_path: Path, capsys) -> None:
    cfg = NAFNetConfig(width=8, enc_blk_nums=(1, 1), middle_blk_num=1, dec_blk_nums=(1, 1))
    path = tmp_path / "net.pth"
    torch.save({"params": {"module." + k: v for k, v in NAFNet(cfg).state_dict().items()}}, path)
    assert main(["inspect", str(path), "--size", "512x256", "--arch", "nafnet-local", "--train-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "'params' entry, prefix 'module.' stripped" in out
    assert "NAFNetLocal (TLC, train size 64x64" in out and "[from --arch]" in out
    from nafnet_edge.complexity import count_macs

    tlc = cfg.replace(arch="nafnet-local", train_size=(64, 64))  # local pooling: sca convs run at full size
    assert f"GMACs       {count_macs(tlc, 512, 256) / 1e9:.2f} at 512x256" in out
    assert count_macs(tlc, 512, 256) > count_macs(cfg, 512, 256)


def test_run_restores_images_with_the_default_model(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    clean = cv2.imread(str(KODAK[0]))[:200, :300]
    noisy = np.clip(clean + rng.normal(0, 25, clean.shape), 0, 255).astype(np.uint8)
    cv2.imwrite(str(src / "noisy.png"), noisy)
    gray16 = (cv2.cvtColor(noisy, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257)[:64, :80]
    cv2.imwrite(str(src / "gray16.tif"), gray16)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "nafnet_edge.cli", "run", str(src), "-o", str(out), "--tile", "128", "--overlap", "32"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gray16.tif", "noisy.png"]
    restored = cv2.imread(str(out / "noisy.png"))
    assert restored.shape == clean.shape and restored.dtype == np.uint8

    def psnr(a: np.ndarray, b: np.ndarray) -> float:
        return float(10 * np.log10(255.0**2 / np.mean((a.astype(float) - b.astype(float)) ** 2)))

    assert psnr(restored, clean) > psnr(noisy, clean) + 4.0  # the default denoiser really denoises
    g = cv2.imread(str(out / "gray16.tif"), cv2.IMREAD_UNCHANGED)
    assert g.shape == gray16.shape and g.dtype == np.uint16


def test_run_with_an_explicit_checkpoint_and_whole_image(tmp_path: Path, capsys) -> None:
    cfg = NAFNetConfig(width=8, enc_blk_nums=(1,), middle_blk_num=1, dec_blk_nums=(1,))
    model = NAFNet(cfg)
    path = tmp_path / "zero.pth"
    torch.save({"params": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}, path)
    image = (np.arange(30 * 20 * 3) % 251).reshape(30, 20, 3).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    assert main(["run", str(path), str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--tile", "0"]) == 0
    # all-zero weights: the network is the identity through its global residual
    assert np.array_equal(cv2.imread(str(tmp_path / "o" / "a.png")), image)
    assert torch.is_grad_enabled()  # main() is called from notebooks: it must not switch autograd off for them


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["run", "missing.png", "-o", "out"], EXIT_BAD_INPUT, "input not found"),
        (["run", "x.png", "-o", "out", "--tile", "64", "--overlap", "64"], EXIT_USAGE, "--overlap (64) must be"),
        (["run", "nope.pth", "x.png", "-o", "out"], EXIT_BAD_INPUT, "checkpoint not found"),
    ],
)
def test_run_errors(tmp_path: Path, monkeypatch, capsys, argv: list[str], code: int, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.png").write_bytes(cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes())
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_usage_error_exit_code(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "--tile", "-3", "x.png", "-o", "o"])
    assert info.value.code == EXIT_USAGE


def test_every_option_of_every_command_says_what_it_does() -> None:
    import argparse

    from nafnet_edge.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    silent = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, parser in commands.items()
        for action in parser._actions
        if not action.help and not isinstance(action, argparse._HelpAction)
    ]
    assert len(commands) >= 8 and silent == []


# Renamed flags: (command line with the old spelling, the same with the new one, the new flag).
RENAMED = [
    ("convert --target onnx --data d", "convert --target onnx --val-data d", "--val-data"),
    ("convert --target onnx --data-pairs a b", "convert --target onnx --val-pairs a b", "--val-pairs"),
    ("convert --target onnx --iters 7", "convert --target onnx --steps 7", "--steps"),
    ("convert --target onnx --batch 2", "convert --target onnx --train-batch 2", "--train-batch"),
    ("convert --target onnx --bench-iters 3", "convert --target onnx --bench-runs 3", "--bench-runs"),
    ("validate d --data v", "validate d --val-data v", "--val-data"),
    ("validate d --data-pairs a b", "validate d --val-pairs a b", "--val-pairs"),
    ("quantize --target openvino --data t", "quantize --target openvino --train-data t", "--train-data"),
    ("quantize --target openvino --train-data t --pairs c", "quantize --target openvino --train-data t --train-pairs c",
     "--train-pairs"),
    ("quantize --target openvino --train-data t --out o", "quantize --target openvino --train-data t -o o",
     "--output"),
    ("quantize --target openvino --train-data t --iters 7", "quantize --target openvino --train-data t --steps 7",
     "--steps"),
    ("quantize --target openvino --train-data t --batch 2",
     "quantize --target openvino --train-data t --train-batch 2", "--train-batch"),
    ("quantize --target openvino --train-data t --bench-iters 3",
     "quantize --target openvino --train-data t --bench-runs 3", "--bench-runs"),
    ("bench d --iters 3", "bench d --runs 3", "--runs"),
    ("run x.png -o o --batch 2", "run x.png -o o --tile-batch 2", "--tile-batch"),
    ("report d --data v", "report d --val-data v", "--val-data"),
]  # fmt: skip


@pytest.mark.parametrize(("old", "new", "flag"), RENAMED, ids=[r[0] for r in RENAMED])
def test_a_deprecated_spelling_still_works_and_names_the_new_flag(capsys, old: str, new: str, flag: str) -> None:
    from nafnet_edge.cli import build_parser

    parsed_new = build_parser().parse_args(new.split())
    assert capsys.readouterr().err == ""
    parsed_old = build_parser().parse_args(old.split())
    assert vars(parsed_old) == vars(parsed_new)  # the same options reach the command
    old_flag = next(word for word in old.split() if word.startswith("--") and word not in new.split())
    assert capsys.readouterr().err == (
        f"nafnet-edge: warning: {old_flag} is deprecated, use {flag} (the old name goes in nafnet-edge 0.3)\n"
    )


@pytest.mark.parametrize(
    "argv",
    [
        "bench d --runs 3 --time 2",
        "bench d --iters 3 --time 2",
        "convert --target onnx --bench --bench-runs 3 --bench-time 2",
        "quantize --target openvino --train-data t --bench --bench-time 2 --bench-runs 3",
    ],
)
def test_a_run_count_and_a_time_budget_are_alternatives(capsys, argv: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv.split())
    err = capsys.readouterr().err
    assert info.value.code == EXIT_USAGE and "not allowed with argument" in err
    assert err.splitlines()[-1].startswith("nafnet-edge ") and "Traceback" not in err


def test_bench_time_reaches_the_settings() -> None:
    from nafnet_edge.cli import build_parser

    assert build_parser().parse_args(["bench", "d", "--time", "2.5"]).time_s == 2.5
    args = build_parser().parse_args(["convert", "--target", "onnx", "--bench", "--bench-time", "4"])
    assert (args.bench_time, args.bench_runs) == (4.0, 20)


@pytest.mark.parametrize(
    ("command", "old_names"),
    [
        ("convert --target onnx", ["--data", "--data-pairs", "--iters", "--batch", "--bench-iters"]),
        ("quantize --target openvino", ["--data", "--pairs", "--out", "--iters", "--batch", "--bench-iters"]),
        ("validate d", ["--data", "--data-pairs"]),
        ("bench d", ["--iters"]),
    ],
)
def test_help_lists_none_of_the_old_names(capsys, command: str, old_names: list[str]) -> None:
    import re

    with pytest.raises(SystemExit) as info:
        main([*command.split(), "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    listed = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", out))
    assert listed.isdisjoint(old_names), listed & set(old_names)


def test_help_shows_the_shared_defaults(capsys) -> None:
    from nafnet_edge import defaults

    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # help wraps lines
    assert f"QAT steps (default: {defaults.STEPS})" in out
    assert f"(default: {defaults.INPUT_SIZE[0]})" in out and f"(default: {defaults.OUTPUT_DIR})" in out
    assert f"(default: {defaults.LR:g})" in out
