"""OpenVINO int8: NNCF post-training quantization of the deploy graph in PyTorch, fine-tunable, saved as an IR
whose FakeQuantize nodes the CPU plugin runs as int8 kernels.

``prepare`` runs ``nncf.quantize`` on the deploy graph (``nafnet_edge.deploy`` with ``target="openvino"``) with
NNCF's PyTorch backend: ranges from min/max statistics over the calibration batches, fast bias correction, and
NNCF's fake quantizers hooked into a copy of the graph (int8 symmetric per-channel weights; int8 per-tensor
activations, symmetric with preset "performance", the default, asymmetric with "mixed"; per-channel into the
depthwise convs). Those quantizers have trainable ranges, so the same module is the QAT student: weights and
ranges learn through straight-through gradients. NNCF has no observers: ranges are fixed by the statistics at
``prepare`` (pass the calibration batches there) and then move only by training. ``export`` traces the module
with ``ov.convert_model``: each activation quantizer becomes a FakeQuantize node, weights are stored as i8
constants with a dequantizing multiply, and ``OpenVINOConverter``'s runner executes the IR. With ``pixel_format``
(``--io image``) the traced, calibrated model is then wrapped by the converter's ``PrePostProcessor`` pixel I/O
(``with_pixel_io``): uint8 pixels in and out, the quantized graph between them unchanged. The input quantizer's
[0, 1] range in 255 steps takes ``pixels / 255`` exactly.

Three choices differ from plain ``nncf.quantize``:
- The input quantizer is pinned to [0, 1] in 255 steps (the artifact's input contract): an image decoded from
  8 bits passes exactly, and nothing is clipped. Calibrated on a few crops it would take their largest value
  and clip every brighter pixel of other images.
- The channel norms stay unquantized inside (``fp32_norms``): quantizers between their mean, subtract, power
  and square root split the pattern OpenVINO's frontend folds into one MVN op, the placement NNCF's OpenVINO
  backend also chooses on the fp32 IR. Latency and PSNR are the same either way; the IR is simpler this way.
- Preset "performance" (NNCF's own default for CNNs) rather than "mixed": with asymmetric activations the CPU
  plugin runs the transposed-conv upsampling in f32: slower at the same PSNR.

The CPU plugin runs the FakeQuantize-fed convolutions as u8 x i8 kernels whatever ``INFERENCE_PRECISION_HINT``
says; the hint decides what the rest runs in (the norms, the first and last ops). ``inference_precision="auto"``
times the IR with each precision this CPU runs natively and ships the fastest (``choose_inference_precision``):
bf16 on Intel CPUs with AMX, f32 on AMD Zen 4, where bf16 measured slower. The manifest records the hint and the
timings, and the runner compiles with it.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from nafnet_edge.converters.base import Exported
from nafnet_edge.converters.openvino import (
    BIN,
    CAPABILITY_NAMES,
    DEFAULT_INFERENCE_PRECISION,
    DEVICE,
    INFERENCE_PRECISIONS,
    XML,
    save_ir,
)
from nafnet_edge.deploy.modules import ChannelNorm
from nafnet_edge.errors import OptionError
from nafnet_edge.pixels import check_pixel_format, io_info
from nafnet_edge.quantization.base import Quantizer

Preset = Literal["mixed", "performance"]
INPUT_RANGE = (0.0, 1.0)  # the deploy graph's input contract: images in [0, 1]
# NNCF compiles a C++ extension on first use (about 45 s on two cores) and raises, instead of falling back, when
# that takes longer than NNCF_EXTENSION_LOAD_TIMEOUT (default 60 s); a busy machine needs more headroom.
EXTENSION_LOAD_TIMEOUT_S = "600"
PRECISION_ROUNDS = 15  # interleaved timing rounds per inference precision (auto)
AUTO_PRECISIONS = INFERENCE_PRECISIONS  # what auto times, those this CPU runs natively
PRECISION_MARGIN = 0.95  # a precision other than f32 is kept only when its median is at most this fraction of f32's


class NotPreparedError(ValueError):
    """``export`` was given a module that ``OpenVINOQuantizer.prepare`` did not make."""


class OpenVINOQuantizer(Quantizer):
    target: ClassVar[str] = "openvino"
    artifact: ClassVar[str] = XML
    modules: ClassVar[tuple[str, ...]] = ("openvino", "nncf")
    extra: ClassVar[str] = "openvino"

    def __init__(
        self,
        *,
        preset: Preset = "performance",
        fp32_norms: bool = True,
        inference_precision: str = "auto",
        keep_float: Collection[str] = (),
    ) -> None:
        super().__init__(keep_float=keep_float)
        if preset not in ("mixed", "performance"):
            raise ValueError(f"preset {preset!r}: choose mixed or performance")
        if inference_precision not in ("auto", *INFERENCE_PRECISIONS):
            raise OptionError(
                f"inference precision {inference_precision!r} is not one of auto, {', '.join(INFERENCE_PRECISIONS)}"
            )
        self.preset: Preset = preset
        self.fp32_norms = fp32_norms  # no quantizers inside the channel norms: they stay one MVN op in the IR
        # what the float remainder runs in: the CPU plugin's INFERENCE_PRECISION_HINT, timed when "auto"
        self.inference_precision = inference_precision

    @property
    def scheme(self) -> str:
        activations = "asymmetric" if self.preset == "mixed" else "symmetric"
        return (
            f"NNCF PyTorch PTQ (nncf.quantize, preset {self.preset}, fast bias correction): int8 symmetric "
            f"per-channel weights, int8 {activations} per-tensor activations, input pinned to [0, 1]"
        )

    def prepare(
        self,
        graph: torch.nn.Module,
        example: torch.Tensor,
        *,
        qat: bool,
        calibration: Iterable[torch.Tensor] | None = None,
    ) -> torch.nn.Module:
        """A quantized copy of ``graph`` (``graph`` itself is untouched), calibrated on ``calibration`` (NCHW
        batches; ``[example]`` without it), in eval mode; its weights and ranges require gradients when ``qat``.
        Forward passes after this do not change the ranges."""
        import nncf

        self.check_available()
        os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", EXTENSION_LOAD_TIMEOUT_S)
        samples = list(calibration) if calibration is not None else [example]
        if not samples:
            raise ValueError("calibration is empty: give at least one NCHW batch (or None to use the example)")
        ignored = nncf.IgnoredScope(patterns=norm_patterns(graph)) if self.fp32_norms else None
        input_name = next(iter(inspect.signature(graph.forward).parameters))
        # NNCF's progress bars print to stdout: they go to stderr, so `quantize --json` prints only JSON
        with torch.no_grad(), _nncf_log_level(logging.WARNING), redirect_stdout(sys.stderr):
            prepared = nncf.quantize(
                graph,
                nncf.Dataset(samples),
                preset=nncf.QuantizationPreset(self.preset),
                subset_size=len(samples),
                model_type=None,  # a CNN: no transformer patterns
                ignored_scope=ignored,
            )
        pin_input_range(prepared, input_name, INPUT_RANGE)
        if any(op == "/interpolate/0" for op in _hooked_ops(prepared)):  # super-resolution: the bilinear residual
            pin_input_range(prepared, "/interpolate/0", INPUT_RANGE)  # of [0, 1] pixels is in [0, 1] too
        if self.keep_float:
            groups = self.unit_quantizers(prepared, sorted(self.keep_float), example)
            self.set_quantizers([q for unit in groups.values() for q in unit], False)
        for p in prepared.parameters():
            if p.is_floating_point():  # NNCF keeps bit widths and flags as integer parameters: never trainable
                p.requires_grad_(qat)
        self.set_training(prepared, False)
        return prepared

    def set_training(self, prepared: torch.nn.Module, training: bool) -> None:
        """NNCF's quantizers compute the same in both modes; the deploy graph has no dropout or batch norm."""
        prepared.train(training)

    def unit_quantizers(
        self, prepared: torch.nn.Module, units: Sequence[str], example: torch.Tensor
    ) -> dict[str, list[torch.nn.Module]]:
        """NNCF's quantizers called while each unit's module runs (its weights, inputs and inner activations),
        found by one forward pass with module hooks: NNCF names the operations of blocks held in containers
        without the container (``0/conv1a/conv2d/2``), so its names do not say which block an operation is in."""
        quantizers = _quantizers(prepared)
        found: dict[str, list[torch.nn.Module]] = {u: [] for u in units}
        active: list[str] = []
        handles = []

        def enter(unit: str) -> Callable[..., None]:
            return lambda module, args: active.append(unit)

        def leave(module: torch.nn.Module, args: Any, output: Any) -> None:
            active.pop()  # a forward hook's return value would replace the module's output

        for unit in units:
            module = prepared.get_submodule(unit)
            handles += [module.register_forward_pre_hook(enter(unit)), module.register_forward_hook(leave)]

        def record(module: torch.nn.Module, args: Any) -> None:
            for unit in active:
                if not any(q is module for q in found[unit]):
                    found[unit].append(module)

        handles += [q.register_forward_pre_hook(record) for q in quantizers]
        try:
            with torch.no_grad():
                prepared(example[:1])
        finally:
            for handle in handles:
                handle.remove()
        return found

    def set_quantizers(self, modules: Sequence[torch.nn.Module], enabled: bool) -> None:
        for quantizer in modules:
            if enabled:
                quantizer.enable_quantization()  # type: ignore[operator]
            else:
                quantizer.disable_quantization()  # type: ignore[operator]

    def freeze_observers(self, prepared: torch.nn.Module) -> None:
        """Stop training the quantization ranges; they keep quantizing with their current values."""
        for quantizer in _quantizers(prepared):
            quantizer.disable_gradients()

    def export(
        self, prepared: torch.nn.Module, out_dir: Path, example: torch.Tensor, *, pixel_format: str | None = None
    ) -> Exported:
        """Trace ``prepared`` at ``example``'s size, batch 1, into ``model.xml`` + ``model.bin`` (tensors named
        ``image`` and ``restored``, rt_info as ``OpenVINOConverter`` writes it with precision int8); with
        ``pixel_format``, behind 8-bit image I/O in that format, as the converter's image IRs."""
        import nncf
        import openvino as ov

        quantizers = _quantizers(prepared)
        if not quantizers:
            raise NotPreparedError("export needs the module OpenVINOQuantizer.prepare returned (no NNCF quantizers)")
        if pixel_format is not None:
            check_pixel_format(pixel_format, int(example.shape[1]))
        h, w = example.shape[-2:]
        shape = [1, example.shape[1], h, w]
        training = prepared.training
        prepared.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # torch.jit.trace warns for every quantizer NNCF evaluates in Python while tracing (1,600 lines)
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                ov_model = ov.convert_model(
                    prepared, example_input=example[:1].contiguous(), input=ov.PartialShape(shape)
                )
        finally:
            prepared.train(training)
        op_counts = save_ir(
            ov_model,
            out_dir,
            prepared,
            input_size=(int(h), int(w)),
            precision="int8",
            rt_info={"quantization_scheme": self.scheme},
            pixel_format=pixel_format,
        )
        precision = choose_inference_precision(out_dir / XML, self.inference_precision)
        return Exported(
            files=[XML, BIN],
            info={
                **io_info(pixel_format),
                **precision,
                "openvino": ov.get_version(),
                "nncf": nncf.__version__,
                "torch": importlib.metadata.version("torch"),
                "quantization_scheme": self.scheme,
                "preset": self.preset,
                "fp32_norms": self.fp32_norms,
                "kept_float": sorted(self.keep_float),
                "quantizers": len(quantizers),
                "fake_quantize_nodes": op_counts.get("FakeQuantize", 0),
                "weight_precision": "i8 (dequantized by a multiply the plugin fuses into the int8 convolution)",
                "ops": dict(op_counts.most_common()),
                "file_bytes": {f: (Path(out_dir) / f).stat().st_size for f in (XML, BIN)},
            },
        )


