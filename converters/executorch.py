"""ExecuTorch with the XNNPACK delegate: one fp32 ``.pte`` for one fixed input size, optionally a bundled program.

The deploy graph (``nafnet_edge.deploy`` in its ``conv-mean`` norm form) lowers into a single XNNPACK partition;
``Exported.info`` counts the partitions and lists any compute op left on ExecuTorch's portable kernels, so a
regression in delegation shows up in the manifest. The session executes the ``.pte`` in ExecuTorch's own
runtime (``executorch.runtime``), never in PyTorch, for validation and ``bench`` alike.

Image I/O (``ExportOptions.pixel_format``, ``--io image``): the program takes uint8 ``(1, H, W, P)`` pixels and
returns them (``nafnet_edge.pixels.image_io_module``); ``rgba`` is the default, the bytes an Android ``Bitmap`` in
ARGB_8888 gives ``copyPixelsToBuffer``. XNNPACK takes the channel moves, the 1/255 and 255 scales, the clamp
and the rounding (an add and a subtract of 2**23) into the network's partition; the uint8 -> float and float ->
uint8 conversions (XNNPACK here converts no dtypes) are ``quantized_decomposed`` (de)quantize ops with scale 1,
which ExecuTorch's quantized kernels run (part of its standard kernel libraries): on this machine's 256x256 RGBA
tile 0.1 and 0.34 ms, where the portable dtype casts took 0.55 and 2.7 ms. ``ops_outside_delegate`` lists them.

With the ``bundle`` setting (``--bundle``), ``model.bpte`` is written next to ``model.pte``: the same program plus
the test inputs and their expected outputs, which an app loads with ExecuTorch's bundled-program API to verify the
file on the device (``verify_result_with_bundled_expected_output``, with a tolerance the app chooses:
XNNPACK's fp32 kernels differ from PyTorch by about 1e-6, so the runtime's default ``atol=1e-8`` is too tight).
The runtime applies those tolerances to float outputs only and compares uint8 outputs byte for byte, while an
image-I/O program's pixels may differ from the reference's by one level where a value lies near a rounding
boundary: ``Exported.info["bundle_level_agreement"]`` records how the program here matches its bundled outputs,
and an app that needs a tolerance runs the bundled inputs itself and allows one level.

int8 programs come from ``nafnet_edge.quantization``; this converter exports fp32 only.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from nafnet_edge.converters.base import (
    Exported,
    ExportOptions,
    Precision,
    Session,
    SessionSettings,
    Target,
    TargetOption,
    checked_input,
    input_channels,
    operator_profile,
    pixel_format_of,
    pixel_session,
)
from nafnet_edge.errors import ArtifactError, MissingBackendError, OptionError
from nafnet_edge.pixels import check_pixel_format, image_io_module, io_info, level_agreement, pixel_channels
from nafnet_edge.usage import KOTLIN_RESTORE_BITMAP, android_pixel_tiler

if TYPE_CHECKING:
    import torch

    from nafnet_edge.deploy import DeployNAFNet, NormForm

BACKEND = "XnnpackBackend"
METHOD = "forward"
BUNDLE = "model.bpte"
# ETDump events that wrap others: a delegate call (XNNPACK's operators inside), a portable kernel's call (its
# native_call_<op> event inside), the whole execution
WRAPPER_EVENTS = frozenset({"DELEGATE_CALL", "OPERATOR_CALL", "Method::execute"})

# call_function nodes that compute nothing at run time: tuple access, memory planning, views
NO_OP_NODES = frozenset(
    {
        "getitem",
        "alloc",
        "aten.view_copy.default",
        "aten.alias_copy.default",
        "aten.squeeze_copy.dims",
        "aten.unsqueeze_copy.default",
    }
)


def _node_name(node: torch.fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def delegation_summary(graph_module: torch.fx.GraphModule) -> tuple[list[str], dict[str, int]]:
    """The backend of each delegated partition, and the compute ops left outside any delegate (name -> count).

    Not ``executorch.devtools.backend_debug.get_delegation_info``: it gives no backend ids, names ops by FX node
    name ("aten_index_tensor" rather than the overload "aten.index.Tensor" recorded here) and counts no-op nodes
    (getitem, alloc) as outside the delegate.
    """
    backends: list[str] = []
    outside: Counter[str] = Counter()
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = _node_name(node)
        if name == "executorch_call_delegate":
            lowered = getattr(graph_module, node.args[0].target)
            backends.append(str(getattr(lowered, "backend_id", "unknown")))
        elif name not in NO_OP_NODES:
            outside[name] += 1
    return backends, dict(sorted(outside.items()))


def pixel_conversions(graph_module: torch.fx.GraphModule) -> dict[str, int]:
    """The image-I/O wrapper's two conversions among the ops outside any delegate (name -> count): the uint8
    (de)quantization with scale 1 that ``image_io_module(..., integer_kernels=True)`` puts at the ends."""
    import torch

    found: Counter[str] = Counter()
    for node in graph_module.graph.nodes:
        converts = node.op == "call_function" and "quantize_per_tensor" in str(node.target)
        if converts and node.args[1:3] == (1.0, 0) and torch.uint8 in node.args:
            found[_node_name(node)] += 1
    return dict(found)


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A copy with canonical strides (ExecuTorch rejects the zero stride numpy gives a ``[None]`` axis): uint8
    pixels stay uint8, anything else becomes float32."""
    import torch

    a = np.asarray(a)
    return torch.from_numpy(np.array(a, dtype=np.uint8 if a.dtype == np.uint8 else np.float32, order="C"))


