"""ONNX (opset 17) through PyTorch's TorchScript exporter, validated in onnxruntime.

The file is fixed to ``ExportOptions.input_size`` by default. With ``ExportOptions.dynamic`` the height and
width are symbolic (``height``, ``width``; any multiple of the padding multiple): valid only for a graph whose
channel attention pools globally, which computes the same function at every size. A TLC graph that pools
locally at the given size is fixed for that size (its kernel and replicate padding depend on it), so a dynamic
export of it is refused.

The deploy graph's ``manifest_metadata`` (str -> str, attached by the pipeline), the input size and the padding
multiple go into the model's ``metadata_props``, so the file describes itself without the manifest next to it.
A TLC model (``nafnet_edge.arch`` = NAFNetLocal there) is never exported dynamic: even where it pools globally at
the given size, it would pool locally at larger ones.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from nafnet_edge.artifact_files import artifact_file, loading
from nafnet_edge.converters.base import INPUT_NAME, OUTPUT_NAME, Converter, Exported, ExportOptions, LoadedRunner
from nafnet_edge.errors import OptionError

ARCH_KEY, TLC_ARCH = "nafnet_edge.arch", "NAFNetLocal"  # set by the pipeline in the graph's manifest_metadata
PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")  # in order of preference, where available

DOC_STRING = (
    "NAFNet image restoration (deploy graph). Input 'image': float32 NCHW, batch 1, RGB in [0, 1], height and "
    "width a multiple of pad_multiple (zero-pad right/bottom, crop the output back). Output 'restored': same "
    "shape, not clamped (clamp to [0, 1] and round for 8-bit images)."
)


def local_pooling(graph: torch.nn.Module) -> list[tuple[int, int]]:
    """Kernel sizes of the channel-attention pools that are not global (TLC's local box mean), in graph order."""
    from nafnet_edge.deploy import FixedPool
    from nafnet_edge.model import ChannelPool

    return [m.kernel_size for m in graph.modules() if isinstance(m, FixedPool | ChannelPool) and m.kernel_size]


class ONNXConverter(Converter):
    target: ClassVar[str] = "onnx"
    deploy_target: ClassVar[str] = "onnx"
    artifact: ClassVar[str] = "model.onnx"
    precisions = ("fp32",)
    modules: ClassVar[tuple[str, ...]] = ("onnx", "onnxruntime")
    extra: ClassVar[str] = "onnx"
    file_kind: ClassVar[str] = "ONNX model"
    opset: ClassVar[int] = 17

    def check_options(self, options: ExportOptions) -> None:
        super().check_options(options)
        if options.bundle:
            raise OptionError("--bundle is for --target executorch; an ONNX file carries no test cases")
        if options.extra_sizes:
            raise OptionError(
                "--target onnx exports one size or any size: use --dynamic for symbolic height and width "
                "instead of --sizes"
            )

    def export(self, graph: torch.nn.Module, out_dir: Path, options: ExportOptions) -> Exported:
        import onnx
        import onnxruntime

        self.check_options(options)
        h, w = options.input_size
        metadata = {str(k): str(v) for k, v in getattr(graph, "manifest_metadata", {}).items()}
        if options.dynamic and (kernels := local_pooling(graph)):
            raise OptionError(
                f"--dynamic needs global pooling, but this TLC graph pools locally at {h}x{w} (kernels "
                f"{sorted(set(kernels))}), which is fixed for that size; drop --dynamic (one file per size) and "
                "tile larger images"
            )
        if options.dynamic and metadata.get(ARCH_KEY) == TLC_ARCH:
            raise OptionError(
                f"--dynamic cannot keep TLC: this {TLC_ARCH} pools globally at {h}x{w} but locally at larger sizes, "
                "which one file cannot do; drop --dynamic (one file per size) and tile larger images"
            )
        path = out_dir / self.artifact
        example = torch.zeros(1, graph.intro.in_channels, h, w)  # type: ignore[union-attr]
        axes = {2: "height", 3: "width"}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated, not wrong
            torch.onnx.export(
                graph,
                (example,),
                str(path),
                opset_version=self.opset,
                dynamo=False,  # the dynamo exporter needs onnxscript
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes} if options.dynamic else None,
            )

        model = onnx.load(str(path))
        model.doc_string = DOC_STRING
        onnx.helper.set_model_props(
            model,
            metadata
            | {
                "nafnet_edge.input_size": f"{h}x{w}",
                "nafnet_edge.padding_multiple": str(graph.pad_multiple),
                "nafnet_edge.dynamic": str(options.dynamic).lower(),
            },
        )
        onnx.save(model, str(path))
        onnx.checker.check_model(str(path), full_check=True)

        return Exported(
            files=[self.artifact],
            info={
                "opset": self.opset,
                "onnx_version": onnx.__version__,
                "onnxruntime_version": onnxruntime.__version__,
                "op_histogram": dict(sorted(Counter(n.op_type for n in model.graph.node).items())),
                "dynamic": options.dynamic,
                "file_bytes": path.stat().st_size,
            },
        )

    def artifact_path(self, out_dir: Path) -> Path:
        """``model.onnx`` and every external data file it names, checked (see ``Converter.artifact_path``)."""
        path = artifact_file(out_dir, self.artifact)
        for location in external_data_locations(path):
            artifact_file(out_dir, location)
        return path

    def load_errors(self) -> tuple[type[BaseException], ...]:
        from google.protobuf.message import DecodeError
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NotImplemented")
        return (DecodeError, *(getattr(ort_errors, n) for n in names if hasattr(ort_errors, n)))

    def load_runner(self, out_dir: Path, manifest: dict[str, Any]) -> LoadedRunner:
        import onnxruntime

        path = self.artifact_path(out_dir)
        available = onnxruntime.get_available_providers()
        providers = [p for p in PROVIDERS if p in available]
        with self.loading(path):
            session = onnxruntime.InferenceSession(str(path), providers=providers)

        def run(a: np.ndarray) -> np.ndarray:
            out = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(a, dtype=np.float32)})[0]
            return np.asarray(out, dtype=np.float32)

        return LoadedRunner(run=run, info={"runtime": "onnxruntime", "providers": session.get_providers()})


def external_data_locations(path: Path) -> list[str]:
    """The external data files an ONNX model names (relative to its folder), read from the graph alone."""
    import onnx
    from google.protobuf.message import DecodeError

    with loading(path, ONNXConverter.file_kind, (DecodeError,)):
        model = onnx.load(str(path), load_external_data=False)
    locations: list[str] = []
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        tensors = [*graph.initializer, *(s.values for s in graph.sparse_initializer)]
        for node in graph.node:
            for attribute in node.attribute:
                tensors += [attribute.t, *attribute.tensors]
                graphs += [attribute.g, *attribute.graphs]
        for tensor in tensors:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                entries = {e.key: e.value for e in tensor.external_data}
                locations.append(entries.get("location", ""))
    return sorted(set(locations))
