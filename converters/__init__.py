"""Exporters to Core ML, ExecuTorch, OpenVINO and ONNX, one module per target, and the runners that execute
their artifacts (installed as ``nafnet_edge.converters``)."""
