"""Graph access for qcompile, on top of onnx-ir: loading, saving, shapes and small queries."""

from qcompile.ir.io import load_model, model_nbytes, save_model, to_proto
from qcompile.ir.shapes import infer_shapes, parse_input_shapes, pin_input_shapes

__all__ = [
    "infer_shapes",
    "load_model",
    "model_nbytes",
    "parse_input_shapes",
    "pin_input_shapes",
    "save_model",
    "to_proto",
]
