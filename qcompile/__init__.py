"""qcompile: an ONNX graph-level quantization compiler."""

from qcompile.api import CompileResult, build_tvm, compile, export_qonnx, make_options
from qcompile.errors import QCompileError
from qcompile.options import CompileOptions, NodeMatcher, NodeOverride

__version__ = "0.1.0"

__all__ = [
    "CompileOptions",
    "CompileResult",
    "NodeMatcher",
    "NodeOverride",
    "QCompileError",
    "build_tvm",
    "compile",
    "export_qonnx",
    "make_options",
]