def choose_inference_precision(xml: Path, requested: str, rounds: int = PRECISION_ROUNDS) -> dict[str, Any]:
    """The ``inference_precision`` the artifact ships with (the runner compiles with it) and how it was chosen.

    ``auto`` compiles the IR once per precision this CPU runs natively (f32, and bf16 / f16 where
    ``OPTIMIZATION_CAPABILITIES`` lists them), times them side by side (interleaved rounds, medians, LATENCY hint)
    and keeps f32 unless another is faster by ``PRECISION_MARGIN``; the record has the timings, the CPU and how
    far each output is from f32's (PSNR)."""
    import numpy as np
    import openvino as ov

    from nafnet_edge.benchmark import cpu_isa, cpu_name
    from nafnet_edge.validation import psnr

    if requested != "auto":
        return {"inference_precision": requested, "inference_precision_choice": f"asked for ({requested})"}
    core = ov.Core()
    capabilities = core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")
    candidates = [p for p in AUTO_PRECISIONS if p == DEFAULT_INFERENCE_PRECISION or CAPABILITY_NAMES[p] in capabilities]
    if len(candidates) == 1:
        return {
            "inference_precision": DEFAULT_INFERENCE_PRECISION,
            "inference_precision_choice": f"the only one this CPU runs natively ({', '.join(capabilities)})",
        }
    model = core.read_model(str(xml))
    port = model.input(0)
    kind = port.get_element_type().to_dtype()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, port.get_shape(), dtype=np.uint8) if kind == np.uint8 else rng.random(port.get_shape())
    x = x.astype(kind)
    requests = {
        p: core.compile_model(
            model, DEVICE, {"INFERENCE_PRECISION_HINT": p, "PERFORMANCE_HINT": "LATENCY"}
        ).create_infer_request()
        for p in candidates
    }
    outputs = {p: np.array(r.infer({0: x})[0], dtype=np.float64) for p, r in requests.items()}  # warm-up
    times: dict[str, list[float]] = {p: [] for p in requests}
    for _ in range(rounds):
        for p, r in requests.items():
            started = time.perf_counter()
            r.infer({0: x})
            times[p].append((time.perf_counter() - started) * 1e3)
    medians = {p: statistics.median(t) for p, t in times.items()}
    best = min(medians, key=lambda p: medians[p])
    chosen = (
        best
        if medians[best] <= PRECISION_MARGIN * medians[DEFAULT_INFERENCE_PRECISION]
        else DEFAULT_INFERENCE_PRECISION
    )
    peak = 255.0 if kind == np.uint8 else 1.0
    reference = outputs[DEFAULT_INFERENCE_PRECISION]
    return {
        "inference_precision": chosen,
        "inference_precision_choice": "timed on this CPU",
        "inference_precision_timings": {
            "cpu": cpu_name(),
            "isa": cpu_isa(),
            "rounds": rounds,
            "margin": PRECISION_MARGIN,
            "median_ms": {p: round(m, 3) for p, m in medians.items()},
            "psnr_vs_f32_db": {
                p: round(min(psnr(o / peak, reference / peak), 999.0), 2) for p, o in outputs.items() if p != "f32"
            },
        },
    }


