"""The LiteRT runner nafnet-edge starts under emulation with the ARM64 sysroot's Python: a ``.tflite`` in
``ai_edge_litert``'s interpreter (XNNPACK on CPU), as ``nafnet_edge.converters.litert`` runs it on the host.

Usage: ``python3 litert_runner.py MODEL.tflite THREADS``. Once the interpreter is ready it writes one JSON line to
stdout: the input and output tensors (dtype, shape, bytes). Then, until standard input ends, it reads one input
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
    ready = {
        "input": inputs,
        "output": outputs,
        "cpu_features": None,  # the cpuinfo inside ai-edge-litert cannot be asked
    }
    data.write((json.dumps(ready) + "\n").encode())
    data.flush()
    stdin = sys.stdin.buffer
    dtype, shape, size = np.dtype(inputs["dtype"]), inputs["shape"], inputs["bytes"]
    while True:
        chunk = stdin.read(size)
        if not chunk:
            return 0
        if len(chunk) != size:
            print("standard input ended inside a tensor", file=sys.stderr)
            return 4
        interpreter.set_tensor(source["index"], np.frombuffer(chunk, dtype).reshape(shape))
        interpreter.invoke()
        data.write(np.ascontiguousarray(interpreter.get_tensor(sink["index"])).tobytes())
        data.flush()


if __name__ == "__main__":
    sys.exit(main())
