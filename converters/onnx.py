"""ONNX (opset 17) through PyTorch's TorchScript exporter, validated in onnxruntime.

The file is fixed to ``ExportOptions.input_size`` by default. With the ``dynamic`` setting (``--dynamic``) the
height and width are symbolic (``height``, ``width``; any multiple of the padding multiple): valid only for a
graph whose channel attention pools globally, which computes the same function at every size. A TLC graph that
pools locally at the given size is fixed for that size (its kernel and replicate padding depend on it), so a dynamic
export of it is refused.

The deploy recipe's metadata (``graph.recipe.metadata``, str -> str), the input size and the padding multiple go
into the model's ``metadata_props``, so the file describes itself without the manifest next to it. A TLC model
(``graph.recipe.arch`` NAFNetLocal) is never exported dynamic: even where it pools globally at the given size, it
would pool locally at larger ones.

Image I/O (``ExportOptions.pixel_format``, ``--io image``): the model takes uint8 ``(1, H, W, P)`` pixels named
``image`` and returns them as ``restored`` (``nafnet_edge.pixels.image_io_module``: Cast, Slice/Concat for the
channel order, Transpose, the 1/255 and 255 scales, Clip, rounding half to even as an Add and a Sub of 2**23,
Cast); with ``--dynamic`` the symbolic axes are the NHWC height and width (1 and 2).
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from nafnet_edge.artifact_files import artifact_file, loading, runtime_reason
from nafnet_edge.converters.base import (
    INPUT_NAME,
    OUTPUT_NAME,
    Exported,
    ExportOptions,
    Precision,
    Session,
    SessionSettings,
    Target,
    TargetOption,
    input_channels,
    operator_profile,
    pixel_format_of,
    pixel_session,
)
from nafnet_edge.errors import OptionError

if TYPE_CHECKING:
    from nafnet_edge.deploy import DeployNAFNet, NormForm

PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")  # in order of preference, where available

DOC_STRING = (
    "NAFNet image restoration (deploy graph). Input 'image': float32 NCHW, batch 1, RGB in [0, 1], height and "
    "width a multiple of pad_multiple (zero-pad right/bottom, crop the output back). Output 'restored': same "
    "shape, not clamped (clamp to [0, 1] and round for 8-bit images)."
)
DOC_STRING_IMAGE = (
    "NAFNet image restoration (deploy graph) with 8-bit pixel I/O. Input 'image': uint8 NHWC, batch 1, {fmt} "
    "pixels{alpha_in}, height and width a multiple of pad_multiple (zero-pad right/bottom, crop the output back). "
    "Output 'restored': uint8, same shape and format{alpha_out}; clamped, scaled by 255 and rounded half to even "
    "inside the model."
)


USAGE = """\
## Python (onnxruntime)

