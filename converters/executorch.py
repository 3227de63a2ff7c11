"""ExecuTorch with the XNNPACK delegate: one fp32 ``.pte`` for one fixed input size, optionally a bundled program.

The deploy graph (``nafnet_edge.deploy`` with ``target="xnnpack"``) lowers into a single XNNPACK partition;
``Exported.info`` counts the partitions and lists any compute op left on ExecuTorch's portable kernels, so a
regression in delegation shows up in the manifest. The runner executes the ``.pte`` in ExecuTorch's own
runtime (pybindings), never in PyTorch.

With ``ExportOptions.bundle``, ``model.bpte`` is written next to ``model.pte``: the same program plus the test
inputs and their expected outputs, which an app loads with ExecuTorch's bundled-program API to verify the
file on the device (``verify_result_with_bundled_expected_output``, with a tolerance the app chooses:
XNNPACK's fp32 kernels differ from PyTorch by about 1e-6, so the runtime's default ``atol=1e-8`` is too tight).

int8 programs come from ``nafnet_edge.quantization``; this converter exports fp32 only.
"""

from __future__ import annotations

import importlib.metadata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from nafnet_edge.converters.base import Converter, Exported, ExportOptions, LoadedRunner
from nafnet_edge.errors import ArtifactError, MissingBackendError, OptionError

BACKEND = "XnnpackBackend"
METHOD = "forward"
BUNDLE = "model.bpte"

# call_function nodes that compute nothing at run time: tuple access, memory planning, views
NO_OP_NODES = frozenset(
    {
        "getitem",
        "alloc",
        "aten.view_copy.default",
        "aten.alias_copy.default",
        "aten.squeeze_copy.dims",
        "aten.unsqueeze_copy.default",
    }
)


