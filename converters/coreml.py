"""Core ML targets: an ML program ``.mlpackage`` (``coreml``) and an ExecuTorch ``.pte`` delegated to Core ML
(``executorch-coreml``).

Both convert the deploy graph in its "coreml" form (each channel norm is one ``layer_norm`` op) with
coremltools, computing in fp16 by default (the Neural Engine is fp16-only; the deploy graph's scaled residual
stream keeps the norms finite) or fp32 on request, for iOS 17 / macOS 14 or later. Inputs and outputs stay
float32 (coremltools casts to fp16 and back inside an fp16 program), so apps feed the same arrays either way.

Image I/O (``--io image``, ``.mlpackage`` only): the input ``image`` and output ``restored`` are Core ML images
(``ct.ImageType``: an app passes a ``CVPixelBuffer`` or ``CGImage``, Core ML converts it to the model's colour
space) in the pixel format's colour space: RGB or BGR for 3-channel models, GRAYSCALE (8-bit) for 1-channel ones.
The program scales the pixels by 1/255 (the input's ``scale``, an op coremltools writes into the program), reverses
the channels around the network for BGR, and ends in ``round(clip(y, 0, 1) * 255)``, so the output image holds
exactly the 8-bit levels an app gets; its float32 output (cast from fp16 in an fp16 program, as coremltools keeps
RGB/BGR/GRAYSCALE image outputs float32) is what Core ML writes into the output buffer. One input size only: Core
ML image outputs of several sizes get an open size range from coremltools (a workaround for a Core ML bug), which
nothing here can run, so ``--sizes`` is refused with image I/O.

Core ML cannot execute off Apple platforms. On macOS the sessions use Core ML itself (``MLModel.predict``, or
the ExecuTorch runtime's Core ML backend); elsewhere validation evaluates the saved ML program op by op in numpy
(``bench`` reports them not runnable: the evaluator says nothing about speed), in
its own precision (``nafnet_edge.converters.coreml_mil``), which reads the artifact back, never PyTorch. For
the ``.pte`` that program is the Core ML model embedded in the delegate payload, which is only the whole
``.pte`` when the graph lowered to one Core ML partition with nothing left outside it.
"""

from __future__ import annotations

import json
import logging
import operator
import platform
import struct
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from nafnet_edge.artifact_files import artifact_file
from nafnet_edge.converters.base import (
    INPUT_NAME,
    OUTPUT_NAME,
    Exported,
    ExportOptions,
    NotRunnable,
    Precision,
    Runner,
    Session,
    SessionSettings,
    Target,
    TargetOption,
    input_channels,
    pixel_format_of,
    pixel_session,
)
from nafnet_edge.errors import ArtifactError, MissingBackendError, OptionError
from nafnet_edge.pixels import LEVELS, check_pixel_format, io_info, pixel_channels
from nafnet_edge.sizes import parse_size

if TYPE_CHECKING:
    import torch

    from nafnet_edge.deploy import DeployNAFNet, DeployRecipe, NormForm

MINIMUM_TARGET = "iOS17"  # ML program features the deploy graph relies on; macOS14 is the same spec version
DEFAULT_COMPUTE_UNITS = "ALL"
EVALUATOR_NOTE = (
    "Core ML cannot execute off Apple platforms; the saved ML program is evaluated op by op in numpy in its own "
    "precision"
)
COREML_BACKEND_ID = "CoreMLBackend"
COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")  # ct.ComputeUnit names
# pixel format -> ct.colorlayout name of the image input and output (GRAYSCALE: 8-bit, a OneComponent8 buffer)
COLOR_LAYOUTS = {"rgb": "RGB", "bgr": "BGR", "gray": "GRAYSCALE"}
COREML_OFF_MACOS = (
    "Core ML runs only on macOS and iOS; this machine is {system}. Validation used the numpy ML-program "
    "evaluator, which says nothing about speed: bench on a Mac"
)

