"""Static dims that onnx's shape inference loses, recovered; shape reads of them folded.

Exporters compute sizes at run time even where they are constants of the architecture:
DeBERTa's attention divides its scores by √(head size) read as
Sqrt(Cast(Slice(Shape(q)))); HF EfficientNet pads its stem by a pads tensor built from
ConstantOfShape/Concat/Reshape (which onnxscript's folder leaves), after which onnx's
inference loses every spatial size down to the pooler. In an integer-only graph a Div by
such a value is a Div of codes (no integer form), and a pool whose windows differ in
size needs the map size at compile time.

ONNX Runtime's symbolic shape inference (`onnxruntime.tools.symbolic_shape_infer`, which
its quantization pre-processing and transformer optimizer use) tracks these dims and
finds the static ones; its integer dims are merged into values whose dims onnx left
unknown. `Slice(Shape(x))` with constant bounds becomes `Shape(x, start, end)`
(onnxscript's folder folds a Shape whose sliced dims are static, not a Slice of one), a
Gather of static dims by a scalar index becomes its constant, and constants are folded
again. Integer-only pipelines run it; a symbolic-inference failure
only means nothing is merged. A wrong merged dim would show in the compile's own check
of output shapes and SQNR against FP32 on real runs.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qcompile.ir.graph import add_initializer, const_array
from qcompile.passes.canonicalize import FoldConstants

logger = logging.getLogger(__name__)


def _symbolic_dims(model: ir.Model) -> dict[str, list[int | None]]:
    """Each value's dims as ORT's symbolic inference sees them (int where static)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        inferred = SymbolicShapeInference.infer_shapes(
            ir.to_proto(model), auto_merge=True, guess_output_rank=False
        )
    except Exception as exc:  # its failure leaves the shapes as onnx inferred them
        logger.info("symbolic shape inference failed (%s); shape reads stay", exc)
        return {}
    dims: dict[str, list[int | None]] = {}
    for info in inferred.graph.value_info:
        shape = info.type.tensor_type.shape if info.type.HasField("tensor_type") else None
        if shape is not None and info.type.tensor_type.HasField("shape"):
            dims[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    return dims


def _merge_static_dims(model: ir.Model) -> bool:
    """Give values the integer dims symbolic inference found where onnx's are unknown."""
    values = [v for node in model.graph for v in node.outputs]
    if all(v.shape is not None and v.shape.is_static() for v in values):
        return False
    symbolic, merged = _symbolic_dims(model), False
    for value in values:
        found = symbolic.get(value.name)
        if found is None or value.shape is None or len(found) != len(value.shape):
            continue
        dims = [
            d if isinstance(d, int) or s is None else s
            for d, s in zip(value.shape, found, strict=True)
        ]
        if dims != list(value.shape):
            value.shape = ir.Shape(dims)
            merged = True
    return merged


def _slice_bounds(node: ir.Node) -> tuple[int, int] | None:
    """(start, end) of a Slice over axis 0 with step 1 and constant bounds, else None."""
    given = list(node.inputs[1:]) + [None] * (5 - len(node.inputs))
    starts, ends, axes, steps = (const_array(v) if v is not None else None for v in given)
    if any(a is None or a.size != 1 for a in (starts, ends)):
        return None
    if given[2] is not None and (
        axes is None or axes.size != 1 or int(axes.flat[0]) not in (0, -1)
    ):
        return None  # a shape is 1-D: axis 0 or −1
    if given[3] is not None and (steps is None or steps.size != 1 or int(steps.flat[0]) != 1):
        return None
    return int(starts.flat[0]), int(np.clip(ends.flat[0], -(2**62), 2**62))


def _slices_of_shapes_as_shape_ranges(model: ir.Model) -> bool:
    """Slice(Shape(x), s, e) → Shape(x, start=s, end=e): the same values (Shape's start/end
    clamp like Slice's), in the form onnxscript's constant folder reads."""
    if model.opset_imports.get("", 0) < 15:  # Shape has start/end from opset 15
        return False
    changed = False
    for node in list(model.graph):
        if node.op_type != "Slice" or len(node.inputs) < 3 or node.outputs[0].is_graph_output():
            continue
        source = node.inputs[0].producer()
        if source is None or source.op_type != "Shape" or source.attributes:
            continue
        bounds = _slice_bounds(node)
        if bounds is None:
            continue
        ranged = ir.node(
            "Shape",
            [source.inputs[0]],
            attributes={"start": bounds[0], "end": bounds[1]},
            name=f"{node.name}_shape",
        )
        out = ranged.outputs[0]
        out.name, out.dtype = f"{node.outputs[0].name}_ranged", ir.DataType.INT64
        model.graph.insert_before(node, ranged)
        ir.convenience.replace_all_uses_with(node.outputs[0], out)
        model.graph.remove(node, safe=True)
        changed = True
    return changed


def _gathered_static_dims(model: ir.Model) -> bool:
    """Gather(Shape(x), constant indices) of static dims → that constant (onnxscript's
    folder takes 1-D indices only; torch writes a scalar index: MobileViT's patch grid
    ceil(H / 2)·2 is Gather(Shape(x), 2) → Cast → Div → Ceil → Mul)."""
    changed = False
    for node in list(model.graph):
        source = node.inputs[0].producer() if node.op_type == "Gather" else None
        if source is None or source.op_type != "Shape" or node.attributes.get_int("axis", 0):
            continue
        shape, indices = source.inputs[0].shape, const_array(node.inputs[1])
        if shape is None or indices is None or node.outputs[0].is_graph_output():
            continue
        start = source.attributes.get_int("start", 0)
        end = source.attributes.get_int("end", len(shape))
        dims = list(shape)[start:end]
        picked = [dims[int(i)] for i in indices.ravel() if -len(dims) <= int(i) < len(dims)]
        if len(picked) != indices.size or not all(isinstance(d, int) for d in picked):
            continue
        value = np.asarray(picked, np.int64).reshape(indices.shape)
        name = f"{node.outputs[0].name}_static"
        ir.convenience.replace_all_uses_with(
            node.outputs[0], add_initializer(model.graph, name, value)
        )
        model.graph.remove(node, safe=True)
        changed = True
    return changed


class FoldStaticShapeReads(ir.passes.InPlacePass):
    """Static dims onnx's inference lost are merged in, and shape reads of static dims
    become constants (see the module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        merged = _merge_static_dims(model)
        sliced = _slices_of_shapes_as_shape_ranges(model)
        gathered = _gathered_static_dims(model)
        rewritten = merged or sliced or gathered
        folded = FoldConstants()(model).modified if rewritten else False
        return ir.passes.PassResult(model, rewritten or folded)
