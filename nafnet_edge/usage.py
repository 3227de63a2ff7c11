"""USAGE.md written next to each artifact: how to load it and call it on its platform, nothing more.

The Python snippets are executed by the test suite against real artifacts (tests/test_convert_pipeline.py);
the Swift, Kotlin and C++ snippets use only the runtimes' documented entry points and the names and shapes
the manifest records.
"""

from __future__ import annotations

from typing import Any

COMMON = """\
# {title}

`{artifact}` restores one {h}x{w} tile. Source: `{checkpoint}` (sha256 `{sha}`), {arch}, {precision}.

| | name | shape | type | values |
|---|---|---|---|---|
| input | `{inp}` | `[1, {c}, {h}, {w}]` (NCHW) | float32 | {channels} in [0, 1] |
| output | `{out}` | `[1, {c}, {h}, {w}]` (NCHW) | float32 | unclamped: clamp to [0, 1], then round |

- Smaller images: zero-pad right and bottom to {h}x{w}, run, crop the output back.
- Larger images: run {h}x{w} tiles overlapping by {overlap} px and blend the overlaps (what `nafnet-edge run
  --tile {h} --overlap {overlap}` does); tile starts on multiples of {multiple} follow the whole-image result best.
- Validation of this file in its runtime is in `manifest.json` (`validation`).
"""

PYTHON_IO = """\
import numpy as np
from PIL import Image

H, W = {h}, {w}
pixels = np.atleast_3d(np.asarray(Image.open("photo.png").convert("{mode}"), dtype=np.float32) / 255.0)
h, w = min(pixels.shape[0], H), min(pixels.shape[1], W)
x = np.zeros((1, {c}, H, W), np.float32)  # zero-padded right and bottom
x[0, :, :h, :w] = pixels[:h, :w].transpose(2, 0, 1)
"""

PYTHON_SAVE = """\
y = np.clip(y[0, :, :h, :w].transpose(1, 2, 0), 0.0, 1.0)  # crop the padding, clamp
Image.fromarray((y * 255.0 + 0.5).astype(np.uint8).squeeze()).save("restored.png")
"""

TARGET_NOTES = {
    "coreml": (
        "Core ML",
        """\
## Swift (iOS 17 / macOS 14 or later)

Add `{artifact}` to the Xcode target; Xcode compiles it and generates a class named after the file.

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
""",
    ),
    "executorch-coreml": (
        "ExecuTorch (Core ML delegate)",
        """\
## iOS / macOS with the ExecuTorch runtime and its Core ML backend linked

```swift
import ExecuTorch

let module = Module(filePath: Bundle.main.path(forResource: "model", ofType: "pte")!)
let input = Tensor<Float>(pixels, shape: [1, {c}, {h}, {w}])   // pixels: [Float], NCHW, {channels} in [0, 1]
let output = try module.forward(input)
```
""",
    ),
    "executorch": (
        "ExecuTorch (XNNPACK)",
        """\
## Python

```python
{python_io}
from executorch.runtime import Runtime
import torch

program_bytes = open("{artifact}", "rb").read()  # keep the bytes alive while the program is used
program = Runtime.get().load_program(program_bytes)
method = program.load_method("forward")
y = method.execute([torch.from_numpy(x)])[0].numpy()
{python_save}```

## Android (Kotlin, `org.pytorch.executorch`)

```kotlin
val module = Module.load(filesDir.resolve("{artifact}").absolutePath)
val input = Tensor.fromBlob(pixels, longArrayOf(1, {c}, {h}, {w}))  // pixels: FloatArray, NCHW, in [0, 1]
val restored = module.forward(EValue.from(input))[0].toTensor().dataAsFloatArray
```

## C++ (`executorch::extension::Module`)

```cpp
Module module("{artifact}");
auto input = from_blob(pixels.data(), {{1, {c}, {h}, {w}}});  // float NCHW in [0, 1]
auto restored = module.forward(input)->at(0).toTensor();
```
""",
    ),
    "openvino": (
        "OpenVINO",
        """\
## Python

Pin the inference precision: on CPUs with bf16 the plugin otherwise runs bf16 silently.

```python
{python_io}
import openvino as ov

compiled = ov.Core().compile_model("{artifact}", "CPU", {{"INFERENCE_PRECISION_HINT": "f32"}})
y = compiled({{"{inp}": x}})["{out}"]
{python_save}```

## C++

```cpp
ov::Core core;
auto compiled = core.compile_model("{artifact}", "CPU", ov::hint::inference_precision(ov::element::f32));
auto request = compiled.create_infer_request();
request.set_tensor("{inp}", ov::Tensor(ov::element::f32, {{1, {c}, {h}, {w}}}, pixels.data()));
request.infer();
const float* restored = request.get_tensor("{out}").data<float>();
```
""",
    ),
    "onnx": (
        "ONNX",
        """\
## Python (onnxruntime)

```python
{python_io}
import onnxruntime as ort

session = ort.InferenceSession("{artifact}", providers=["CPUExecutionProvider"])
y = session.run(["{out}"], {{"{inp}": x}})[0]
{python_save}```
""",
    ),
}