# Both Core ML targets take the minimum deployment target (one option, the same for either).
MIN_TARGET_OPTION = TargetOption(
    "--min-target",
    "minimum_target",
    "iOS17 (default), iOS18, macOS14...",
    default=MINIMUM_TARGET,
    metavar="OS",
)
COREML_USAGE = """\
## Swift (iOS 17 / macOS 14 or later)

Add `{artifact}` to the Xcode target; Xcode compiles it and generates a class named after the file. (This Swift
uses only Core ML's documented API but is not compiled by nafnet-edge's own tests, which run where no Swift
compiler exists; the Python below is executed by them.)

```swift
import CoreML

let config = MLModelConfiguration()
config.computeUnits = .all
let model = try MLModel(contentsOf: Bundle.main.url(forResource: "model", withExtension: "mlmodelc")!,
                        configuration: config)
let image = try MLMultiArray(shape: [1, {c}, {h}, {w}], dataType: .float32)  // planar: c * {h} * {w} + y * {w} + x
// ... fill `image` with {channels} values in [0, 1] ...
let result = try model.prediction(from: MLDictionaryFeatureProvider(dictionary: ["{inp}": image]))
let restored = result.featureValue(for: "{out}")!.multiArrayValue!
```

## Python (macOS only: Core ML does not execute elsewhere)

```
import coremltools as ct
model = ct.models.MLModel("{artifact}")
y = model.predict({{"{inp}": x}})["{out}"]   # x: float32 array [1, {c}, {h}, {w}]
```
"""
COREML_IMAGE_USAGE = """\
## Swift (iOS 17 / macOS 14 or later)

Add `{artifact}` to the Xcode target; Xcode compiles it and generates a class named after the file. Its input
`{inp}` and output `{out}` are Core ML images ({channels}, {w}x{h}): pass a `CVPixelBuffer` of one tile (a camera's
32BGRA buffer is fine: Core ML converts it to the model's colour space; `kCVPixelFormatType_OneComponent8` for gray)
and read the restored tile's pixel buffer; scaling, clamping and rounding happen inside the model. (This Swift uses
only Core ML's and Vision's documented API but is not compiled by nafnet-edge's own tests, which run where no Swift
compiler exists.)

```swift
import CoreML
import CoreVideo
import Vision

let config = MLModelConfiguration()
config.computeUnits = .all
let model = try MLModel(contentsOf: Bundle.main.url(forResource: "model", withExtension: "mlmodelc")!,
                        configuration: config)

/// One {w}x{h} tile through the model.
func restore(_ tile: CVPixelBuffer) throws -> CVPixelBuffer {{
    let input = try MLDictionaryFeatureProvider(dictionary: ["{inp}": MLFeatureValue(pixelBuffer: tile)])
    return try model.prediction(from: input).featureValue(for: "{out}")!.imageBufferValue!
}}

/// The same through Vision (the tile is exactly {w}x{h}, so nothing is scaled or cropped).
let request = VNCoreMLRequest(model: try VNCoreMLModel(for: model))
request.imageCropAndScaleOption = .scaleFill
func restoreWithVision(_ tile: CVPixelBuffer) throws -> CVPixelBuffer {{
    try VNImageRequestHandler(cvPixelBuffer: tile).perform([request])
    return (request.results!.first as! VNPixelBufferObservation).pixelBuffer
}}

// A whole photo: `nafnet-edge plan DIR --frame HxW --json` gives the zero-padded size `padded`, the tile origins
// `ys` x `xs` and the blend weights `weights_y`, `weights_x`. For every tile (row, col): copy the {w}x{h} window
// at (ys[row], xs[col]) of the padded frame into a pixel buffer, restore it, and add each restored pixel times
// weights_y[row][i] * weights_x[col][j] into a float accumulator; then crop to the frame and round to 8 bits.
```

## Python (macOS only: Core ML does not execute elsewhere)

```python
{python_io}
import coremltools as ct

model = ct.models.MLModel("{artifact}")


def run(x):  # x: uint8 [1, {h}, {w}, {p}] {channels} pixels -> the restored pixels, the same
    y = x[0]
    image = Image.fromarray(np.ascontiguousarray({from_format}).squeeze())  # a PIL image is RGB (or L)
    photo = np.atleast_3d(np.asarray(model.predict({{"{inp}": image}})["{out}"].convert("{mode}")))
    return np.ascontiguousarray({to_format})[None]


{python_save}```
"""
EXECUTORCH_COREML_USAGE = """\
## iOS / macOS with the ExecuTorch runtime and its Core ML backend linked

```swift
import ExecuTorch

let module = Module(filePath: Bundle.main.path(forResource: "model", ofType: "pte")!)
let input = Tensor<Float>(pixels, shape: [1, {c}, {h}, {w}])   // pixels: [Float], NCHW, {channels} in [0, 1]
let output = try module.forward(input)
```
"""


