"""The numpy evaluator of saved Core ML ML programs (nafnet_edge.converters.coreml_mil).

Whole-model tests convert tiny NAFNets with coremltools, save the .mlpackage, read the program back and
compare its evaluation with PyTorch; op tests build single-op MIL programs and compare with torch.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from helpers import require

ct = require("coremltools")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402
from helpers import randomize  # noqa: E402

from nafnet_edge.converters.coreml_mil import OPS, MilProgram, load_program  # noqa: E402
from nafnet_edge.deploy import deploy  # noqa: E402
from nafnet_edge.images import read_image  # noqa: E402
from nafnet_edge.model import NAFNetConfig, build_model  # noqa: E402

SIZE = 64
CONFIG = NAFNetConfig(width=8, enc_blk_nums=(1, 1), middle_blk_num=1, dec_blk_nums=(1, 1))
ONE_LEVEL = CONFIG.replace(enc_blk_nums=(1,), dec_blk_nums=(1,))  # for the tests that convert a second model
FP32_MAX_ABS = 2e-6  # measured 2.4e-7 to 4.8e-7 (deploy graphs, TLC included, on three Kodak crops)
FP16_MIN_PSNR = 60.0  # measured 69.0 to 71.7 dB


def _export(module: torch.nn.Module, path, precision) -> MilProgram:
    traced = torch.jit.trace(module.eval(), torch.rand(1, 3, SIZE, SIZE), check_trace=False)
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(name="image", shape=(1, 3, SIZE, SIZE))],
        outputs=[ct.TensorType(name="restored")],
        convert_to="mlprogram",
        compute_precision=precision,
        minimum_deployment_target=ct.target.iOS17,
    )
    mlmodel.save(str(path))
    return load_program(path)


def _torch(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    path = Path(str(resources.files("nafnet_edge") / "data" / "kodak" / "kodim23.png"))
    crop = read_image(path).pixels[100 : 100 + SIZE, 200 : 200 + SIZE]
    return np.ascontiguousarray(crop.transpose(2, 0, 1)[None])


@pytest.fixture(scope="module")
def coreml_graph() -> torch.nn.Module:
    return deploy(randomize(build_model(CONFIG)), norm_form="layer-norm", input_size=(SIZE, SIZE))


@pytest.fixture(scope="module")
def fp32_package(coreml_graph, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fp32") / "m.mlpackage"
    _export(coreml_graph, path, ct.precision.FLOAT32)
    return path


@pytest.fixture(scope="module")
def fp32_program(fp32_package) -> MilProgram:
    return load_program(fp32_package)


@pytest.fixture(scope="module")
def fp16_program(coreml_graph, tmp_path_factory) -> MilProgram:
    return _export(coreml_graph, tmp_path_factory.mktemp("fp16") / "m.mlpackage", ct.precision.FLOAT16)


# --- whole models ----------------------------------------------------------------------------------------------


def test_fp32_program_matches_pytorch(fp32_program, coreml_graph, image):
    assert {"conv", "conv_transpose", "layer_norm", "reduce_mean", "transpose"} <= fp32_program.op_types
    out = fp32_program.run({"image": image})["restored"]
    assert out.dtype == np.float32 and out.shape == image.shape
    assert np.abs(out - _torch(coreml_graph, image)).max() <= FP32_MAX_ABS


def test_weights_are_read_from_the_blob_file(fp32_package, tmp_path):
    package = shutil.copytree(fp32_package, tmp_path / "copy.mlpackage")
    (package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").unlink()
    with pytest.raises(RuntimeError, match="weight.bin"):
        load_program(package)


def _widened(program: MilProgram) -> MilProgram:
    """The same program (fp16-rounded weights included) with fp32 arithmetic: every fp16 declared fp32."""
    wide = lambda d: np.dtype(np.float32) if d == np.float16 else d
    f16 = lambda v: getattr(v, "dtype", None) == np.float16
    return MilProgram(
        inputs={k: (shape, wide(d)) for k, (shape, d) in program.inputs.items()},
        consts={k: v.astype(np.float32) if f16(v) else v for k, v in program.consts.items()},
        ops=[dataclasses.replace(op, dtypes=tuple(map(wide, op.dtypes))) for op in program.ops],
        outputs=program.outputs,
    )


def test_fp16_program_is_evaluated_in_fp16(fp16_program, fp32_program, coreml_graph, image):
    assert all(d == np.float16 for op in fp16_program.ops for d in op.dtypes)
    image16 = image.astype(np.float16)  # what the program's fp16 input holds
    out = fp16_program.run({"image": image16})["restored"]
    assert out.dtype == np.float16
    out = out.astype(np.float32)
    assert np.isfinite(out).all()
    assert _psnr(out, _torch(coreml_graph, image)) >= FP16_MIN_PSNR
    assert np.abs(out - fp32_program.run({"image": image})["restored"]).max() > 1e-4
    # The program's weights are PyTorch's rounded to fp16: fp32 arithmetic on them reproduces PyTorch run with
    # fp16-rounded parameters and input (measured 3e-6) ...
    half = copy.deepcopy(coreml_graph)
    with torch.no_grad():
        for p in half.parameters():
            p.copy_(p.half().float())
    wide = _widened(fp16_program).run({"image": image16})["restored"]
    assert np.abs(wide - _torch(half, image16.astype(np.float32))).max() <= 2e-5
    # ... and fp16 arithmetic adds its own rounding on top of that (measured 1.5e-3)
    assert np.abs(out - wide).max() > 5e-4


def test_fp16_overflow_in_upstream_layernorm(tmp_path, image):
    """The upstream LayerNorm form squares (x - mu) in fp16: squares >= 65520 become inf, exactly where fp16
    rounding puts them, and the program still runs to a finite output (d / sqrt(inf) = 0)."""
    model = randomize(build_model(ONE_LEVEL))  # 64x64 needs no padding: the plain model converts as is
    program = _export(model, tmp_path / "plain.mlpackage", ct.precision.FLOAT16)
    pows = [op for op in program.ops if op.type == "pow"]
    assert pows
    names = [op.outputs[0] for op in pows] + [op.inputs["x"] for op in pows] + ["restored"]
    normal = program.run({"image": image}, fetch=names)
    assert not any(np.isinf(normal[op.outputs[0]]).any() for op in pows)
    assert _psnr(normal["restored"].astype(np.float32), _torch(model, image)) >= FP16_MIN_PSNR
    loud = program.run({"image": image * 1000}, fetch=names)
    overflowed = 0
    for op in pows:
        square = loud[op.inputs["x"]].astype(np.float32) ** 2  # exact: an fp16 value squared fits fp32
        np.testing.assert_array_equal(np.isinf(loud[op.outputs[0]]), square >= 65520)
        overflowed += int((square >= 65520).sum())
    assert overflowed > 0
    assert np.isfinite(loud["restored"]).all()


def test_fp16_program_of_the_deploy_graph_is_clean_where_upstream_overflows(tmp_path, image):
    """A model whose residual stream is at trained-model magnitudes (|x| in the hundreds): the upstream form
    overflows fp16 in its squares and misses 45 dB; the deploy graph (explicit squares too, form "generic")
    keeps every intermediate finite and meets 45 dB against fp32 PyTorch."""
    model = randomize(build_model(ONE_LEVEL))
    with torch.no_grad():  # intro, beta, gamma x 400; ending / 400: same share of the stream per block
        for name, p in model.named_parameters():
            if name.startswith("intro.") or name.endswith(("beta", "gamma")):
                p.mul_(400.0)
        model.ending.weight.div_(400.0)
    ref = _torch(model, image)
    plain = _export(model, tmp_path / "plain.mlpackage", ct.precision.FLOAT16)
    squares = [op.outputs[0] for op in plain.ops if op.type == "pow"]
    out = plain.run({"image": image}, fetch=[*squares, "restored"])
    assert any(np.isinf(out[name]).any() for name in squares)
    assert _psnr(np.clip(out["restored"].astype(np.float32), 0, 1), ref.clip(0, 1)) < 45.0
    graph = deploy(model, norm_form="reference", input_size=(SIZE, SIZE))
    program = _export(graph, tmp_path / "deploy.mlpackage", ct.precision.FLOAT16)
    every = [name for op in program.ops for name in op.outputs]
    values = program.run({"image": image}, fetch=every)
    assert all(np.isfinite(v).all() for v in values.values())
    assert _psnr(np.clip(values[program.outputs[0]].astype(np.float32), 0, 1), ref.clip(0, 1)) >= 45.0


def test_tlc_local_pooling_program(tmp_path, image):
    # train_size 32x24 -> TLC kernels 48x36 and 24x18: smaller than both feature maps of a 64x64 input
    model = randomize(build_model(ONE_LEVEL.replace(arch="nafnet-local", train_size=(32, 24))))
    graph = deploy(model, norm_form="layer-norm", input_size=(SIZE, SIZE))
    program = _export(graph, tmp_path / "tlc.mlpackage", ct.precision.FLOAT32)
    assert {"avg_pool", "linear", "concat"} <= program.op_types  # separable box mean, edge copies concatenated
    out = program.run({"image": image})["restored"]
    assert np.abs(out - _torch(graph, image)).max() <= FP32_MAX_ABS
    assert np.abs(out - _torch(model, image)).max() <= FP32_MAX_ABS  # and the original NAFNetLocal


def test_unknown_op_raises_naming_it(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4))], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.cumsum(x=mb.relu(x=x), axis=1)

    mlmodel = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17)
    mlmodel.save(str(tmp_path / "u.mlpackage"))
    program = load_program(tmp_path / "u.mlpackage")
    assert "cumsum" in program.op_types and "cumsum" not in OPS
    with pytest.raises(NotImplementedError, match="cumsum"):
        program.run({"x": np.ones((1, 4), np.float32)})


def test_not_an_mlpackage(tmp_path):
    with pytest.raises(ValueError, match="not an .mlpackage"):
        load_program(tmp_path)


# --- single ops ------------------------------------------------------------------------------------------------

_rng = np.random.default_rng(0)
W_CONV = _rng.standard_normal((6, 2, 3, 3)).astype(np.float32)  # 4 in, 6 out, groups 2
W_DECONV = _rng.standard_normal((4, 3, 3, 3)).astype(np.float32)  # 4 in, 6 out, groups 2
BIAS = _rng.standard_normal(6).astype(np.float32)
GAMMA, BETA = _rng.standard_normal(5).astype(np.float32), _rng.standard_normal(5).astype(np.float32)
MEAN, VAR = _rng.standard_normal(4).astype(np.float32), _rng.random(4).astype(np.float32) + 0.5
T = torch.from_numpy
Q_SCALE = np.array([0.01, 0.02, 0.05], np.float32)  # per channel of axis 1 (3 channels)
Q_ZERO = np.array([0, -3, 5], np.int8)
Q_DATA = _rng.integers(-128, 128, (4, 3, 2)).astype(np.int8)


def _interleave(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.empty((a.shape[0], 2 * a.shape[1], *a.shape[2:]), a.dtype)
    out[:, 0::2], out[:, 1::2] = a, b
    return out


# (id, input shapes, MIL builder, reference on numpy inputs); inputs are standard normal float32
W_LINEAR = np.random.default_rng(11).standard_normal((5, 4)).astype(np.float32)

OP_CASES = [
    (
        "conv-same-stride2",
        [(1, 4, 9, 10)],
        lambda x: mb.conv(x=x, weight=W_CONV, bias=BIAS, strides=[2, 2], pad_type="same", groups=2),
        lambda x: F.conv2d(F.pad(T(x), (0, 1, 1, 1)), T(W_CONV), T(BIAS), stride=2, groups=2),
    ),
    (
        "conv-custom-dilated",
        [(1, 4, 9, 10)],
        lambda x: mb.conv(x=x, weight=W_CONV, pad_type="custom", pad=[1, 2, 0, 3], dilations=[2, 1], groups=2),
        lambda x: F.conv2d(F.pad(T(x), (0, 3, 1, 2)), T(W_CONV), dilation=(2, 1), groups=2),
    ),
    (
        "conv-same_lower",
        [(1, 4, 8, 8)],
        lambda x: mb.conv(x=x, weight=W_CONV[:, :, :2, :2].copy(), pad_type="same_lower", groups=2),
        lambda x: F.conv2d(F.pad(T(x), (1, 0, 1, 0)), T(W_CONV[:, :, :2, :2].copy()), groups=2),
    ),
    (
        "conv_transpose-output_shape",
        [(1, 4, 5, 6)],
        lambda x: mb.conv_transpose(
            x=x,
            weight=W_DECONV,
            bias=BIAS,
            pad_type="custom",
            pad=[1, 1, 1, 1],
            strides=[2, 2],
            groups=2,
            output_shape=[1, 6, 10, 12],
        ),
        lambda x: F.conv_transpose2d(T(x), T(W_DECONV), T(BIAS), stride=2, padding=1, output_padding=1, groups=2),
    ),
    (
        "conv_transpose-dilated",
        [(1, 4, 5, 6)],
        lambda x: mb.conv_transpose(x=x, weight=W_DECONV, strides=[1, 2], dilations=[2, 1], groups=2),
        lambda x: F.conv_transpose2d(T(x), T(W_DECONV), stride=(1, 2), dilation=(2, 1), groups=2),
    ),
    (
        "avg_pool-include-pad",
        [(1, 3, 7, 9)],
        lambda x: mb.avg_pool(x=x, kernel_sizes=[3, 2], strides=[2, 1], pad_type="custom", pad=[1, 1, 1, 1]),
        lambda x: F.avg_pool2d(T(x), (3, 2), stride=(2, 1), padding=1, count_include_pad=True),
    ),
    (
        "avg_pool-exclude-pad",
        [(1, 3, 7, 9)],
        lambda x: mb.avg_pool(
            x=x,
            kernel_sizes=[3, 3],
            strides=[1, 2],
            pad_type="custom",
            pad=[1, 1, 1, 1],
            exclude_padding_from_average=True,
        ),
        lambda x: F.avg_pool2d(T(x), 3, stride=(1, 2), padding=1, count_include_pad=False),
    ),
    (
        "max_pool",
        [(1, 3, 7, 9)],
        lambda x: mb.max_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1]),
        lambda x: F.max_pool2d(T(x), 3, stride=2, padding=1),
    ),
    (
        "pad-constant",
        [(1, 2, 4, 5)],
        lambda x: mb.pad(x=x, pad=[1, 2, 3, 0], mode="constant", constant_val=0.5),
        lambda x: F.pad(T(x), (3, 0, 1, 2), value=0.5),
    ),
    (
        "pad-reflect",
        [(1, 2, 4, 5)],
        lambda x: mb.pad(x=x, pad=[1, 2, 3, 0], mode="reflect"),
        lambda x: F.pad(T(x), (3, 0, 1, 2), mode="reflect"),
    ),
    (
        "pad-replicate",
        [(1, 2, 4, 5)],
        lambda x: mb.pad(x=x, pad=[1, 2, 3, 0], mode="replicate"),
        lambda x: F.pad(T(x), (3, 0, 1, 2), mode="replicate"),
    ),
    (
        "pixel_shuffle",
        [(1, 8, 3, 4)],
        lambda x: mb.pixel_shuffle(x=x, upscale_factor=2),
        lambda x: F.pixel_shuffle(T(x), 2),
    ),
    (
        "pixel_unshuffle",
        [(1, 2, 4, 6)],
        lambda x: mb.pixel_unshuffle(x=x, downscale_factor=np.uint32(2)),
        lambda x: F.pixel_unshuffle(T(x), 2),
    ),
    (
        "layer_norm-affine",
        [(1, 3, 4, 5)],
        lambda x: mb.layer_norm(x=x, axes=[-1], gamma=GAMMA, beta=BETA, epsilon=1e-3),
        lambda x: F.layer_norm(T(x), (5,), T(GAMMA), T(BETA), eps=1e-3),
    ),
    (
        "layer_norm-3-axes",
        [(2, 3, 4, 5)],
        lambda x: mb.layer_norm(x=x, axes=[1, 2, 3]),
        lambda x: F.layer_norm(T(x), (3, 4, 5), eps=1e-5),
    ),
    (
        "batch_norm",
        [(1, 4, 3, 5)],
        lambda x: mb.batch_norm(x=x, mean=MEAN, variance=VAR, gamma=GAMMA[:4], beta=BETA[:4], epsilon=1e-3),
        lambda x: F.batch_norm(T(x), T(MEAN), T(VAR), T(GAMMA[:4]), T(BETA[:4]), eps=1e-3),
    ),
    (
        "reduce_mean-sum-max-min",
        [(2, 3, 4, 5)],
        lambda x: (
            mb.reduce_mean(x=x, axes=[2, 3], keep_dims=True),
            mb.reduce_sum(x=x, axes=[1, -1]),
            mb.reduce_max(x=x, axes=[0], keep_dims=True),
            mb.reduce_min(x=x),
        ),
        lambda x: (x.mean((2, 3), keepdims=True), x.sum((1, 3)), x.max(0, keepdims=True), x.min()),
    ),
    (
        "elementwise-binary",
        [(2, 3), (1, 3)],
        lambda x, y: (
            mb.add(x=x, y=y),
            mb.sub(x=x, y=y),
            mb.mul(x=x, y=y),
            mb.real_div(x=x, y=y),
            mb.maximum(x=x, y=y),
            mb.minimum(x=x, y=y),
            mb.pow(x=mb.add(x=mb.mul(x=x, y=x), y=0.1), y=np.float32(1.5)),
        ),
        lambda x, y: (x + y, x - y, x * y, x / y, np.maximum(x, y), np.minimum(x, y), (x * x + 0.1) ** 1.5),
    ),
    (
        "elementwise-unary",
        [(2, 7)],
        lambda x: (
            mb.relu(x=x),
            mb.sigmoid(x=x),
            mb.clip(x=x, alpha=-0.2, beta=0.3),
            mb.sqrt(x=mb.mul(x=x, y=x)),
            mb.rsqrt(x=mb.mul(x=x, y=x), epsilon=1e-3),
            mb.identity(x=x),
            mb.cast(x=mb.cast(x=x, dtype="fp16"), dtype="fp32"),
        ),
        lambda x: (
            np.maximum(x, 0),
            torch.sigmoid(T(x)),
            np.clip(x, -0.2, 0.3),
            np.abs(x),
            1 / np.sqrt(x * x + 1e-3),
            x,
            x.astype(np.float16).astype(np.float32),
        ),
    ),
    (
        "shape-ops",
        [(2, 4, 3)],
        lambda x: (
            mb.transpose(x=x, perm=[2, 0, 1]),
            mb.reshape(x=x, shape=[0, -1, 6]),
            mb.squeeze(x=mb.expand_dims(x=x, axes=[0, -1]), axes=[0]),
            mb.squeeze(x=mb.slice_by_size(x=x, begin=[1, 0, 0], size=[1, -1, 2])),
        ),
        lambda x: (x.transpose(2, 0, 1), x.reshape(2, 2, 6), x[..., None], x[1, :, :2]),
    ),
    (
        "slice-split-concat",
        [(2, 5, 6, 4)],
        lambda x: (
            mb.slice_by_index(
                x=x,
                begin=[0, 1, 0, 2],
                end=[1, 4, 5, -1],
                stride=[1, 2, 1, 1],
                begin_mask=[False, False, True, False],
                end_mask=[False, False, True, False],
                squeeze_mask=[True, False, False, False],
            ),
            *mb.split(x=x, split_sizes=[1, 4], axis=1),
            mb.concat(values=mb.split(x=x, num_splits=2, axis=2), axis=1, interleave=True),
        ),
        lambda x: (x[0, 1:4:2, :, 2:-1], x[:, :1], x[:, 1:], _interleave(x[:, :, :3], x[:, :, 3:])),
    ),
    (
        "quantize-dequantize-per-tensor-uint8",
        [(1, 3, 4, 5)],
        lambda x: (
            q := mb.quantize(input=x, scale=np.float32(0.02), zero_point=np.uint8(128), output_dtype="uint8"),
            mb.dequantize(input=q, scale=np.float32(0.02), zero_point=np.uint8(128)),
        ),
        lambda x: (q := np.clip(np.rint(x / np.float32(0.02)) + 128, 0, 255), (q - 128) * np.float32(0.02)),
    ),
    (
        "quantize-dequantize-per-channel-int8",
        [(1, 3, 4, 5)],
        lambda x: (
            q := mb.quantize(input=x, scale=Q_SCALE, axis=1, output_dtype="int8"),
            mb.dequantize(input=q, scale=Q_SCALE, zero_point=Q_ZERO, axis=1),
        ),
        lambda x: (
            q := np.clip(np.rint(x / Q_SCALE[:, None, None]), -128, 127),
            (q - Q_ZERO[:, None, None]) * Q_SCALE[:, None, None],
        ),
    ),
    (
        "round",
        [(2, 3, 4)],
        lambda x: mb.round(x=mb.mul(x=x, y=np.float32(3.0))),
        lambda x: torch.round(T(x) * 3.0),
    ),
    ("reverse", [(1, 3, 4, 5)], lambda x: mb.reverse(x=x, axes=[1, -1]), lambda x: np.flip(x, (1, 3))),
    ("reverse-all-axes", [(2, 3, 4)], lambda x: mb.reverse(x=x), lambda x: np.flip(x)),
    (
        "constexpr_affine_dequantize",
        [(4, 3, 2)],
        lambda x: mb.add(
            x=x, y=mb.constexpr_affine_dequantize(quantized_data=Q_DATA, zero_point=Q_ZERO, scale=Q_SCALE, axis=1)
        ),
        lambda x: x + (Q_DATA.astype(np.float32) - Q_ZERO[:, None]) * Q_SCALE[:, None],
    ),
    ("gelu-exact", [(2, 3, 4)], lambda x: mb.gelu(x=x, mode="EXACT"), lambda x: F.gelu(T(x))),
    (
        "gelu-tanh",
        [(2, 3, 4)],
        lambda x: mb.gelu(x=x, mode="TANH_APPROXIMATION"),
        lambda x: F.gelu(T(x), approximate="tanh"),
    ),
    ("softmax", [(2, 3, 5)], lambda x: mb.softmax(x=x, axis=-1), lambda x: torch.softmax(T(x), dim=-1)),
    (
        "matmul-transposed",
        [(2, 3, 4), (2, 5, 4)],
        lambda x, y: mb.matmul(x=x, y=y, transpose_y=True),
        lambda x, y: torch.matmul(T(x), T(y).transpose(1, 2)),
    ),
    (
        "linear",
        [(2, 3, 4)],
        lambda x: mb.linear(x=x, weight=W_LINEAR, bias=BIAS[:5]),
        lambda x: F.linear(T(x), T(W_LINEAR), T(BIAS[:5])),
    ),
    (
        "upsample_bilinear-half-pixel",
        [(1, 2, 3, 5)],
        lambda x: mb.upsample_bilinear(x=x, scale_factor_height=2.0, scale_factor_width=2.0, align_corners=False),
        lambda x: F.interpolate(T(x), scale_factor=2, mode="bilinear", align_corners=False),
    ),
]


def _program(shapes, builder, dtype=types.fp32) -> MilProgram:
    specs = [mb.TensorSpec(shape=s, dtype=dtype) for s in shapes]
    names = ["x", "y"][: len(shapes)]
    fn = (lambda x: builder(x)) if len(shapes) == 1 else (lambda x, y: builder(x, y))
    prog = mb.program(input_specs=specs, opset_version=ct.target.iOS17)(fn)
    program = MilProgram.from_pymil(prog)
    assert list(program.inputs) == names
    return program


@pytest.mark.parametrize(("shapes", "builder", "reference"), [c[1:] for c in OP_CASES], ids=[c[0] for c in OP_CASES])
def test_op_matches_reference(shapes, builder, reference):
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    program = _program(shapes, builder)
    outs = list(program.run(dict(zip(program.inputs, xs, strict=True))).values())
    refs = reference(*xs)
    refs = refs if isinstance(refs, tuple) else (refs,)
    assert len(outs) == len(refs)
    for out, ref in zip(outs, refs, strict=True):
        ref = ref.numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_every_op_of_the_cases_is_covered():
    covered = set().union(*(_program(c[1], c[2]).op_types for c in OP_CASES))
    assert covered == set(OPS)


@pytest.mark.parametrize("dtype", [types.fp32, types.fp16], ids=["fp32", "fp16"])
def test_round_is_half_to_even(dtype):
    """Ties round to the even neighbour (as torch.round and coremltools' constant folding), in the operand's dtype."""
    program = _program([(8,)], lambda x: mb.round(x=x), dtype=dtype)
    ties = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 254.5, 255.5], np.float32)
    (out,) = program.run({"x": ties}).values()
    assert out.dtype == (np.float16 if dtype == types.fp16 else np.float32)
    assert out.tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 254.0, 256.0]


def test_fp16_arithmetic():
    """Elementwise ops round (and overflow) in fp16; reductions and convs accumulate in fp32, round once."""
    program = _program(
        [(1, 128, 1, 1)],
        lambda x: (
            mb.mul(x=x, y=x),
            mb.add(x=x, y=np.float16(1.0)),
            mb.reduce_sum(x=x, axes=[1]),
            mb.reduce_mean(x=x, axes=[1]),
            mb.conv(x=x, weight=np.ones((1, 128, 1, 1), np.float16)),
        ),
        dtype=types.fp16,
    )
    square, plus_one, total, mean, conv = program.run({"x": np.full((1, 128, 1, 1), 2048.0)}).values()
    assert square.dtype == np.float16 and np.isinf(square).all()  # 2048^2 > 65504
    assert (plus_one == 2048).all()  # 2049 is not an fp16 number: rounds back to 2048
    assert np.isinf(total).all() and np.isinf(conv).all()  # 262144 overflows fp16 once rounded
    assert (mean == 2048).all()  # but the fp32 accumulator did not overflow on the way


def test_quantize_rounds_half_to_even_saturates_and_matches_coremltools_reference():
    """Ties go to the even integer, out-of-range values clip to the dtype's range, and an fp16 program forms the
    quotient in fp16, exactly as coremltools' own reference (``quantize_by_scale_and_zp``) computes the op."""
    from coremltools.optimize._utils import dequantize_by_scale_and_zp, quantize_by_scale_and_zp

    scale = np.float32(0.5)
    ties = np.array([[0.25, 0.75, 1.25, -0.25, -0.75, 100.0, -100.0]], np.float32)  # x / scale: .5, 1.5, 2.5 ...
    program = _program([ties.shape], lambda x: mb.quantize(input=x, scale=scale, output_dtype="int8"))
    (q,) = program.run({"x": ties}).values()
    assert q.dtype == np.int8 and q.tolist() == [[0, 2, 2, 0, -2, 127, -128]]

    rng = np.random.default_rng(2)
    x = (rng.standard_normal((1, 3, 8, 8)) * 4).astype(np.float16)
    scale16, zero = np.array([0.013, 0.029, 0.031], np.float16), np.array([128, 120, 140], np.uint8)
    program = _program(
        [x.shape],
        lambda v: (
            q := mb.quantize(input=v, scale=scale16, zero_point=zero, axis=1, output_dtype="uint8"),
            mb.dequantize(input=q, scale=scale16, zero_point=zero, axis=1),
        ),
        dtype=types.fp16,
    )
    q, y = program.run({"x": x}).values()
    expected = quantize_by_scale_and_zp(x, scale16[:, None, None], zero[:, None, None], "uint8")
    np.testing.assert_array_equal(q, expected)
    np.testing.assert_array_equal(y, dequantize_by_scale_and_zp(expected, scale16, zero, axis=1))
    assert y.dtype == np.float16
