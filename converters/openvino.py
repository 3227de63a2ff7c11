"""OpenVINO: the deploy graph as an IR (``model.xml`` + ``model.bin``), validated with the CPU plugin.

Export: ``ov.convert_model`` from the PyTorch deploy graph with a static input shape, tensors named ``image``
and ``restored``, the manifest essentials stored in the IR's rt_info under ``nafnet_edge`` (read them back with
``model.get_rt_info(["nafnet_edge", key])``), then ``ov.save_model``. Precision ``fp16`` compresses the
weights to f16 in the ``.bin`` (half the size); the CPU plugin decompresses them to f32 at load, so it changes
the file, not the arithmetic.

Image I/O (``--io image``): the converted model is wrapped by OpenVINO's ``PrePostProcessor`` before saving (after
NNCF quantization for int8, so the calibrated graph is unchanged). The input ``image`` is uint8 NHWC in the pixel
format (``bgr`` by default: OpenCV frames; ``rgb``, ``bgra``/``rgba`` with the alpha byte ignored, ``gray`` for
1-channel models); the IR converts it to f32, to RGB, divides by 255 and transposes to the model's NCHW. The output
``restored`` is clamped to [0, 1], multiplied by 255, rounded half to even, converted to u8, transposed to NHWC and
reordered to the same pixel format, alpha 255. rt_info records ``io`` and ``pixel_format`` beside the other facts.

Session: the CPU plugin silently runs bf16 on CPUs that report bf16, so the session pins
``INFERENCE_PRECISION_HINT`` (f32 unless ``--inference-precision``, the hint ``inference_precision``, or the
manifest's ``export`` section asks for another) and refuses to run when
the plugin reports a different precision than asked (on x86 without native f16 it answers an f16 request with
bf16). It records what ran: the plugin's precision hint and, over the execution graph's compute nodes,
histograms of the plugin's reported runtime precision and of the precision of the data they read.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np

from nafnet_edge.artifact_files import artifact_file, runtime_reason
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
from nafnet_edge.errors import ArtifactError, OptionError, display_path
from nafnet_edge.pixels import (
    LEVELS,
    PIXEL_FORMATS,
    check_pixel_format,
    has_alpha,
    io_info,
    output_slots,
    pixel_channels,
)

if TYPE_CHECKING:
    import torch

    from nafnet_edge.deploy import DeployNAFNet, DeployRecipe, NormForm

XML, BIN = "model.xml", "model.bin"
RT_INFO_SECTION = "nafnet_edge"
DEVICE = "CPU"
INFERENCE_PRECISIONS = ("f32", "bf16", "f16")  # values of the CPU plugin's INFERENCE_PRECISION_HINT we accept
DEFAULT_INFERENCE_PRECISION = "f32"
CAPABILITY_NAMES = {"f32": "FP32", "bf16": "BF16", "f16": "FP16"}  # as in the plugin's OPTIMIZATION_CAPABILITIES
# Execution-graph nodes that move or hold data rather than compute; left out of the runtime precision histogram.
NON_COMPUTE_LAYERS = frozenset({"Input", "Output", "Const", "Reorder", "Reshape"})

PYTHON_USAGE = """\
## Python

Pin the inference precision the artifact was validated with ({inference_precision}): left unset, the plugin
runs bf16 on CPUs that have it.

```python
{python_io}
import openvino as ov

compiled = ov.Core().compile_model("{artifact}", "CPU", {{"INFERENCE_PRECISION_HINT": "{inference_precision}"}})


def run(x):
    return compiled({{"{inp}": x}})["{out}"]


{python_save}```
"""

USAGE = (
    PYTHON_USAGE
    + """
## C++

```cpp
ov::Core core;
auto compiled = core.compile_model("{artifact}", "CPU",
                                   ov::hint::inference_precision(ov::element::{inference_precision}));
auto request = compiled.create_infer_request();
request.set_tensor("{inp}", ov::Tensor(ov::element::f32, {{1, {c}, {h}, {w}}}, pixels.data()));
request.infer();
const float* restored = request.get_tensor("{out}").data<float>();
```
"""
)

# Image I/O: the tile's bytes go in as they are (a continuous cv::Mat of 8-bit pixels in the artifact's pixel format,
# CV_8UC3 BGR by default), and the output has the same layout and format.
USAGE_IMAGE = (
    PYTHON_USAGE
    + """
## C++