class CoreMLTarget(Target):
    """An ML program ``.mlpackage`` with named, described float32 I/O and the manifest essentials as metadata.

    ``export`` reads the deploy recipe's metadata (``graph.recipe.metadata``, str -> str; empty unless the pipeline
    gave some) into the model's ``user_defined_metadata`` next to the target's own facts (input sizes, compute
    precision, minimum target, padding multiple), which win on a shared key. From it ``version`` takes the
    weights' sha256 (``nafnet_edge.source_sha256``) and ``license`` takes ``nafnet_edge.license`` when present.

    The ``extra_sizes`` setting (``--sizes``) adds enumerated input sizes (``ct.EnumeratedShapes``, default
    ``input_size``). Flexible shapes can push Core ML off the Neural Engine, so a single fixed size is the default.

    With ``ExportOptions.pixel_format`` (rgb, bgr; gray for 1-channel models) the input and output are Core ML
    images (see the module docstring); the session then runs on uint8 (1, H, W, P) pixels (``pixel_session``).
    """

    name: ClassVar[str] = "coreml"
    extra: ClassVar[str] = "coreml"
    modules: ClassVar[tuple[str, ...]] = ("coremltools",)
    runtime_packages: ClassVar[tuple[str, ...]] = ("coremltools",)
    norm_form: ClassVar[NormForm] = "layer-norm"
    artifact: ClassVar[str] = "model.mlpackage"
    file_kind: ClassVar[str] = "Core ML package"
    precisions: ClassVar[tuple[Precision, ...]] = ("fp16", "fp32")
    default_precision: ClassVar[Precision] = "fp16"
    quantizer: ClassVar[str | None] = "nafnet_edge.quantization.coreml:CoreMLQuantizer"
    color: ClassVar[str] = "#4e79a7"
    options: ClassVar[tuple[TargetOption, ...]] = (
        TargetOption("--sizes", "extra_sizes", "more sizes", default=(), kind="values", type=parse_size, metavar="PX"),
        MIN_TARGET_OPTION,
        TargetOption(
            "--weights-only",
            "weights_only",
            "int8 weights with fp16 activations (post-training) instead of W8A8",
            default=False,
            kind="flag",
            commands=("convert", "quantize"),
        ),
        TargetOption(
            "--compute-units",
            "compute_units",
            "compute units on macOS (ALL)",
            default=DEFAULT_COMPUTE_UNITS,
            choices=COMPUTE_UNITS,
            commands=("bench",),
        ),
    )
    usage_title: ClassVar[str] = "Core ML"
    usage_body: ClassVar[str] = COREML_USAGE
    usage_image_body: ClassVar[str] = COREML_IMAGE_USAGE
    pixel_formats: ClassVar[tuple[str, ...]] = tuple(COLOR_LAYOUTS)  # gray: 1-channel models only

    def quantizer_options(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        return {"mode": "weights"} if settings.get("weights_only") else {}

    def artifact_path(self, out_dir: Path) -> Path:
        """The ``.mlpackage`` folder, every entry in it checked (see ``Target.artifact_path``)."""
        return artifact_file(out_dir, self.artifact, bundle=True)

    def load_errors(self) -> tuple[type[BaseException], ...]:
        from google.protobuf.message import DecodeError

        return (RuntimeError, DecodeError, KeyError, json.JSONDecodeError, UnicodeDecodeError)

    def check_options(self, options: ExportOptions) -> None:
        super().check_options(options)
        deployment_target(self.setting(options, "minimum_target"))
        extra = {tuple(s) for s in self.setting(options, "extra_sizes") or ()} - {tuple(options.input_size)}
        if options.pixel_format is not None and extra:
            raise OptionError(
                "--sizes with --io image: Core ML image outputs of more than one size get an open size range from "
                "coremltools (a workaround for a Core ML bug) that cannot be validated here; export one image-I/O "
                "artifact per size, or use --io tensor for enumerated sizes"
            )

    def export(self, graph: DeployNAFNet, out_dir: Path, options: ExportOptions) -> Exported:
        import torch

        ct = import_coremltools()
        self.check_options(options)
        fmt = options.pixel_format
        if fmt is not None:
            check_pixel_format(fmt, _channels(graph))
        sizes = input_sizes(graph, options)
        shapes = [(1, _channels(graph), h, w) for h, w in sizes]
        shape: Any = shapes[0] if len(shapes) == 1 else ct.EnumeratedShapes(shapes=shapes, default=shapes[0])
        module = graph.eval() if fmt is None else pixel_levels_module(graph.eval(), fmt)
        traced = torch.jit.trace(module, torch.rand(shapes[0]), check_trace=False)
        inputs, outputs = io_types(shape, fmt)
        mlmodel = ct.convert(
            traced,
            convert_to="mlprogram",
            inputs=inputs,
            outputs=outputs,
            compute_precision=_ct_precision(options.precision),
            minimum_deployment_target=deployment_target(self.setting(options, "minimum_target")),
        )
        describe_io(mlmodel, graph.recipe, sizes, pixel_format=fmt)
        mlmodel.user_defined_metadata.update(graph.recipe.metadata)
        mlmodel.user_defined_metadata.update(
            {
                "nafnet_edge.input_sizes": ",".join(f"{h}x{w}" for h, w in sizes),
                "nafnet_edge.compute_precision": options.precision,
                "nafnet_edge.minimum_target": self.setting(options, "minimum_target"),
                "nafnet_edge.padding_multiple": str(graph.pad_multiple),
                **io_metadata(fmt),
            }
        )
        path = Path(out_dir) / self.artifact
        mlmodel.save(str(path))

        program = _load_program(path)
        return Exported(
            files=[self.artifact],
            info={
                "coremltools": ct.__version__,
                "model_type": "mlprogram",
                "compute_precision": options.precision,
                "compute_units": DEFAULT_COMPUTE_UNITS,
                "minimum_target": self.setting(options, "minimum_target"),
                "input_sizes": [list(s) for s in sizes],
                "shapes": "fixed" if len(sizes) == 1 else "enumerated",
                **package_io_info(program, options.precision, fmt),
                "mil_ops": _histogram(op.type for op in program.ops),
            },
        )

    def open_session(
        self, out_dir: Path, *, export: Mapping[str, Any] | None = None, settings: SessionSettings | None = None
    ) -> Session:
        """Core ML on macOS with ``compute_units`` (the hint, else the ``export`` section, else ALL); elsewhere the
        numpy ML-program evaluator, or ``NotRunnable`` for a session that will be timed."""
        ct = import_coremltools()
        from nafnet_edge.converters.coreml_mil import load_program

        settings = settings or SessionSettings()
        path = self.artifact_path(out_dir)
        fmt = pixel_format_of(export)
        if sys.platform != "darwin" and settings.timing:
            raise NotRunnable(COREML_OFF_MACOS.format(system=platform.system()))
        with self.loading(path):
            allowed = _allowed_shapes(ct.utils.load_spec(str(path)))
            program = load_program(path)
        precision = _program_precision(program)
        if (INPUT_NAME in program.images) != (fmt is not None):
            raise ArtifactError(
                f"{path} has {'image' if INPUT_NAME in program.images else 'tensor'} I/O but its manifest records "
                f"{'pixel format ' + fmt if fmt else 'tensor I/O'}; convert again"
            )
        if sys.platform == "darwin":
            units = _compute_units(export, settings)
            with self.loading(path):
                mlmodel = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit[units])
            info = {"runtime": "coreml", "compute_units": units, "compute_precision": precision}
            if fmt is not None:
                return pixel_session(Session(_coreml_pixels(mlmodel, allowed, fmt), "coreml", info, keep=mlmodel), fmt)

            def run_coreml(x: np.ndarray) -> np.ndarray:
                _check_shape(x, allowed)
                return np.asarray(mlmodel.predict({INPUT_NAME: x})[OUTPUT_NAME], dtype=np.float32)

            return Session(run_coreml, "coreml", info, keep=mlmodel)

        info = {"runtime": "mil-numpy-evaluator", "compute_precision": precision, "note": EVALUATOR_NOTE}
        if fmt is not None:
            session = Session(_evaluator_pixels(program, allowed, fmt), "mil-numpy-evaluator", info, keep=program)
            return pixel_session(session, fmt)

        def run_evaluator(x: np.ndarray) -> np.ndarray:
            _check_shape(x, allowed)
            return np.asarray(program.run({INPUT_NAME: x})[OUTPUT_NAME], dtype=np.float32)

        return Session(run_evaluator, "mil-numpy-evaluator", info, keep=program)


