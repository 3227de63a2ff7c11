"""Evaluate a saved Core ML ML program op by op in numpy, in the program's own precision.

Core ML cannot run on Linux (``MLModel.predict`` needs macOS), so a saved ``.mlpackage`` is validated by
reading its ML program back (``load_program``: the protobuf spec plus the blob weights, rebuilt with
coremltools' own MIL-proto loader, never from PyTorch) and evaluating the ``main`` function here.

Precision model, so that an fp16 program is evaluated as fp16 hardware would compute it:

- every value has the dtype the program declares for it; each op's result is rounded to its declared
  output dtype, and ``cast`` ops (which coremltools inserts around fp16 programs) convert as declared;
- elementwise ops (add, mul, pow, maximum, ...) are numpy ops on the operands' dtype, so fp16 arithmetic
  rounds (and overflows to inf) after every op;
- convolutions, pooling, reductions and the normalization ops (layer_norm, batch_norm) accumulate in
  float32 and round their result once, like Core ML's fp16 GPU and Neural Engine paths, which accumulate
  wider than fp16 (so a sum can exceed 65504 on the way and still give a finite mean);
- transcendental unary ops (sigmoid, rsqrt, gelu in each of its modes) and softmax (its row maximum subtracted
  first) are computed in float32 and rounded once; matmul and bilinear upsampling accumulate in float32 too;
- int8 (iOS 17 linear quantization, what W8A8 and weight-only int8 programs hold): ``quantize`` is
  ``clip(round_half_even(x / scale) + zero_point)`` into the int8 or uint8 range, the quotient formed in the
  input's dtype (fp16 in an fp16 program, as coremltools' own reference ``quantize_by_scale_and_zp`` does);
  ``dequantize`` and the weights' ``constexpr_affine_dequantize`` are ``scale * (q - zero_point)`` computed in
  float32 and rounded once to the declared dtype. ``scale`` and ``zero_point`` are scalars (per tensor) or
  vectors along ``axis`` (per channel); a missing zero point is 0. Core ML's own kernels are not public: a
  value within rounding error of a half step can land one int8 step away from this on a device;
- ``round`` rounds half to even in the operand's dtype (coremltools' own constant folding uses ``np.round``, which
  does the same; the MIL spec says only that 0.5 rounds to 0), so an exact tie can land one level away on a device.

Image-typed I/O (``ct.ImageType``): Core ML binds an image input's 8-bit pixels as float values 0..255 in the
model's colour space (channel order), and everything after that is in the program: coremltools writes the input's
``scale`` and ``bias`` as ``mul`` and ``add`` ops right after the input, so evaluating the program evaluates the
preprocessing too. ``MilProgram.images`` names the image-typed inputs and outputs with their colour space; ``run``
refuses an image input that is not whole pixel values 0..255 with the channels its colour space has.

An op type without an evaluator raises ``NotImplementedError`` naming it before anything is computed, and
every result's shape is checked against the shape the program declares, so an evaluator cannot silently
answer for something it does not implement.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from nafnet_edge.artifact_files import name_problem
from nafnet_edge.errors import ArtifactError

Value = Any  # np.ndarray, a numpy scalar, str or bool (const arguments), or a tuple of arrays (variadic inputs)
Args = dict[str, Value]

DTYPES: dict[str, type] = {
    "fp16": np.float16,
    "fp32": np.float32,
    "fp64": np.float64,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "uint16": np.uint16,
    "int32": np.int32,
    "int64": np.int64,
    "bool": np.bool_,
}


@dataclass(frozen=True)
class MilOp:
    """One non-const operation: argument name -> variable name(s), plus the op-set defaults it leaves out."""

    type: str
    name: str
    inputs: dict[str, str | tuple[str, ...]]
    defaults: dict[str, Value]
    outputs: tuple[str, ...]
    dtypes: tuple[np.dtype, ...]
    shapes: tuple[tuple[int, ...] | None, ...]  # None where the program leaves a dimension symbolic


@dataclass
class MilProgram:
    """The ``main`` function of an ML program: inputs, consts, ops in program order and output names."""

    inputs: dict[str, tuple[tuple[int, ...] | None, np.dtype]]
    consts: dict[str, Value]
    ops: list[MilOp]
    outputs: tuple[str, ...]
    # image-typed inputs and outputs (``ct.ImageType``): name -> colour space (RGB, BGR, GRAYSCALE, ...)
    images: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_pymil(cls, program: Any, function: str = "main") -> MilProgram:
        """Flatten a coremltools ``Program`` (pymil) into plain names and numpy values."""
        from coremltools.converters.mil.mil import types

        def np_dtype(var: Any) -> np.dtype:
            return np.dtype(types.nptype_from_builtin(var.dtype))

        def static_shape(var: Any) -> tuple[int, ...] | None:
            shape = tuple(var.shape)
            return shape if all(isinstance(d, (int, np.integer)) for d in shape) else None

        func = program.functions[function]
        inputs = {name: (static_shape(v), np_dtype(v)) for name, v in func.inputs.items()}
        consts: dict[str, Value] = {}
        ops: list[MilOp] = []
        for op in func.operations:
            if op.op_type == "const":
                consts[op.outputs[0].name] = op.outputs[0].val
                continue
            if op.blocks:
                raise NotImplementedError(f"op {op.op_type!r} ({op.name}): control flow is not supported")
            given = {
                k: tuple(x.name for x in v) if isinstance(v, (list, tuple)) else v.name for k, v in op.inputs.items()
            }
            defaults = {k: v for k, v in op.default_inputs().items() if k not in given and v is not None}
            ops.append(
                MilOp(
                    type=op.op_type,
                    name=op.name,
                    inputs=given,
                    defaults=defaults,
                    outputs=tuple(o.name for o in op.outputs),
                    dtypes=tuple(np_dtype(o) for o in op.outputs),
                    shapes=tuple(static_shape(o) for o in op.outputs),
                )
            )
        return cls(inputs=inputs, consts=consts, ops=ops, outputs=tuple(v.name for v in func.outputs))

    @property
    def op_types(self) -> set[str]:
        return {op.type for op in self.ops}

    def run(self, inputs: Mapping[str, np.ndarray], fetch: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Evaluate the program; inputs are converted to their declared dtype (as Core ML converts a multiarray),
        outputs come back in theirs (float16 for an fp16 program without output casts).

        ``fetch`` names the variables to return (intermediates included); by default the program's outputs.
        """
        missing = sorted(self.op_types - OPS.keys())
        if missing:
            raise NotImplementedError(f"no numpy evaluator for MIL op type(s): {', '.join(missing)}")
        if set(inputs) != set(self.inputs):
            raise ValueError(f"program inputs are {sorted(self.inputs)}, got {sorted(inputs)}")
        env: dict[str, Value] = dict(self.consts)
        for name, (shape, dtype) in self.inputs.items():
            env[name] = np.asarray(inputs[name]).astype(dtype)
            if shape is not None and env[name].shape != shape:
                raise ValueError(f"input {name!r} must have shape {shape}, got {env[name].shape}")
            if name in self.images:
                _check_image(name, self.images[name], env[name])
        with np.errstate(all="ignore"):  # fp16 overflow to inf is part of what is being emulated
            for op in self.ops:
                args = dict(op.defaults)
                for key, ref in op.inputs.items():
                    args[key] = tuple(env[n] for n in ref) if isinstance(ref, tuple) else env[ref]
                result = OPS[op.type](args)
                results = result if isinstance(result, tuple) else (result,)
                for name, value, dtype, shape in zip(op.outputs, results, op.dtypes, op.shapes, strict=True):
                    value = np.asarray(value).astype(dtype, copy=False)
                    if shape is not None and value.shape != shape:
                        raise RuntimeError(f"{op.type} {op.name}: evaluated shape {value.shape}, program says {shape}")
                    env[name] = value
        return {name: env[name] for name in (self.outputs if fetch is None else fetch)}


