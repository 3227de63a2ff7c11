"""LiteRT (formerly TensorFlow Lite) through litert-torch, validated in LiteRT's own runtime (``ai_edge_litert``).

``litert_torch.convert`` lowers the deploy graph to a ``.tflite`` flatbuffer fixed for ``ExportOptions.input_size``,
with one signature (``serving_default``) whose input is named ``image`` and output ``restored``. Tensor I/O keeps
the graph's float32 NCHW (the converter computes in NHWC and puts one TRANSPOSE at each end); image I/O
(``--io image``) takes and returns uint8 NHWC pixels (``nafnet_edge.pixels.image_io_module``: a CAST at each end,
SLICE/CONCATENATION or a PADV2 for the channel order, the 1/255 and 255 scales, the clamp as RELU_0_TO_1 and the
rounding half to even as a ROUND, all of which litert-torch lowers as written; no TRANSPOSE).
``rgba`` is the default format, the bytes an Android ``Bitmap`` in ARGB_8888 gives ``copyPixelsToBuffer``.

Norm form ``mvn``: measured on the embedded width-16 model at 256x256 on 2 Xeon cores (XNNPACK, 40 interleaved
runs), every form converts and matches PyTorch within 6e-7, and ``mvn`` (26.3 ms, 390 operators) ties
``reference`` (26.4 ms, 414) as the fastest, ahead of ``conv-mean`` (28.3 ms: the channel means as 1x1
convolutions do not pay off in XNNPACK) and ``layer-norm`` (28.9 ms, 534 operators with its reshapes); it has the
fewest operators of the fast two.

Precisions: fp32, and fp16 as float16 weights (``ai_edge_quantizer``'s ``float_casting`` weight-only recipe on
the converted file: the convolution and fully connected weights stored as float16 behind DEQUANTIZE operators).
A GPU delegate computes such a file in half precision. On CPU, the session runs an fp16 file with XNNPACK's FP16
inference (``TFLITE_XNNPACK_DELEGATE_FLAG_FORCE_FP16``, set through LiteRT's ``CompiledModel`` CPU options: the
Python ``Interpreter`` has no way to set it), so validation measures half-precision arithmetic. XNNPACK computes
FP16 natively on ARM64 with the ARMv8.2 FP16 extension and emulates it on x86-64 with AVX2 (each operation in
float32, its result rounded to float16: the precision loss of FP16, not bit-exact with native FP16); where it can
do neither it refuses, and the session falls back to the interpreter, which dequantizes the weights at load and
computes in float32. ``Session.info["compute"]`` (the manifest's ``runtime``) records what ran. Image I/O rounds
with ROUND rather than the 2**23 add and subtract the other targets use: 2**23 lies beyond float16's range (65504),
so half-precision arithmetic would turn the pixels into infinities. ``gpu_delegate.float16_overflow`` names any
operator with a constant beyond that range, and the session computes such an fp16 file in float32. int8 files come from
``nafnet_edge.quantization.litert``.

GPU readiness (``Exported.info["gpu_delegate"]``): how many of the file's operators the LiteRT GPU delegate would
take. ai-edge-litert 2.3.0 ships TFLite's model analyzer (``_pywrap_analyzer_wrapper``, what
``tf.lite.experimental.Analyzer.analyze(..., gpu_compatibility=True)`` calls), but built without its GPU checks:
it reports every model compatible, a sort (STABLEHLO_SORT) and uint8 casts included. So the count applies the
delegate's documented constraints to the flatbuffer (read with the schema ai-edge-litert ships): its operator list
(https://ai.google.dev/edge/litert/performance/gpu, and the per-operator rules the delegate checks when it
partitions a graph, ``tflite/tools/versioning/gpu_compatibility.cc`` in the LiteRT repository), tensors of at most
4 dimensions, batch 1, float32/float16 or quantized int8/uint8 tensors (the delegate dequantizes those). LiteRT's
newer GPU accelerator (``CompiledModel`` with ``Accelerator.GPU``) may take more (RELU_0_TO_1 and ROUND, for two).

The session is LiteRT's runtime on CPU with XNNPACK, all cores unless ``SessionSettings.threads`` says otherwise
(the interpreter alone would use one: 48 ms instead of 25 ms at 256x256 on 2 cores). No per-operator profile:
neither the interpreter nor ``CompiledModel`` exposes one in Python (LiteRT's ``benchmark_model`` tool has one).
"""