class ExecuTorchCoreMLTarget(Target):
    """An ExecuTorch ``.pte`` whose graph is delegated to ExecuTorch's Core ML backend.

    The backend converts the edge program with coremltools and embeds the ``.mlpackage`` in the delegate
    payload; its I/O names come from the graph (not ``image``/``restored``) and it carries no descriptions or
    metadata (the ExecuTorch method is what apps call). Fixed input size and tensor I/O only: enumerated shapes and
    Core ML images are ``.mlpackage`` options (``--target coreml``).
    """

    name: ClassVar[str] = "executorch-coreml"
    extra: ClassVar[str] = "executorch,coreml"
    modules: ClassVar[tuple[str, ...]] = ("coremltools", "executorch")
    runtime_packages: ClassVar[tuple[str, ...]] = ("coremltools", "executorch")
    norm_form: ClassVar[NormForm] = "layer-norm"
    artifact: ClassVar[str] = "model.pte"
    file_kind: ClassVar[str] = "ExecuTorch program"
    precisions: ClassVar[tuple[Precision, ...]] = ("fp16", "fp32")
    default_precision: ClassVar[Precision] = "fp16"
    color: ClassVar[str] = "#e15759"
    options: ClassVar[tuple[TargetOption, ...]] = (MIN_TARGET_OPTION,)
    usage_title: ClassVar[str] = "ExecuTorch (Core ML delegate)"
    usage_body: ClassVar[str] = EXECUTORCH_COREML_USAGE

    def load_errors(self) -> tuple[type[BaseException], ...]:
        # Reading the program's flatbuffer in Python (no Core ML backend here) fails in struct, or in
        # unpacking what a damaged file holds.
        return (RuntimeError, struct.error, ValueError, IndexError, KeyError)

    def check_available(self) -> None:
        super().check_available()
        import_coremltools()
        try:
            from executorch.backends.apple.coreml.partition import CoreMLPartitioner  # noqa: F401
        except ImportError as err:
            raise MissingBackendError(
                f"--target {self.name}: ExecuTorch's Core ML backend cannot be imported ({err}); "
                f"pip install 'nafnet-edge[{self.extra}]'"
            ) from err

    def check_options(self, options: ExportOptions) -> None:
        super().check_options(options)
        deployment_target(self.setting(options, "minimum_target"))

    def export(self, graph: DeployNAFNet, out_dir: Path, options: ExportOptions) -> Exported:
        import torch

        ct = import_coremltools()
        self.check_options(options)
        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner
        from executorch.exir import to_edge_transform_and_lower
        from executorch.exir.delegate import executorch_call_delegate

        h, w = options.input_size
        example = torch.rand(1, _channels(graph), h, w)
        specs = CoreMLBackend.generate_compile_specs(
            compute_precision=_ct_precision(options.precision),
            minimum_deployment_target=deployment_target(self.setting(options, "minimum_target")),
        )
        with _quiet_coreml_backend():
            edge = to_edge_transform_and_lower(
                torch.export.export(graph.eval(), (example,)), partitioner=[CoreMLPartitioner(compile_specs=specs)]
            )
        lowered = edge.exported_program().graph_module
        calls = [n for n in lowered.graph.nodes if n.op == "call_function"]
        delegated = [n for n in calls if n.target is executorch_call_delegate]
        outside = [n for n in calls if n.target is not executorch_call_delegate and n.target is not operator.getitem]
        payloads = [getattr(lowered, n.args[0].target).processed_bytes for n in delegated]
        with tempfile.TemporaryDirectory() as tmp:
            programs = [_load_program(p) for p in unpack_coreml_payloads(payloads, Path(tmp))]
        (Path(out_dir) / self.artifact).write_bytes(edge.to_executorch().buffer)
        return Exported(
            files=[self.artifact],
            info={
                "executorch": package_version("executorch"),
                "coremltools": ct.__version__,
                "backend": COREML_BACKEND_ID,
                "compute_precision": options.precision,
                "compute_units": DEFAULT_COMPUTE_UNITS,
                "minimum_target": self.setting(options, "minimum_target"),
                "input_sizes": [[h, w]],
                "io": "tensor",
                "io_dtypes": {INPUT_NAME: "float32", OUTPUT_NAME: "float32"},
                "coreml_io_dtypes": [_program_io_dtypes(p) for p in programs],
                "io_note": "float32 method input and output; the embedded Core ML model's own I/O dtypes are listed "
                "per delegate (coremltools keeps an fp16 program's output in fp16)",
                "delegated_partitions": len(delegated),
                "ops_outside_delegate": _histogram(str(n.target) for n in outside),
                "mil_ops": _histogram(op.type for p in programs for op in p.ops),
            },
        )

    def open_session(
        self, out_dir: Path, *, export: Mapping[str, Any] | None = None, settings: SessionSettings | None = None
    ) -> Session:
        """The ``.pte`` in ExecuTorch's runtime with its Core ML backend (Apple platforms); elsewhere the Core ML
        model of its only delegate in the numpy evaluator, or ``NotRunnable`` for a session that will be timed."""
        import torch
        from executorch.runtime import Runtime

        settings = settings or SessionSettings()
        path = self.artifact_path(out_dir)
        runtime = Runtime.get()
        if runtime.backend_registry.is_available(COREML_BACKEND_ID):
            with self.loading(path):
                program = runtime.load_program(str(path))
                method = program.load_method("forward")
            if method is None:
                raise ArtifactError(f"{path} has no forward method; convert again")

            def run_executorch(x: np.ndarray) -> np.ndarray:
                out = method.execute([torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))])
                return out[0].numpy().astype(np.float32, copy=False)

            precision = (export or {}).get("compute_precision", "unknown")
            info = {"runtime": "executorch-coreml", "backend": COREML_BACKEND_ID, "compute_precision": precision}
            return Session(run_executorch, "executorch-coreml", info, keep=(program, method))
        if settings.timing:
            raise NotRunnable(
                f"this ExecuTorch runtime has no {COREML_BACKEND_ID} (it exists only on Apple platforms); "
                "bench the program on a Mac or in the app"
            )

        import_coremltools()
        with self.loading(path):
            payloads = _pte_coreml_payloads(path)
        with tempfile.TemporaryDirectory() as tmp:
            (package,) = unpack_coreml_payloads(payloads, Path(tmp))
            program = _load_program(package)
        (name,) = program.inputs
        (output,) = program.outputs

        def run_evaluator(x: np.ndarray) -> np.ndarray:
            return np.asarray(program.run({name: x})[output], dtype=np.float32)

        info = {
            "runtime": "mil-numpy-evaluator",
            "compute_precision": _program_precision(program),
            "note": f"{EVALUATOR_NOTE}. The ExecuTorch runtime here has no Core ML backend: the evaluated program "
            "is the Core ML model extracted from the .pte's only delegate, which is the whole graph",
        }
        return Session(run_evaluator, "mil-numpy-evaluator", info, keep=program)


