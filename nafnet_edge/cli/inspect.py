"""``nafnet-edge inspect``: identify a checkpoint."""

from __future__ import annotations

import argparse
import json
from typing import Any

from nafnet_edge import defaults
from nafnet_edge.cli.common import EPILOG, Parents, load_model
from nafnet_edge.sizes import parse_size


def describe(loaded: Any, size: tuple[int, int]) -> dict[str, Any]:
    """The inspect report; the first keys are the documented --json contract."""
    from nafnet_edge.complexity import count_macs
    from nafnet_edge.model import tlc_kernel_sizes
    from nafnet_edge.releases import releases_with_shape

    cfg = loaded.config
    info: dict[str, Any] = {
        "arch": cfg.arch,
        "img_channels": cfg.img_channels,
        "width": cfg.width,
        "enc_blk_nums": list(cfg.enc_blk_nums),
        "middle_blk_num": cfg.middle_blk_num,
        "dec_blk_nums": list(cfg.dec_blk_nums),
        "params": loaded.num_params,
        "gmacs": round(count_macs(cfg, *size) / 1e9, 3),
        "release": loaded.release.name if loaded.release else None,
        "sha256": loaded.sha256,
        "param_key": loaded.raw_param_key,
        "gmacs_size": list(size),
        "dw_expand": cfg.dw_expand,
        "ffn_expand": cfg.ffn_expand,
        "class": "NAFNetLocal" if cfg.arch == "nafnet-local" else "NAFNet",
        "arch_source": loaded.arch_source,
        "train_size": list(cfg.train_size) if cfg.arch == "nafnet-local" else None,
        "tlc_kernels": [list(k) for k in tlc_kernel_sizes(cfg)] if cfg.arch == "nafnet-local" else None,
        "pad_multiple": cfg.pad_multiple,
        "task": loaded.release.task if loaded.release else loaded.metadata.get("task"),
        "same_shape_as": [r.name for r in releases_with_shape(cfg)],
        "other_param_keys": loaded.other_param_keys,
        "key_prefix": loaded.key_prefix,
        "file_format": loaded.file_format,
        "path": str(loaded.path),
        "embedded_default": loaded.is_default,
    }
    return info


ARCH_SOURCES = {
    "flag": "--arch",
    "release": "official release (sha256)",
    "metadata": "file metadata",
    "shape": "GoPro/REDS-shaped network: TLC as upstream evaluates it; --arch nafnet to disable",
    "default": "default for an unrecognised file",
}


def cmd_inspect(args: argparse.Namespace) -> int:
    loaded = load_model(args, args.checkpoint)
    info = describe(loaded, args.size)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    layout = [info["file_format"], f"'{info['param_key']}' entry" if info["param_key"] else "bare state dict"]
    if info["other_param_keys"]:
        layout.append(f"also has {', '.join(info['other_param_keys'])} (--param-key to use it)")
    if info["key_prefix"]:
        layout.append(f"prefix '{info['key_prefix']}' stripped")
    arch = info["class"]
    if info["tlc_kernels"]:
        arch += f" (TLC, train size {info['train_size'][0]}x{info['train_size'][1]}, kernels {info['tlc_kernels']})"
    release = info["release"] or "none (not an official release file)"
    if info["release"]:
        release += f": {info['task']}"
    elif info["same_shape_as"]:
        release += f"; same shape as {', '.join(info['same_shape_as'])}"
    rows = [
        ("checkpoint", info["path"] + ("  [embedded default]" if info["embedded_default"] else "")),
        ("sha256", info["sha256"]),
        ("release", release),
        ("layout", ", ".join(layout)),
        ("class", f"{arch}  [from {ARCH_SOURCES[info['arch_source']]}]"),
        (
            "config",
            f"img_channels {info['img_channels']}, width {info['width']}, enc {info['enc_blk_nums']}, "
            f"middle {info['middle_blk_num']}, dec {info['dec_blk_nums']}, "
            f"dw_expand {info['dw_expand']}, ffn_expand {info['ffn_expand']}",
        ),
        ("params", f"{info['params'] / 1e6:.2f} M ({info['params']:,})"),
        ("GMACs", f"{info['gmacs']:.2f} at {args.size[0]}x{args.size[1]}"),
        ("padding", f"zero pad right/bottom to a multiple of {info['pad_multiple']}, then crop"),
    ]
    if info["task"] and not info["release"]:
        rows.insert(3, ("task", info["task"]))
    for name, value in rows:
        print(f"{name:<11} {value}")
    return 0


def add_parser(sub: Any, parents: Parents) -> None:
    ckpt = parents.ckpt
    p = sub.add_parser(
        "inspect",
        parents=[ckpt],
        help="identify a checkpoint: configuration, class, params, GMACs, release",
        description="Identify a NAFNet checkpoint from its tensor shapes and sha256. "
        "Without CKPT, describes the embedded default model.",
        epilog=EPILOG,
    )
    p.add_argument("checkpoint", nargs="?", metavar="CKPT", help="checkpoint file (.pth, .pt, .safetensors)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--size",
        type=parse_size,
        default=defaults.GMACS_SIZE,
        metavar="PX",
        help="input size the GMACs are counted at (default: %(default)s)",
    )
    p.set_defaults(func=cmd_inspect)