def with_io(
    module: torch.nn.Module, channels: int, size: tuple[int, int], pixel_format: str | None
) -> tuple[torch.nn.Module, torch.Tensor]:
    """``module`` (float NCHW) behind image I/O in ``pixel_format`` (None: as it is) and a batch-1 example input
    of its own type at ``size``. Refuses a format that cannot carry ``channels`` (``OptionError``)."""
    import torch

    if pixel_format is None:
        return module, torch.zeros(1, channels, *size)
    check_pixel_format(pixel_format, channels)
    import executorch.kernels.quantized  # noqa: F401 - the out variants of the pixel (de)quantize kernels

    pixels = torch.zeros(1, *size, pixel_channels(pixel_format), dtype=torch.uint8)
    return image_io_module(module, pixel_format, integer_kernels=True), pixels


PYTHON_USAGE = """\
## Python

```python
{python_io}
from executorch.runtime import Runtime
import torch

program_bytes = open("{artifact}", "rb").read()  # keep the bytes alive while the program is used
program = Runtime.get().load_program(program_bytes)
method = program.load_method("forward")


def run(x):  # x: {run_io}
    return method.execute([torch.from_numpy(x)])[0].numpy()


{python_save}```
"""

USAGE = (
    PYTHON_USAGE
    + """
## Android (Kotlin, `org.pytorch.executorch`)

One {h}x{w} tile:

```kotlin
val module = Module.load(filesDir.resolve("{artifact}").absolutePath)
val input = Tensor.fromBlob(pixels, longArrayOf(1, {c}, {h}, {w}))  // pixels: FloatArray, NCHW, in [0, 1]
val restored = module.forward(EValue.from(input))[0].toTensor().dataAsFloatArray
```

A whole `Bitmap` of any size: add `NafnetTiler.kt` (in this folder; plain Kotlin, compiled and tested on the JVM
against nafnet-edge's Python tiler) to the app. It pads, tiles, runs and blends exactly as this artifact was
validated:

```kotlin
val tiler = NafnetTiler(object : TileModule {{
    override fun run(input: FloatArray, channels: Int, height: Int, width: Int): FloatArray =
        module.forward(EValue.from(Tensor.fromBlob(input, longArrayOf(1, {c}L, {h}L, {w}L))))[0]
            .toTensor().dataAsFloatArray
}}, tileHeight = {h}, tileWidth = {w}, overlap = {overlap}, align = {align}, channels = {c}{kscale})
val pixels = IntArray(bitmap.width * bitmap.height)
bitmap.getPixels(pixels, 0, bitmap.width, 0, 0, bitmap.width, bitmap.height)
val restored = Bitmap.createBitmap(
    tiler.restoreArgb(pixels, bitmap.height, bitmap.width), bitmap.width{xs}, bitmap.height{xs}, Bitmap.Config.ARGB_8888
)
```

## C++ (`executorch::extension::Module`)

```cpp
Module module("{artifact}");
auto input = from_blob(pixels.data(), {{1, {c}, {h}, {w}}});  // float NCHW in [0, 1]
auto restored = module.forward(input)->at(0).toTensor();
```
"""
)