# --- shared helpers --------------------------------------------------------------------------------------------


def import_coremltools() -> Any:
    """coremltools, without its import-time notice that torch 2.13 is newer than it was tested with (conversion
    of these graphs works and is checked by the tests)."""
    ct_logger = logging.getLogger("coremltools")
    quiet = _DropMessages("has not been tested with coremltools")
    ct_logger.addFilter(quiet)
    try:
        import coremltools as ct
    finally:
        ct_logger.removeFilter(quiet)
    return ct


def deployment_target(name: str) -> Any:
    """``ct.target`` for a minimum deployment target name (iOS17, macOS14 or later); ``ValueError`` otherwise."""
    ct = import_coremltools()
    targets = {n.lower(): t for n, t in ct.target.__members__.items() if n.startswith(("iOS", "macOS"))}
    chosen = targets.get(name.lower())
    newest = ", ".join(n for n, t in ct.target.__members__.items() if t >= ct.target.iOS17 and n.lower() in targets)
    if chosen is None:
        raise OptionError(f"unknown Core ML minimum target {name!r}; choose one of {newest}")
    if chosen < ct.target.iOS17:
        raise OptionError(f"Core ML minimum target {name} is too old: {MINIMUM_TARGET} (macOS14) is the minimum")
    return chosen


def input_sizes(graph: DeployNAFNet, options: ExportOptions) -> list[tuple[int, int]]:
    """``input_size`` then the extra enumerated sizes (duplicates dropped), each checked against the graph."""
    extra = CoreMLTarget.setting(options, "extra_sizes") or ()
    sizes = list(dict.fromkeys([tuple(options.input_size), *map(tuple, extra)]))
    m = graph.pad_multiple
    for h, w in sizes:
        if h % m or w % m:
            raise OptionError(f"input size {h}x{w} must be a multiple of the padding multiple {m}")
    if len(sizes) > 1 and (graph.recipe.local_pooling or graph.recipe.is_tlc):
        raise OptionError(
            "enumerated sizes need global channel-attention pooling; TLC (NAFNetLocal) pooling is fixed for "
            "one input size: export one artifact per size"
        )
    return sizes


