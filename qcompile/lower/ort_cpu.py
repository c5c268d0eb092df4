"""QDQ MatMuls with a float output as ONNX Runtime's CPU kernel, bias included.

ORT already turns DequantizeLinear → MatMul (no QuantizeLinear after it) into its
com.microsoft MatMulIntegerToFloat kernel, but its fusion leaves the bias Add of a
Linear layer outside, where the next fusion makes it a BiasGelu (or it runs as an Add
of its own). MatMulIntegerToFloat takes the bias as an input and adds it while the
int32 accumulators are scaled, so writing the kernel ourselves with the bias folded in
saves one pass over the output per layer, and the GELU after an FFN's first layer runs
as ORT's plain Gelu, which is faster than its BiasGelu (benchmarks/SPEED.md has
MiniLM's speed against FP32 and ORT's quantizer).

The rewrite is exact: the kernel computes what ORT's own fusion of the same Q/DQ graph
computes, plus the bias added in float. Other runtimes (TVM, the numpy reference) read
the node back as DequantizeLinear → MatMul → Add (`expand_matmul_integer_to_float`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.ir.graph import add_initializer, const_array

MS_DOMAIN = "com.microsoft"
_INT8 = frozenset({ir.DataType.UINT8, ir.DataType.INT8})


def _dq_inputs(value: ir.Value | None, *, constant: bool) -> list[ir.Value | None] | None:
    """(codes, scale, zero point) of the 8-bit DequantizeLinear producing `value`."""
    dq = value.producer() if value is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
        return None
    codes, scale = dq.inputs[0], dq.inputs[1]
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    if codes is None or codes.dtype not in _INT8 or const_array(scale) is None:
        return None
    if zero is not None and const_array(zero) is None:
        return None
    if constant:  # the weight: 2-D codes, per-tensor or per output column (axis 1)
        w = const_array(codes)
        if w is None or w.ndim != 2:
            return None
        s = const_array(scale)
        axis = dq.attributes.get_int("axis", 1)
        if s.size > 1 and (s.ndim != 1 or axis not in (1, -1) or s.size != w.shape[1]):
            return None
    elif const_array(scale).size != 1:
        return None  # per-tensor activations only
    return [codes, scale, zero]


def _bias_add(graph: ir.Graph, matmul: ir.Node, n_out: int) -> tuple[ir.Node, ir.Value] | None:
    """The Add of a constant [N] bias that is the MatMul output's only use."""
    out = matmul.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out in graph.outputs:
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    other = add.inputs[1 - uses[0].idx]
    bias = const_array(other)
    if bias is None or bias.dtype != np.float32 or bias.ndim != 1 or bias.size != n_out:
        return None
    return add, other


class FuseMatMulIntegerToFloat(ir.passes.InPlacePass):
    """DequantizeLinear(a) · DequantizeLinear(W) [+ bias] → MatMulIntegerToFloat.

    Precondition: a QDQ graph (InsertQDQ's output) for ONNX Runtime's CPU EP.
    Postcondition: every MatMul whose inputs are an 8-bit per-tensor activation DQ and a
    constant 8-bit 2-D weight DQ (per tensor or per output column), and whose output is
    not quantized again, is a MatMulIntegerToFloat under the MatMul's name, with the
    constant bias of a following Add folded in; the DQ nodes left unused are removed by
    the finalize phase."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
                continue
            a = _dq_inputs(node.inputs[0], constant=False)
            w = _dq_inputs(node.inputs[1], constant=True)
            out = node.outputs[0]
            if (
                a is None
                or w is None
                or any(u.node.op_type == "QuantizeLinear" for u in out.uses())
            ):
                continue
            n_out = const_array(w[0]).shape[1]
            fused = _bias_add(graph, node, n_out)
            inputs = [a[0], w[0], a[1], w[1], a[2], w[2]]
            if fused is not None:
                inputs.append(fused[1])
            while inputs[-1] is None:
                inputs.pop()
            kernel = ir.node(
                "MatMulIntegerToFloat", inputs, domain=MS_DOMAIN, name=f"{node.name}_int8"
            )
            graph.insert_before(node, kernel)
            last = fused[0] if fused is not None else node
            result = last.outputs[0]
            kernel.outputs[0].name, result.name = result.name, f"{result.name}_unfused"
            kernel.outputs[0].dtype, kernel.outputs[0].shape = result.dtype, result.shape
            ir.convenience.replace_all_uses_with(
                result, kernel.outputs[0], replace_graph_outputs=True
            )
            if fused is not None:
                graph.remove(fused[0], safe=True)
            graph.remove(node, safe=True)
            # the kernel keeps the MatMul's name: reports and profiles name layers by it
            kernel.name = node.name
            modified = True
        if modified and MS_DOMAIN not in model.opset_imports:
            model.opset_imports[MS_DOMAIN] = 1
        return ir.passes.PassResult(model, modified)


def _dequantize_before(node: ir.Node, codes, scale, zero, suffix: str, axis=None) -> ir.Value:
    inputs = [codes, scale] + ([zero] if zero is not None else [])
    attrs = {"axis": axis} if axis is not None else {}
    dq = ir.node("DequantizeLinear", inputs, attributes=attrs, name=f"{node.name}_{suffix}")
    dq.outputs[0].name, dq.outputs[0].dtype = f"{node.name}_{suffix}_out", ir.DataType.FLOAT
    node.graph.insert_before(node, dq)
    return dq.outputs[0]


def expand_matmul_integer_to_float(model: ir.Model) -> int:
    """MatMulIntegerToFloat back to DequantizeLinear → MatMul → Add, for runtimes that
    read standard ONNX only (TVM's importer, onnx's reference). Returns how many."""
    graph = model.graph
    count = 0
    for node in list(graph):
        if node.op_type != "MatMulIntegerToFloat" or node.domain != MS_DOMAIN:
            continue
        node.name = node.name or f"matmul_integer_to_float_{count}"
        ins = list(node.inputs) + [None] * (7 - len(node.inputs))
        a, w, a_scale, w_scale, a_zero, w_zero, bias = ins
        per_column = const_array(w_scale) is not None and const_array(w_scale).size > 1
        if w_zero is None and per_column:  # DequantizeLinear wants both per-axis or none
            zeros = np.zeros(const_array(w_scale).shape, const_array(w).dtype)
            w_zero = add_initializer(graph, f"{node.name}_w_zero", zeros)
        x = _dequantize_before(node, a, a_scale, a_zero, "dq_a")
        y = _dequantize_before(node, w, w_scale, w_zero, "dq_w", 1 if per_column else None)
        mm = ir.node("MatMul", [x, y], name=f"{node.name}_matmul")
        graph.insert_before(node, mm)
        result = mm.outputs[0]
        if bias is not None:
            result.name = f"{node.name}_nobias"
            add = ir.node("Add", [result, bias], name=f"{node.name}_bias")
            graph.insert_before(node, add)
            result = add.outputs[0]
        out = node.outputs[0]
        result.dtype, result.shape = out.dtype, out.shape
        name, out.name = out.name, f"{out.name}_fused"
        result.name = name
        ir.convenience.replace_all_uses_with(out, result, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        count += 1
    return count
