"""Weight-only int8 for embedding tables (Gather on a constant matrix).

A BERT's word-embedding table is half its weights; left FP32 the "quantized" model is
barely smaller. Dequantizing the whole table in front of the Gather would cost a full
pass over it per inference, so we gather first and dequantize only the selected rows:

    Gather(table_int8, ids) → Cast → Mul(Unsqueeze(Gather(row_scales, ids), -1))

symmetric int8 with one scale per row (standard ONNX ops, every runtime runs it).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qcompile.calibrate.observers import weight_qparams
from qcompile.ir.graph import add_initializer
from qcompile.numerics.qparams import QuantSpec, quantize

logger = logging.getLogger(__name__)

MIN_TABLE_BYTES = 64 * 1024  # small tables are not worth the extra ops
S8_NARROW = QuantSpec(bits=8, signed=True, symmetric=True, narrow=True)


def _embedding_gathers(model: ir.Model) -> list[ir.Node]:
    found = []
    for node in model.graph:
        if node.op_type != "Gather" or node.attributes.get_int("axis", 0) != 0:
            continue
        table = node.inputs[0].const_value if node.inputs[0] is not None else None
        if table is None or len(table.shape) != 2 or table.dtype != ir.DataType.FLOAT:
            continue
        if table.nbytes >= MIN_TABLE_BYTES:
            found.append(node)
    return found


class QuantizeEmbeddings(ir.passes.InPlacePass):
    """Store large embedding tables as int8 rows with per-row scales."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        gathers = _embedding_gathers(model)
        done: dict[str, tuple[ir.Value, ir.Value]] = {}
        for node in gathers:
            table = node.inputs[0]
            if table.name not in done:
                w = table.const_value.numpy().astype(np.float32)
                qp = weight_qparams(w, S8_NARROW, axis=0)
                done[table.name] = (
                    add_initializer(graph, f"{table.name}_quantized", quantize(w, qp)),
                    add_initializer(graph, f"{table.name}_row_scale", qp.scale.astype(np.float32)),
                )
            q_table, scales = done[table.name]
            ids = node.inputs[1]
            out = node.outputs[0]
            base = node.name or out.name
            gq = ir.node("Gather", [q_table, ids], attributes={"axis": 0}, name=f"{base}_int8")
            cast = ir.node(
                "Cast", [gq.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{base}_cast"
            )
            gs = ir.node("Gather", [scales, ids], attributes={"axis": 0}, name=f"{base}_row_scale")
            axes = add_initializer(graph, f"{base}_unsqueeze_axes", np.array([-1], np.int64))
            unsq = ir.node("Unsqueeze", [gs.outputs[0], axes], name=f"{base}_row_scale_unsqueeze")
            mul = ir.node("Mul", [cast.outputs[0], unsq.outputs[0]], name=f"{base}_dequantize")
            for i, n in enumerate((gq, cast, gs, unsq)):
                n.outputs[0].name = f"{base}_embedding_{i}"
            mul_out = mul.outputs[0]
            mul_out.dtype, mul_out.shape = out.dtype, out.shape
            graph.insert_after(node, [gq, cast, gs, unsq, mul])
            out.replace_all_uses_with(mul_out, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            mul_out.name = out.name
        if gathers:
            logger.info("quantized %d embedding table(s) to int8 rows", len(done))
        return ir.passes.PassResult(model, bool(gathers))