def io_types(shape: Any, pixel_format: str | None) -> tuple[list[Any], list[Any]]:
    """``ct.convert``'s ``inputs`` and ``outputs``: float32 tensors, or with ``pixel_format`` Core ML images in its
    colour space, the input scaled by 1/255 (coremltools writes the scale into the program as a ``mul``)."""
    ct = import_coremltools()
    if pixel_format is None:
        return [ct.TensorType(name=INPUT_NAME, shape=shape, dtype=np.float32)], [
            ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)
        ]
    layout = getattr(ct.colorlayout, COLOR_LAYOUTS[pixel_format])
    image = ct.ImageType(name=INPUT_NAME, shape=shape, scale=1.0 / LEVELS, color_layout=layout)
    return [image], [ct.ImageType(name=OUTPUT_NAME, color_layout=layout)]


def pixel_levels_module(model: torch.nn.Module, pixel_format: str) -> torch.nn.Module:
    """``model`` between the scaled image input and the image output: it takes the image's channels in [0, 1] (in
    ``pixel_format``'s order: BGR is reversed to the model's RGB and back) and returns
    ``round(clamp(y, 0, 1) * 255)`` (half to even), the levels the output image holds."""
    import torch

    if pixel_format not in COLOR_LAYOUTS:
        raise OptionError(f"Core ML images take --pixel-format {', '.join(COLOR_LAYOUTS)}, not {pixel_format}")
    reverse = pixel_format == "bgr"

    class PixelLevels(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.model(x.flip(1) if reverse else x)
            y = torch.round(torch.clamp(y, 0.0, 1.0) * LEVELS)
            return y.flip(1) if reverse else y

    wrapper = PixelLevels()
    wrapper.training = False  # only the wrapper: a PT2E-converted ``model`` refuses ``eval()``; pass it in eval mode
    return wrapper


def io_metadata(pixel_format: str | None) -> dict[str, str]:
    """The model metadata entries saying which I/O the package has."""
    if pixel_format is None:
        return {"nafnet_edge.io": "tensor"}
    return {"nafnet_edge.io": "image", "nafnet_edge.pixel_format": pixel_format}


def package_io_info(program: Any, precision: Precision, pixel_format: str | None) -> dict[str, Any]:
    """``Exported.info`` entries on the package's I/O: kind, pixel format, the program's I/O dtypes and a note."""
    dtypes = _program_io_dtypes(program)
    if pixel_format is None:
        return {**io_info(None), "io_dtypes": dtypes, "io_note": _io_note(precision)}
    casts = "; computed in fp16 between casts" if precision == "fp16" else ""
    return {
        **io_info(pixel_format),
        "color_layout": COLOR_LAYOUTS[pixel_format],
        "io_dtypes": dtypes,
        "io_note": f"Core ML {COLOR_LAYOUTS[pixel_format]} images in and out (8-bit pixel buffers); the program "
        f"scales by 1/255, clamps to [0, 1], scales by 255 and rounds (half to even){casts}",
    }


def unpack_coreml_payloads(payloads: list[bytes], into: Path) -> list[Path]:
    """The ``.mlpackage`` of each Core ML delegate payload (a flattened directory written by the backend's
    preprocess: ``lowered_module/model.mlpackage`` plus metadata), unpacked under ``into``."""
    from executorch.backends.apple.coreml import executorchcoreml

    packages = []
    for i, payload in enumerate(payloads):
        if payload.startswith(b"CMJR"):
            raise NotImplementedError("multi-method Core ML payloads (named-data references) are not supported")
        folder = into / f"delegate_{i}"
        folder.mkdir(parents=True)
        if not executorchcoreml.unflatten_directory_contents(payload, str(folder.resolve())):
            raise RuntimeError(f"Core ML delegate payload {i} could not be unpacked")
        found = sorted(folder.rglob("*.mlpackage"))
        if len(found) != 1:
            raise RuntimeError(f"Core ML delegate payload {i} holds {len(found)} .mlpackage, expected one")
        packages.append(found[0])
    return packages


def _pte_coreml_payloads(path: Path) -> list[bytes]:
    """The Core ML delegate payloads of a ``.pte`` whose forward is exactly one Core ML delegate call; else
    ``MissingBackendError`` (such a program cannot be evaluated without ExecuTorch's Core ML backend)."""
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.exir.schema import DataLocation, DelegateCall, KernelCall

    program = deserialize_pte_binary(path.read_bytes()).program
    (plan,) = program.execution_plan
    instructions = [i.instr_args for chain in plan.chains for i in chain.instructions]
    kernels = sum(isinstance(i, KernelCall) for i in instructions)
    delegate_calls = sum(isinstance(i, DelegateCall) for i in instructions)
    coreml = [d for d in plan.delegates if d.id == COREML_BACKEND_ID]
    if kernels or delegate_calls != 1 or len(coreml) != 1 or coreml[0].processed.location != DataLocation.INLINE:
        raise MissingBackendError(
            f"{path.name} cannot execute off Apple platforms (no Core ML backend in this ExecuTorch runtime), and "
            f"it is not one inline Core ML delegate ({delegate_calls} delegate calls, {kernels} portable kernels) "
            "that could be evaluated on its own: validate it on macOS"
        )
    return [program.backend_delegate_data[coreml[0].processed.index].data]


def _load_program(package: Path) -> Any:
    from nafnet_edge.converters.coreml_mil import load_program

    return load_program(package)


def _channels(graph: DeployNAFNet) -> int:
    return input_channels(graph)


def _ct_precision(precision: Precision) -> Any:
    ct = import_coremltools()
    return {"fp16": ct.precision.FLOAT16, "fp32": ct.precision.FLOAT32}[precision]


def _io_note(precision: Precision) -> str:
    if precision == "fp16":
        return "float32 input and output; coremltools inserted casts to fp16 and back inside the program"
    return "float32 input and output, computed in fp32"


def _histogram(names: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(names).items()))


