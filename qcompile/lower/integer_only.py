"""Integer-only lowering (HAWQ-V3): a QDQ graph → integer arithmetic from input to output.

Every op with inputs through DequantizeLinear and output into a QuantizeLinear becomes its
integer form, and the Q/DQ pairs between them disappear: Conv/Gemm/MatMul → ConvInteger/
MatMulInteger with int32 accumulators, bias and dyadic requantization (`numerics/dyadic.py`);
Add/Sub/Mul/Concat rescaled with dyadic multipliers; pools as integer sums with a dyadic
1/n; data movement on integers; single-input elementwise ops as lookup tables.

Only standard ONNX ops are emitted, so stock ONNX Runtime runs the result, and
`backends/reference.py` reproduces it bit for bit. Ops with no integer form stay float
islands (DQ → op → Q); `islands` lists them and the caller decides if they are allowed.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompile.ir.graph import const_array
from qcompile.lower.integer_norms import NORMS
from qcompile.lower.integer_parts import (
    DQ,
    INT_RANGE,
    LUT_OPS,
    MOVEMENT_OPS,
    FloatIsland,
    IntAct,
    IntConst,
    OutQuant,
    Q,
    _activation_bounds,
    _connected,
    _Emitter,
    _evaluate,
    _is_graph_output,
    _is_int32,
    _narrowed,
    _np,
    _quantizer,
    _take_over,
    float_ops_between,
)
from qcompile.lower.integer_reductions import REDUCTIONS, masked_scores, wide_sum
from qcompile.lower.integer_select import constant_movement, movement_parameters, where
from qcompile.lower.integer_upsample import UPSAMPLING
from qcompile.lower.integer_wide import add_wide, wide_accumulator
from qcompile.numerics.dyadic import Dyadic, DyadicRangeError, to_dyadic
from qcompile.profile import standard_op
from qcompile.quantize.log2 import levels, log2_codes, power_table

logger = logging.getLogger(__name__)


class LowerToIntegerOnly(ir.passes.InPlacePass):
    """Replace DQ → op → Q by integer ops wherever an integer form exists.

    Requires: a QDQ graph as InsertQDQ writes it (per-tensor activation parameters,
    constant scales and zero points, int32 biases at scale s_x·s_w), topologically sorted.
    Ensures: FP32 semantics of the QDQ graph up to one integer step at rounding ties
    (requantization rounds half up, QuantizeLinear half to even); `islands` lists the ops
    left in float between quantizers.
    """

    def __init__(self, keep_float: Callable[[str, str], bool] | None = None) -> None:
        """`keep_float(node_name, op_type)`: nodes the user keeps float (`--exclude`)."""
        super().__init__()
        self.keep_float = keep_float
        self.lowered: Counter[str] = Counter()
        self.islands: list[FloatIsland] = []
        self._refused: set[str] = set()
        self._bounds: dict[int, tuple[int, int]] = {}

    # -- reading the QDQ graph -----------------------------------------------------------

    def _int_view(self, value: ir.Value | None) -> IntAct | IntConst | None:
        if value is None:
            return None
        dq = value.producer()
        if dq is None or dq.op_type != DQ or dq.domain not in ("", "ai.onnx"):
            return None
        src = dq.inputs[0]
        scale = const_array(dq.inputs[1])
        zp = const_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
        if scale is None or src.dtype not in (*INT_RANGE, ir.DataType.INT32):
            return None
        zp = np.zeros_like(scale, dtype=np.int64) if zp is None else zp
        if src.const_value is not None:
            axis = dq.attributes.get_int("axis", 1) if scale.ndim == 1 else None
            return IntConst(src, src.const_value.numpy(), scale, zp, axis)
        if scale.ndim != 0 or src.dtype not in INT_RANGE:
            return None  # per-channel activations: not produced by InsertQDQ
        lo, hi = self._bounds.get(id(src), _narrowed(src))
        return IntAct(src, float(scale), int(zp), lo, hi)

    def _out_quant(self, value: ir.Value, graph: ir.Graph) -> OutQuant | None:
        """The quantizer that alone consumes `value` (through a foldable Relu/Clip)."""
        uses = list(value.uses())
        if _is_graph_output(value, graph) or len(uses) != 1:
            return None
        consumer = uses[0].node
        if consumer.op_type in ("Relu", "Clip") and uses[0].idx == 0:
            bounds = _activation_bounds(consumer)
            nxt = list(consumer.outputs[0].uses())
            if bounds is None or len(nxt) != 1 or _is_graph_output(consumer.outputs[0], graph):
                return None
            return _quantizer(nxt[0].node, bounds)
        return _quantizer(consumer)

    # -- the pass ------------------------------------------------------------------------

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        used = {v.name for v in graph.inputs} | set(graph.initializers)
        for node in graph:
            used |= {v.name for v in node.outputs}
        lowerings: dict[str, Callable] = {
            "Conv": self._conv,
            "Gemm": self._gemm,
            "MatMul": self._matmul,
            "Add": self._add,
            "Sub": self._add,
            "Mul": self._mul,
            "Concat": self._concat,
        }
        for name, lower in {**REDUCTIONS, **NORMS}.items():  # pools, norms, Softmax
            lowerings[name] = functools.partial(lower, self)
        for name in MOVEMENT_OPS:
            lowerings[name] = self._movement
        lowerings["Where"] = functools.partial(where, self)
        lowerings.update({k: functools.partial(f, self) for k, f in UPSAMPLING.items()})
        for name in LUT_OPS:
            lowerings.setdefault(name, self._lookup_table)
        modified = False
        constants: dict[tuple, ir.Value] = {}
        for node in list(graph):
            if node.op_type in (Q, DQ) or node.graph is None:
                continue
            if not any(self._int_view(v) or wide_sum(self, v) or masked_scores(self, v)
                       or wide_accumulator(self, v) for v in node.inputs):  # fmt: skip
                emit = _Emitter(graph, node, node.name or node.op_type, used, constants)
                if constant_movement(self, node, emit, graph) is None:  # a quantized constant
                    self.lowered[node.op_type] += 1
                    modified = True
                    continue
                self._refused.add(node.name)  # float in the QDQ graph already: the plan's
                continue  # not fed by quantized tensors: outside the integer region
            standard = standard_op(node.domain, node.op_type) is not None
            lower = lowerings.get(node.op_type) if standard else None
            if self.keep_float and self.keep_float(node.name or "", node.op_type):
                self.islands.append(FloatIsland(node.name, node.op_type, "excluded by option"))
                continue
            emit = _Emitter(graph, node, node.name or node.op_type, used, constants)
            try:
                reason = lower(node, emit, graph) if lower else "no integer form"
            except DyadicRangeError as exc:  # nodes emitted so far are dead: removed below
                reason, modified = f"no dyadic requantization: {exc}", True
            if reason is None:
                self.lowered[node.op_type] += 1
                modified = True
            else:
                self.islands.append(FloatIsland(node.name, node.op_type, reason))
        modified |= self._requantize_pairs(graph, used, constants)
        if modified:
            common_passes.RemoveUnusedNodesPass()(model)
            graph.sort()
        reasons = {i.node: i.reason for i in self.islands}
        self._refused |= set(reasons)
        floating = [n for n in float_ops_between(graph) if n.op_type not in (Q, DQ)]
        group = _connected(floating)  # their Q/DQ neighbours are the shores, not islands
        self.islands = [
            FloatIsland(n.name, n.op_type, reasons.get(n.name, "fed by another float op"), group[i])
            for i, n in enumerate(floating)
        ]
        return ir.passes.PassResult(model, modified)

    def _requantize_pairs(self, graph: ir.Graph, used: set[str], constants: dict) -> bool:
        """DQ → Q left between two integer kernels (a residual sum kept in int32 for an
        integer LayerNorm, then requantized for the next Add) → one dyadic requantization."""
        done = False
        for q in [n for n in graph if n.op_type == Q]:
            dq, out = q.inputs[0].producer(), _quantizer(q)
            if dq is None or dq.op_type != DQ or out is None:
                continue
            x = self._int_view(dq.outputs[0]) or wide_sum(self, dq.outputs[0])
            if not isinstance(x, IntAct):
                continue
            emit = _Emitter(graph, q, q.name or "requantize", used, constants)
            try:
                d = to_dyadic(x.scale / out.scale)
            except DyadicRangeError:
                continue
            y = emit.requantize(emit.centered(x, ir.DataType.INT64, "x"), d, out)
            self._finish(graph, out, y, q.outputs[0].shape)
            self.lowered["requantize"] += 1
            done = True
        return done

    def ensures(self, model: ir.Model) -> None:
        """Nothing float between input Q and output DQ but islands the lowering could not
        avoid: each island group holds an op it refused (with the reason), never only ops
        its own integer kernels left behind (or that the QDQ graph already left float)."""
        caused = {i.group for i in self.islands if i.node in self._refused}
        stray = [i for i in self.islands if i.group not in caused]
        if stray:
            raise RuntimeError(
                f"integer-only lowering left float op {stray[0].node} ({stray[0].op_type}) "
                "between integer kernels with no op it refused"
            )

    def _finish(
        self, graph: ir.Graph, out: OutQuant, value: ir.Value, shape: ir.Shape | None
    ) -> None:
        """`value` (the lowered integers, shaped like the float tensor) replaces the
        quantizer's output."""
        value.shape = shape
        self._bounds[id(value)] = (out.qmin, out.qmax)
        _take_over(graph, out.replace, value)

    # -- lowerings: each returns None when done, or why it could not lower ---------------

    def _conv(self, node: ir.Node, emit: _Emitter, graph: ir.Graph) -> str | None:
        x, w = self._int_view(node.inputs[0]), self._int_view(node.inputs[1])
        bias = self._int_view(node.inputs[2]) if len(node.inputs) > 2 else None
        if not isinstance(x, IntAct) or not isinstance(w, IntConst) or w.axis not in (0, None):
            return "input or weight not quantized per tensor / per output channel"
        if len(node.inputs) > 2 and node.inputs[2] is not None and not _is_int32(bias):
            return "bias not quantized to int32"
        channels = w.array.shape[0]
        bshape = (channels,) + (1,) * (w.array.ndim - 2)
        attrs = {k: v for k, v in node.attributes.items()}
        inputs = [x.value, w.value, emit.const("x_zp", np.asarray(x.zero_point, _np(x.value)))]
        if np.any(w.zero_point != 0):
            inputs.append(emit.const("w_zp", w.zero_point.astype(w.array.dtype)))
        acc = emit.op("ConvInteger", inputs, ir.DataType.INT32, "acc", attrs)
        if bias is not None:
            b = emit.const("bias", bias.array.astype(np.int32).reshape(bshape))
            acc = emit.op("Add", [acc, b], ir.DataType.INT32, "acc_bias")
        return self._close(node, emit, graph, acc, x.scale * w.scale.astype(np.float64), bshape, 1)

    def _gemm(self, node: ir.Node, emit: _Emitter, graph: ir.Graph) -> str | None:
        a = node.attributes
        if (
            a.get_int("transA", 0)
            or a.get_float("alpha", 1.0) != 1
            or a.get_float("beta", 1.0) != 1
        ):
            return "Gemm with transA or alpha/beta != 1"
        return self._linear(node, emit, graph, transpose_b=bool(a.get_int("transB", 0)))

    def _matmul(self, node: ir.Node, emit: _Emitter, graph: ir.Graph) -> str | None:
        if log2_codes(node.inputs[0]) is not None:
            return self._log2_matmul(node, emit, graph)
        return self._linear(node, emit, graph, transpose_b=False)

    def _log2_matmul(self, node: ir.Node, emit: _Emitter, graph: ir.Graph) -> str | None:
        """p̂·V with log2-coded p̂: Σ_k 2^(S−c_k)·(v_k − z) in int32, at scale 2^−S·s_v
        (log2.py): the powers of two come from a lookup table on the codes."""
        codes, bits = log2_codes(node.inputs[0])
        v = self._int_view(node.inputs[1])
        if not isinstance(v, IntAct):
            return "second input not quantized per tensor"
        table = emit.const("log2_powers", power_table(bits))
        index = emit.cast(codes, ir.DataType.INT64, "log2_index")
        powers = emit.op("Gather", [table, index], ir.DataType.INT32, "log2_powers_of_codes")
        centered = emit.centered(v, ir.DataType.INT32, "v")
        acc = emit.op("MatMul", [powers, centered], ir.DataType.INT32, "acc")
        return self._close(node, emit, graph, acc, v.scale * 2.0 ** -(levels(bits) - 1), (), -1)

    def _linear(
        self, node: ir.Node, emit: _Emitter, graph: ir.Graph, *, transpose_b: bool
    ) -> str | None:
        x, w = self._int_view(node.inputs[0]), self._int_view(node.inputs[1])
        bias = self._int_view(node.inputs[2]) if len(node.inputs) > 2 else None
        if not isinstance(x, IntAct) or w is None:
            return "input not quantized per tensor"
        if len(node.inputs) > 2 and node.inputs[2] is not None and not _is_int32(bias):
            return "bias not quantized to int32"
        inputs = [x.value]
        if isinstance(w, IntConst):
            array, scale = w.array, w.scale.astype(np.float64)
            if transpose_b:
                if array.ndim != 2:
                    return "transposed weight of rank != 2"
                array = np.ascontiguousarray(array.T)
            elif scale.ndim == 1 and w.axis not in (array.ndim - 1, -1):
                return "weight quantized per channel on a non-output axis"
            inputs.append(emit.const("weight", array) if transpose_b else w.value)
            w_zp = w.zero_point.astype(array.dtype)
        else:
            if transpose_b:
                return "Gemm with a transposed run-time B"
            inputs.append(w.value)
            scale, w_zp = np.float64(w.scale), np.asarray(w.zero_point, _np(w.value))
        inputs.append(emit.const("a_zp", np.asarray(x.zero_point, _np(x.value))))
        if np.any(w_zp != 0):
            inputs.append(emit.const("b_zp", w_zp))
        acc = emit.op("MatMulInteger", inputs, ir.DataType.INT32, "acc")
        if bias is not None:
            b = emit.const("bias", bias.array.astype(np.int32))
            acc = emit.op("Add", [acc, b], ir.DataType.INT32, "acc_bias")
        return self._close(node, emit, graph, acc, x.scale * scale, (), -1)

    def _close(
        self,
        node: ir.Node,
        emit: _Emitter,
        graph: ir.Graph,
        acc: ir.Value,
        acc_scale: np.ndarray,
        bshape: tuple[int, ...],
        axis: int,
    ) -> None:
        """Requantize an accumulator to the output's integers, or dequantize it once."""
        value = node.outputs[0]
        acc_scale = np.asarray(acc_scale, np.float64)
        shape = bshape if acc_scale.ndim == 1 else ()
        out = self._out_quant(value, graph)
        quantizers = [out] if out is not None else []
        if out is None:  # read by quantizers and float ops alike: serve each its own way
            quantizers = [q for u in value.uses() if (q := _quantizer(u.node)) is not None]
        for q in quantizers:
            y = emit.requantize(acc, to_dyadic(acc_scale / q.scale), q, shape)
            self._finish(graph, q, y, value.shape)
        if value.uses() or _is_graph_output(value, graph):
            # the output stays float: dequantize the accumulator, once
            scale = emit.const("acc_scale", acc_scale.astype(np.float32))
            zp = emit.const("acc_zp", np.zeros(acc_scale.shape, np.int32))
            attrs = {"axis": axis} if acc_scale.ndim == 1 else {}
            y = emit.op(DQ, [acc, scale, zp], ir.DataType.FLOAT, "dequantized", attrs)
            y.shape = value.shape
            _take_over(graph, value, y)
        return None

    def _operands(self, node: ir.Node, emit: _Emitter, wide=False) -> list | str:
        """Both inputs as (centered int64 value, scale); `wide`: int32 sums count too."""
        operands = []
        for i, v in enumerate(node.inputs):
            view = self._int_view(v) or (wide_sum(self, v) if wide else None)
            if isinstance(view, IntAct):
                operands.append((emit.centered(view, ir.DataType.INT64, f"in{i}"), view.scale))
            elif isinstance(view, IntConst) and view.scale.ndim == 0:
                centered = view.array.astype(np.int64) - np.int64(view.zero_point)
                operands.append((emit.const(f"in{i}_centered", centered), float(view.scale)))
            else:
                return f"input {i} not quantized per tensor"
        return operands

    def _add(self, node: ir.Node, emit: _Emitter, graph: ir.Graph) -> str | None:
        if node.op_type == "Add" and any(wide_accumulator(self, v) for v in node.inputs):
            return add_wide(self, node, emit, graph)
        out = self._out_quant(node.outputs[0], graph)
        operands = self._operands(node, emit, wide=out is not None)
        if isinstance(operands, str):
            return operands
        (a, sa), (b, sb) = operands
        if out is None:  # the sum stays float: add in int32 at a common scale, dequantize once
            return self._add_to_float(node, emit, graph, a, sa, b, sb)
        ra, rb = sa / out.scale, sb / out.scale
        # one shift for both terms, as fine as the larger factor allows (its multiplier in
        # [2**29, 2**30)); then a·ma + b·mb, exact in int64 (|a|, |b| < 2**31)
        shift = np.int64(np.clip(30 - np.frexp(max(ra, rb))[1], 1, 61))
        ma, mb = (np.int64(np.rint(r * 2.0 ** int(shift))) for r in (ra, rb))
        I64 = ir.DataType.INT64
        ta = emit.op("Mul", [a, emit.const("ma", ma)], I64, "a_scaled")
        tb = emit.op("Mul", [b, emit.const("mb", mb)], I64, "b_scaled")
        acc = emit.op(node.op_type, [ta, tb], I64, "sum")  # Add or Sub
        y = emit.requantize(acc, Dyadic(np.int64(1), np.asarray(shift, np.int64)), out)
        self._finish(graph, out, y, node.outputs[0].shape)
        return None

    def _add_to_float(
        self,
        node: ir.Node,
        emit: _Emitter,
        graph: ir.Graph,
        a: ir.Value,
        sa: float,
        b: ir.Value,
        sb: float,
    ) -> None:
        """a·sa + b·sb = (a·ma + b·mb) · s with integer ma, mb: a residual sum read by a
        float op (LayerNorm) or returned. ma, mb < 2**22 keep the int32 sum exact for 8-bit
        operands (|a|, |b| <= 255); the relative error of the two factors is below 2**-21."""
        big = max(sa, sb)
        exponent = int(np.frexp(big)[1])
        scale = 2.0 ** (exponent - 22)  # big / scale in [2**21, 2**22)
        ma, mb = (np.int32(np.rint(x / scale)) for x in (sa, sb))
        I32 = ir.DataType.INT32
        ta = emit.op("Mul", [emit.cast(a, I32, "a32"), emit.const("ma", ma)], I32, "a_scaled")
        tb = emit.op("Mul", [emit.cast(b, I32, "b32"), emit.const("mb", mb)], I32, "b_scaled")
        acc = emit.op(node.op_type, [ta, tb], I32, "sum")  # Add or Sub
        bound = 255 * (abs(int(ma)) + abs(int(mb)))  # 8-bit operands, centered
        self._bounds[id(acc)] = (-bound, bound)  # for an integer LayerNorm reading it
        s = emit.const("sum_scale", np.float32(scale))
        y = emit.op(
            DQ, [acc, s, emit.const("sum_zp", np.int32(0))], ir.DataType.FLOAT, "dequantized"
        )
        y.shape = node.outputs[0].shape
        _take_over(graph, node.outputs[0], y)
        return None

    def _mul(self, node: ir.Node, emit: _Emitter, graph: ir.Graph) -> str | None:
        out = self._out_quant(node.outputs[0], graph)
        if out is None:
            return "output not quantized"
        operands = self._operands(node, emit)
        if isinstance(operands, str):
            return operands
        (a, sa), (b, sb) = operands
        acc = emit.op("Mul", [a, b], ir.DataType.INT64, "product")
        y = emit.requantize(acc, to_dyadic(sa * sb / out.scale), out)
        self._finish(graph, out, y, node.outputs[0].shape)
        return None

    def _concat(self, node: ir.Node, emit: _Emitter, graph: ir.Graph) -> str | None:
        out = self._out_quant(node.outputs[0], graph)
        if out is None:
            return "output not quantized"
        views = [self._int_view(v) for v in node.inputs]
        if not all(isinstance(v, IntAct) for v in views):
            return "an input is not a quantized activation"
        parts = [emit.rescaled(v, out, f"in{i}") for i, v in enumerate(views)]
        y = emit.op("Concat", parts, out.dtype, "concat", dict(node.attributes.items()))
        self._finish(graph, out, y, node.outputs[0].shape)
        return None

    def _movement(self, node: ir.Node, emit: _Emitter, graph: ir.Graph) -> str | None:
        x = self._int_view(node.inputs[0])
        if not isinstance(x, IntAct):
            return "data input not a quantized activation"
        if any(self._int_view(v) is not None for v in node.inputs[1:]):
            return "a parameter input is quantized"
        params = movement_parameters(node, x, emit)
        if isinstance(params, str):
            return params
        if node.op_type == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].uses():
            return "MaxPool indices are used"
        outs = [
            self._out_quant(v, graph)
            for v in node.outputs
            if v.uses() or _is_graph_output(v, graph)
        ]
        if not outs or any(o is None for o in outs):
            return "output not quantized"
        clone = ir.node(
            node.op_type,
            [x.value, *params],
            attributes=dict(node.attributes.items()),
            num_outputs=len(node.outputs),
            name=emit._name("int"),
        )
        graph.insert_before(node, clone)
        for old, new in zip(node.outputs, clone.outputs, strict=True):
            new.name, new.dtype, new.shape = emit._name("out"), x.value.dtype, old.shape
            if not (old.uses() or _is_graph_output(old, graph)):
                continue
            out = self._out_quant(old, graph)
            moved = IntAct(new, x.scale, x.zero_point, x.qmin, x.qmax)
            y = emit.rescaled(moved, out, "out")
            self._finish(graph, out, y, old.shape)
        return None

    def _lookup_table(self, node: ir.Node, emit: _Emitter, graph: ir.Graph) -> str | None:
        x = self._int_view(node.inputs[0]) or wide_sum(self, node.inputs[0])
        out = self._out_quant(node.outputs[0], graph)
        if not isinstance(x, IntAct) or out is None or len(node.outputs) != 1:
            return "input or output not quantized"
        extra = node.inputs[1:]
        if any(v is not None and v.const_value is None for v in extra):
            return "a non-constant parameter input"
        # 8-bit codes, or a wide sum's finer codes (integer_wide.py: up to 4096 entries)
        lo, hi = INT_RANGE.get(x.value.dtype, (x.qmin, x.qmax))
        if hi - lo >= 2**16:
            return "input range too wide for a lookup table"
        codes = np.arange(lo, hi + 1, dtype=np.int64)
        real = ((codes - x.zero_point) * np.float32(x.scale)).astype(np.float32)
        try:
            y_real = _evaluate(node, real)
        except Exception as exc:  # the op's own reference implementation refused
            return f"could not tabulate: {exc}"
        q = np.rint(y_real.astype(np.float32) / np.float32(out.scale)) + out.zero_point
        table = np.clip(q, out.qmin, out.qmax).astype(out.dtype.numpy())
        index = emit.cast(x.value, ir.DataType.INT64, "index")
        if lo != 0:
            index = emit.op(
                "Sub", [index, emit.const("first", np.int64(lo))], ir.DataType.INT64, "offset"
            )
        y = emit.op("Gather", [emit.const("table", table), index], out.dtype, "lookup", {"axis": 0})
        self._finish(graph, out, y, node.outputs[0].shape)
        return None


# -- helpers ------------------------------------------------------------------------------
