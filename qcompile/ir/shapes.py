"""Shapes: pinning dynamic input dims and shape inference that degrades gracefully.

ORT's `quant_pre_process` dies on some detector graphs ("Incomplete symbolic shape
inference"). We never do: onnx inference runs non-strictly, a failure is logged, and
calibration later fills in the shapes it observes (see `record_observed_shapes`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompile.errors import QCompileError
from qcompile.ir.graph import values_by_name

logger = logging.getLogger(__name__)


def parse_input_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse CLI specs like 'input=1,3,224,224' into {name: dims}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition("=")
        if not sep or not name:
            raise QCompileError(
                f"bad --input-shape '{spec}'",
                hint="write it as NAME=D0,D1,... e.g. input=1,3,224,224",
            )
        try:
            values = tuple(int(d) for d in dims.split(",") if d.strip())
        except ValueError as exc:
            raise QCompileError(
                f"bad --input-shape '{spec}': dims must be integers", tensor=name
            ) from exc
        if not values or any(v <= 0 for v in values):
            raise QCompileError(f"bad --input-shape '{spec}': dims must be positive", tensor=name)
        shapes[name] = values
    return shapes


def pin_input_shapes(model: ir.Model, shapes: Mapping[str, Sequence[int]]) -> None:
    """Replace (dynamic) dims of named graph inputs with fixed sizes."""
    inputs = {v.name: v for v in model.graph.inputs}
    for name, dims in shapes.items():
        value = inputs.get(name)
        if value is None:
            raise QCompileError(
                "no graph input has this name",
                tensor=name,
                hint=f"model inputs are: {', '.join(sorted(inputs))}",
            )
        if value.shape is not None:
            if len(value.shape) != len(dims):
                raise QCompileError(
                    f"input has rank {len(value.shape)} but the pinned shape has rank {len(dims)}",
                    tensor=name,
                )
            for axis, (old, new) in enumerate(zip(value.shape, dims, strict=True)):
                if isinstance(old, int) and old > 0 and old != new:
                    raise QCompileError(
                        f"axis {axis} is fixed to {old} in the model but pinned to {new}",
                        tensor=name,
                    )
        value.shape = ir.Shape(list(dims))


# ops whose outputs are sequences; onnx-ir's inference pass writes them back as tensor types
SEQUENCE_OPS = frozenset(
    {"SequenceEmpty", "SequenceConstruct", "SequenceInsert", "SequenceErase", "SplitToSequence",
     "SequenceMap"}
)  # fmt: skip


def infer_shapes(model: ir.Model) -> bool:
    """Run onnx shape inference in place; return False (and log why) if it failed."""
    try:
        common_passes.ShapeInferencePass(strict_mode=False, data_prop=True)(model)
        _restore_sequence_types(model)
        return True
    except Exception as exc:  # inference failing must not stop compilation
        logger.warning("shape inference failed (%s); shapes will come from calibration", exc)
        return False


def record_observed_shapes(
    model: ir.Model, observed: Mapping[str, tuple[np.dtype, tuple[int, ...]]]
) -> None:
    """Fill missing dtypes seen at run time during calibration.

    Shapes are not pinned from observations: one batch's dims may be dynamic ones.
    """
    values = values_by_name(model.graph)
    for name, (dtype, _shape) in observed.items():
        value = values.get(name)
        if value is None:
            continue
        if value.dtype is None:
            value.dtype = ir.DataType.from_numpy(np.dtype(dtype))


def _restore_sequence_types(model: ir.Model) -> None:
    """Sequence-valued outputs keep a sequence type (the inference pass made them tensors,
    and ONNX Runtime then refuses the model)."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type in SEQUENCE_OPS and node.domain in ("", "ai.onnx"):
            for value in node.outputs:
                if isinstance(value.type, ir.TensorType):
                    value.type = ir.SequenceType(ir.TensorType(value.type.dtype))
                    value.shape = None
