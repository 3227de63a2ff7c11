"""Exporters to Core ML, ExecuTorch, OpenVINO and ONNX, one module per target (installed as
``nafnet_edge.converters``). The targets arrive with issue 4; this package holds no converter yet."""