def norm_patterns(graph: torch.nn.Module) -> list[str]:
    """NNCF ignored-scope patterns matching the operations inside every ``ChannelNorm`` of ``graph``.

    NNCF names an operation ``<scope>/<attribute>/<op>/<call>`` (``0/norm1/sub/3``), the scope of blocks inside
    containers reduced to an index, so the pattern keys on the norms' attribute names."""
    attributes = sorted({name.rsplit(".", 1)[-1] for name, m in graph.named_modules() if isinstance(m, ChannelNorm)})
    return [rf"(.*/)?{attribute}/.*" for attribute in attributes]


def _hooked_ops(prepared: torch.nn.Module) -> set[str]:
    """The names of the values NNCF hooked a quantizer to (the graph's input, ``/interpolate/0``, ...)."""
    from nncf.torch.function_hook.hook_storage import decode_hook_name
    from nncf.torch.function_hook.wrapper import get_hook_storage

    return {decode_hook_name(name)[1] for name, _ in get_hook_storage(prepared).named_hooks()}


def pin_input_range(prepared: torch.nn.Module, input_name: str, value_range: tuple[float, float]) -> None:
    """Set the quantizer on the value ``input_name`` (the graph input: ``forward``'s argument, as NNCF names the
    input node; or an op's output such as ``/interpolate/0``) to ``value_range`` exactly: unsigned when
    symmetric, so [0, 1] in 255 steps. NNCF's statistics average the calibration batches' extremes: a super-resolution
    graph's bilinear residual came out clipped at 0.65 on the shipped photos (24 dB against fp32)."""
    from nncf.torch.function_hook.hook_storage import decode_hook_name
    from nncf.torch.function_hook.wrapper import get_hook_storage
    from nncf.torch.quantization.layers import AsymmetricQuantizer, BaseQuantizer

    low, high = value_range
    inputs = [
        module
        for name, module in get_hook_storage(prepared).named_hooks()
        if isinstance(module, BaseQuantizer) and decode_hook_name(name)[1] == input_name
    ]
    if not inputs:
        raise RuntimeError(f"NNCF put no quantizer on the input {input_name!r}: its hook naming may have changed")
    for quantizer in inputs:  # through the state dict: it maps log-scale storage and re-derives the levels
        state = quantizer.state_dict()
        if isinstance(quantizer, AsymmetricQuantizer):
            state.update(input_low=torch.full_like(state["input_low"], low))
            state.update(input_range=torch.full_like(state["input_range"], high - low))
        else:
            if low != 0.0:
                raise ValueError(f"a symmetric unsigned quantizer starts at 0, not {low}")
            state.update(
                scale=torch.full_like(state["scale"], high), signed_tensor=torch.zeros_like(state["signed_tensor"])
            )
        quantizer.load_state_dict(state)


def _quantizers(prepared: torch.nn.Module) -> list[Any]:
    from nncf.torch.quantization.layers import BaseQuantizer

    return [m for m in prepared.modules() if isinstance(m, BaseQuantizer)]


@contextmanager
def _nncf_log_level(level: int) -> Iterator[None]:
    from nncf.common.logging import nncf_logger

    previous = nncf_logger.level
    nncf_logger.setLevel(level)
    try:
        yield
    finally:
        nncf_logger.setLevel(previous)