from __future__ import annotations

import atexit
import os
import platform
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from nafnet_edge.converters.base import (
    INPUT_NAME,
    OUTPUT_NAME,
    Exported,
    ExportOptions,
    Precision,
    Session,
    SessionSettings,
    Target,
    checked_input,
    input_channels,
    pixel_format_of,
    pixel_session,
)
from nafnet_edge.pixels import check_pixel_format, io_info, pixel_channels
from nafnet_edge.usage import KOTLIN_RESTORE_BITMAP, android_pixel_tiler

if TYPE_CHECKING:
    import torch

    from nafnet_edge.deploy import DeployNAFNet, NormForm

SIGNATURE = "serving_default"  # litert-torch's name for the one signature
# The TFLite operators whose float weights the fp16 recipe stores as float16 (ai_edge_quantizer's float casting).
FP16_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "CONV_2D_TRANSPOSE")
XNNPACK_FORCE_FP16 = 0x4  # TFLITE_XNNPACK_DELEGATE_FLAG_FORCE_FP16 (tflite/delegates/xnnpack/xnnpack_delegate.h)

PYTHON_USAGE = """\
## Python (`ai-edge-litert`)

```python
{python_io}
from ai_edge_litert.interpreter import Interpreter

interpreter = Interpreter(model_path="{artifact}", num_threads=4)  # without num_threads: one thread
restore = interpreter.get_signature_runner()  # the file's one signature: {inp} -> {out}


def run(x):  # x: {run_io}
    return restore({inp}=x)["{out}"]


{python_save}```
"""

KOTLIN_LOAD = """\
val model = CompiledModel.create(context.assets, "{artifact}", CompiledModel.Options(Accelerator.CPU))
val inputs = model.createInputBuffers()
val outputs = model.createOutputBuffers()
"""

KOTLIN_GPU = """\
`Accelerator.GPU` runs it on the phone's GPU (in half precision); `manifest.json` (`export.gpu_delegate`) counts
the operators the GPU delegate takes and names the ones it leaves to the CPU.
"""

USAGE = (
    PYTHON_USAGE
    + """
## Android (Kotlin, LiteRT `CompiledModel`)

A sketch, not compiled by nafnet-edge's tests (they have no Android SDK): one {h}x{w} tile, float32 NCHW in [0, 1].
"""
    + KOTLIN_GPU
    + """
```kotlin
"""
    + KOTLIN_LOAD
    + """inputs[0].writeFloat(pixels)  // pixels: FloatArray of 1*{c}*{h}*{w}, NCHW, in [0, 1]
model.run(inputs, outputs)
val restored = outputs[0].readFloat()  // same layout; clamp to [0, 1] and scale by 255 for an 8-bit image
```

A whole `Bitmap` of any size: `NafnetTiler.kt` (in this folder; plain Kotlin, compiled and tested on the JVM
against nafnet-edge's Python tiler) pads, tiles, runs and blends exactly as this artifact was validated:

```kotlin
val tiler = NafnetTiler(object : TileModule {{
    override fun run(input: FloatArray, channels: Int, height: Int, width: Int): FloatArray {{
        inputs[0].writeFloat(input)
        model.run(inputs, outputs)
        return outputs[0].readFloat()
    }}
}}, tileHeight = {h}, tileWidth = {w}, overlap = {overlap}, align = {align}, channels = {c}{kscale})
```
"""
)

KOTLIN_GPU_IMAGE = """\
On the GPU (`Accelerator.GPU`), by the GPU delegate's documented operator list, the pixel conversions at the ends
(the two uint8 CASTs, the clamp and the rounding) stay on the CPU (`manifest.json`, `export.gpu_delegate.rejected`);
the network between them runs on the GPU, in half precision too.
"""

USAGE_IMAGE = (
    PYTHON_USAGE
    + """
## Android (Kotlin, LiteRT `CompiledModel`)

"""
    + android_pixel_tiler("model", "LiteRT", "a sketch, not compiled by the tests (they have no Android SDK)")
    + KOTLIN_GPU_IMAGE
    + """
```kotlin
"""
    + KOTLIN_LOAD
    + """val tiler = NafnetPixelTiler(object : PixelTileModule {{
    override fun run(pixels: ByteArray, height: Int, width: Int): ByteArray {{  // uint8 [1, {h}, {w}, {p}] in and out
        inputs[0].writeInt8(pixels)
        model.run(inputs, outputs)
        return outputs[0].readInt8()
    }}
}}, tileHeight = {h}, tileWidth = {w}, overlap = {overlap}, align = {align}, bytesPerPixel = {p}{kscale})

"""
    + KOTLIN_RESTORE_BITMAP
)