def load_program(path: str | Path, function: str = "main") -> MilProgram:
    """Read the ML program of a saved ``.mlpackage`` back from its spec and blob weight file (with the colour
    space of its image-typed inputs and outputs, ``MilProgram.images``)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise ArtifactError(f"{path} is not an .mlpackage (no Manifest.json)")
    spec = ct.utils.load_spec(str(path))
    if spec.WhichOneof("Type") != "mlProgram":
        raise ArtifactError(f"{path} holds a {spec.WhichOneof('Type')} model, not an ML program")
    program = load_milproto(spec, spec.specificationVersion, str(_weights_dir(path)))
    loaded = MilProgram.from_pymil(program, function)
    loaded.images = image_features(spec)
    return loaded


def image_features(spec: Any) -> dict[str, str]:
    """Name -> colour space (``ImageFeatureType.ColorSpace`` name) of a model spec's image-typed inputs and
    outputs."""
    from coremltools.proto import FeatureTypes_pb2

    space = FeatureTypes_pb2.ImageFeatureType.ColorSpace
    features = [*spec.description.input, *spec.description.output]
    return {f.name: space.Name(f.type.imageType.colorSpace) for f in features if f.type.HasField("imageType")}


IMAGE_CHANNELS = {"RGB": 3, "BGR": 3, "GRAYSCALE": 1, "GRAYSCALE_FLOAT16": 1}


def _check_image(name: str, color_space: str, x: np.ndarray) -> None:
    """An image input holds what Core ML binds from a pixel buffer: (1, C, H, W) whole values 0..255, C the
    colour space's channels."""
    channels = IMAGE_CHANNELS.get(color_space)
    if channels is None:
        raise NotImplementedError(f"image input {name!r}: colour space {color_space} is not supported")
    if x.ndim != 4 or x.shape[:2] != (1, channels):
        raise ValueError(f"image input {name!r} ({color_space}) must have shape (1, {channels}, H, W), got {x.shape}")
    if not np.all((x >= 0) & (x <= 255) & (x == np.rint(x))):
        raise ValueError(
            f"image input {name!r} takes pixel values: whole numbers 0..255 in {color_space} order, as Core ML binds "
            "an 8-bit image"
        )


