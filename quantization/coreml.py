"""Core ML int8: W8A8 by PT2E with the Core ML quantizer, or weight-only int8; an ML program ``.mlpackage``.

Two modes, both from the deploy graph in its "coreml" form (each channel norm is one ``layer_norm`` op), both
computing in fp16 (the Neural Engine is fp16-only) for iOS 17 / macOS 14 or later, with float32 I/O named and
described like the fp16 artifact (``CoreMLConverter``, whose runner executes these too):

- ``"w8a8"`` (default): ``prepare`` exports the graph and annotates it with the Core ML PT2E quantizer
  (coremltools' ``LinearQuantizerConfig``, symmetric: int8 per-channel weights, int8 per-tensor
  activations), inserting torchao's observers (PTQ: min/max) or fake quantizers (QAT: moving-average min/max).
  ``export`` converts it to quantize/dequantize form and ``ct.convert``s the ``torch.export``-ed program: the
  ML program holds iOS 17 ``quantize``/``dequantize`` ops around the int8 convolutions, adds, multiplies and
  pooling, and int8 weights as ``constexpr_affine_dequantize``: the int8-int8 compute of the Neural Engine from
  A17 Pro (iPhone 15 Pro) on; older hardware dequantizes and computes in fp16. (coremltools' own post-training
  activation quantization, ``linear_quantize_activations``, calibrates by running the model: macOS only.)
- ``"weights"``: weight-only int8, post-training only. The graph is converted to an fp16 ML program and every
  weight tensor (conv and transposed conv) becomes int8 with ``ct.optimize.coreml.linear_quantize_weights``
  (linear symmetric, per output channel): half the fp16 size, the compute stays fp16, nothing to calibrate.
  A row whose largest weight is below 127 * 2**-25 gets a scale that underflows fp16 to 0 and dequantizes to
  zeros (an error below 4e-6 per weight; 8 rows of the trained default denoiser).

Image I/O (``export(..., pixel_format=...)``): the same int8 program behind Core ML image input and output, as
``CoreMLTarget`` exports fp16 and fp32 (``converters.coreml``): the input scaled by 1/255 inside, the output
``round(clamp(y, 0, 1) * 255)`` computed in fp16 after the unquantized global residual.

Scales are fp16 like everything in the program; many weight-channel scales are fp16 subnormals (the deploy
graph divides the weights writing the residual stream by its stream scale), which Core ML handles: the program
matches PyTorch's fp32 quantize/dequantize simulation (docs/int8.md has the figures).

coremltools' own ``coremltools.optimize.torch.quantization._coreml_quantizer.CoreMLQuantizer`` cannot be
imported with torch 2.13 (it imports ``torch.ao.quantization.quantizer``, which moved to torchao); the W8A8 mode
uses the same quantizer as ported to torchao's PT2E by ExecuTorch
(``executorch.backends.apple.coreml.quantizer.CoreMLQuantizer``, same config class and patterns). The config
accepts only ``quint8`` activations, which symmetric quantization gives zero point 128; the annotation here
swaps in int8 with zero point 0 (same observers, the same 256 levels shifted, so identical outputs). Core ML
performs better with zero point 0 (coremltools' pass ``nullify_redundant_quantization_zero_point`` says so),
and that pass rewrites only some quantizers (67 of 94 on the test model: not those whose tensor more than one
dequantize reads), so with quint8 the program would mix uint8 and int8 activations.

What stays fp16 in W8A8: the channel norms (the quantizer has no ``layer_norm`` pattern, so they run between a
dequantize and a quantize, as XNNPACK's ``fp32_norms`` do), the global-average pooling (``reduce_mean``),
the two transposed-conv upsamplings (no pattern; their weights stay fp16) and, by choice
(``fp_global_residual``), the global residual ``ending(x) + input``: quantized, its 8-bit output grid (about
0.009 for outputs in [-0.2, 1.2]) is coarser than an 8-bit image and the input passes through it quantized too.

Only the quantizer's patterns that occur in a deploy graph are matched (conv, add, mul, pooling): NAFNet has
no activation function, batch norm or linear layer, and tracing the other patterns (``conv_act`` with each of
13 activations, ...) would be most of ``prepare``'s time for the same annotation. Baseline's GELU, ReLU and
sigmoid then run in fp16 between a dequantize and a quantize, each after its convolution's own quantize;
``conv_act`` would quantize once after the activation instead (15 fewer quantize ops on the tiny test model, 0.2
to 0.4 dB closer to fp32), left out for that tracing time.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import importlib.util
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from nafnet_edge.converters.base import Exported
from nafnet_edge.converters.coreml import (
    DEFAULT_COMPUTE_UNITS,
    MINIMUM_TARGET,
    deployment_target,
    describe_io,
    import_coremltools,
    io_metadata,
    io_types,
    package_io_info,
    pixel_levels_module,
)
from nafnet_edge.errors import MissingBackendError, OptionError
from nafnet_edge.pixels import check_pixel_format
from nafnet_edge.quantization.pt2e import Pt2eQuantizer

Mode = Literal["w8a8", "weights"]
MODES: tuple[Mode, ...] = ("w8a8", "weights")
W8A8_MODULES = ("executorch", "torchao")  # the Core ML PT2E quantizer (ExecuTorch's port) and PT2E itself
# the Core ML quantizer's annotators whose patterns a deploy graph holds (see the module docstring)
ANNOTATORS = ("conv", "add", "mul", "avg_pool2d", "adaptive_avg_pool2d")
CONVERSION_OPS = frozenset({"quantize", "dequantize", "constexpr_affine_dequantize", "cast"})
FACTS = "nafnet_edge_facts"  # attribute of a prepared module: what export needs of the deploy graph


@dataclasses.dataclass(frozen=True)
class _Facts:
    """What export needs of the deploy graph a module was prepared from (PT2E export drops its attributes)."""

    recipe: Any  # nafnet_edge.deploy.DeployRecipe
    qat: bool


class CoreMLQuantizer(Pt2eQuantizer):
    target: ClassVar[str] = "coreml"
    artifact: ClassVar[str] = "model.mlpackage"
    modules: ClassVar[tuple[str, ...]] = ("coremltools",)
    extra: ClassVar[str] = "coreml"

    def __init__(
        self, *, mode: Mode = "w8a8", fp_global_residual: bool = True, keep_float: Collection[str] = ()
    ) -> None:
        super().__init__(keep_float=keep_float)
        if mode not in MODES:
            raise ValueError(f"Core ML int8 mode {mode!r}: choose w8a8 (weights and activations) or weights")
        self.mode: Mode = mode
        self.fp_global_residual = fp_global_residual  # W8A8: leave the output's residual add unquantized

    @property
    def trains(self) -> bool:
        return self.mode == "w8a8"  # weight-only int8 has nothing to fine-tune

    @property
    def scheme(self) -> str:
        if self.mode == "weights":
            return "weight-only int8: ct.optimize.coreml.linear_quantize_weights, linear symmetric per-channel"
        residual = ", global residual fp16" if self.fp_global_residual else ""
        return (
            "W8A8: PT2E Core ML quantizer (LinearQuantizerConfig, symmetric): int8 per-channel weights, "
            f"int8 per-tensor activations{residual}"
        )

    def check_available(self) -> None:
        super().check_available()
        missing = [m for m in W8A8_MODULES if importlib.util.find_spec(m) is None]
        if self.mode == "w8a8" and missing:
            raise MissingBackendError(
                f"Core ML W8A8 needs {', '.join(missing)} (the Core ML PT2E quantizer): "
                "pip install 'nafnet-edge[coreml,executorch]', or use weight-only int8"
            )

    def prepare(
        self,
        graph: torch.nn.Module,
        example: torch.Tensor,
        *,
        qat: bool,
        calibration: Iterable[torch.Tensor] | None = None,
    ) -> torch.nn.Module:
        """W8A8: the PT2E-prepared copy of ``graph`` (``Pt2eQuantizer.prepare``). Weights: a frozen copy of
        ``graph`` (nothing to calibrate)."""
        self.check_available()
        facts = _Facts(recipe=graph.recipe, qat=qat)
        if self.mode == "weights":
            if self.keep_float:
                raise OptionError("weight-only Core ML int8 cannot keep units in float; W8A8 (the default) can")
            if qat:
                raise OptionError(
                    "weight-only Core ML int8 is post-training only (--method ptq); QAT needs W8A8 (the default)"
                )
            prepared = copy.deepcopy(graph).eval().requires_grad_(False)
            setattr(prepared, FACTS, facts)
            return prepared

        prepared = super().prepare(graph, example, qat=qat, calibration=calibration)
        setattr(prepared, FACTS, facts)
        return prepared

    def pt2e_quantizer(self, *, qat: bool) -> Any:
        return _pt2e_quantizer(qat=qat, fp_global_residual=self.fp_global_residual)

    def set_training(self, prepared: torch.nn.Module, training: bool) -> None:
        if self.mode == "weights":
            prepared.train(training)
        else:
            super().set_training(prepared, training)

    @property
    def switches_units(self) -> bool:
        return self.mode == "w8a8"

    def unit_quantizers(
        self, prepared: torch.nn.Module, units: Sequence[str], example: torch.Tensor
    ) -> dict[str, list[torch.nn.Module]]:
        if self.mode != "w8a8":
            raise NotImplementedError("weight-only Core ML int8 has no fake quantizers to switch per unit")
        return super().unit_quantizers(prepared, units, example)

    def freeze_observers(self, prepared: torch.nn.Module) -> None:
        """Fix every range: the fake quantizers keep quantizing with the ranges observed so far."""
        if self.mode == "w8a8":
            super().freeze_observers(prepared)

    def export(
        self, prepared: torch.nn.Module, out_dir: Path, example: torch.Tensor, *, pixel_format: str | None = None
    ) -> Exported:
        """The int8 ML program for ``example``'s size, batch 1, saved as ``out_dir/model.mlpackage``, with Core ML
        image I/O in ``pixel_format`` when given (rgb, bgr; gray for 1-channel models); ``prepared`` stays
        usable."""
        ct = import_coremltools()
        facts = getattr(prepared, FACTS, None)
        if facts is None:
            raise ValueError("export takes a module made by CoreMLQuantizer.prepare")
        if pixel_format is not None:
            check_pixel_format(pixel_format, facts.recipe.channels)
        shape = (1, *example.shape[1:])
        inputs, outputs = io_types(shape, pixel_format)
        common = {
            "convert_to": "mlprogram",
            "inputs": inputs,
            "outputs": outputs,
            "compute_precision": ct.precision.FLOAT16,
            "minimum_deployment_target": deployment_target(MINIMUM_TARGET),
        }
        x = torch.rand(shape)
        info: dict[str, Any] = {"coremltools": ct.__version__}
        if self.mode == "weights":
            traced = torch.jit.trace(_with_io(copy.deepcopy(prepared).eval(), pixel_format), x, check_trace=False)
            mlmodel = ct.convert(traced, **common)
            with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 for rows whose fp16 scale underflows
                mlmodel = ct.optimize.coreml.linear_quantize_weights(mlmodel, _weight_config(ct))
        else:
            converted = _with_io(self.convert(prepared), pixel_format)
            with torch.no_grad():
                program = torch.export.export(converted, (x,)).run_decompositions({})
            mlmodel = ct.convert(program, **common)
            info.update(
                executorch=importlib.metadata.version("executorch"), torchao=importlib.metadata.version("torchao")
            )
        sizes = [tuple(shape[2:])]
        describe_io(mlmodel, facts.recipe, sizes, pixel_format=pixel_format)
        mlmodel.user_defined_metadata.update(facts.recipe.metadata)
        mlmodel.user_defined_metadata.update(
            {
                "nafnet_edge.input_sizes": f"{shape[2]}x{shape[3]}",
                "nafnet_edge.compute_precision": "fp16",
                "nafnet_edge.quantization": self.scheme,
                "nafnet_edge.minimum_target": MINIMUM_TARGET,
                "nafnet_edge.padding_multiple": str(facts.recipe.pad_multiple),
                **io_metadata(pixel_format),
            }
        )
        path = Path(out_dir) / self.artifact
        mlmodel.save(str(path))

        from nafnet_edge.converters.coreml_mil import load_program

        saved = load_program(path)
        info.update(
            {
                "model_type": "mlprogram",
                "compute_precision": "fp16",
                "compute_units": DEFAULT_COMPUTE_UNITS,
                "minimum_target": MINIMUM_TARGET,
                "input_sizes": [list(sizes[0])],
                "shapes": "fixed",
                **package_io_info(saved, "fp16", pixel_format),
                "quantization_mode": self.mode,
                "quantization_scheme": self.scheme,
                "quantization_method": "qat" if facts.qat else "ptq",
                "kept_float": sorted(self.keep_float),
                **int8_summary(saved),
                "mil_ops": dict(sorted(Counter(op.type for op in saved.ops).items())),
            }
        )
        return Exported(files=[self.artifact], info=info)


def _with_io(module: torch.nn.Module, pixel_format: str | None) -> torch.nn.Module:
    """``module`` as the ML program computes it: itself for tensor I/O, between the image input's scale and the
    rounded 8-bit output for image I/O (``pixel_levels_module``)."""
    return module if pixel_format is None else pixel_levels_module(module, pixel_format)


def _pt2e_quantizer(*, qat: bool, fp_global_residual: bool) -> Any:
    """The Core ML PT2E quantizer for a deploy graph: symmetric int8 per-channel weights and int8 per-tensor
    activations, min/max observers for PTQ, moving-average ones for QAT; only the ``ANNOTATORS`` patterns."""
    from coremltools.optimize.torch.quantization import LinearQuantizerConfig, ModuleLinearQuantizerConfig
    from executorch.backends.apple.coreml.quantizer import CoreMLQuantizer as PT2ECoreMLQuantizer
    from executorch.backends.apple.coreml.quantizer._annotation_config import AnnotationConfig
    from executorch.backends.apple.coreml.quantizer._coreml_quantizer import _AnnotationPatternRegistry

    observer = "moving_average_min_max" if qat else "min_max"
    config = LinearQuantizerConfig(
        global_config=ModuleLinearQuantizerConfig(
            quantization_scheme="symmetric",
            weight_dtype=torch.qint8,
            weight_per_channel=True,
            activation_dtype=torch.quint8,
            weight_observer=observer,
            activation_observer=observer,
        )
    )

    class DeployGraphQuantizer(PT2ECoreMLQuantizer):
        def _annotate_all_patterns(self, model: Any, quantization_config: Any, filter_fn: Any = None) -> None:
            annotation = _int8_activations(AnnotationConfig.from_quantization_config(quantization_config))
            annotators = _AnnotationPatternRegistry.get_annotators()
            for name in ANNOTATORS:
                annotators[name](model, annotation, filter_fn)

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().annotate(model)
            if fp_global_residual:
                _global_residual(model).meta.pop("quantization_annotation", None)
            return model

    return DeployGraphQuantizer(config)


def _int8_activations(annotation: Any) -> Any:
    """``annotation`` with int8 activation specs in place of the config's quint8 ones (same observers)."""
    import attr

    spec = annotation.output_activation
    if spec is None:
        return annotation
    partial = spec.observer_or_fake_quant_ctr.p
    ctr = partial.func.with_args(**{**partial.keywords, "dtype": torch.int8})
    int8 = dataclasses.replace(spec, dtype=torch.int8, observer_or_fake_quant_ctr=ctr)
    return attr.evolve(annotation, input_activation=int8, output_activation=int8)


