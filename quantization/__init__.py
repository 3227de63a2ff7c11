"""INT8 quantization per target (installed as ``nafnet_edge.quantization``). The quantizers arrive with
issue 5; this package holds no quantizer yet."""
