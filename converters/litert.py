"""LiteRT (formerly TensorFlow Lite) through litert-torch, validated in the LiteRT interpreter (``ai_edge_litert``).

``litert_torch.convert`` lowers the deploy graph to a ``.tflite`` flatbuffer fixed for ``ExportOptions.input_size``.
The file keeps the graph's float32 NCHW I/O (input ``image``, output ``restored``): the converter computes in
NHWC and puts one TRANSPOSE at each end. The interpreter hands the whole network to one XNNPACK delegate on CPU.

Norm form ``mvn``: measured on the embedded width-16 model at 256x256 on 2 Xeon cores (XNNPACK, 40 interleaved
runs), every form converts and matches PyTorch within 6e-7, and ``mvn`` (26.3 ms, 390 operators) ties
``reference`` (26.4 ms, 414) as the fastest, ahead of ``conv-mean`` (28.3 ms: the channel means as 1x1
convolutions do not pay off in XNNPACK) and ``layer-norm`` (28.9 ms, 534 operators with its reshapes); it has the
fewest operators of the fast two.

Precisions: fp32, and fp16 as float16 weights (``ai_edge_quantizer``'s ``float_casting`` weight-only recipe on
the converted file: the convolution and fully connected weights stored as float16 behind DEQUANTIZE operators,
which XNNPACK folds back into float32 weights at load; compute stays float32). The fp16 file is about half the
size at the same CPU speed; a GPU delegate runs it in half precision.

Tensor I/O only (no ``--io image`` yet) and no int8 yet.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from importlib import metadata
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
)

if TYPE_CHECKING:
    from nafnet_edge.deploy import DeployNAFNet, NormForm

# The TFLite operators whose float weights the fp16 recipe stores as float16 (ai_edge_quantizer's float casting).
FP16_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "CONV_2D_TRANSPOSE")

USAGE = """\
## Python (`ai-edge-litert`)

```python
{python_io}
from ai_edge_litert.interpreter import Interpreter

interpreter = Interpreter(model_path="{artifact}", num_threads=4)  # without num_threads: one thread
interpreter.allocate_tensors()
input_index = interpreter.get_input_details()[0]["index"]
output_index = interpreter.get_output_details()[0]["index"]


def run(x):  # x: float32 [1, {c}, {h}, {w}] in [0, 1] (NCHW, as exported); returns the same shape, not clamped
    interpreter.set_tensor(input_index, x)
    interpreter.invoke()
    return interpreter.get_tensor(output_index).copy()


{python_save}```

## Android (Kotlin, LiteRT `CompiledModel`)

A sketch, not compiled by nafnet-edge's tests: one {h}x{w} tile, float32 NCHW in [0, 1].

```kotlin
val model = CompiledModel.create(context.assets, "{artifact}", CompiledModel.Options(Accelerator.CPU))
val inputs = model.createInputBuffers()
val outputs = model.createOutputBuffers()
inputs[0].writeFloat(pixels)  // pixels: FloatArray of 1*{c}*{h}*{w}, NCHW, in [0, 1]
model.run(inputs, outputs)
val restored = outputs[0].readFloat()  // same layout; clamp to [0, 1] and scale by 255 for an 8-bit image
```
"""


class LiteRTTarget(Target):
    name: ClassVar[str] = "litert"
    extra: ClassVar[str] = "litert"
    modules: ClassVar[tuple[str, ...]] = ("litert_torch", "ai_edge_litert")
    runtime_packages: ClassVar[tuple[str, ...]] = ("litert-torch", "ai-edge-litert", "ai-edge-quantizer")
    norm_form: ClassVar[NormForm] = "mvn"
    artifact: ClassVar[str] = "model.tflite"
    file_kind: ClassVar[str] = "LiteRT model"
    precisions: ClassVar[tuple[Precision, ...]] = ("fp32", "fp16")
    color: ClassVar[str] = "#ff9da7"
    usage_title: ClassVar[str] = "LiteRT"
    usage_body: ClassVar[str] = USAGE

    def export(self, graph: DeployNAFNet, out_dir: Path, options: ExportOptions) -> Exported:
        import litert_torch
        import torch

        self.check_options(options)
        h, w = options.input_size
        path = out_dir / self.artifact
        example = torch.zeros(1, graph.intro.in_channels, h, w)
        with torch.no_grad():
            litert_torch.convert(graph.eval(), (example,)).export(str(path))
        fp32_bytes = path.stat().st_size
        if options.precision == "fp16":
            float16_weights(path)
        return Exported(
            files=[self.artifact],
            info={
                "litert_torch_version": metadata.version("litert-torch"),
                "ai_edge_litert_version": metadata.version("ai-edge-litert"),
                "ai_edge_quantizer_version": metadata.version("ai-edge-quantizer"),
                "weights": "float16" if options.precision == "fp16" else "float32",
                "op_histogram": op_histogram(path),
                "file_bytes": path.stat().st_size,
                "fp32_file_bytes": fp32_bytes,
                "io": "tensor",
            },
        )

    def load_errors(self) -> tuple[type[BaseException], ...]:
        return (RuntimeError, ValueError)

    def open_session(
        self, out_dir: Path, *, export: Mapping[str, Any] | None = None, settings: SessionSettings | None = None
    ) -> Session:
        """The LiteRT interpreter (its default XNNPACK delegate on CPU) on ``settings.threads`` threads, all cores
        when None (the interpreter alone would use one: 48 ms instead of 25 ms at 256x256 on 2 cores)."""
        from ai_edge_litert.interpreter import Interpreter

        settings = settings or SessionSettings()
        threads = settings.threads or os.cpu_count() or 1
        path = self.artifact_path(out_dir)
        with self.loading(path):
            interpreter = Interpreter(model_path=str(path), num_threads=threads)
            interpreter.allocate_tensors()
        source = interpreter.get_input_details()[0]
        sink = interpreter.get_output_details()[0]

        def run(x: np.ndarray) -> np.ndarray:
            interpreter.set_tensor(source["index"], np.ascontiguousarray(x, dtype=np.float32))
            interpreter.invoke()
            return np.array(interpreter.get_tensor(sink["index"]), dtype=np.float32)

        info = {
            "ai_edge_litert": metadata.version("ai-edge-litert"),
            "threads": threads,
            "delegates": sum(1 for op in interpreter._get_ops_details() if op["op_name"] == "DELEGATE"),
        }
        return Session(run, "litert", info, keep=interpreter)


def float16_weights(path: Path) -> None:
    """Rewrite the ``.tflite`` at ``path`` with its convolution and fully connected weights stored as float16."""
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.quantizer import Quantizer

    quantizer = Quantizer(str(path))
    for op in FP16_WEIGHT_OPS:
        quantizer.add_weight_only_config(".*", getattr(qtyping.TFLOperationName, op), 16, algorithm_key="float_casting")
    quantizer.quantize().export_model(str(path), overwrite=True)


def op_histogram(path: Path) -> dict[str, int]:
    """The operators of the ``.tflite`` at ``path`` as the interpreter reads them (before delegation), by count."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))  # not allocated: no delegate yet
    ops = Counter(op["op_name"] for op in interpreter._get_ops_details())
    return dict(sorted(ops.items()))