def _global_residual(model: torch.fx.GraphModule) -> torch.fx.Node:
    """The add producing the graph's output from the graph's input: ``ending(x) + inp``, or in a super-resolution
    graph ``up(x) + bilinear(inp)``."""
    (output,) = [n for n in model.graph.nodes if n.op == "output"]
    (node,) = output.args[0]

    def from_input(a: torch.fx.Node) -> bool:
        return a.op == "placeholder" or ("upsample" in str(a.target) and a.all_input_nodes[0].op == "placeholder")

    if node.target is not torch.ops.aten.add.Tensor or not any(from_input(a) for a in node.all_input_nodes):
        raise RuntimeError(f"the deploy graph's output is {node.target}, not the global residual add")
    return node


def _weight_config(ct: Any) -> Any:
    """Every weight tensor int8 (biases and other vectors stay fp16: coremltools never compresses rank 1)."""
    op_config = ct.optimize.coreml.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0
    )
    return ct.optimize.coreml.OptimizationConfig(global_config=op_config)


def int8_summary(program: Any) -> dict[str, Any]:
    """How much of an ML program is int8: weight tensors stored int8 or float, activation quantizers, and the
    compute ops on int8 data (``int8_ops``: every activation input dequantized from int8, every result quantized
    to int8, weights int8), which Core ML may run as int8 kernels; all other compute ops run in fp16."""
    producer = {name: op for op in program.ops for name in op.outputs}
    consumers: dict[str, list[Any]] = {}
    for op in program.ops:
        for ref in op.inputs.values():
            for name in _names(ref):
                consumers.setdefault(name, []).append(op)
    weights: Counter[str] = Counter()
    int8_ops: Counter[str] = Counter()
    float_ops: Counter[str] = Counter()
    for op in program.ops:
        int8_weight = True
        if op.type in ("conv", "conv_transpose"):
            source = producer.get(op.inputs["weight"])
            int8_weight = source is not None and source.type == "constexpr_affine_dequantize"
            weights["int8" if int8_weight else "float"] += 1
        if op.type in CONVERSION_OPS:
            continue
        names = [n for k, ref in op.inputs.items() if k in ("x", "y", "values") for n in _names(ref)]
        activations = [producer.get(n) for n in names if n not in program.consts]
        quantized_in = bool(activations) and all(p is not None and p.type == "dequantize" for p in activations)
        users = consumers.get(op.outputs[0], [])
        quantized_out = bool(users) and all(u.type == "quantize" for u in users)
        (int8_ops if int8_weight and quantized_in and quantized_out else float_ops)[op.type] += 1
    return {
        "int8_weights": weights["int8"],
        "float_weights": weights["float"],
        "activation_quantizers": sum(op.type == "quantize" for op in program.ops),
        "int8_ops": dict(sorted(int8_ops.items())),
        "fp16_ops": dict(sorted(float_ops.items())),
    }


def _names(ref: str | tuple[str, ...]) -> tuple[str, ...]:
    return ref if isinstance(ref, tuple) else (ref,)