class LiteRTTarget(Target):
    name: ClassVar[str] = "litert"
    extra: ClassVar[str] = "litert"
    modules: ClassVar[tuple[str, ...]] = ("litert_torch", "ai_edge_litert")
    runtime_packages: ClassVar[tuple[str, ...]] = ("litert-torch", "ai-edge-litert", "ai-edge-quantizer")
    norm_form: ClassVar[NormForm] = "mvn"
    artifact: ClassVar[str] = "model.tflite"
    file_kind: ClassVar[str] = "LiteRT model"
    precisions: ClassVar[tuple[Precision, ...]] = ("fp32", "fp16")
    quantizer: ClassVar[str | None] = "nafnet_edge.quantization.litert:LiteRTQuantizer"
    # rgba first: an Android Bitmap (ARGB_8888) copied with copyPixelsToBuffer gives RGBA bytes
    pixel_formats: ClassVar[tuple[str, ...]] = ("rgba", "rgb", "bgra", "bgr", "gray")
    color: ClassVar[str] = "#ff9da7"
    helpers: ClassVar[tuple[str, ...]] = ("android/NafnetTiler.kt",)  # whole frames on Android
    usage_title: ClassVar[str] = "LiteRT"
    usage_body: ClassVar[str] = USAGE
    usage_image_body: ClassVar[str] = USAGE_IMAGE

    def export(self, graph: DeployNAFNet, out_dir: Path, options: ExportOptions) -> Exported:
        import torch

        self.check_options(options)
        h, w = options.input_size
        channels = input_channels(graph)
        fmt = options.pixel_format
        module: torch.nn.Module = graph
        example = torch.zeros(1, channels, h, w)
        if fmt is not None:
            check_pixel_format(fmt, channels)
            module = image_io(graph, fmt)
            example = torch.zeros(1, h, w, pixel_channels(fmt), dtype=torch.uint8)
        path = out_dir / self.artifact
        convert_to_tflite(module.eval(), example, path)
        fp32_bytes = path.stat().st_size
        if options.precision == "fp16":
            float16_weights(path)
        return Exported(
            files=[self.artifact],
            info={
                "litert_torch_version": metadata.version("litert-torch"),
                "ai_edge_litert_version": metadata.version("ai-edge-litert"),
                "ai_edge_quantizer_version": metadata.version("ai-edge-quantizer"),
                "signature": SIGNATURE,
                "weights": "float16" if options.precision == "fp16" else "float32",
                "op_histogram": op_histogram(path),
                "gpu_delegate": gpu_delegate_readiness(path),
                "file_bytes": path.stat().st_size,
                "fp32_file_bytes": fp32_bytes,
                **io_info(fmt),
            },
        )

    @staticmethod
    def export_summary(export: Mapping[str, Any]) -> str:
        """What the result line adds for a LiteRT artifact: the GPU delegate's share of its operators."""
        gpu = export.get("gpu_delegate") or {}
        return f"{gpu['accepted']}/{gpu['nodes']} on GPU" if "nodes" in gpu else ""

    def load_errors(self) -> tuple[type[BaseException], ...]:
        return (RuntimeError, ValueError)

    def open_session(
        self, out_dir: Path, *, export: Mapping[str, Any] | None = None, settings: SessionSettings | None = None
    ) -> Session:
        """LiteRT on CPU (XNNPACK) on ``settings.threads`` threads, all cores when None: the interpreter, or for a
        float16-weight file ``CompiledModel`` with XNNPACK's FP16 inference where this CPU can run it."""
        from ai_edge_litert.interpreter import Interpreter

        settings = settings or SessionSettings()
        threads = settings.threads or os.cpu_count() or 1
        path = self.artifact_path(out_dir)
        fmt = pixel_format_of(export)
        with self.loading(path):
            interpreter = Interpreter(model_path=str(path), num_threads=threads)
            interpreter.allocate_tensors()
        source = interpreter.get_input_details()[0]
        sink = interpreter.get_output_details()[0]
        io = _TensorIO(tuple(int(d) for d in source["shape"]), np.dtype(source["dtype"]))
        info: dict[str, Any] = {"ai_edge_litert": metadata.version("ai-edge-litert"), "threads": threads}

        def interpret(x: np.ndarray) -> np.ndarray:
            interpreter.set_tensor(source["index"], io.check(x))
            interpreter.invoke()
            return np.array(interpreter.get_tensor(sink["index"]), dtype=io.dtype)

        run: Callable[[np.ndarray], np.ndarray] = interpret
        keep: Any = interpreter
        compute = compute_of(export)
        overflow = ((export or {}).get("gpu_delegate") or {}).get("float16_overflow")
        if compute == "fp16" and overflow:
            compute = "fp32 (float16 weights dequantized at load)"
            info["fp16_unavailable"] = f"constants beyond float16's range in {', '.join(sorted(overflow))}"
        if compute == "fp16":
            try:
                run, keep = fp16_runner(path, threads, io, tuple(int(d) for d in sink["shape"]))
                info.update(api="CompiledModel", xnnpack_flags="FORCE_FP16", fp16_arithmetic=fp16_arithmetic())
            except RuntimeError as e:  # XNNPACK refuses FP16 where the CPU can neither compute nor emulate it
                compute = "fp32 (float16 weights dequantized at load)"
                info["fp16_unavailable"] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if keep is interpreter:
            ops = interpreter._get_ops_details()  # after allocation: the delegate's nodes replace the ones it took
            info.update(api="Interpreter", xnnpack_partitions=sum(op["op_name"] == "DELEGATE" for op in ops))
        info["compute"] = compute
        session = Session(run, "litert", info, keep=keep)
        return pixel_session(session, fmt) if fmt else session