def _program_io_dtypes(program: Any) -> dict[str, str]:
    """Input and output name -> numpy dtype name, as the ML program declares them."""
    declared = {name: dtype for op in program.ops for name, dtype in zip(op.outputs, op.dtypes, strict=True)}
    io = {name: dtype for name, (_, dtype) in program.inputs.items()}
    io.update({name: declared[name] for name in program.outputs})
    return {name: np.dtype(dtype).name for name, dtype in io.items()}


def _program_precision(program: Any) -> str:
    """fp16 when the program computes anything in fp16 (its I/O can still be float32)."""
    return "fp16" if any(d == np.float16 for op in program.ops for d in op.dtypes) else "fp32"


def _compute_units(export: Mapping[str, Any] | None, settings: SessionSettings) -> str:
    """The hint ``compute_units``, else the manifest's ``export`` section's, else ALL."""
    given = settings.hints.get("compute_units") or (export or {}).get("compute_units", DEFAULT_COMPUTE_UNITS)
    units = str(given).upper()
    if units not in COMPUTE_UNITS:
        raise ArtifactError(f"compute units {units!r}; choose one of {', '.join(COMPUTE_UNITS)}")
    return units


def _allowed_shapes(spec: Any) -> list[tuple[int, ...]]:
    """The input shapes (NCHW) the model accepts: its enumerated shapes, else its one fixed shape."""
    from coremltools.proto import FeatureTypes_pb2

    from nafnet_edge.converters.coreml_mil import IMAGE_CHANNELS

    feature = spec.description.input[0].type
    if feature.WhichOneof("Type") == "imageType":
        image = feature.imageType
        c = IMAGE_CHANNELS.get(FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(image.colorSpace), 3)
        sizes = [(s.height, s.width) for s in image.enumeratedSizes.sizes] or [(image.height, image.width)]
        return [(1, c, h, w) for h, w in sizes]
    array = feature.multiArrayType
    return [tuple(s.shape) for s in array.enumeratedShapes.shapes] or [tuple(array.shape)]


def _check_shape(x: np.ndarray, allowed: list[tuple[int, ...]]) -> None:
    if tuple(x.shape) not in allowed:
        raise ValueError(f"input shape {tuple(x.shape)} is not one the model accepts: {allowed}")


def _check_pixels(p: np.ndarray, allowed: list[tuple[int, ...]], pixel_format: str) -> None:
    """uint8 (1, H, W, P) pixels of a size the image input accepts (``allowed``: NCHW shapes)."""
    depth = pixel_channels(pixel_format)
    if not isinstance(p, np.ndarray) or p.dtype != np.uint8 or p.ndim != 4 or p.shape[3] != depth:
        got = f"{p.dtype} {p.shape}" if isinstance(p, np.ndarray) else type(p).__name__
        raise ValueError(f"expected uint8 pixels (1, H, W, {depth}) in {pixel_format}, got {got}")
    n, h, w, c = p.shape
    if (n, c, h, w) not in allowed:
        raise ValueError(f"pixels {tuple(p.shape)} are not a size the model accepts: {allowed} (NCHW)")