USAGE_IMAGE = (
    PYTHON_USAGE
    + """
## Android (Kotlin, `org.pytorch.executorch`)

"""
    + android_pixel_tiler("program", "ExecuTorch", "documentation, not compiled by the tests")
    + """
```kotlin
val module = Module.load(filesDir.resolve("{artifact}").absolutePath)
val tiler = NafnetPixelTiler(object : PixelTileModule {{
    override fun run(pixels: ByteArray, height: Int, width: Int): ByteArray =  // uint8 [1, {h}, {w}, {p}] in and out
        module.forward(EValue.from(Tensor.fromBlobUnsigned(pixels, longArrayOf(1, {h}L, {w}L, {p}L))))[0]
            .toTensor().dataAsUnsignedByteArray
}}, tileHeight = {h}, tileWidth = {w}, overlap = {overlap}, align = {align}, bytesPerPixel = {p}{kscale})

"""
    + KOTLIN_RESTORE_BITMAP
    + """
## C++ (`executorch::extension::Module`)

```cpp
Module module("{artifact}");
auto input = from_blob(pixels.data(), {{1, {h}, {w}, {p}}}, executorch::aten::ScalarType::Byte);  // uint8
auto restored = module.forward(input)->at(0).toTensor();  // uint8 [1, {h}, {w}, {p}]
```
"""
)


# int8 programs: the float channel norms' precision, -centred with a centring conv (auto: fp32 or fp16, timed)
NORM_PRECISIONS = ("auto", "fp32", "fp16", "fp32-centred", "fp16-centred")


