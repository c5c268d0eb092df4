"""Rewrite passes, one module per family, all built on onnx_ir.passes."""