FAILED = """\
> **FAILED its accuracy budget** in validation in its runtime (`manifest.json`, `validation`): {failures}.
> Try next: {advice}.

"""


def budget_advice(manifest: dict[str, Any]) -> str:
    """What to try when the artifact described by ``manifest`` misses its validation budget, as one sentence."""
    precision = manifest["precision"]
    if precision == "fp32":
        return (
            "an fp32 artifact should match the PyTorch reference, so re-run `nafnet-edge validate` on this folder; "
            "if it still fails, the runtime (`runtime` in manifest.json) computes differently: report it with "
            "manifest.json"
        )
    if precision != "int8":
        return "convert with --precision fp32, or accept a looser --max-drift / --min-fidelity"
    quantization = manifest.get("quantization", {})
    tries = []
    if manifest.get("export", {}).get("quantization_mode") == "weights":
        tries.append("W8A8 with QAT (without --weights-only) or --precision fp16 (convert)")
    elif quantization.get("method") == "ptq":
        tries.append("QAT (--method qat)")
    else:
        tries.append(f"longer QAT (--iters {2 * quantization.get('iters', 300)})")
    tries.append("more or more representative --data (images like the ones it will restore, degradation included)")
    search = quantization.get("search", {})
    kept = list(quantization.get("kept_float", []))
    others = [u for u in search.get("sensitivity_db", {}) if u not in kept]
    following = [*kept, *others[: max(1, len(kept))]]
    if others and following not in [r["kept_float"] for r in search.get("rounds", [])]:
        tries.append(f"--keep-float {','.join(following)} (the next most sensitive units)")
    elif kept:
        tries.append(f"either of those with --keep-float {','.join(kept)} (the units this artifact keeps float)")
    else:
        tries.append("--keep-float UNITS (units to leave float; --search-rounds N picks the most sensitive)")
    return "; ".join(tries) + "; or accept a looser --max-drift / --min-fidelity"


def usage_note(target: str, manifest: dict[str, Any]) -> str:
    """The USAGE.md text for an artifact described by ``manifest``; one that missed its validation budget says so
    first, with the failures and what to try."""
    title, body = TARGET_NOTES[target]
    _, c, h, w = manifest["input"]["shape"]
    fields = {
        "title": f"{title}: how to run this artifact",
        "artifact": manifest["files"][0],
        "checkpoint": manifest["source"]["checkpoint"],
        "sha": manifest["source"]["sha256"][:16],
        "arch": manifest["tlc"]["arch"],
        "precision": manifest["precision"],
        "inp": manifest["input"]["name"],
        "out": manifest["output"]["name"],
        "c": c,
        "h": h,
        "w": w,
        "channels": manifest["input"]["channels"],
        "mode": "RGB" if c == 3 else "L",
        "overlap": manifest["tiling"]["overlap_px"],
        "multiple": manifest["padding_multiple"],
    }
    python_io = PYTHON_IO.format(**fields).rstrip("\n")
    python_save = PYTHON_SAVE
    note = COMMON.format(**fields) + "\n" + body.format(**fields, python_io=python_io, python_save=python_save)
    validation = manifest.get("validation")
    if validation is not None and not validation["passed"]:
        note = FAILED.format(failures="; ".join(validation["failures"]), advice=budget_advice(manifest)) + note
    return note
