"""Backends: execution and export for ONNX Runtime (and, later, TVM and QONNX)."""
