"""How the original graph and the deploy graph lower: ExecuTorch XNNPACK partitions, OpenVINO and Core ML ops.

Prints, for the NAFNet-SIDD-width32 shape (and GoPro-width32 with --gopro) at 256x256 (random weights; the
structure is what matters):
- ExecuTorch with the XNNPACK partitioner: number of delegated partitions and the compute ops left outside;
- OpenVINO: op-type histogram of the converted model (before the CPU plugin's own fusions);
- Core ML: MIL op histogram of the converted ML program (conversion works on Linux).

    python benchmarks/deploy_delegation.py [--gopro] [--size 256] [--skip coreml]
"""

from __future__ import annotations

import argparse
import collections
import warnings

import torch
from common import random_release_shape  # benchmarks/common.py: the script folder is on sys.path

from nafnet_edge.deploy import deploy

NON_COMPUTE = {"getitem", "executorch_call_delegate", "output", "placeholder", "alloc", "view_copy", "clone"}


def xnnpack_partitions(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, collections.Counter]:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = torch.export.export(model, (x,))
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    graph = edge.exported_program().graph
    delegates = 0
    outside: collections.Counter = collections.Counter()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target)).removeprefix("aten.").split(".")[0]
        if "executorch_call_delegate" in str(node.target):
            delegates += 1
        elif name not in NON_COMPUTE:
            outside[name] += 1
    return delegates, outside


def openvino_ops(model: torch.nn.Module, x: torch.Tensor) -> collections.Counter:
    import openvino as ov

    ov_model = ov.convert_model(model, example_input=x)
    return collections.Counter(op.get_type_name() for op in ov_model.get_ops())


def coreml_ops(model: torch.nn.Module, x: torch.Tensor) -> collections.Counter:
    import coremltools as ct

    traced = torch.jit.trace(model, x)
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(name="image", shape=tuple(x.shape))],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS17,
        skip_model_load=True,
    )
    ops: collections.Counter = collections.Counter()
    for fn in mlmodel._mil_program.functions.values():
        for op in fn.operations:
            ops[op.op_type] += 1
    return ops


def show(title: str, before: collections.Counter, after: collections.Counter) -> None:
    print(f"\n{title}: {sum(before.values())} ops -> {sum(after.values())} ops")
    keys = sorted(set(before) | set(after), key=lambda k: (-before[k] - after[k], k))
    print(f"  {'op':<28}{'original':>10}{'deploy':>10}")
    for k in keys:
        print(f"  {k:<28}{before[k]:>10}{after[k]:>10}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gopro", action="store_true", help="GoPro-width32 shape (NAFNetLocal) instead of SIDD-width32")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--skip", nargs="*", default=[], choices=["xnnpack", "openvino", "coreml"])
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    shape = "GoPro-width32" if args.gopro else "SIDD-width32"
    model = random_release_shape(shape)
    x = torch.rand(1, 3, args.size, args.size)
    size = (args.size, args.size)
    print(f"{shape} at {args.size}x{args.size}")
    if "xnnpack" not in args.skip:
        for label, m in (("original", model), ("deploy", deploy(model, norm_form="conv-mean", input_size=size))):
            n, outside = xnnpack_partitions(m, x)
            left = ", ".join(f"{k} x{v}" for k, v in outside.most_common()) or "none"
            print(f"ExecuTorch XNNPACK, {label:<8}: {n} delegated partitions; compute ops outside: {left}")
    if "openvino" not in args.skip:
        show("OpenVINO ops", openvino_ops(model, x), openvino_ops(deploy(model, norm_form="mvn", input_size=size), x))
    if "coreml" not in args.skip:
        show(
            "Core ML MIL ops",
            coreml_ops(model, x),
            coreml_ops(deploy(model, norm_form="layer-norm", input_size=size), x),
        )


if __name__ == "__main__":
    main()