```python
{python_io}
import onnxruntime as ort

session = ort.InferenceSession("{artifact}", providers=["CPUExecutionProvider"])


def run(x):
    return session.run(["{out}"], {{"{inp}": x}})[0]


{python_save}```
"""
ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")  # onnxruntime's error prefix


class ONNXTarget(Target):
    name: ClassVar[str] = "onnx"
    extra: ClassVar[str] = "onnx"
    modules: ClassVar[tuple[str, ...]] = ("onnx", "onnxruntime")
    runtime_packages: ClassVar[tuple[str, ...]] = ("onnx", "onnxruntime")
    norm_form: ClassVar[NormForm] = "mvn"
    artifact: ClassVar[str] = "model.onnx"
    file_kind: ClassVar[str] = "ONNX model"
    precisions: ClassVar[tuple[Precision, ...]] = ("fp32",)
    pixel_formats: ClassVar[tuple[str, ...]] = ("rgb", "bgr", "rgba", "bgra", "gray")
    color: ClassVar[str] = "#b07aa1"
    options: ClassVar[tuple[TargetOption, ...]] = (
        TargetOption("--dynamic", "dynamic", "symbolic height and width", default=False, kind="flag"),
    )
    usage_title: ClassVar[str] = "ONNX"
    usage_body: ClassVar[str] = USAGE
    opset: ClassVar[int] = 17

    def export(self, graph: DeployNAFNet, out_dir: Path, options: ExportOptions) -> Exported:
        import onnx
        import onnxruntime
        import torch

        from nafnet_edge.pixels import check_pixel_format, has_alpha, image_io_module, io_info, pixel_channels

        self.check_options(options)
        h, w = options.input_size
        dynamic = bool(self.setting(options, "dynamic"))
        recipe = graph.recipe
        if dynamic and (kernels := recipe.local_pooling):
            raise OptionError(
                f"--dynamic needs global pooling, but this TLC graph pools locally at {h}x{w} (kernels "
                f"{sorted(set(kernels))}), which is fixed for that size; drop --dynamic (one file per size) and "
                "tile larger images"
            )
        if dynamic and recipe.is_tlc:
            raise OptionError(
                f"--dynamic cannot keep TLC: this {recipe.arch} pools globally at {h}x{w} but locally at larger sizes, "
                "which one file cannot do; drop --dynamic (one file per size) and tile larger images"
            )
        path = out_dir / self.artifact
        fmt = options.pixel_format
        module: torch.nn.Module = graph
        example = torch.zeros(1, input_channels(graph), h, w)
        axes = {2: "height", 3: "width"}
        doc = DOC_STRING
        if fmt is not None:
            check_pixel_format(fmt, input_channels(graph))
            module = image_io_module(graph, fmt)
            example = torch.zeros(1, h, w, pixel_channels(fmt), dtype=torch.uint8)
            axes = {1: "height", 2: "width"}
            alpha = has_alpha(fmt)
            doc = DOC_STRING_IMAGE.format(
                fmt=fmt.upper() if fmt != "gray" else "gray",
                alpha_in=" (alpha ignored)" if alpha else "",
                alpha_out=", alpha 255" if alpha else "",
            )
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated, not wrong
            # image I/O's alpha pad: the exporter writes its pad widths reversed by a step -1 slice it cannot fold
            warnings.filterwarnings("ignore", "Constant folding - Only steps=1", UserWarning)
            torch.onnx.export(
                module,
                (example,),
                str(path),
                opset_version=self.opset,
                dynamo=False,  # the dynamo exporter needs onnxscript
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes} if dynamic else None,
            )

        model = onnx.load(str(path))
        model.doc_string = doc
        onnx.helper.set_model_props(
            model,
            dict(recipe.metadata)
            | {
                "nafnet_edge.input_size": f"{h}x{w}",
                "nafnet_edge.padding_multiple": str(graph.pad_multiple),
                "nafnet_edge.dynamic": str(dynamic).lower(),
                "nafnet_edge.io": "image" if fmt else "tensor",
            }
            | ({"nafnet_edge.pixel_format": fmt} if fmt else {}),
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
                "dynamic": dynamic,
                "file_bytes": path.stat().st_size,
                **io_info(fmt),
            },
        )

    def artifact_path(self, out_dir: Path) -> Path:
        """``model.onnx`` and every external data file it names, checked (see ``Target.artifact_path``)."""
        path = artifact_file(out_dir, self.artifact)
        for location in external_data_locations(path):
            artifact_file(out_dir, location)
        return path

    @staticmethod
    def load_reason(error: BaseException) -> str:
        """onnxruntime's message without its ``[ONNXRuntimeError] : 7 : INVALID_PROTOBUF :`` prefix."""
        return runtime_reason(Exception(ORT_PREFIX.sub("", str(error).strip())))

    def load_errors(self) -> tuple[type[BaseException], ...]:
        from google.protobuf.message import DecodeError
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NotImplemented")
        return (DecodeError, *(getattr(ort_errors, n) for n in names if hasattr(ort_errors, n)))

    def open_session(
        self, out_dir: Path, *, export: Mapping[str, Any] | None = None, settings: SessionSettings | None = None
    ) -> Session:
        """onnxruntime with the first available of ``PROVIDERS``; ``settings.threads`` sets its intra-op threads.
        The profile is onnxruntime's own profiler (kernel time per operator type)."""
        import onnxruntime as ort

        settings = settings or SessionSettings()
        fmt = pixel_format_of(export)
        dtype = np.uint8 if fmt else np.float32  # the model's input and output type
        path = self.artifact_path(out_dir)
        providers = [p for p in PROVIDERS if p in ort.get_available_providers()]

        def session_options(*, profile_in: str | None = None) -> Any:
            opts = ort.SessionOptions()
            if settings.threads:
                opts.intra_op_num_threads = settings.threads
            if profile_in is not None:
                opts.enable_profiling = True
                opts.profile_file_prefix = str(Path(profile_in) / "profile")
            return opts

        with self.loading(path):
            session = ort.InferenceSession(str(path), session_options(), providers=providers)

        def feed(a: np.ndarray) -> dict[str, np.ndarray]:
            a = np.asarray(a)
            if fmt and a.dtype != np.uint8:
                raise ValueError(f"the model takes uint8 pixels, got {a.dtype}: pass the pixel buffer's bytes")
            return {INPUT_NAME: np.ascontiguousarray(a, dtype=dtype)}

        def run(a: np.ndarray) -> np.ndarray:
            return np.asarray(session.run([OUTPUT_NAME], feed(a))[0], dtype=dtype)

        def profile(x: np.ndarray, runs: int) -> dict[str, Any]:
            inputs = feed(x)
            with tempfile.TemporaryDirectory(prefix="nafnet-edge-ort-") as tmp:
                profiled = ort.InferenceSession(str(path), session_options(profile_in=tmp), providers=providers)
                for _ in range(runs + 1):
                    profiled.run(None, inputs)
                events = json.loads(Path(profiled.end_profiling()).read_text())
            ops: Counter[str] = Counter()
            counts: Counter[str] = Counter()
            for event in events:
                if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
                    key = event.get("args", {}).get("op_name", "?")
                    ops[key] += event["dur"] / 1e3 / (runs + 1)
                    counts[key] += 1
            return operator_profile("onnxruntime profiler, kernel time per operator type", ops, counts, runs + 1)

        info: dict[str, Any] = {"runtime": "onnxruntime", "providers": session.get_providers()}
        info["onnxruntime"] = ort.__version__
        if settings.threads:
            info["threads"] = settings.threads
        result = Session(run, "onnxruntime", info, profile, keep=session)
        return pixel_session(result, fmt) if fmt else result


def external_data_locations(path: Path) -> list[str]:
    """The external data files an ONNX model names (relative to its folder), read from the graph alone."""
    import onnx
    from google.protobuf.message import DecodeError

    with loading(path, ONNXTarget.file_kind, (DecodeError,), ONNXTarget.load_reason):
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
