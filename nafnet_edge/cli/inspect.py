"""``nafnet-edge inspect``: identify a checkpoint."""

from __future__ import annotations

import argparse
import json
from typing import Any

from nafnet_edge import defaults
from nafnet_edge.cli.common import CHECKPOINT_HELP, EPILOG, Parents, load_model
from nafnet_edge.sizes import parse_size


def describe(loaded: Any, size: tuple[int, int]) -> dict[str, Any]:
    """The inspect report; the first keys are the documented --json contract."""
    from nafnet_edge.complexity import count_macs
    from nafnet_edge.model import tlc_kernel_sizes
    from nafnet_edge.releases import releases_with_shape, shapes_like

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
        "family": cfg.family,
        "class": cfg.class_name,
        "up_scale": cfg.up_scale,
        "views": cfg.views,
        "in_channels": cfg.in_channels,
        "blocks": sum(cfg.enc_blk_nums) + cfg.middle_blk_num + sum(cfg.dec_blk_nums),
        "fusion": cfg.fusion,
        "arch_source": loaded.arch_source,
        "train_size": list(cfg.train_size) if cfg.local else None,
        "tlc_kernels": [list(k) for k in tlc_kernel_sizes(cfg)] if cfg.local else None,
        "pad_multiple": cfg.pad_multiple,
        "task": loaded.release.task if loaded.release else loaded.metadata.get("task"),
        "same_shape_as": [r.name for r in releases_with_shape(cfg)],
        "released_shape": shapes_like(cfg),
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
    "default": "default for an unrecognised file",
}
SHAPE_REASONS = {  # why a file of no known release gets its arch from its shape
    "nafnet-local": "GoPro/REDS-shaped network: TLC as upstream evaluates it; --arch nafnet to disable",
    "baseline-local": "GoPro-shaped Baseline: TLC as upstream evaluates it; --arch baseline to disable",
    "nafssr": "stereo checkpoint: TLC as upstream evaluates NAFSSR; --arch nafnet-sr to disable",
    "nafnet-sr": "single-view super-resolution network (no stereo fusion)",
}
FAMILY_TITLES = {"nafnet": "NAFNet", "baseline": "Baseline", "nafnet-sr": "NAFNet-SR"}


def _family(info: dict[str, Any]) -> str:
    title = FAMILY_TITLES[info["family"]]
    if info["family"] != "nafnet-sr":
        return f"{title} (U-Net: restores at the input size, 1 view)"
    views = "stereo pair: 2 views (left first)" if info["views"] == 2 else "single view"
    return f"{title} (super-resolution x{info['up_scale']}, {views}, {info['in_channels']} channels in and out)"


def _config(info: dict[str, Any]) -> str:
    if info["family"] == "nafnet-sr":
        fusion = "stereo fusion (SCAM) after every block" if info["fusion"] else "no fusion"
        blocks = f"{info['middle_blk_num']} blocks, x{info['up_scale']}, {fusion}"
    else:
        blocks = f"enc {info['enc_blk_nums']}, middle {info['middle_blk_num']}, dec {info['dec_blk_nums']}"
    return (
        f"img_channels {info['img_channels']}, width {info['width']}, {blocks}, "
        f"dw_expand {info['dw_expand']}, ffn_expand {info['ffn_expand']}"
    )


def _release(info: dict[str, Any]) -> str:
    if info["release"]:
        return f"{info['release']}: {info['task']}"
    if info["same_shape_as"]:
        return f"none (not an official release file); same shape as {', '.join(info['same_shape_as'])}"
    if info["released_shape"]:
        return (
            f"none identified; matches the shape of {', '.join(info['released_shape'])}; sha256 not in the release "
            "table"
        )
    return "none (not an official release file)"


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
        per_view = " per view" if info["views"] == 2 else ""
        arch += (
            f" (TLC, train size {info['train_size'][0]}x{info['train_size'][1]}{per_view}, "
            f"kernels {info['tlc_kernels']})"
        )
    source = SHAPE_REASONS[info["arch"]] if info["arch_source"] == "shape" else ARCH_SOURCES[info["arch_source"]]
    height, width = args.size
    if info["family"] == "nafnet-sr":
        gmacs_at = f"at {height}x{width}{' per view' if info['views'] == 2 else ''} (input; output x{info['up_scale']})"
        padding = "none (no downsampling)"
    else:
        gmacs_at = f"at {height}x{width}"
        padding = f"zero pad right/bottom to a multiple of {info['pad_multiple']}, then crop"
    rows = [
        ("checkpoint", info["path"] + ("  [embedded default]" if info["embedded_default"] else "")),
        ("sha256", info["sha256"]),
        ("release", _release(info)),
        ("layout", ", ".join(layout)),
        ("family", _family(info)),
        ("class", f"{arch}  [from {source}]"),
        ("config", _config(info)),
        ("params", f"{info['params'] / 1e6:.2f} M ({info['params']:,})"),
        ("GMACs", f"{info['gmacs']:.2f} {gmacs_at}"),
        ("padding", padding),
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
        help="identify a checkpoint: family, configuration, class, params, GMACs, release",
        description="Identify a checkpoint of the NAFNet family (NAFNet, Baseline, NAFNetSR, NAFSSR) from its "
        "tensor shapes and sha256. "
        "Without CKPT, describes the embedded default model.",
        epilog=EPILOG,
    )
    p.add_argument("checkpoint", nargs="?", metavar="CKPT", help=CHECKPOINT_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--size",
        type=parse_size,
        default=defaults.GMACS_SIZE,
        metavar="PX",
        help="input size the GMACs are counted at (default: %(default)s)",
    )
    p.set_defaults(func=cmd_inspect)