def compute_of(export: Mapping[str, Any] | None) -> str:
    """The arithmetic an artifact's ``export`` section asks for on CPU: fp16 for float16 weights, int8 where the
    file is quantized (float32 for what it keeps float), else fp32."""
    export = export or {}
    if export.get("weights") == "float16":
        return "fp16"
    if export.get("int8_ops"):
        return "int8 (float32 for the operators the file keeps float)"
    return "fp32"


def fp16_arithmetic() -> str:
    """How XNNPACK's FP16 inference computes on this machine (its delegate documentation)."""
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        return "emulated: each operation in float32, its result rounded to float16 (XNNPACK on x86)"
    return "native float16 (ARMv8.2 FP16 arithmetic)"


class _TensorIO:
    """The artifact's input shape and type (uint8 for image I/O); refuses other arrays with what to do instead."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.shape, self.dtype = shape, dtype

    def check(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(checked_input(a, self.shape, self.dtype, ".tflite"), dtype=self.dtype)


def fp16_runner(
    path: Path, threads: int, io: _TensorIO, output_shape: tuple[int, ...] | None = None
) -> tuple[Callable[[np.ndarray], np.ndarray], Any]:
    """A runner for the ``.tflite`` at ``path`` in ``CompiledModel`` on CPU with XNNPACK's FP16 inference forced,
    run once on zeros (XNNPACK refuses at compilation or at the first run where the CPU cannot do FP16:
    ``RuntimeError``); and the model to keep alive."""
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.options import CpuOptions, Options

    options = Options(cpu_options=CpuOptions(num_threads=threads, xnnpack_flags=XNNPACK_FORCE_FP16))
    model = CompiledModel.from_file(str(path), environment=_environment(), options=options)
    inputs, outputs = model.create_input_buffers(0), model.create_output_buffers(0)
    shape = output_shape or io.shape  # a super-resolution model's output is larger than its input
    size = int(np.prod(shape))

    def run(x: np.ndarray) -> np.ndarray:
        inputs[0].write(io.check(x))
        model.run_by_index(0, inputs, outputs)
        return np.array(outputs[0].read(size, io.dtype), dtype=io.dtype).reshape(shape)

    run(np.zeros(io.shape, io.dtype))
    return run, (model, inputs, outputs)


_ENVIRONMENT: list[Any] = []  # one LiteRT environment for the process


def _environment() -> Any:
    """The process's LiteRT environment for ``CompiledModel``, created on first use (where the caller captures
    what the runtime prints: ``progress.backend_output``)."""
    if not _ENVIRONMENT:
        import ai_edge_litert
        from ai_edge_litert.environment import Environment, EnvironmentOptions

        runtime = os.path.dirname(os.path.abspath(ai_edge_litert.__file__))
        _ENVIRONMENT.append(Environment.create(options=EnvironmentOptions(runtime_path=runtime)))
        atexit.register(_quiet_exit)
    return _ENVIRONMENT[0]


def _quiet_exit() -> None:
    """At exit, after everything nafnet-edge prints: stderr to /dev/null, for the lines LiteRT's accelerators log
    when the native runtime tears down (after Python's own finalization, beyond any capture)."""
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def image_io(module: torch.nn.Module, pixel_format: str) -> torch.nn.Module:
    """``module`` behind LiteRT's 8-bit image I/O (fp32, fp16 and int8 files alike): ``image_io_module`` with the
    rounding as ROUND, which stays within float16 where a GPU or XNNPACK's FP16 inference computes it (the 2**23
    rounding of the other targets would overflow)."""
    from nafnet_edge.pixels import image_io_module

    return image_io_module(module, pixel_format, round_op=True)


def convert_to_tflite(module: torch.nn.Module, example: torch.Tensor, path: Path, **convert_options: Any) -> None:
    """``module`` (one tensor in, one out) converted by litert-torch for ``example`` and written to ``path``, its
    signature's input named ``image`` and output ``restored`` as the manifest says (litert-torch names the
    signature's inputs after ``sample_kwargs`` and its outputs after the keys of a returned dict).
    ``convert_options`` go to ``litert_torch.convert`` (``quant_config`` for int8)."""
    import litert_torch
    import torch

    class Named(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = module

        def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
            return {OUTPUT_NAME: self.model(image)}

    with torch.no_grad():
        converted = litert_torch.convert(Named().eval(), sample_kwargs={INPUT_NAME: example}, **convert_options)
    converted.export(str(path))


def float16_weights(path: Path) -> None:
    """Rewrite the ``.tflite`` at ``path`` with its convolution and fully connected weights stored as float16."""
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.quantizer import Quantizer

    quantizer = Quantizer(str(path))
    for op in FP16_WEIGHT_OPS:
        quantizer.add_weight_only_config(".*", getattr(qtyping.TFLOperationName, op), 16, algorithm_key="float_casting")
    quantizer.quantize().export_model(str(path), overwrite=True)


# ---- reading the flatbuffer ---------------------------------------------------------------------------------------


class TfliteGraph:
    """The main subgraph of a ``.tflite`` as the TFLite schema reads it (``ai_edge_litert.schema_py_generated``,
    the flatbuffers object API): its operators in execution order, with names, tensors and options."""

    def __init__(self, path: Path) -> None:
        from ai_edge_litert import schema_py_generated as schema

        model = schema.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
        self.ops_by_code = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        self.types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
        self.model = model
        self.subgraph = model.subgraphs[0]
        self.operators = list(self.subgraph.operators or [])
        self.graph_io = {int(i) for i in [*(self.subgraph.inputs or []), *(self.subgraph.outputs or [])]}

    def op_name(self, op: Any) -> str:
        code = self.model.operatorCodes[op.opcodeIndex]
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)  # codes above 127 only in builtinCode
        name = self.ops_by_code.get(builtin, f"BUILTIN_{builtin}")
        return name if name != "CUSTOM" else f"CUSTOM:{(code.customCode or b'').decode(errors='replace')}"

    def tensor(self, index: int) -> _Tensor:
        t = self.subgraph.tensors[index]
        buffer = self.model.buffers[t.buffer] if t.buffer else None
        const = buffer is not None and (buffer.data is not None and len(buffer.data) > 0 or bool(buffer.offset))
        q = t.quantization
        quantized = q is not None and q.scale is not None and len(q.scale) > 0
        shape = [int(d) for d in (t.shape if t.shape is not None else [])]
        graph_io = index in self.graph_io
        return _Tensor(
            shape, self.types.get(t.type, str(t.type)), const, quantized, graph_io, buffer if const else None
        )

    def inputs(self, op: Any) -> list[_Tensor]:
        return [self.tensor(i) for i in (op.inputs if op.inputs is not None else []) if i >= 0]

    def outputs(self, op: Any) -> list[_Tensor]:
        return [self.tensor(i) for i in (op.outputs if op.outputs is not None else []) if i >= 0]


class _Tensor:
    """One operand: shape, type name ("FLOAT32"), whether it is a constant (and its buffer), quantized, and one of
    the graph's inputs or outputs."""

    def __init__(
        self, shape: list[int], dtype: str, const: bool, quantized: bool, graph_io: bool, buffer: Any = None
    ) -> None:
        self.shape, self.dtype, self.const, self.quantized = shape, dtype, const, quantized
        self.graph_io, self.buffer = graph_io, buffer

    def max_abs(self) -> float:
        """The largest magnitude of a float32 constant (0 for anything else)."""
        if self.dtype != "FLOAT32" or self.buffer is None or self.buffer.data is None:
            return 0.0
        values = np.frombuffer(np.asarray(self.buffer.data, dtype=np.uint8).tobytes(), dtype="<f4")
        return float(np.abs(values).max()) if values.size else 0.0


def op_histogram(path: Path) -> dict[str, int]:
    """The operators of the ``.tflite`` at ``path`` (its main subgraph, as written), by count."""
    graph = TfliteGraph(path)
    return dict(sorted(Counter(graph.op_name(op) for op in graph.operators).items()))


# ---- GPU delegate readiness ---------------------------------------------------------------------------------------

GPU_RULE = (
    "the LiteRT GPU delegate's documented operator list and per-operator constraints "
    "(ai.google.dev/edge/litert/performance/gpu; tflite/tools/versioning/gpu_compatibility.cc), tensors of at most "
    "4 dimensions, batch 1, float32/float16 or quantized int8/uint8 tensors"
)
FLOAT16_MAX = 65504.0
GPU_FLOAT_TYPES = frozenset({"FLOAT32", "FLOAT16"})
GPU_TENSOR_TYPES = GPU_FLOAT_TYPES | {"INT32", "BOOL"}  # int32 and bool: shapes, axes, comparisons
# Operators the delegate takes whatever their operands (beyond the tensor constraints).
GPU_PLAIN_OPS = frozenset(
    {
        "AVERAGE_POOL_2D",
        "BATCH_MATMUL",
        "CONCATENATION",
        "CUMSUM",
        "FULLY_CONNECTED",
        "GATHER",
        "LEAKY_RELU",
        "MAX_POOL_2D",
        "PACK",
        "PRELU",
        "QUANTIZE",
        "RELU",
        "RELU6",
        "RELU_N1_TO_1",
        "RESIZE_BILINEAR",
        "RESIZE_NEAREST_NEIGHBOR",
        "SELECT",
        "SELECT_V2",
        "SOFTMAX",
        "SPLIT",
        "SPLIT_V",
    }
)
GPU_UNARY_OPS = frozenset(
    {"ABS", "CEIL", "COS", "ELU", "EXP", "FLOOR", "GELU", "LOG", "LOGISTIC", "NEG", "RSQRT", "SIGN", "SIN", "SQRT"}
    | {"SQUARE", "TANH"}
)
GPU_BINARY_OPS = frozenset(
    {"ATAN2", "DIV", "EQUAL", "FLOOR_DIV", "FLOOR_MOD", "GREATER", "GREATER_EQUAL", "LESS", "LESS_EQUAL"}
    | {"LOGICAL_AND", "MAXIMUM", "MINIMUM", "NOT_EQUAL", "POW", "SQUARED_DIFFERENCE", "SUB"}
)
GPU_REDUCE_OPS = frozenset({"MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN", "REDUCE_PROD"})
GPU_SINGLE_INPUT_OPS = frozenset(
    {"RESHAPE", "TRANSPOSE", "TILE", "HARD_SWISH", "DEPTH_TO_SPACE", "SPACE_TO_DEPTH", "DEQUANTIZE"}
)
GPU_CONV_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV"})
GPU_PAD_OPS = frozenset({"PAD", "PADV2", "MIRROR_PAD"})


def gpu_delegate_readiness(path: Path) -> dict[str, Any]:
    """How many operators of the ``.tflite`` at ``path`` the GPU delegate would take under its documented
    constraints (``GPU_RULE``): ``nodes``, ``accepted``, ``rejected`` (operator -> count) and ``reasons``
    (operator -> why, the first reason met); ``float16_overflow`` counts the operators with a constant beyond
    float16's range (65504), which half-precision arithmetic (the GPU's, XNNPACK's FP16) turns into infinity."""
    graph = TfliteGraph(path)
    rejected: Counter[str] = Counter()
    reasons: dict[str, str] = {}
    overflow: Counter[str] = Counter()
    for op in graph.operators:
        name = graph.op_name(op)
        reason = gpu_rejection(name, op, graph)
        if reason is not None:
            rejected[name] += 1
            reasons.setdefault(name, reason)
        if any(t.const and t.max_abs() > FLOAT16_MAX for t in graph.inputs(op)):
            overflow[name] += 1
    nodes = len(graph.operators)
    return {
        "nodes": nodes,
        "accepted": nodes - sum(rejected.values()),
        "rejected": dict(sorted(rejected.items())),
        "reasons": dict(sorted(reasons.items())),
        "float16_overflow": dict(sorted(overflow.items())),
        "rule": GPU_RULE,
        "source": "documented constraints (ai-edge-litert's analyzer is built without its GPU checks)",
    }


def gpu_rejection(name: str, op: Any, graph: TfliteGraph) -> str | None:
    """Why the GPU delegate would leave operator ``op`` (named ``name``) of ``graph`` to the CPU; None when it
    takes it."""
    inputs, outputs = graph.inputs(op), graph.outputs(op)
    for t in inputs + outputs:
        if len(t.shape) > 4:
            return f"{len(t.shape)}-D tensor (the GPU delegate takes at most 4-D)"
        if t.graph_io and len(t.shape) == 4 and t.shape[0] != 1:
            return f"batch {t.shape[0]} (the GPU delegate takes batch 1)"
        supported = t.dtype in GPU_TENSOR_TYPES or (t.dtype in ("INT8", "UINT8") and t.quantized)
        if not supported and name != "CAST":  # CAST has its own rule below
            return f"{t.dtype.lower()} tensor (float32/float16 or quantized int8/uint8)"
    runtime = [t for t in inputs if not t.const]
    consts = [t for t in inputs if t.const]
    if name in GPU_PLAIN_OPS:
        return None
    if name == "CAST":
        kinds = (inputs[0].dtype, outputs[0].dtype)
        if set(kinds) <= {"FLOAT32", "INT32"} or ("BOOL" in kinds and set(kinds) - {"BOOL"} <= GPU_FLOAT_TYPES):
            return None
        return f"CAST {kinds[0].lower()} -> {kinds[1].lower()} (float32/int32, or bool/float, only)"
    if name in ("ADD", "MUL"):
        return None if len(inputs) == 2 else f"{name} of {len(inputs)} inputs (two)"
    if name == "ADD_N":
        return None if len(inputs) == 2 else "ADD_N of more than two inputs"
    if name in GPU_UNARY_OPS:
        return None if len(runtime) == 1 and not consts else f"{name} with a constant operand"
    if name in GPU_BINARY_OPS:
        return None if len(runtime) + len(consts) == 2 and runtime else f"{name} needs one or two operands"
    if name in GPU_REDUCE_OPS:
        axes = inputs[1] if len(inputs) > 1 else None
        ok = len(runtime) == 1 and axes is not None and axes.const and axes.dtype == "INT32"
        return None if ok else f"{name} needs constant int32 axes"
    if name in GPU_SINGLE_INPUT_OPS:
        if name == "DEQUANTIZE" and inputs[0].dtype == "INT16":
            return "DEQUANTIZE of int16"
        return None if len(runtime) <= 1 else f"{name} of {len(runtime)} runtime inputs (one)"
    if name in GPU_CONV_OPS:
        if len(runtime) > 2:
            return f"{name} of {len(runtime)} runtime inputs (at most two)"
        if name == "DEPTHWISE_CONV_2D":
            multiplier = getattr(op.builtinOptions, "depthMultiplier", 1) or 1
            if multiplier != 1 and inputs[0].shape[-1] != 1:
                return "DEPTHWISE_CONV_2D with a depth multiplier and more than one input channel"
        return None
    if name in ("SLICE", "STRIDED_SLICE"):
        if len(inputs[0].shape) not in (3, 4):
            return f"{name} of a {len(inputs[0].shape)}-D tensor (3-D or 4-D)"
        masks = ("ellipsisMask", "newAxisMask", "shrinkAxisMask")
        if name == "STRIDED_SLICE" and any(getattr(op.builtinOptions, m, 0) for m in masks):
            return "STRIDED_SLICE with an ellipsis, new-axis or shrink-axis mask"
        return None
    if name in GPU_PAD_OPS:
        pads = inputs[1].shape if len(inputs) > 1 else []
        return None if pads in ([3, 2], [4, 2]) else f"{name} with paddings of shape {pads} (3x2 or 4x2)"
    return f"{name} is not in the GPU delegate's operator list"