```cpp
ov::Core core;
auto compiled = core.compile_model("{artifact}", "CPU",
                                   ov::hint::inference_precision(ov::element::{inference_precision}));
auto request = compiled.create_infer_request();
// tile: a continuous {h}x{w} cv::Mat of 8-bit {channels} pixels (an OpenCV frame is BGR)
request.set_tensor("{inp}", ov::Tensor(ov::element::u8, compiled.input("{inp}").get_shape(), tile.data));
request.infer();
cv::Mat restored({h}, {w}, tile.type(), request.get_tensor("{out}").data<uint8_t>());  // valid until the next infer
```
"""
)

# Input color formats of the PrePostProcessor by pixel format (4-byte pixels: the X byte is dropped).
COLOR_FORMATS = {"rgb": "RGB", "bgr": "BGR", "rgba": "RGBX", "bgra": "BGRX", "gray": "GRAY"}


class OpenVINOTarget(Target):
    name: ClassVar[str] = "openvino"
    extra: ClassVar[str] = "openvino"
    modules: ClassVar[tuple[str, ...]] = ("openvino",)
    runtime_packages: ClassVar[tuple[str, ...]] = ("openvino",)
    norm_form: ClassVar[NormForm] = "mvn"
    artifact: ClassVar[str] = XML
    file_kind: ClassVar[str] = "OpenVINO IR"
    precisions: ClassVar[tuple[Precision, ...]] = ("fp32", "fp16")
    default_precision: ClassVar[Precision] = "fp32"
    quantizer: ClassVar[str | None] = "nafnet_edge.quantization.openvino:OpenVINOQuantizer"
    color: ClassVar[str] = "#59a14f"
    options: ClassVar[tuple[TargetOption, ...]] = (
        TargetOption(
            "--inference-precision",
            "inference_precision",
            "the CPU plugin's INFERENCE_PRECISION_HINT: bench runs the artifact with it (default: the one it ships "
            f"with, else {DEFAULT_INFERENCE_PRECISION}); int8 artifacts ship with it (auto, the default: f32, or bf16 "
            "/ f16 where this CPU runs them natively and they time faster)",
            choices=("auto", *INFERENCE_PRECISIONS),
            metavar="PREC",
            commands=("bench", "quantize"),
        ),
    )
    usage_title: ClassVar[str] = "OpenVINO"
    usage_body: ClassVar[str] = USAGE
    usage_image_body: ClassVar[str] = USAGE_IMAGE
    pixel_formats: ClassVar[tuple[str, ...]] = ("bgr", "rgb", "bgra", "rgba", "gray")

    def export(self, graph: DeployNAFNet, out_dir: Path, options: ExportOptions) -> Exported:
        import openvino as ov
        import torch

        self.check_options(options)
        fmt = options.pixel_format
        if fmt is not None:  # before the conversion, which takes seconds
            check_pixel_format(fmt, input_channels(graph))
        h, w = options.input_size
        shape = (1, input_channels(graph), h, w)
        with torch.no_grad():
            ov_model = ov.convert_model(graph, example_input=torch.rand(shape), input=ov.PartialShape(list(shape)))
        fp16 = options.precision == "fp16"
        op_counts = save_ir(
            ov_model,
            out_dir,
            graph,
            input_size=(h, w),
            precision=options.precision,
            compress_to_fp16=fp16,
            pixel_format=fmt,
        )
        return Exported(
            files=[XML, BIN],
            info={
                **io_info(fmt),
                "openvino": ov.get_version(),
                "weight_precision": "f16 compressed (decompressed to f32 at load)"
                if options.precision == "fp16"
                else "f32",
                "ops": dict(op_counts.most_common()),
                "file_bytes": {name: (Path(out_dir) / name).stat().st_size for name in (XML, BIN)},
            },
        )

    def quantizer_options(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        return {"inference_precision": settings.get("inference_precision") or "auto"}

    def artifact_path(self, out_dir: Path) -> Path:
        """``model.xml`` and the ``model.bin`` OpenVINO reads beside it, checked (see ``Target.artifact_path``)."""
        artifact_file(out_dir, BIN)
        return artifact_file(out_dir, XML)

    @staticmethod
    def load_reason(error: BaseException) -> str:
        """OpenVINO's message without its ``Exception from src/...`` location lines."""
        return runtime_reason(error, skip=lambda line: line.startswith("Exception from "))

    def open_session(
        self, out_dir: Path, *, export: Mapping[str, Any] | None = None, settings: SessionSettings | None = None
    ) -> Session:
        """The IR compiled for the CPU plugin with the LATENCY hint, its inference precision pinned
        (``inference_precision``: the hint, else the ``export`` section, else f32) and ``settings.threads``
        threads; the profile reads the plugin's performance counters, the throughput mode compiles with the
        THROUGHPUT hint and runs its optimal number of requests.

        An image-I/O IR (the ``export`` section's ``pixel_format``, else the IR's rt_info) gives a
        ``pixel_session``: ``native``, ``profile`` and ``throughput`` take uint8 (1, H, W, P) pixels."""
        import openvino as ov

        settings = settings or SessionSettings()
        path = self.artifact_path(out_dir)
        asked = settings.hints.get("inference_precision")
        shipped = (export or {}).get("inference_precision", DEFAULT_INFERENCE_PRECISION)
        requested = asked or shipped
        if asked == "auto":
            raise OptionError(
                f"--inference-precision auto is for quantize (it times the candidates there); running an artifact "
                f"takes one of {', '.join(INFERENCE_PRECISIONS)}, or none for the one it ships with ({shipped})"
            )
        if requested not in INFERENCE_PRECISIONS:
            raise ArtifactError(
                f"inference_precision {requested!r} is not one of {', '.join(INFERENCE_PRECISIONS)} "
                "(the CPU plugin's INFERENCE_PRECISION_HINT values)"
            )
        core = ov.Core()
        fallback = None
        if not asked and requested != DEFAULT_INFERENCE_PRECISION:  # chosen by timing on the CPU it was made on
            capabilities = core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")
            if CAPABILITY_NAMES[requested] not in capabilities:
                fallback = (
                    f"shipped with {requested}, which this CPU does not run natively: {DEFAULT_INFERENCE_PRECISION}"
                )
                requested = DEFAULT_INFERENCE_PRECISION
        base: dict[str, Any] = {"INFERENCE_PRECISION_HINT": requested}  # every compilation below starts from it
        if settings.threads:
            base["INFERENCE_NUM_THREADS"] = settings.threads
        with self.loading(path):
            model = core.read_model(str(path))
            fmt = pixel_format_of(export) or ir_pixel_format(model)
            check_input_type(model, fmt, path)
            compiled = core.compile_model(model, DEVICE, {**base, "PERFORMANCE_HINT": "LATENCY"})
        used = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if used != requested:
            capabilities = core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")
            supported = [p for p in INFERENCE_PRECISIONS if CAPABILITY_NAMES[p] in capabilities]
            raise ArtifactError(
                f"the OpenVINO CPU plugin was asked for {requested} inference but would run {used} on this CPU "
                f"({core.get_property(DEVICE, 'FULL_DEVICE_NAME')}: {', '.join(capabilities)}); "
                f"set inference_precision to {' or '.join(supported)}"
            )
        reported, activations = runtime_precisions(compiled)
        request = compiled.create_infer_request()
        dtype = np.uint8 if fmt else np.float32

        def feed(x: np.ndarray) -> dict[str, np.ndarray]:
            if fmt and np.asarray(x).dtype != np.uint8:  # a float frame cast to uint8 would silently be black
                raise ValueError(
                    f"this IR takes uint8 pixels (1, H, W, {pixel_channels(fmt)}) in {fmt}, not {np.asarray(x).dtype}"
                )
            return {INPUT_NAME: np.ascontiguousarray(x, dtype=dtype)}

        def run(x: np.ndarray) -> np.ndarray:
            return np.asarray(request.infer(feed(x))[OUTPUT_NAME], dtype=dtype)

        def profile(x: np.ndarray, runs: int) -> dict[str, Any]:
            counted = core.compile_model(model, DEVICE, {**base, "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True})
            req = counted.create_infer_request()
            feeding = feed(x)
            req.infer(feeding)
            ops: Counter[str] = Counter()
            counts: Counter[str] = Counter()
            for _ in range(runs):
                req.infer(feeding)
                for p in req.profiling_info:
                    if p.status == p.Status.EXECUTED and p.real_time.total_seconds() > 0:
                        key = f"{p.node_type} ({p.exec_type})"
                        ops[key] += p.real_time.total_seconds() * 1e3 / runs
                        counts[key] += 1
            return operator_profile("OpenVINO performance counters (PERF_COUNT), per executed node", ops, counts, runs)

        def throughput(x: np.ndarray, frames: int) -> dict[str, Any]:
            fast = core.compile_model(model, DEVICE, {**base, "PERFORMANCE_HINT": "THROUGHPUT"})
            requests = int(fast.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
            queue = ov.AsyncInferQueue(fast, requests)
            feeding = feed(x)
            for _ in range(requests):  # warm every request
                queue.start_async(feeding)
            queue.wait_all()
            started = time.perf_counter()
            for _ in range(frames):
                queue.start_async(feeding)
            queue.wait_all()
            seconds = time.perf_counter() - started
            return {
                "mode": "OpenVINO THROUGHPUT hint",
                "fps": round(frames / seconds, 3),
                "streams": int(fast.get_property("NUM_STREAMS")),
                "requests": requests,
                "frames": frames,
            }

        info = {
            "runtime": "openvino",
            "openvino": ov.get_version(),
            "device": DEVICE,
            "device_name": core.get_property(DEVICE, "FULL_DEVICE_NAME"),
            "hint": "LATENCY",
            "inference_precision": used,
            **({"inference_precision_fallback": fallback} if fallback else {}),
            "streams": int(compiled.get_property("NUM_STREAMS")),
            "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
            "runtime_precisions": reported,
            "activation_precisions": activations,
        }
        session = Session(run, "openvino", info, profile, throughput, keep=(compiled, model))
        return pixel_session(session, fmt) if fmt else session


def save_ir(
    ov_model: Any,
    out_dir: Path,
    graph: torch.nn.Module,
    *,
    input_size: tuple[int, int],
    precision: str,
    rt_info: Mapping[str, str] | None = None,
    compress_to_fp16: bool = False,
    pixel_format: str | None = None,
) -> Counter[str]:
    """Write ``ov_model`` (converted from the deploy graph ``graph``, or a module prepared from it) as
    ``out_dir/model.xml`` + ``model.bin``: behind 8-bit image I/O in ``pixel_format`` when given
    (``with_pixel_io``), tensors named ``image`` and ``restored``, the model named after the release or
    architecture, and rt_info under ``nafnet_edge`` (``ir_metadata``, then ``rt_info``); returns the saved IR's op
    counts."""
    import openvino as ov

    xml = Path(out_dir) / XML
    if pixel_format is not None:
        if compress_to_fp16:  # only the network's weights: the pixel scale 1/255 is not exact in f16
            ov_model, compress_to_fp16 = compressed_to_fp16(ov_model), False
        ov_model = with_pixel_io(ov_model, pixel_format)
    ov_model.inputs[0].get_tensor().set_names({INPUT_NAME})
    ov_model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    recipe = cast("DeployRecipe", graph.recipe)  # the deploy graph's; NNCF's wrapper forwards attribute reads to it
    metadata = recipe.metadata
    name = metadata.get(f"{RT_INFO_SECTION}.release") or metadata.get(f"{RT_INFO_SECTION}.arch")
    ov_model.set_friendly_name(name or type(graph).__name__)
    entries = {**ir_metadata(graph, input_size, precision, metadata, pixel_format=pixel_format), **(rt_info or {})}
    for key, value in entries.items():
        ov_model.set_rt_info(value, [RT_INFO_SECTION, key])
    ov.save_model(ov_model, str(xml), compress_to_fp16=compress_to_fp16)
    return Counter(op.get_type_name() for op in ov.Core().read_model(str(xml)).get_ops())


def compressed_to_fp16(ov_model: Any) -> Any:
    """``ov_model`` with its f32 constants compressed to f16 as ``ov.save_model(compress_to_fp16=True)`` writes
    them (a Convert back to f32 after each), read back into memory."""
    import tempfile

    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="nafnet-edge-ov-") as scratch:
        xml = Path(scratch) / XML
        ov.save_model(ov_model, str(xml), compress_to_fp16=True)
        core = ov.Core()
        core.set_property({"ENABLE_MMAP": False})  # the weights are copied, not mapped from the file deleted here
        return core.read_model(str(xml))


def ir_metadata(
    graph: torch.nn.Module,
    input_size: tuple[int, int],
    precision: str,
    metadata: Mapping[str, str],
    *,
    pixel_format: str | None = None,
) -> dict[str, str]:
    """rt_info entries under ``nafnet_edge``: the pipeline's metadata (its ``nafnet_edge.`` key prefix dropped,
    since the section already says it) and this IR's own facts, which win on a clash (an image-I/O IR adds
    ``io`` = ``image`` and its ``pixel_format``; without them the IR has tensor I/O)."""
    entries = {
        key.removeprefix(f"{RT_INFO_SECTION}."): value
        for key, value in metadata.items()
        if isinstance(key, str) and isinstance(value, str)
    }
    h, w = input_size
    entries.update(input_size=f"{h}x{w}", padding_multiple=str(graph.pad_multiple), precision=precision)
    if pixel_format is not None:
        entries.update(io="image", pixel_format=pixel_format)
    return entries


def with_pixel_io(ov_model: Any, pixel_format: str) -> Any:
    """``ov_model`` (float32 NCHW in [0, 1], RGB or gray -> float32 NCHW) behind 8-bit pixel I/O, built with
    OpenVINO's ``PrePostProcessor``: uint8 NHWC pixels in ``pixel_format`` in (alpha ignored), the same out
    (``round_half_to_even(clamp(y, 0, 1) * 255)``, alpha 255)."""
    import openvino.opset13 as ops
    from openvino import Layout, Type
    from openvino.preprocess import ColorFormat, PrePostProcessor

    width = pixel_channels(pixel_format)
    channels = int(ov_model.inputs[0].get_partial_shape()[1].get_length())
    check_pixel_format(pixel_format, channels)
    ppp = PrePostProcessor(ov_model)
    source = ppp.input()
    source.tensor().set_element_type(Type.u8).set_layout(Layout("NHWC"))
    source.tensor().set_color_format(getattr(ColorFormat, COLOR_FORMATS[pixel_format]))
    steps = source.preprocess().convert_element_type(Type.f32)
    if pixel_format not in ("rgb", "gray"):
        steps.convert_color(ColorFormat.RGB)  # also drops the X (alpha) byte
    steps.scale(LEVELS)
    source.model().set_layout(Layout("NCHW"))

    def to_levels(node: Any) -> Any:
        scaled = ops.multiply(ops.clamp(node, 0.0, 1.0), np.float32(LEVELS))
        return ops.round(scaled, "half_to_even").output(0)

    # Each buffer slot's model channel (the alpha slot, appended by the pad, comes after the model's channels).
    slots = output_slots(pixel_format)

    def to_pixel_format(node: Any) -> Any:
        if has_alpha(pixel_format):
            zeros, one = np.zeros(4, np.int64), np.array([0, 0, 0, 1], np.int64)
            node = ops.pad(node, zeros, one, "constant", np.uint8(LEVELS)).output(0)
        if slots != list(range(width)):
            node = ops.gather(node, ops.constant(np.array(slots, np.int64)), ops.constant(np.int64(3))).output(0)
        return node

    target = ppp.output()
    target.model().set_layout(Layout("NCHW"))
    steps_out = target.postprocess().custom(to_levels).convert_element_type(Type.u8).convert_layout(Layout("NHWC"))
    steps_out.custom(to_pixel_format)
    return ppp.build()


def ir_pixel_format(model: Any) -> str | None:
    """The pixel format an image-I/O IR's rt_info records (``nafnet_edge`` / ``pixel_format``); None without one."""
    if not model.has_rt_info([RT_INFO_SECTION, "pixel_format"]):
        return None
    value = model.get_rt_info([RT_INFO_SECTION, "pixel_format"]).astype(str)
    return value if value in PIXEL_FORMATS else None


def check_input_type(model: Any, pixel_format: str | None, path: Path) -> None:
    """Refuse an IR whose input type contradicts its recorded I/O (uint8 for image I/O, f32 for tensor I/O)."""
    expected = "u8" if pixel_format else "f32"
    found = model.input(INPUT_NAME).get_element_type().get_type_name()
    if found != expected:
        io = f"image I/O in {pixel_format}" if pixel_format else "tensor I/O"
        raise ArtifactError(
            f"{display_path(path)}: its input {INPUT_NAME!r} is {found}, but the artifact records {io} ({expected}); "
            "convert again"
        )


def runtime_precisions(compiled: Any) -> tuple[dict[str, int], dict[str, int]]:
    """Two histograms over the compute nodes of the compiled execution graph (e.g. ``{"f32": 113}``): the
    plugin's own ``runtimePrecision`` per node, and the precision of the data each node reads (its first input).

    They differ for f16-compressed weights: the plugin reports f16 for convolutions holding f16 weights while
    their data, and their arithmetic, stay f32 (the output matches PyTorch with f16-rounded weights)."""
    reported: Counter[str] = Counter()
    activations: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ops():
        rt = op.get_rt_info()
        if rt["layerType"].astype(str) in NON_COMPUTE_LAYERS:
            continue
        reported[rt["runtimePrecision"].astype(str)] += 1
        activations[op.input(0).get_element_type().get_type_name()] += 1
    return dict(reported.most_common()), dict(activations.most_common())
