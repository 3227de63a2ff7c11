"""The float channel norms of an XNNPACK int8 program: fp32 or fp16, mean conv or centring conv, chosen by timing.

The int8 program leaves every ``ChannelNorm`` unquantized (``nafnet_edge.quantization.xnnpack`` says why): a
dequantize feeds it and a quantize takes its output, inside the one XNNPACK partition. What the norm costs is
memory traffic over the full tensor, and two rewrites of the converted graph change it:

- fp16: the dequantize feeding the norm produces fp16 (its ``out_dtype``) and the norm's constants are fp16, so
  the norm runs XNNPACK's fp16 kernels and the quantize after it reads fp16. Half the bytes per pass; on CPUs
  with native fp16 arithmetic (AVX512-FP16, Arm) faster, on others (AMD Zen 4) XNNPACK converts to fp32 inside
  each kernel and it is slower. The outputs move by about 53 dB PSNR, far below int8's own error.
- centring conv (``-centred``): ``x - conv(x, J/C)`` (a 1-output mean conv and a broadcast subtract) becomes one
  C x C conv with weights ``I - J/C``: one pass fewer, C times the multiply-adds, so only for C <=
  ``CENTRE_MAX_CHANNELS``. On AMD Zen 4 whole programs ran 1-3% slower with it; it is there to ask for.

Which precision is faster depends on the CPU, so with ``auto`` the quantizer lowers one whole program per kernel
of ``AUTO`` (``variants``), times them side by side in the ExecuTorch runtime (``time_programs``: interleaved
rounds, medians) and keeps fp32 unless fp16 is faster by ``MARGIN`` (``pick``); the timings and the choice go
into the manifest (``record``). Norms timed alone, in small programs, did not predict the whole program on AMD
Zen 4 (even there, 1.17x slower in the program), hence whole programs, at one more lowering (25-40 s).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from nafnet_edge.converters.executorch import NORM_PRECISIONS
from nafnet_edge.deploy.modules import ChannelNorm

__all__ = ["NORM_PRECISIONS", "NormPrecision", "apply", "pick", "record", "time_programs", "variants"]

NormPrecision = Literal["auto", "fp32", "fp16", "fp32-centred", "fp16-centred"]  # NORM_PRECISIONS
KERNELS = ("fp32", "fp16", "fp32-centred", "fp16-centred")  # what --norm-precision can ask for, besides auto
AUTO = ("fp32", "fp16")  # what auto times: lowering a program takes 25-40 s, and centring measured no gain
BASELINE = "fp32"  # what the program runs unless a measurement says otherwise
CENTRE_MAX_CHANNELS = 64  # C x C multiply-adds per pixel: beyond this the centring conv costs more than it saves
MARGIN = 0.95  # another kernel replaces the baseline only when its median is at most this fraction of it
ROUNDS = 15

Shape = tuple[int, int, int]  # channels, height, width


@dataclass
class NormRegion:
    """The nodes of one ``ChannelNorm`` in a converted graph and where its values come from and go."""

    name: str  # the module path
    nodes: list[torch.fx.Node]
    shape: Shape
    # int8 on both sides (every activation input a dequantize, every consumer a quantize): the fp16 rewrite applies
    quantized_edges: bool


def _norm_name(node: torch.fx.Node) -> str | None:
    """The path of the innermost ``ChannelNorm`` that ``node`` belongs to, if any."""
    qualified = f"{ChannelNorm.__module__}.{ChannelNorm.__qualname__}"
    stack = node.meta.get("nn_module_stack") or {}
    names = [path for path, kind in stack.values() if kind is ChannelNorm or kind == qualified]
    return names[-1] if names else None


def _op(node: torch.fx.Node) -> str:
    packet = getattr(node.target, "overloadpacket", None)
    return packet.__name__ if packet is not None else str(node.target)


def norm_regions(gm: torch.fx.GraphModule) -> list[NormRegion]:
    """Every ``ChannelNorm`` of a converted (quantize/dequantize) graph, in graph order."""
    grouped: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and (name := _norm_name(node)) is not None:
            grouped.setdefault(name, []).append(node)
    regions = []
    for name, nodes in grouped.items():
        inside = set(nodes)
        inputs = [a for n in nodes for a in n.all_input_nodes if a not in inside and a.op != "get_attr"]
        users = [u for n in nodes for u in n.users if u not in inside]
        if not inputs:
            continue
        vals = [v for n in (*inputs, *nodes) if isinstance(v := n.meta.get("val"), torch.Tensor) and v.dim() == 4]
        if not vals:
            continue
        _, c, h, w = (int(d) for d in max(vals, key=lambda v: v.shape[1]).shape)
        edges = all(_op(a) == "dequantize_per_tensor" for a in inputs) and all(
            _op(u) == "quantize_per_tensor" for u in users
        )
        regions.append(NormRegion(name, nodes, (c, h, w), edges))
    return regions


def _constant(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    value = functools.reduce(getattr, str(node.target).split("."), gm)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{node.target} is not a tensor constant")
    return value


def _add_constant(gm: torch.fx.GraphModule, before: torch.fx.Node, name: str, value: torch.Tensor) -> torch.fx.Node:
    name = name.replace(".", "_")
    while hasattr(gm, name):
        name += "_"
    gm.register_buffer(name, value, persistent=False)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def centre(gm: torch.fx.GraphModule, region: NormRegion) -> bool:
    """Rewrite ``x - conv(x, J/C)`` of a conv-mean norm as ``conv(x, I - J/C)``; False when the pattern is absent."""
    for node in region.nodes:
        if _op(node) != "sub" or len(node.args) != 2:
            continue
        x, mean = node.args
        if not (isinstance(mean, torch.fx.Node) and _op(mean) == "conv2d" and mean.args[0] is x):
            continue
        c = region.shape[0]
        weight = torch.eye(c).view(c, c, 1, 1) - 1.0 / c
        w = _add_constant(gm, mean, f"{region.name}_centre", weight)
        with gm.graph.inserting_before(node):
            conv = gm.graph.call_function(torch.ops.aten.conv2d.default, (x, w))
        conv.meta = {**node.meta}
        node.replace_all_uses_with(conv)
        gm.graph.erase_node(node)
        if not mean.users:
            gm.graph.erase_node(mean)
        region.nodes = [n for n in region.nodes if n is not node and n is not mean] + [conv]
        return True
    return False


def half(gm: torch.fx.GraphModule, region: NormRegion) -> None:
    """Run ``region`` in fp16: the dequantizes feeding it produce fp16, its constants become fp16."""
    inside = set(region.nodes)
    replaced: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in region.nodes:
        for a in node.all_input_nodes:
            if a in inside:
                continue
            if a not in replaced:
                if a.op == "get_attr":
                    value = _constant(gm, a)
                    replaced[a] = (
                        _add_constant(gm, node, f"{a.target}_fp16", value.detach().half())
                        if value.is_floating_point()
                        else a
                    )
                else:  # a dequantize (quantized_edges)
                    assert callable(a.target)
                    with gm.graph.inserting_after(a):
                        replaced[a] = gm.graph.call_function(a.target, a.args, {**a.kwargs, "out_dtype": torch.float16})
                    replaced[a].meta = {**a.meta}
            node.replace_input_with(a, replaced[a])


def apply(gm: torch.fx.GraphModule, kernels: Mapping[str, str]) -> list[torch.fx.Node]:
    """Rewrite each norm of ``gm`` named in ``kernels`` to its kernel; the nodes now running fp16."""
    fp16: list[torch.fx.Node] = []
    for region in norm_regions(gm):
        kernel = kernels.get(region.name, BASELINE)
        if kernel.endswith("-centred"):
            centre(gm, region)
        if kernel.startswith("fp16") and region.quantized_edges:
            half(gm, region)
            fp16.extend(region.nodes)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return fp16


def pick(timings: Mapping[str, float]) -> str:
    """The fastest kernel, the baseline unless beaten by ``MARGIN``."""
    best = min(timings, key=lambda k: timings[k])
    return best if timings[best] <= MARGIN * timings[BASELINE] else BASELINE


_CHOICES: dict[tuple[Any, ...], str] = {}  # per process: a search's later rounds reuse the first round's choice


def variants(gm: torch.fx.GraphModule, requested: NormPrecision) -> dict[str, dict[str, str]]:
    """Whole-program candidates: name -> the kernel of each norm. ``auto`` gives each kernel of ``AUTO``, any
    other request its kernel, applied to the norms it suits (fp16 between int8 edges, centring to C <=
    ``CENTRE_MAX_CHANNELS``); the other norms stay fp32."""
    regions = norm_regions(gm)

    def kernels(kernel: str) -> dict[str, str]:
        out = {}
        for r in regions:
            precision = kernel.split("-")[0] if r.quantized_edges else BASELINE
            centred = kernel.endswith("-centred") and r.shape[0] <= CENTRE_MAX_CHANNELS
            out[r.name] = f"{precision}-centred" if centred else precision
        return out

    if requested != "auto":
        return {requested: kernels(requested)}
    return {k: kernels(k) for k in AUTO if k == BASELINE or kernels(k) != kernels(BASELINE)}


def choice_key(gm: torch.fx.GraphModule) -> tuple[Any, ...]:
    """What a timed choice depends on besides the program's input: the norms' shapes and edges."""
    return tuple((r.name, r.shape, r.quantized_edges) for r in norm_regions(gm))


def time_programs(programs: Mapping[str, bytes], example: torch.Tensor, rounds: int = ROUNDS) -> dict[str, float]:
    """Median ms of each ExecuTorch program on ``example``, timed in interleaved rounds after a warm-up run."""
    from executorch.runtime import Runtime

    runtime = Runtime.get()
    methods = {name: runtime.load_program(buffer).load_method("forward") for name, buffer in programs.items()}
    times: dict[str, list[float]] = {name: [] for name in methods}
    for method in methods.values():
        method.execute([example])
    for _ in range(rounds):
        for name, method in methods.items():
            started = time.perf_counter()
            method.execute([example])
            times[name].append((time.perf_counter() - started) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def record(requested: NormPrecision, kernels: Mapping[str, str], timings: Mapping[str, float] | None) -> dict[str, Any]:
    """The manifest's account of the norms: their precision and kernels, and how they were chosen."""
    chosen = Counter(kernels.values())
    precisions = sorted({k.split("-")[0] for k in kernels.values()})
    out: dict[str, Any] = {
        "norm_precision": "+".join(precisions) if precisions else "none",
        "norm_kernels": dict(sorted(chosen.items())),
        "norm_choice": "timed on this CPU" if requested == "auto" else f"asked for ({requested})",
    }
    if timings:
        from nafnet_edge.benchmark import cpu_isa, cpu_name

        out["norm_timings"] = {
            "cpu": cpu_name(),
            "isa": cpu_isa(),
            "rounds": ROUNDS,
            "margin": MARGIN,
            "median_ms": {k: round(v, 3) for k, v in timings.items()},
        }
    return out