def _node_name(node: torch.fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def delegation_summary(graph_module: torch.fx.GraphModule) -> tuple[list[str], dict[str, int]]:
    """The backend of each delegated partition, and the compute ops left outside any delegate (name -> count)."""
    backends: list[str] = []
    outside: Counter[str] = Counter()
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = _node_name(node)
        if name == "executorch_call_delegate":
            lowered = getattr(graph_module, node.args[0].target)
            backends.append(str(getattr(lowered, "backend_id", "unknown")))
        elif name not in NO_OP_NODES:
            outside[name] += 1
    return backends, dict(sorted(outside.items()))


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A float32 copy with canonical strides: ExecuTorch rejects the zero stride numpy gives a ``[None]`` axis."""
    return torch.from_numpy(np.array(a, dtype=np.float32, order="C"))


class ExecuTorchConverter(Converter):
    target: ClassVar[str] = "executorch"
    deploy_target: ClassVar[str] = "xnnpack"
    artifact: ClassVar[str] = "model.pte"
    precisions = ("fp32",)
    modules: ClassVar[tuple[str, ...]] = ("executorch",)
    extra: ClassVar[str] = "executorch"
    file_kind: ClassVar[str] = "ExecuTorch program"

    def check_options(self, options: ExportOptions) -> None:
        super().check_options(options)
        if options.dynamic or options.extra_sizes:
            raise OptionError(
                f"--target {self.target} exports one fixed size per .pte ({options.input_size[0]}x"
                f"{options.input_size[1]}); drop --dynamic/--sizes and tile larger images, or export one "
                ".pte per size"
            )
        if options.bundle:  # test inputs may still be missing here: the pipeline adds them after this check
            if options.test_outputs and len(options.test_outputs) != len(options.test_inputs):
                raise ValueError(
                    f"{len(options.test_inputs)} bundled test inputs but {len(options.test_outputs)} expected "
                    "outputs; give one output per input"
                )
            for a in (*options.test_inputs, *options.test_outputs):
                if a.ndim != 4 or a.shape[0] != 1 or tuple(a.shape[2:]) != tuple(options.input_size):
                    raise ValueError(
                        f"bundled test arrays must be (1, C, {options.input_size[0]}, {options.input_size[1]}) "
                        f"at the input size; got {a.shape}: pad or crop them to it"
                    )

    def export(self, graph: torch.nn.Module, out_dir: Path, options: ExportOptions) -> Exported:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        self.check_options(options)
        if options.bundle and not options.test_inputs:
            raise OptionError(
                "a bundled program (--bundle) needs test inputs to carry and none were given: keep validation on "
                "(the first validation image becomes the test case) or drop --bundle"
            )
        example = torch.zeros(1, graph.intro.in_channels, *options.input_size)  # type: ignore[union-attr]
        with torch.no_grad():
            exported = torch.export.export(graph, (example,))
        edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
        backends, outside = delegation_summary(edge.exported_program().graph_module)
        program = edge.to_executorch()
        buffer = program.buffer
        (out_dir / self.artifact).write_bytes(buffer)
        files = [self.artifact]
        info: dict[str, Any] = {
            "executorch_version": importlib.metadata.version("executorch"),
            "delegate": BACKEND,
            "delegated_partitions": len(backends),
            "delegate_backends": sorted(set(backends)),
            "ops_outside_delegate": outside,
            "program_bytes": len(buffer),
        }
        if options.bundle:
            bundle = self._bundle(program, graph, options)
            (out_dir / BUNDLE).write_bytes(bundle)
            files.append(BUNDLE)
            info["bundle"] = BUNDLE
            info["bundled_test_cases"] = len(options.test_inputs)
            info["bundle_bytes"] = len(bundle)
        return Exported(files=files, info=info)

    @staticmethod
    def _bundle(program: Any, graph: torch.nn.Module, options: ExportOptions) -> bytes:
        """The program with its test cases; expected outputs are ``options.test_outputs`` or, when none are
        given, the deploy graph's own outputs for the test inputs."""
        from executorch.devtools.bundled_program.config import MethodTestCase, MethodTestSuite
        from executorch.devtools.bundled_program.core import BundledProgram
        from executorch.devtools.bundled_program.serialize import serialize_from_bundled_program_to_flatbuffer

        inputs = [_tensor(a) for a in options.test_inputs]
        if options.test_outputs:
            expected = [_tensor(a) for a in options.test_outputs]
        else:
            with torch.no_grad():
                expected = [graph(x).contiguous() for x in inputs]
        cases = [MethodTestCase(inputs=(x,), expected_outputs=(y,)) for x, y in zip(inputs, expected, strict=True)]
        bundled = BundledProgram(program, [MethodTestSuite(method_name=METHOD, test_cases=cases)])
        return serialize_from_bundled_program_to_flatbuffer(bundled)

    def load_runner(self, out_dir: Path, manifest: dict[str, Any]) -> LoadedRunner:
        from executorch.runtime import Runtime

        runtime = Runtime.get()
        if not runtime.backend_registry.is_available(BACKEND):
            raise MissingBackendError(
                f"this ExecuTorch runtime has no {BACKEND} (registered: "
                f"{', '.join(runtime.backend_registry.registered_backend_names)}); "
                f"pip install 'nafnet-edge[{self.extra}]'"
            )
        path = self.artifact_path(out_dir)
        buffer = path.read_bytes()
        with self.loading(path):
            program = runtime.load_program(buffer)
            method = program.load_method(METHOD)
        if method is None:
            raise ArtifactError(f"{path} has no {METHOD!r} method; convert again")
        run = _ProgramRunner(buffer, program, method, tuple(method.metadata.input_tensor_meta(0).sizes()))
        info: dict[str, Any] = {"runtime": "executorch", "backend": BACKEND}
        threads = _threadpool_size()
        if threads is not None:
            info["threads"] = threads
        return LoadedRunner(run=run, info=info)


@dataclass(frozen=True)
class _ProgramRunner:
    """Runs the loaded method; holds the program bytes, which the runtime reads but does not own."""

    buffer: bytes
    program: Any
    method: Any
    input_shape: tuple[int, ...]

    def __call__(self, a: np.ndarray) -> np.ndarray:
        if tuple(a.shape) != self.input_shape:
            raise ValueError(
                f"the .pte takes input {self.input_shape}, got {tuple(a.shape)}: zero-pad to the input size and "
                "crop back, or tile larger images"
            )
        return self.method.execute([_tensor(a)])[0].numpy().astype(np.float32, copy=True)


def _threadpool_size() -> int | None:
    """Threads of ExecuTorch's shared threadpool (used by XNNPACK), where the pybindings expose it."""
    try:
        from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count
    except ImportError:
        return None
    return int(_threadpool_get_thread_count())
