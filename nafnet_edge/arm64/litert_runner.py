"""The LiteRT runner nafnet-edge starts under emulation with the ARM64 sysroot's Python: a ``.tflite`` in
``ai_edge_litert``'s interpreter (XNNPACK on CPU), as ``nafnet_edge.converters.litert`` runs it on the host.

Usage: ``python3 litert_runner.py MODEL.tflite THREADS [fp16]``. With ``fp16`` (a float16-weight file, as the
host session runs it) the model runs in ``CompiledModel`` with XNNPACK's FP16 inference forced, which ARM64 cores
with the FP16 extension compute natively; where XNNPACK refuses, in the interpreter (float32). Once the model is
ready it writes one JSON line to stdout: the input and output tensors (dtype, shape, bytes) and the arithmetic
that runs (``compute``). Then, until standard input ends, it reads one input
tensor (raw bytes) at a time, invokes the interpreter and writes the output tensor's raw bytes. Everything else
goes to stderr. Standard library, numpy and ai_edge_litert only: it runs in the emulated Python, not in
nafnet-edge's.
"""

import json
import os
import sys


def main() -> int:
    model, threads = sys.argv[1], int(sys.argv[2])
    data = os.fdopen(os.dup(1), "wb")  # the data channel; what the runtime prints goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=model, num_threads=threads)
    interpreter.allocate_tensors()
    source, sink = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

    def describe(detail):
        dtype = np.dtype(detail["dtype"])
        shape = [int(v) for v in detail["shape"]]
        return {"dtype": dtype.name, "shape": shape, "bytes": int(np.prod(shape)) * dtype.itemsize}

    inputs, outputs = describe(source), describe(sink)
    dtype, shape, size = np.dtype(inputs["dtype"]), inputs["shape"], inputs["bytes"]
    out_dtype, out_count = np.dtype(outputs["dtype"]), int(np.prod(outputs["shape"]))

    def interpret(x):
        interpreter.set_tensor(source["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(sink["index"])

    run, compute = interpret, "fp32"
    if len(sys.argv) > 3 and sys.argv[3] == "fp16":
        compute = "fp32 (XNNPACK refused FP16 inference)"
        try:
            run = fp16_runner(model, threads, np.zeros(shape, dtype), out_dtype, out_count)
            compute = "fp16"
        except RuntimeError as e:
            print(f"FP16 inference refused: {e}", file=sys.stderr)
    ready = {
        "input": inputs,
        "output": outputs,
        "compute": compute,
        "cpu_features": None,  # the cpuinfo inside ai-edge-litert cannot be asked
    }
    data.write((json.dumps(ready) + "\n").encode())
    data.flush()
    stdin = sys.stdin.buffer
    while True:
        chunk = stdin.read(size)
        if not chunk:
            return 0
        if len(chunk) != size:
            print("standard input ended inside a tensor", file=sys.stderr)
            return 4
        data.write(np.ascontiguousarray(run(np.frombuffer(chunk, dtype).reshape(shape))).tobytes())
        data.flush()


XNNPACK_FORCE_FP16 = 0x4  # TFLITE_XNNPACK_DELEGATE_FLAG_FORCE_FP16, as nafnet_edge.converters.litert sets it


def fp16_runner(model, threads, zeros, out_dtype, out_count):
    """The model in ``CompiledModel`` on CPU with XNNPACK's FP16 inference forced, run once on ``zeros`` (XNNPACK
    refuses at compilation or at the first run: ``RuntimeError``)."""
    import ai_edge_litert
    import numpy as np
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.environment import Environment, EnvironmentOptions
    from ai_edge_litert.options import CpuOptions, Options

    environment = Environment.create(
        options=EnvironmentOptions(runtime_path=os.path.dirname(os.path.abspath(ai_edge_litert.__file__)))
    )
    options = Options(cpu_options=CpuOptions(num_threads=threads, xnnpack_flags=XNNPACK_FORCE_FP16))
    compiled = CompiledModel.from_file(model, environment=environment, options=options)
    inputs, outputs = compiled.create_input_buffers(0), compiled.create_output_buffers(0)

    def run(x):
        inputs[0].write(x)
        compiled.run_by_index(0, inputs, outputs)
        return np.array(outputs[0].read(out_count, out_dtype), dtype=out_dtype)

    run(zeros)
    run.keep = (environment, compiled, inputs, outputs)
    return run


if __name__ == "__main__":
    sys.exit(main())