def _evaluator_pixels(program: Any, allowed: list[tuple[int, ...]], pixel_format: str) -> Runner:
    """The numpy evaluator on uint8 (1, H, W, P) pixels: fed as Core ML binds an image (float NCHW 0..255 in the
    colour space's order, which is ``pixel_format``'s), its float output (already rounded levels) back to uint8."""

    def run(p: np.ndarray) -> np.ndarray:
        _check_pixels(p, allowed, pixel_format)
        x = np.ascontiguousarray(p.transpose(0, 3, 1, 2), dtype=np.float32)
        y = np.asarray(program.run({INPUT_NAME: x})[OUTPUT_NAME], dtype=np.float32)
        # NaN (an overflowed fp16 program) reads as 0, which validation then scores as wrong
        return np.clip(np.nan_to_num(y, nan=0.0), 0.0, LEVELS).astype(np.uint8).transpose(0, 2, 3, 1).copy()

    return run


def _coreml_pixels(mlmodel: Any, allowed: list[tuple[int, ...]], pixel_format: str) -> Runner:
    """Core ML (macOS) on uint8 (1, H, W, P) pixels, through the PIL images coremltools' ``predict`` takes and
    returns (RGB or L; Core ML converts to and from the model's colour space)."""
    from PIL import Image

    mode = "L" if pixel_format == "gray" else "RGB"

    def run(p: np.ndarray) -> np.ndarray:
        _check_pixels(p, allowed, pixel_format)
        tile = p[0, :, :, ::-1] if pixel_format == "bgr" else p[0]
        image = Image.fromarray(np.ascontiguousarray(tile[:, :, 0] if mode == "L" else tile), mode=mode)
        restored = mlmodel.predict({INPUT_NAME: image})[OUTPUT_NAME].convert(mode)
        y = np.atleast_3d(np.asarray(restored, dtype=np.uint8))
        return np.ascontiguousarray(y[:, :, ::-1] if pixel_format == "bgr" else y)[None]

    return run


def describe_io(
    mlmodel: Any, recipe: DeployRecipe, sizes: list[tuple[int, int]], *, pixel_format: str | None = None
) -> None:
    """Descriptions an app developer sees in Xcode's model viewer, from the deploy graph's recipe (and the image
    I/O's pixel format, when it has one)."""
    c, m, metadata = recipe.channels, recipe.pad_multiple, recipe.metadata
    kind = "RGB" if c == 3 else "grayscale" if c == 1 else f"{c}-channel"
    listed = ", ".join(f"{h}x{w}" for h, w in sizes)
    if pixel_format is None:
        mlmodel.input_description[INPUT_NAME] = (
            f"{kind} image, float32 NCHW (1, {c}, H, W), values in [0, 1]; H x W one of {listed} (multiples of "
            f"{m}): zero-pad right/bottom to it and crop the output back, or tile larger images"
        )
        mlmodel.output_description[OUTPUT_NAME] = (
            "restored image, same shape, layout and range as image; not clamped: clamp to [0, 1] before quantizing"
        )
    else:
        space = COLOR_LAYOUTS[pixel_format]
        mlmodel.input_description[INPUT_NAME] = (
            f"image ({space}, 8 bits per channel), H x W one of {listed} (multiples of {m}): zero-pad right/bottom "
            "to it and crop the output back, or tile larger images; scaled to [0, 1] inside the model"
        )
        mlmodel.output_description[OUTPUT_NAME] = (
            f"restored image, same size and colour space ({space}): clamped and rounded to 8-bit levels inside the "
            "model"
        )
    release = metadata.get("nafnet_edge.release")
    mlmodel.short_description = f"NAFNet{f' {release}' if release else ''} image restoration, exported by nafnet-edge"
    mlmodel.author = "nafnet-edge"
    if metadata.get("nafnet_edge.source_sha256"):
        mlmodel.version = f"weights sha256 {metadata['nafnet_edge.source_sha256'][:16]}"
    if metadata.get("nafnet_edge.license"):
        mlmodel.license = metadata["nafnet_edge.license"]


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


@contextmanager
def _quiet_coreml_backend() -> Iterator[None]:
    """Lower without the Core ML backend's chatter: its partitioner logs at INFO, and its preprocess warns on every
    lowering that the spec version limits the OSes (the minimum target is chosen on purpose)."""
    partitioner = logging.getLogger("executorch.backends.apple.coreml.partition.coreml_partitioner")
    preprocess = logging.getLogger("executorch.backends.apple.coreml.compiler.coreml_preprocess")
    quiet = _DropMessages("and it will not run on all version of iOS/macOS")
    level = partitioner.level
    partitioner.setLevel(logging.WARNING)
    preprocess.addFilter(quiet)
    try:
        yield
    finally:
        preprocess.removeFilter(quiet)
        partitioner.setLevel(level)
