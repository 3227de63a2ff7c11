"""USAGE.md written next to each artifact: how to load it and call it on its platform, nothing more.

The Python snippets are executed by the test suite against real artifacts (tests/test_convert_pipeline.py);
the Swift, Kotlin and C++ snippets use only the runtimes' documented entry points and the names and shapes
the manifest records.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nafnet_edge.manifest import Manifest

COMMON = """\
# {title}

`{artifact}` restores one {h}x{w} tile. Source: `{checkpoint}` (sha256 `{sha}`), {arch}, {precision}.

| | name | shape | type | values |
|---|---|---|---|---|
| input | `{inp}` | `[1, {c}, {h}, {w}]` (NCHW) | float32 | {channels} in [0, 1] |
| output | `{out}` | `[1, {c}, {h}, {w}]` (NCHW) | float32 | unclamped: clamp to [0, 1], then round |

- Smaller images: zero-pad right and bottom to {h}x{w}, run, crop the output back.
- Larger images: run {h}x{w} tiles overlapping by {overlap} px and blend the overlaps (what `nafnet-edge run
  DIR photo.png -o OUT` does with this folder as DIR); tile starts on multiples of {multiple} follow the
  whole-image result best. `nafnet-edge plan DIR --frame 3024x4032 --json` prints the exact plan for a frame
  size (padding, every tile's origin, the blend weights of each tile row and column) as data to embed in an app;
  `manifest.json` (`tiling`) states the window as a formula.
- Validation of this file in its runtime is in `manifest.json` (`validation`).
"""

PYTHON_IO = """\
import numpy as np
from PIL import Image
from nafnet_edge import tile_plan  # the tiling this artifact was validated with, for any photo size

pixels = np.atleast_3d(np.asarray(Image.open("photo.png").convert("{mode}"), dtype=np.float32) / 255.0)
plan = tile_plan(*pixels.shape[:2], tile=({h}, {w}), overlap_px={overlap}, align_px={align})
frame = np.zeros((*plan.padded, {c}), np.float32)  # zero-padded right and bottom
frame[: pixels.shape[0], : pixels.shape[1]] = pixels
"""

PYTHON_SAVE = """\
restored = np.zeros_like(frame)
for row, top in enumerate(plan.ys):  # every {h}x{w} tile through the artifact, blended with the plan's weights
    for col, left in enumerate(plan.xs):
        x = np.ascontiguousarray(frame[top : top + {h}, left : left + {w}].transpose(2, 0, 1)[None])
        weight = np.outer(plan.weights_y[row], plan.weights_x[col])[:, :, None]
        restored[top : top + {h}, left : left + {w}] += run(x)[0].transpose(1, 2, 0) * weight
y = np.clip(restored[: pixels.shape[0], : pixels.shape[1]], 0.0, 1.0)  # crop the padding, clamp
Image.fromarray((y * 255.0 + 0.5).astype(np.uint8).squeeze()).save("restored.png")
"""

GENERIC_NOTE = """\
## Running it

Load `{artifact}` in its target's runtime, feed it the input above and read the output; `manifest.json` records
the runtime and settings it was validated with (`runtime`).
"""


def target_note(target: str) -> tuple[str, str]:
    """A target's USAGE.md title and body template (``Target.usage_title``/``usage_body``); a target without its
    own, or a name no longer registered, gets a generic note."""
    from nafnet_edge.converters import target_class
    from nafnet_edge.errors import OptionError

    try:
        cls = target_class(target)
    except (OptionError, ImportError, AttributeError):
        return target, GENERIC_NOTE
    return cls.usage_title or target, cls.usage_body or GENERIC_NOTE


FAILED = """\
> **FAILED its accuracy budget** in validation in its runtime (`manifest.json`, `validation`): {failures}.
> Try next: {advice}.

"""


def budget_advice(manifest: Manifest) -> str:
    """What to try when the artifact described by ``manifest`` misses its validation budget, as one sentence."""
    precision = manifest.precision
    if precision == "fp32":
        return (
            "an fp32 artifact should match the PyTorch reference, so re-run `nafnet-edge validate` on this folder; "
            "if it still fails, the runtime (`runtime` in manifest.json) computes differently: report it with "
            "manifest.json"
        )
    if precision != "int8":
        return "convert with --precision fp32, or accept a looser --max-drift / --min-fidelity"
    quantization = manifest.quantization or {}
    tries = []
    if manifest.export.get("quantization_mode") == "weights":
        tries.append("W8A8 with QAT (without --weights-only) or --precision fp16 (convert)")
    elif quantization.get("method") == "ptq":
        tries.append("QAT (--method qat)")
    else:
        tries.append(f"longer QAT (--steps {2 * quantization.get('iters', 300)})")
    tries.append(
        "more or more representative --train-data (images like the ones it will restore, degradation included)"
    )
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


def usage_note(target: str, manifest: Manifest) -> str:
    """The USAGE.md text for an artifact described by ``manifest``; one that missed its validation budget says so
    first, with the failures and what to try."""
    title, body = target_note(target)
    io = manifest.io
    c = io.channels
    h, w = io.input_size
    arch = "NAFNetLocal" if manifest.reference.arch == "nafnet-local" else "NAFNet"
    fields = {
        "title": f"{title}: how to run this artifact",
        "artifact": manifest.files[0],
        "checkpoint": manifest.source.checkpoint,
        "sha": manifest.source.sha256[:16],
        "arch": manifest.tlc.get("arch", arch),
        "precision": manifest.precision,
        "inp": io.input.name,
        "out": io.output.name,
        "c": c,
        "h": h,
        "w": w,
        "channels": io.input.channels,
        "mode": "RGB" if c == 3 else "L",
        "overlap": manifest.tiling.overlap_px,
        "multiple": manifest.padding_multiple,
        "align": manifest.tiling.align_px,
    }
    python_io = PYTHON_IO.format(**fields).rstrip("\n")
    python_save = PYTHON_SAVE.format(**fields)
    note = COMMON.format(**fields) + "\n" + body.format(**fields, python_io=python_io, python_save=python_save)
    validation = manifest.validation
    if validation is not None and not validation.passed:
        note = FAILED.format(failures="; ".join(validation.failures), advice=budget_advice(manifest)) + note
    return note
