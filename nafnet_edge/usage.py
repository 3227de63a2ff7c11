"""USAGE.md written next to each artifact: how to load it and call it on its platform, nothing more.

The Python snippets are executed by the test suite against real artifacts (tests/test_convert_pipeline.py);
the Swift, Kotlin and C++ snippets use only the runtimes' documented entry points and the names and shapes
the manifest records.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nafnet_edge.archs import CLASS_NAMES

if TYPE_CHECKING:
    from nafnet_edge.manifest import Manifest

TILING = """\
- Smaller images: zero-pad right and bottom to {h}x{w}, run, crop the output back.
- Larger images: run {h}x{w} tiles overlapping by {overlap} px and blend the overlaps (what `nafnet-edge run
  DIR photo.png -o OUT` does with this folder as DIR); tile starts on multiples of {multiple} follow the
  whole-image result best. `nafnet-edge plan DIR --frame 3024x4032 --json` prints the exact plan for a frame
  size (padding, every tile's origin, the blend weights of each tile row and column) as data to embed in an app;
  `manifest.json` (`tiling`) states the window as a formula.
"""

COMMON = """\
# {title}

`{artifact}` restores one {h}x{w} tile. Source: `{checkpoint}` (sha256 `{sha}`), {arch}, {precision}.

| | name | shape | type | values |
|---|---|---|---|---|
| input | `{inp}` | `[1, {c}, {h}, {w}]` (NCHW) | float32 | {channels} in [0, 1] |
| output | `{out}` | `[1, {c}, {oh}, {ow}]` (NCHW) | float32 | unclamped: clamp to [0, 1], then round |

{geometry}{tiling}- Validation of this file in its runtime is in `manifest.json` (`validation`).
"""

COMMON_IMAGE = """\
# {title}

`{artifact}` restores one {h}x{w} tile of 8-bit pixels. Source: `{checkpoint}` (sha256 `{sha}`), {arch},
{precision}.

| | name | shape | type | values |
|---|---|---|---|---|
| input | `{inp}` | `[1, {h}, {w}, {p}]` (NHWC) | {pixel_type} | {channels} pixels 0..255{alpha_in} |
| output | `{out}` | `[1, {oh}, {ow}, {p}]` (NHWC) | {pixel_type} | {channels} pixels 0..255{alpha_out} |

- The artifact scales by 1/255, restores, clamps, scales by 255 and rounds (half to even) inside: hand it the
  bytes of a pixel buffer and use the bytes it returns. 16-bit and HDR frames need a tensor-I/O artifact
  (`nafnet-edge convert --io tensor`).
{tiling}- Validation of this file in its runtime is in `manifest.json` (`validation`): 8-bit outputs against the fp32
  reference rounded the same way.
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

PYTHON_IO_IMAGE = """\
import numpy as np
from PIL import Image
from nafnet_edge import tile_plan  # the tiling this artifact was validated with, for any photo size

photo = np.atleast_3d(np.asarray(Image.open("photo.png").convert("{mode}")))  # uint8 H x W x {c}
pixels = {to_format}  # the artifact's {channels} byte order
plan = tile_plan(*pixels.shape[:2], tile=({h}, {w}), overlap_px={overlap}, align_px={align})
frame = np.zeros((*plan.padded, {p}), np.uint8)  # zero-padded right and bottom
frame[: pixels.shape[0], : pixels.shape[1]] = pixels
"""

PYTHON_SAVE_IMAGE = """\
restored = np.zeros(frame.shape, np.float32)
for row, top in enumerate(plan.ys):  # every {h}x{w} tile through the artifact, blended with the plan's weights
    for col, left in enumerate(plan.xs):
        x = np.ascontiguousarray(frame[None, top : top + {h}, left : left + {w}])  # uint8 [1, {h}, {w}, {p}]
        weight = np.outer(plan.weights_y[row], plan.weights_x[col])[:, :, None]
        restored[top : top + {h}, left : left + {w}] += run(x)[0] * weight
y = np.rint(restored[: pixels.shape[0], : pixels.shape[1]]).astype(np.uint8)  # crop the padding
Image.fromarray({from_format}.squeeze()).save("restored.png")
"""


# numpy expressions from a PIL photo (RGB or L, uint8 H x W x C) to each pixel format, and from it to the photo
def android_pixel_tiler(kind: str, runtime: str, compiled_note: str) -> str:
    """USAGE.md's opening of an Android image-I/O section: the Kotlin pixel tiler shipped beside the artifact, for
    ``kind`` files ("program", "model") whose default format is ``runtime``'s; ``{pixel_format}`` and ``{p}`` stay
    fields of the template."""
    return f"""\
A whole `Bitmap` of any size: add `NafnetTiler.kt` (in this folder; plain Kotlin) to the app. Its `NafnetPixelTiler`
pads, tiles, runs and blends the {{pixel_format}} bytes exactly as the Python above: nafnet-edge's tests compile it and
check it against that Python byte for byte. The rest of the Kotlin below is {compiled_note}. An ARGB_8888 `Bitmap`
copies out as RGBA bytes, which an `rgba` {kind} (`--pixel-format rgba`, {runtime}'s default) takes as they are; for
another format, put the frame's {{p}} bytes a pixel into a `ByteArray` in its order and call
`tiler.restore(frame, height, width)`.
"""


KOTLIN_RESTORE_BITMAP = """\
fun restore(bitmap: Bitmap): Bitmap {{  // rgba artifacts; ARGB_8888, opaque (the bytes are alpha-premultiplied)
    val bytes = ByteBuffer.allocate(bitmap.byteCount)
    bitmap.copyPixelsToBuffer(bytes)  // RGBA bytes, row by row
    val out = Bitmap.createBitmap(bitmap.width{xs}, bitmap.height{xs}, Bitmap.Config.ARGB_8888)
    out.copyPixelsFromBuffer(tiler.restoreBuffer(bytes, bitmap.height, bitmap.width))  // alpha comes back 255
    return out
}}
```
"""


TO_FORMAT = {
    "rgb": "photo",
    "gray": "photo",
    "bgr": "photo[:, :, ::-1]",
    "rgba": "np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])",
    "bgra": "np.dstack([photo[:, :, ::-1], np.full(photo.shape[:2], 255, np.uint8)])",
}
FROM_FORMAT = {"rgb": "y", "gray": "y", "bgr": "y[:, :, ::-1]", "rgba": "y[:, :, :3]", "bgra": "y[:, :, 2::-1]"}

GENERIC_NOTE = """\
## Running it

Load `{artifact}` in its target's runtime, feed it the input above and read the output; `manifest.json` records
the runtime and settings it was validated with (`runtime`).
"""


def target_note(target: str, io: str = "tensor") -> tuple[str, str]:
    """A target's USAGE.md title and body template (``Target.usage_title``/``usage_body``, or
    ``usage_image_body`` for image I/O when it has one); a target without its own, or a name no longer registered,
    gets a generic note."""
    from nafnet_edge.converters import target_class
    from nafnet_edge.errors import OptionError

    try:
        cls = target_class(target)
    except (OptionError, ImportError, AttributeError):
        return target, GENERIC_NOTE
    body = (getattr(cls, "usage_image_body", "") if io == "image" else "") or cls.usage_body
    return cls.usage_title or target, body or GENERIC_NOTE


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


def geometry_note(scale: int, channels: str) -> str:
    """The lines a super-resolution artifact's note adds: the output scale, and how a stereo pair is packed."""
    lines = ""
    if scale > 1:
        lines += f"- Super-resolution: the output is {scale} times the input's height and width.\n"
    if "+" in channels:
        lines += (
            "- Stereo: one tensor holds the pair, left view's channels first, then the right view's (planar NCHW: "
            "the left image's planes, then the right image's), in and out. Tile both views alike; the views' rows "
            "attend to each other, so full-width tiles keep the most parallax.\n"
        )
    return lines


def scaled_snippets(python_io: str, python_save: str, scale: int) -> tuple[str, str]:
    """The tiling Python for a super-resolution artifact: the plan in input pixels, each output placed at ``scale``
    times its tile's origin, blended with the plan's output-pixel weights, cropped to ``scale`` times the photo."""
    s = str(scale)
    python_io = python_io.replace("align_px={align})", f"align_px={{align}}, scale={s})")
    for old, new in (
        (
            "restored = np.zeros_like(frame)",
            f"restored = np.zeros((frame.shape[0] * {s}, frame.shape[1] * {s}, frame.shape[2]), np.float32)",
        ),
        (
            "restored = np.zeros(frame.shape, np.float32)",
            f"restored = np.zeros((frame.shape[0] * {s}, frame.shape[1] * {s}, frame.shape[2]), np.float32)",
        ),
        (
            "restored[top : top + {h}, left : left + {w}]",
            f"restored[{s} * top : {s} * (top + {{h}}), {s} * left : {s} * (left + {{w}})]",
        ),
        (
            "restored[: pixels.shape[0], : pixels.shape[1]]",
            f"restored[: {s} * pixels.shape[0], : {s} * pixels.shape[1]]",
        ),
    ):
        python_save = python_save.replace(old, new)
    return python_io, python_save


def usage_note(target: str, manifest: Manifest) -> str:
    """The USAGE.md text for an artifact described by ``manifest``; one that missed its validation budget says so
    first, with the failures and what to try."""
    io = manifest.io
    title, body = target_note(target, io.kind)
    c = io.channels
    h, w = io.input_size
    arch = CLASS_NAMES.get(manifest.reference.arch or "nafnet", "NAFNet")
    fields = {
        "title": f"{title}: how to run this artifact",
        "artifact": manifest.files[0],
        "checkpoint": manifest.source.checkpoint,
        "sha": manifest.source.sha256[:16],
        "arch": manifest.tlc.get("arch", arch),
        "precision": manifest.precision,
        "inference_precision": (manifest.export or {}).get("inference_precision", "f32"),  # OpenVINO's hint
        "inp": io.input.name,
        "out": io.output.name,
        "c": c,
        "h": h,
        "w": w,
        "oh": h * io.scale,
        "ow": w * io.scale,
        "geometry": geometry_note(io.scale, io.input.channels),
        "channels": io.input.channels,
        "mode": "RGB" if c == 3 else "L",
        "overlap": manifest.tiling.overlap_px,
        "multiple": manifest.padding_multiple,
        "align": manifest.tiling.align_px,
        "kscale": f", scale = {io.scale}" if io.scale > 1 else "",  # the Kotlin tilers' output scale
        "xs": f" * {io.scale}" if io.scale > 1 else "",  # the restored Bitmap's size
    }
    common, python_io, python_save = COMMON, PYTHON_IO, PYTHON_SAVE
    fmt = io.pixel_format
    if fmt is not None:
        from nafnet_edge.pixels import has_alpha, pixel_channels

        common, python_io, python_save = COMMON_IMAGE, PYTHON_IO_IMAGE, PYTHON_SAVE_IMAGE
        fields.update(
            p=pixel_channels(fmt),
            pixel_type="image" if manifest.target == "coreml" else "uint8",
            alpha_in=", alpha ignored" if has_alpha(fmt) else "",
            alpha_out=", alpha 255" if has_alpha(fmt) else "",
            to_format=TO_FORMAT[fmt],
            from_format=FROM_FORMAT[fmt],
            pixel_format=fmt,
            run_io=f"uint8 [1, {h}, {w}, {pixel_channels(fmt)}] ({fmt}); returns the same",
        )
    else:
        fields.update(p=c, pixel_format="", run_io=f"float32 [1, {c}, {h}, {w}] in [0, 1]; returns it restored")
    fields["tiling"] = TILING.format(**fields)
    if io.scale > 1:
        python_io, python_save = scaled_snippets(python_io, python_save, io.scale)
    python_io = python_io.format(**fields).rstrip("\n")
    python_save = python_save.format(**fields)
    note = common.format(**fields) + "\n" + body.format(**fields, python_io=python_io, python_save=python_save)
    validation = manifest.validation
    if validation is not None and not validation.passed:
        note = FAILED.format(failures="; ".join(validation.failures), advice=budget_advice(manifest)) + note
    return note