class ExecuTorchTarget(Target):
    name: ClassVar[str] = "executorch"
    extra: ClassVar[str] = "executorch"
    modules: ClassVar[tuple[str, ...]] = ("executorch",)
    runtime_packages: ClassVar[tuple[str, ...]] = ("executorch",)
    norm_form: ClassVar[NormForm] = "conv-mean"
    artifact: ClassVar[str] = "model.pte"
    file_kind: ClassVar[str] = "ExecuTorch program"
    precisions: ClassVar[tuple[Precision, ...]] = ("fp32",)
    # rgba first: an Android Bitmap (ARGB_8888) copied with copyPixelsToBuffer gives RGBA bytes
    pixel_formats: ClassVar[tuple[str, ...]] = ("rgba", "rgb", "bgra", "bgr", "gray")
    quantizer: ClassVar[str | None] = "nafnet_edge.quantization.xnnpack:XNNPACKQuantizer"
    color: ClassVar[str] = "#f28e2b"
    helpers: ClassVar[tuple[str, ...]] = ("android/NafnetTiler.kt",)  # whole frames on Android
    options: ClassVar[tuple[TargetOption, ...]] = (
        TargetOption("--bundle", "bundle", "also a bundled program with test I/O", default=False, kind="flag"),
        TargetOption(
            "--norm-precision",
            "norm_precision",
            "int8: the channel norms' float precision (auto, the default: fp32, or fp16 where the whole program "
            "times faster on this CPU); -centred: with a centring conv where C <= 64",
            default="auto",
            choices=NORM_PRECISIONS,
            metavar="PREC",
            commands=("quantize",),
        ),
    )
    usage_title: ClassVar[str] = "ExecuTorch (XNNPACK)"
    usage_body: ClassVar[str] = USAGE
    usage_image_body: ClassVar[str] = USAGE_IMAGE

    def needs_test_io(self, options: ExportOptions) -> bool:
        return bool(self.setting(options, "bundle"))

    def quantizer_options(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        return {"norm_precision": settings.get("norm_precision") or "auto"}

    def check_options(self, options: ExportOptions) -> None:
        super().check_options(options)
        if self.setting(options, "bundle"):  # test inputs may still be missing here: the pipeline adds them later
            if options.test_outputs and len(options.test_outputs) != len(options.test_inputs):
                raise ValueError(
                    f"{len(options.test_inputs)} bundled test inputs but {len(options.test_outputs)} expected "
                    "outputs; give one output per input"
                )
            h, w = options.input_size
            fmt = options.pixel_format
            for a in (*options.test_inputs, *options.test_outputs):
                if fmt is None and (a.ndim != 4 or a.shape[0] != 1 or tuple(a.shape[2:]) != (h, w)):
                    raise ValueError(
                        f"bundled test arrays must be (1, C, {h}, {w}) at the input size; got {a.shape}: pad or "
                        "crop them to it"
                    )
                if fmt is not None and (a.dtype != np.uint8 or a.shape != (1, h, w, pixel_channels(fmt))):
                    raise ValueError(
                        f"bundled test arrays of an image-I/O program must be uint8 (1, {h}, {w}, "
                        f"{pixel_channels(fmt)}) {fmt} pixels at the input size; got {a.dtype} {a.shape}: pad or "
                        "crop them to it and convert them (nafnet_edge.pixels.to_pixels)"
                    )

    def export(self, graph: DeployNAFNet, out_dir: Path, options: ExportOptions) -> Exported:
        import torch
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        self.check_options(options)
        bundle = bool(self.setting(options, "bundle"))
        if bundle and not options.test_inputs:
            raise OptionError(
                "a bundled program (--bundle) needs test inputs to carry and none were given: keep validation on "
                "(the first validation image becomes the test case) or drop --bundle"
            )
        module, example = with_io(graph, input_channels(graph), options.input_size, options.pixel_format)
        with torch.no_grad():
            exported = torch.export.export(module, (example,))
        edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
        backends, outside = delegation_summary(edge.exported_program().graph_module)
        program = edge.to_executorch()
        buffer = program.buffer
        (out_dir / self.artifact).write_bytes(buffer)
        files = [self.artifact]
        info: dict[str, Any] = {
            "executorch_version": importlib.metadata.version("executorch"),
            "delegate": BACKEND,
            "delegated_partitions": len(backends),
            "delegate_backends": sorted(set(backends)),
            "ops_outside_delegate": outside,
            "program_bytes": len(buffer),
            **io_info(options.pixel_format),
        }
        if bundle:
            bundled, expected = self._bundle(program, module, options)
            (out_dir / BUNDLE).write_bytes(bundled)
            files.append(BUNDLE)
            info["bundle"] = BUNDLE
            info["bundled_test_cases"] = len(options.test_inputs)
            info["bundle_bytes"] = len(bundled)
            if options.pixel_format is not None:
                info["bundle_level_agreement"] = _bundle_agreement(buffer, options.test_inputs, expected)
        return Exported(files=files, info=info)

    @staticmethod
    def _bundle(program: Any, module: torch.nn.Module, options: ExportOptions) -> tuple[bytes, list[np.ndarray]]:
        """The program with its test cases, and their expected outputs: ``options.test_outputs`` or, when none
        are given, the exported module's own outputs for the test inputs."""
        import torch
        from executorch.devtools.bundled_program.config import MethodTestCase, MethodTestSuite
        from executorch.devtools.bundled_program.core import BundledProgram
        from executorch.devtools.bundled_program.serialize import serialize_from_bundled_program_to_flatbuffer

        inputs = [_tensor(a) for a in options.test_inputs]
        if options.test_outputs:
            expected = [_tensor(a) for a in options.test_outputs]
        else:
            with torch.no_grad():
                expected = [module(x).contiguous() for x in inputs]
        cases = [MethodTestCase(inputs=(x,), expected_outputs=(y,)) for x, y in zip(inputs, expected, strict=True)]
        bundled = BundledProgram(program, [MethodTestSuite(method_name=METHOD, test_cases=cases)])
        return serialize_from_bundled_program_to_flatbuffer(bundled), [y.numpy() for y in expected]

    def open_session(
        self, out_dir: Path, *, export: Mapping[str, Any] | None = None, settings: SessionSettings | None = None
    ) -> Session:
        """The ``.pte`` in ExecuTorch's runtime (``executorch.runtime``) with XNNPACK's threadpool at
        ``settings.threads``; the profile is an ETDump of a second load read by the devtools Inspector (XNNPACK's
        operators inside the delegate)."""
        import executorch.kernels.quantized  # noqa: F401 - the quantized kernels image-I/O programs call
        from executorch.runtime import Runtime

        settings = settings or SessionSettings()
        runtime = Runtime.get()
        if not runtime.backend_registry.is_available(BACKEND):
            raise MissingBackendError(
                f"this ExecuTorch runtime has no {BACKEND} (registered: "
                f"{', '.join(runtime.backend_registry.registered_backend_names)}); "
                f"pip install 'nafnet-edge[{self.extra}]'"
            )
        if settings.threads:
            _set_threadpool_size(settings.threads)
        path = self.artifact_path(out_dir)
        buffer = path.read_bytes()
        with self.loading(path):
            program = runtime.load_program(buffer)
            method = program.load_method(METHOD)
        if method is None:
            raise ArtifactError(f"{path} has no {METHOD!r} method; convert again")
        fmt = pixel_format_of(export)
        shape = tuple(method.metadata.input_tensor_meta(0).sizes())
        run = _ProgramRunner(buffer, program, method, shape, np.dtype(np.uint8 if fmt else np.float32))

        def profile(x: np.ndarray, runs: int) -> dict[str, Any]:
            from executorch.devtools import Inspector

            traced = runtime.load_program(buffer, enable_etdump=True, debug_buffer_size=0)
            traced_method = traced.load_method(METHOD)
            inputs = [_tensor(x)]
            traced_method.execute(inputs)  # the first run sets XNNPACK up; the Inspector's medians drop it
            for _ in range(runs):
                traced_method.execute(inputs)
            with tempfile.TemporaryDirectory() as tmp:
                etdump = Path(tmp) / "run.etdp"
                traced.write_etdump_result_to_file(str(etdump), str(Path(tmp) / "debug.bin"))
                inspector = Inspector(etdump_path=str(etdump))
            ops: Counter[str] = Counter()
            counts: Counter[str] = Counter()
            for block in inspector.event_blocks:
                if block.name != "Execute":
                    continue
                for event in block.events:
                    if event.perf_data is None or event.name in WRAPPER_EVENTS:
                        continue
                    key = event.name.split(" #")[0]  # XNNPACK numbers every instance: "Convolution (NHWC, F32) #3"
                    ops[key] += event.perf_data.p50
                    counts[key] += 1
            source = "ExecuTorch ETDump (devtools Inspector), XNNPACK operators and portable kernels, median per node"
            return operator_profile(source, ops, counts, 1)

        info: dict[str, Any] = {"runtime": "executorch", "backend": BACKEND}
        threads = _threadpool_size()
        if threads is not None:
            info["threads"] = threads
        session = Session(run, "executorch", info, profile, keep=run)
        return pixel_session(session, fmt) if fmt else session


@dataclass(frozen=True)
class _ProgramRunner:
    """Runs the loaded method; holds the program bytes, which the runtime reads but does not own."""

    buffer: bytes
    program: Any
    method: Any
    input_shape: tuple[int, ...]
    dtype: np.dtype  # the program's input and output type: float32 (tensor I/O) or uint8 (image I/O)

    def __call__(self, a: np.ndarray) -> np.ndarray:
        a = checked_input(a, self.input_shape, self.dtype, ".pte")
        return self.method.execute([_tensor(a)])[0].numpy().astype(self.dtype, copy=True)


def _bundle_agreement(
    buffer: bytes, inputs: tuple[np.ndarray, ...], expected: list[np.ndarray]
) -> dict[str, float | int]:
    """How the program's uint8 outputs in this machine's runtime match the bundled expected outputs (what the
    runtime's byte-exact check compares): shares of samples equal and within one level, the largest difference."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(buffer).load_method(METHOD)
    outputs = [method.execute([_tensor(x)])[0].numpy() for x in inputs]
    got = np.concatenate([o.ravel() for o in outputs]).astype(np.float32) / np.float32(255.0)
    want = np.concatenate([e.ravel() for e in expected]).astype(np.float32) / np.float32(255.0)
    return level_agreement(got, want)


# The public ``executorch.runtime`` API loads and runs programs (with ETDump) but neither reads nor sets the
# threadpool XNNPACK runs on: these two helpers are the only places that use the pybindings for it.
def _set_threadpool_size(threads: int) -> None:
    """Resize ExecuTorch's shared threadpool (process-wide; it applies to methods loaded afterwards)."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(threads)


def _threadpool_size() -> int | None:
    """Threads of ExecuTorch's shared threadpool (used by XNNPACK), where the pybindings expose it."""
    try:
        from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count
    except ImportError:
        return None
    return int(_threadpool_get_thread_count())