def _weights_dir(package: Path) -> Path:
    """The package's weights folder, as its manifest names it (``Data/com.apple.CoreML/weights``)."""
    entries = json.loads((package / "Manifest.json").read_text())["itemInfoEntries"].values()
    paths = [e["path"] for e in entries if e.get("name") == "weights" and e.get("author") == "com.apple.CoreML"]
    path = str(paths[0]) if paths else "com.apple.CoreML/weights"
    problem = name_problem(path)
    if problem:
        raise ArtifactError(f"{package}/Manifest.json names its weights folder badly: {problem}")
    return package / "Data" / path


# --- helpers ---------------------------------------------------------------------------------------------------


def _wide(x: Value) -> np.ndarray:
    """The float32 accumulator for a float operand."""
    return np.asarray(x, dtype=np.float32)


def _ints(v: Value) -> list[int]:
    return [int(i) for i in np.asarray(v).reshape(-1)]


def _pads(a: Args, spatial: tuple[int, ...], kernel: list[int], strides: list[int]) -> list[tuple[int, int]]:
    """(before, after) per spatial dim for conv/pool ``pad_type`` valid, custom, same or same_lower."""
    pad_type = str(a.get("pad_type", "valid"))
    if pad_type == "valid":
        return [(0, 0)] * len(spatial)
    if pad_type == "custom":
        p = _ints(a["pad"])
        return list(zip(p[0::2], p[1::2], strict=True))
    if pad_type in ("same", "same_lower"):
        totals = [max(0, (math.ceil(i / s) - 1) * s + k - i) for i, k, s in zip(spatial, kernel, strides, strict=True)]
        small = [t // 2 for t in totals]
        if pad_type == "same":
            return [(lo, t - lo) for lo, t in zip(small, totals, strict=True)]
        return [(t - lo, lo) for lo, t in zip(small, totals, strict=True)]
    raise NotImplementedError(f"pad_type {pad_type!r}")


def _windows(
    x: np.ndarray, kernel: list[int], strides: list[int], dilations: list[int], pads: list[tuple[int, int]], fill: float
) -> np.ndarray:
    """[N, C, *spatial] -> [N, C, *out, *kernel] view of the (padded) input under every kernel position."""
    x = np.pad(x, [(0, 0), (0, 0), *pads], constant_values=fill)
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    # numpy's stub types ``axis`` as one int; it takes a tuple of axes too (documented)
    w = sliding_window_view(x, span, axis=tuple(range(2, x.ndim)))  # type: ignore[call-overload]
    steps = (*(slice(None, None, s) for s in strides), *(slice(None, None, d) for d in dilations))
    index = (slice(None), slice(None), *steps)
    return w[index]


def _conv_f32(x: np.ndarray, w: np.ndarray, strides: list[int], dilations: list[int], pads, groups: int) -> np.ndarray:
    """Grouped N-d convolution of float32 arrays, accumulated in float32 (no bias)."""
    n, c = x.shape[:2]
    c_out, cg, *kernel = w.shape
    unit = all(s == 1 for s in strides) and all(d == 1 for d in dilations)
    if unit and all(k == 1 for k in kernel) and groups == 1 and not any(any(p) for p in pads):  # 1x1: one matmul
        return np.matmul(w.reshape(c_out, c), x.reshape(n, c, -1)).reshape(n, c_out, *x.shape[2:])
    if unit and groups == c == c_out and x.ndim == 4:  # depthwise: a weighted sum of shifted views
        xp = np.pad(x, [(0, 0), (0, 0), *pads])
        out_h, out_w = xp.shape[2] - kernel[0] + 1, xp.shape[3] - kernel[1] + 1
        out = np.zeros((n, c, out_h, out_w), np.float32)
        for i in range(kernel[0]):
            for j in range(kernel[1]):
                out += w[None, :, 0, i, j, None, None] * xp[:, :, i : i + out_h, j : j + out_w]
        return out
    win = _windows(x, kernel, strides, dilations, pads, 0.0)
    out_sp = win.shape[2 : 2 + len(kernel)]
    p, k = math.prod(out_sp), math.prod(kernel)
    cols = win.reshape(n, groups, cg, p, k).transpose(0, 1, 3, 2, 4).reshape(n, groups, p, cg * k)
    wg = w.reshape(groups, c_out // groups, cg * k).transpose(0, 2, 1)  # [G, Cg*K, Og]
    out = np.matmul(cols, wg)  # [N, G, P, Og]
    return out.transpose(0, 1, 3, 2).reshape(n, c_out, *out_sp)


def _add_bias(y: np.ndarray, bias: Value | None) -> np.ndarray:
    return y if bias is None else y + _wide(bias).reshape(1, -1, *([1] * (y.ndim - 2)))


def _along(v: Value, ndim: int, axis: Value | None) -> np.ndarray:
    """A quantization parameter (scalar, or vector along ``axis``) shaped to broadcast over a rank-``ndim`` tensor."""
    v = np.asarray(v)
    if v.ndim == 0:
        return v
    if axis is None:
        raise ValueError(f"a quantization parameter of shape {v.shape} needs an axis")
    shape = [1] * ndim
    shape[int(axis) % ndim] = v.size
    return v.reshape(shape)


def _axes(a: Args, ndim: int) -> tuple[int, ...]:
    axes = a.get("axes")
    return tuple(range(ndim)) if axes is None else tuple(int(i) % ndim for i in _ints(axes))


# --- op evaluators ---------------------------------------------------------------------------------------------


def _conv(a: Args) -> np.ndarray:
    x, w = _wide(a["x"]), _wide(a["weight"])
    kernel, strides, dilations = list(w.shape[2:]), _ints(a["strides"]), _ints(a["dilations"])
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    pads = _pads(a, x.shape[2:], span, strides)
    return _add_bias(_conv_f32(x, w, strides, dilations, pads, int(a["groups"])), a.get("bias"))


def _conv_transpose(a: Args) -> np.ndarray:
    """The adjoint of conv: zero-stuffed input, full convolution with the flipped kernel, then the crop."""
    x, w = _wide(a["x"]), _wide(a["weight"])  # w: [C_in, C_out/groups, *K]
    groups, strides, dilations = int(a["groups"]), _ints(a["strides"]), _ints(a["dilations"])
    pad_type = str(a.get("pad_type", "valid"))
    if pad_type not in ("valid", "custom"):
        raise NotImplementedError(f"conv_transpose pad_type {pad_type!r}")
    n, c_in, *spatial = x.shape
    og, kernel = w.shape[1], list(w.shape[2:])
    if (
        groups == 1
        and x.ndim == 4
        and strides == kernel
        and dilations == [1, 1]
        and pad_type == "valid"
        and a.get("output_shape") is None
    ):  # non-overlapping (upsampling): out[o, r*i+a, r*j+b] = w[:, o, a, b] x
        y = np.einsum("nihw,ioab->nohawb", x, w, optimize=True)
        return _add_bias(y.reshape(n, og, spatial[0] * kernel[0], spatial[1] * kernel[1]), a.get("bias"))
    up = np.zeros((n, c_in, *[(i - 1) * s + 1 for i, s in zip(spatial, strides, strict=True)]), np.float32)
    dilated = (slice(None), slice(None), *(slice(None, None, s) for s in strides))
    up[dilated] = x
    wc = w.reshape(groups, c_in // groups, og, *kernel).swapaxes(1, 2).reshape(groups * og, c_in // groups, *kernel)
    wc = np.flip(wc, axis=tuple(range(2, wc.ndim)))
    full_pads = [((k - 1) * d, (k - 1) * d) for k, d in zip(kernel, dilations, strict=True)]
    y = _conv_f32(up, np.ascontiguousarray(wc), [1] * len(kernel), dilations, full_pads, groups)
    pads = _pads(a, tuple(spatial), kernel, strides)
    sizes = [f - lo - hi for f, (lo, hi) in zip(y.shape[2:], pads, strict=True)]
    if a.get("output_shape") is not None:
        sizes = _ints(a["output_shape"])[2:]
    extra = [max(0, lo + s - f) for f, (lo, _), s in zip(y.shape[2:], pads, sizes, strict=True)]
    y = np.pad(y, [(0, 0), (0, 0), *((0, e) for e in extra)])
    crop = (slice(None), slice(None), *(slice(lo, lo + s) for (lo, _), s in zip(pads, sizes, strict=True)))
    y = y[crop]
    return _add_bias(y, a.get("bias"))


def _pool(a: Args, average: bool) -> np.ndarray:
    if bool(a.get("ceil_mode", False)):
        raise NotImplementedError("avg_pool/max_pool with ceil_mode=True")
    x = _wide(a["x"])
    kernel, strides = _ints(a["kernel_sizes"]), _ints(a["strides"])
    pads = _pads(a, x.shape[2:], kernel, strides)
    ones = [1] * len(kernel)
    k_axes = tuple(range(-len(kernel), 0))
    if not average:
        return _windows(x, kernel, strides, ones, pads, -np.inf).max(axis=k_axes)
    total = _windows(x, kernel, strides, ones, pads, 0.0).sum(axis=k_axes)
    if bool(a.get("exclude_padding_from_average", False)):
        valid = np.ones((1, 1, *x.shape[2:]), np.float32)
        return total / _windows(valid, kernel, strides, ones, pads, 0.0).sum(axis=k_axes)
    return total / np.float32(math.prod(kernel))


def _quantize(a: Args) -> np.ndarray:
    x, dtype = a["input"], DTYPES[str(a["output_dtype"])]
    q = np.rint(np.divide(x, _along(a["scale"], x.ndim, a.get("axis")).astype(x.dtype)))  # rint: half to even
    if a.get("zero_point") is not None:
        q = q.astype(np.float32) + _along(a["zero_point"], x.ndim, a.get("axis")).astype(np.float32)
    info = np.iinfo(dtype)
    return np.clip(q, info.min, info.max).astype(dtype)


def _dequantize(data: Value, scale: Value, zero_point: Value | None, axis: Value | None) -> np.ndarray:
    q = np.asarray(data, dtype=np.float32)
    if zero_point is not None:
        q = q - _along(zero_point, q.ndim, axis).astype(np.float32)
    return q * _along(scale, q.ndim, axis).astype(np.float32)


def _layer_norm(a: Args) -> np.ndarray:
    x = _wide(a["x"])
    axes = _axes(a, x.ndim)
    mu = x.mean(axis=axes, keepdims=True)
    var = np.square(x - mu).mean(axis=axes, keepdims=True)
    y = (x - mu) / np.sqrt(var + _wide(a["epsilon"]))
    shape = [1] * x.ndim
    for ax in axes:
        shape[ax] = x.shape[ax]
    order = np.argsort(axes)  # gamma/beta follow the order of ``axes``
    for key, combine in (("gamma", np.multiply), ("beta", np.add)):
        if a.get(key) is not None:
            y = combine(y, _wide(a[key]).transpose(order).reshape(shape))
    return y


def _batch_norm(a: Args) -> np.ndarray:
    x = _wide(a["x"])
    c = lambda key, default: _wide(a.get(key, default)).reshape(1, -1, *([1] * (x.ndim - 2)))
    scale = c("gamma", 1.0) / np.sqrt(c("variance", 1.0) + _wide(a["epsilon"]))
    return (x - c("mean", 0.0)) * scale + c("beta", 0.0)


def _pad(a: Args) -> np.ndarray:
    x, p = a["x"], _ints(a["pad"])
    widths = [(0, 0)] * (x.ndim - len(p) // 2) + list(zip(p[0::2], p[1::2], strict=True))
    mode = str(a.get("mode", "constant"))
    if mode == "constant":
        return np.pad(x, widths, constant_values=np.asarray(a.get("constant_val", 0), x.dtype))
    modes: dict[str, Literal["reflect", "edge"]] = {"reflect": "reflect", "replicate": "edge"}
    return np.pad(x, widths, mode=modes[mode])


def _reshape(a: Args) -> np.ndarray:
    x, shape = a["x"], _ints(a["shape"])
    if len(shape) == x.ndim:  # 0 copies the input's dimension
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _split(a: Args) -> tuple[np.ndarray, ...]:
    x, axis = a["x"], int(a["axis"])
    if a.get("split_sizes") is not None:
        return tuple(np.split(x, np.cumsum(_ints(a["split_sizes"]))[:-1], axis=axis))
    return tuple(np.split(x, int(a["num_splits"]), axis=axis))


def _concat(a: Args) -> np.ndarray:
    values, axis = a["values"], int(a["axis"])
    if bool(a.get("interleave", False)):
        stacked = np.stack(values, axis=axis % values[0].ndim + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


def _slice_by_index(a: Args) -> np.ndarray:
    x = a["x"]
    rank = x.ndim

    def flags(key: str) -> list[bool]:
        return [False] * rank if a.get(key) is None else [bool(v) for v in np.asarray(a[key]).reshape(-1)]

    begin, end = _ints(a["begin"]), _ints(a["end"])
    stride = _ints(a["stride"]) if a.get("stride") is not None else [1] * rank
    bmask, emask, squeeze = flags("begin_mask"), flags("end_mask"), flags("squeeze_mask")
    index: list[int | slice] = []
    for i in range(rank):
        if squeeze[i]:
            index.append(begin[i])
        else:
            index.append(slice(None if bmask[i] else begin[i], None if emask[i] else end[i], stride[i]))
    return x[tuple(index)]


def _slice_by_size(a: Args) -> np.ndarray:
    x, begin, size = a["x"], _ints(a["begin"]), _ints(a["size"])
    return x[tuple(slice(b, None if s == -1 else b + s) for b, s in zip(begin, size, strict=True))]


def _pixel_shuffle(a: Args) -> np.ndarray:
    x, r = a["x"], int(a["upscale_factor"])
    n, c, h, w = x.shape
    return x.reshape(n, c // (r * r), r, r, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(n, c // (r * r), h * r, w * r)


def _pixel_unshuffle(a: Args) -> np.ndarray:
    x, r = a["x"], int(a["downscale_factor"])
    n, c, h, w = x.shape
    return x.reshape(n, c, h // r, r, w // r, r).transpose(0, 1, 3, 5, 2, 4).reshape(n, c * r * r, h // r, w // r)


def _squeeze(a: Args) -> np.ndarray:
    x = a["x"]
    return np.squeeze(x) if a.get("axes") is None else np.squeeze(x, axis=_axes(a, x.ndim))


def _reverse(a: Args) -> np.ndarray:
    x = a["x"]
    return np.flip(x, axis=_axes(a, x.ndim))  # no axes: every axis


def _gelu(a: Args) -> np.ndarray:
    """GELU in the op's ``mode``: EXACT (erf, the default), TANH_APPROXIMATION or SIGMOID_APPROXIMATION."""
    from scipy.special import erf  # scipy comes with scikit-image, a core dependency

    x, mode = _wide(a["x"]), str(a.get("mode", "EXACT"))
    if mode == "EXACT":
        return 0.5 * x * (1.0 + erf(x / np.float32(math.sqrt(2.0))))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(np.float32(-1.702) * x))
    raise NotImplementedError(f"no numpy evaluator for MIL gelu mode {mode!r}")


def _matmul(a: Args) -> np.ndarray:
    """Batched matmul (the last two axes), accumulated in float32 and rounded once, like a convolution."""
    x, y = _wide(a["x"]), _wide(a["y"])
    if bool(a.get("transpose_x", False)):
        x = np.swapaxes(x, -1, -2)
    if bool(a.get("transpose_y", False)):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _linear(a: Args) -> np.ndarray:
    """``x @ weight.T + bias`` over the last axis (a constant weight), accumulated in float32 like a matmul."""
    out = np.matmul(_wide(a["x"]), _wide(a["weight"]).T)
    return out if a.get("bias") is None else out + _wide(a["bias"])


def _softmax(a: Args) -> np.ndarray:
    """Softmax along ``axis`` in float32, the maximum subtracted first (as numerically stable kernels do), rounded
    once."""
    x, axis = _wide(a["x"]), int(a.get("axis", -1))
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _upsample_bilinear(a: Args) -> np.ndarray:
    """Bilinear upsampling of the last two axes by the op's scale factors, in float32, rounded once; the grid as
    the MIL spec defines it: ``align_corners`` True maps the corners onto each other, False samples at half-pixel
    centres (``(i + 0.5) * Xin / Xout - 0.5``), clamped to the input."""
    x = _wide(a["x"])
    corners = bool(a.get("align_corners", True))
    out = x
    for axis, key in ((-2, "scale_factor_height"), (-1, "scale_factor_width")):
        n_in = x.shape[axis]
        n_out = int(math.floor(n_in * float(np.asarray(a.get(key, 1)))))
        i = np.arange(n_out, dtype=np.float64)
        spacing = ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0) if corners else n_in / n_out
        grid = np.clip(i * spacing if corners else (i + 0.5) * spacing - 0.5, 0.0, n_in - 1)
        low = np.floor(grid).astype(np.int64)
        high = np.minimum(low + 1, n_in - 1)
        frac = (grid - low).astype(np.float32)
        shape = [1] * out.ndim
        shape[axis] = n_out
        frac = frac.reshape(shape)
        out = np.take(out, low, axis=axis) * (1 - frac) + np.take(out, high, axis=axis) * frac
    return out


def _reduce(fn: Callable[..., np.ndarray]) -> Callable[[Args], np.ndarray]:
    def evaluate(a: Args) -> np.ndarray:
        x = a["x"]
        acc = _wide(x) if np.issubdtype(x.dtype, np.floating) else x
        return fn(acc, axis=_axes(a, x.ndim), keepdims=bool(a.get("keep_dims", False)))

    return evaluate


OPS: dict[str, Callable[[Args], Value]] = {
    "cast": lambda a: a["x"].astype(DTYPES[str(a["dtype"])]),
    "identity": lambda a: a["x"],
    "add": lambda a: np.add(a["x"], a["y"]),
    "sub": lambda a: np.subtract(a["x"], a["y"]),
    "mul": lambda a: np.multiply(a["x"], a["y"]),
    "real_div": lambda a: np.divide(a["x"], a["y"]),
    "pow": lambda a: np.power(a["x"], a["y"]),
    "maximum": lambda a: np.maximum(a["x"], a["y"]),
    "minimum": lambda a: np.minimum(a["x"], a["y"]),
    "sqrt": lambda a: np.sqrt(a["x"]),
    "rsqrt": lambda a: 1.0 / np.sqrt(_wide(a["x"] + a["epsilon"])),
    "relu": lambda a: np.maximum(a["x"], np.zeros((), a["x"].dtype)),
    "sigmoid": lambda a: 1.0 / (1.0 + np.exp(-_wide(a["x"]))),
    "gelu": _gelu,
    "softmax": _softmax,
    "matmul": _matmul,
    "linear": _linear,
    "upsample_bilinear": _upsample_bilinear,
    "clip": lambda a: np.minimum(np.maximum(a["x"], a["alpha"]), a["beta"]),
    "round": lambda a: np.rint(a["x"]),  # half to even, in the operand's dtype
    "reverse": _reverse,
    "conv": _conv,
    "conv_transpose": _conv_transpose,
    "avg_pool": lambda a: _pool(a, average=True),
    "max_pool": lambda a: _pool(a, average=False),
    "reduce_mean": _reduce(np.mean),
    "reduce_sum": _reduce(np.sum),
    "reduce_max": _reduce(np.max),
    "reduce_min": _reduce(np.min),
    "layer_norm": _layer_norm,
    "batch_norm": _batch_norm,
    "pad": _pad,
    "transpose": lambda a: np.transpose(a["x"], _ints(a["perm"])),
    "reshape": _reshape,
    "expand_dims": lambda a: np.expand_dims(a["x"], tuple(_ints(a["axes"]))),
    "squeeze": _squeeze,
    "split": _split,
    "concat": _concat,
    "slice_by_index": _slice_by_index,
    "slice_by_size": _slice_by_size,
    "pixel_shuffle": _pixel_shuffle,
    "pixel_unshuffle": _pixel_unshuffle,
    "quantize": _quantize,
    "dequantize": lambda a: _dequantize(a["input"], a["scale"], a.get("zero_point"), a.get("axis")),
    "constexpr_affine_dequantize": lambda a: _dequantize(a["quantized_data"], a["scale"], a["zero_point"], a["axis"]),
}
