"""OpenVINO: the deploy graph as an IR (``model.xml`` + ``model.bin``), validated with the CPU plugin.

Export: ``ov.convert_model`` from the PyTorch deploy graph with a static input shape, tensors named ``image``
and ``restored``, the manifest essentials stored in the IR's rt_info under ``nafnet_edge`` (read them back with
``model.get_rt_info(["nafnet_edge", key])``), then ``ov.save_model``. Precision ``fp16`` compresses the
weights to f16 in the ``.bin`` (half the size); the CPU plugin decompresses them to f32 at load, so it changes
the file, not the arithmetic.

Runner: the CPU plugin silently runs bf16 on CPUs that report bf16, so the runner pins
``INFERENCE_PRECISION_HINT`` (f32 unless the manifest asks for ``inference_precision``) and refuses to run when
the plugin reports a different precision than asked (on x86 without native f16 it answers an f16 request with
bf16). It records what ran: the plugin's precision hint and, over the execution graph's compute nodes,
histograms of the plugin's reported runtime precision and of the precision of the data they read.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from nafnet_edge.artifact_files import artifact_file
from nafnet_edge.converters.base import (
    INPUT_NAME,
    OUTPUT_NAME,
    Converter,
    Exported,
    ExportOptions,
    LoadedRunner,
    Precision,
)
from nafnet_edge.errors import ArtifactError, OptionError

XML, BIN = "model.xml", "model.bin"
RT_INFO_SECTION = "nafnet_edge"
DEVICE = "CPU"
INFERENCE_PRECISIONS = ("f32", "bf16", "f16")  # values of the CPU plugin's INFERENCE_PRECISION_HINT we accept
DEFAULT_INFERENCE_PRECISION = "f32"
CAPABILITY_NAMES = {"f32": "FP32", "bf16": "BF16", "f16": "FP16"}  # as in the plugin's OPTIMIZATION_CAPABILITIES
# Execution-graph nodes that move or hold data rather than compute; left out of the runtime precision histogram.
NON_COMPUTE_LAYERS = frozenset({"Input", "Output", "Const", "Reorder", "Reshape"})


class OpenVINOConverter(Converter):
    target: ClassVar[str] = "openvino"
    deploy_target: ClassVar[str] = "openvino"
    artifact: ClassVar[str] = XML
    precisions: ClassVar[tuple[Precision, ...]] = ("fp32", "fp16")
    default_precision: ClassVar[Precision] = "fp32"
    modules: ClassVar[tuple[str, ...]] = ("openvino",)
    extra: ClassVar[str] = "openvino"
    file_kind: ClassVar[str] = "OpenVINO IR"

    def check_options(self, options: ExportOptions) -> None:
        super().check_options(options)
        if options.dynamic:
            raise OptionError("--dynamic is for --target onnx; OpenVINO IRs are exported at one fixed --input-size")
        if options.extra_sizes:
            raise OptionError("--sizes is for --target coreml; export one OpenVINO IR per --input-size instead")
        if options.bundle:
            raise OptionError("--bundle is for --target executorch; OpenVINO has no bundled-program format")

    def export(self, graph: torch.nn.Module, out_dir: Path, options: ExportOptions) -> Exported:
        import openvino as ov

        h, w = options.input_size
        shape = (1, graph.intro.in_channels, h, w)
        with torch.no_grad():
            ov_model = ov.convert_model(graph, example_input=torch.rand(shape), input=ov.PartialShape(list(shape)))
        ov_model.inputs[0].get_tensor().set_names({INPUT_NAME})
        ov_model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
        metadata = getattr(graph, "manifest_metadata", {})
        name = metadata.get(f"{RT_INFO_SECTION}.release") or metadata.get(f"{RT_INFO_SECTION}.arch")
        ov_model.set_friendly_name(name or type(graph).__name__)
        for key, value in ir_metadata(graph, options, metadata).items():
            ov_model.set_rt_info(value, [RT_INFO_SECTION, key])

        xml = Path(out_dir) / XML
        ov.save_model(ov_model, str(xml), compress_to_fp16=options.precision == "fp16")
        saved = ov.Core().read_model(str(xml))
        op_counts = Counter(op.get_type_name() for op in saved.get_ops())
        return Exported(
            files=[XML, BIN],
            info={
                "openvino": ov.get_version(),
                "weight_precision": "f16 compressed (decompressed to f32 at load)"
                if options.precision == "fp16"
                else "f32",
                "ops": dict(op_counts.most_common()),
                "file_bytes": {name: (Path(out_dir) / name).stat().st_size for name in (XML, BIN)},
            },
        )

    def artifact_path(self, out_dir: Path) -> Path:
        """``model.xml`` and the ``model.bin`` OpenVINO reads beside it, checked (see ``Converter.artifact_path``)."""
        artifact_file(out_dir, BIN)
        return artifact_file(out_dir, XML)

    def load_runner(self, out_dir: Path, manifest: dict[str, Any]) -> LoadedRunner:
        import openvino as ov

        path = self.artifact_path(out_dir)
        requested = manifest.get("inference_precision", DEFAULT_INFERENCE_PRECISION)
        if requested not in INFERENCE_PRECISIONS:
            raise ArtifactError(
                f"inference_precision {requested!r} is not one of {', '.join(INFERENCE_PRECISIONS)} "
                "(the CPU plugin's INFERENCE_PRECISION_HINT values)"
            )
        core = ov.Core()
        with self.loading(path):
            compiled = core.compile_model(str(path), DEVICE, {"INFERENCE_PRECISION_HINT": requested})
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

        def run(x: np.ndarray) -> np.ndarray:
            result = request.infer({INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
            return np.asarray(result[OUTPUT_NAME], dtype=np.float32)

        return LoadedRunner(
            run=run,
            info={
                "runtime": "openvino",
                "openvino": ov.get_version(),
                "device": DEVICE,
                "device_name": core.get_property(DEVICE, "FULL_DEVICE_NAME"),
                "inference_precision": used,
                "runtime_precisions": reported,
                "activation_precisions": activations,
            },
        )


def ir_metadata(graph: torch.nn.Module, options: ExportOptions, metadata: dict[str, str]) -> dict[str, str]:
    """rt_info entries under ``nafnet_edge``: the pipeline's metadata (its ``nafnet_edge.`` key prefix dropped,
    since the section already says it) and this IR's own facts, which win on a clash."""
    entries = {
        key.removeprefix(f"{RT_INFO_SECTION}."): value
        for key, value in metadata.items()
        if isinstance(key, str) and isinstance(value, str)
    }
    h, w = options.input_size
    entries.update(
        input_size=f"{h}x{w}",
        padding_multiple=str(graph.pad_multiple),
        precision=options.precision,
    )
    return entries


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
