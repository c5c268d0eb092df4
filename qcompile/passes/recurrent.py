"""ONNX's LSTM unrolled over a sequence length known at compile time, for integer-only
pipelines: MatMuls with constant weights, Adds, Sigmoid/Tanh and Muls, which the integer
plan quantizes and lowers like any other (tables for the gates, integer products for the
cell), with the gates' and cell state's ranges calibrated per step.

ONNX writes an LSTM layer as one node whose gates and cell state live inside the kernel:
there is nothing to observe or quantize between them. Written out (ONNX's equations,
gate order i, o, f, c in W, R and B):

    G_t = X_t·Wᵀ + B_w + B_r + H_{t−1}·Rᵀ            (X·Wᵀ + B for all steps at once)
    i, o, f = σ(G_t[i]), σ(G_t[o]), σ(G_t[f]);  g = tanh(G_t[c])
    C_t = f ⊙ C_{t−1} + i ⊙ g;  H_t = o ⊙ tanh(C_t)

with zero initial state (the H·Rᵀ and f ⊙ C terms vanish at the first step), Y the
stacked H_t ([T, D, B, H]), Y_h and Y_c the last ones; reverse directions run t from
T − 1 down. Only what exporters write for inference is covered: default activations, no
peepholes, clip or coupled input/forget gate, no sequence_lens, constant or absent
initial state of zeros, layout 0. Any other LSTM — and one whose sequence length is not
static (pin it with --input-shape) — stays as it is, and the integer plan names it.

Why not ONNX's Scan/Loop with the step as its body: the integer lowering works on the
main graph, and a static unroll gives every step its own calibrated ranges.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.ir.graph import add_initializer, const_array

DEFAULT_ACTIVATIONS = ("Sigmoid", "Tanh", "Tanh")
MAX_STEPS = 512  # longer sequences would write tens of thousands of nodes


def unroll_refusal(node: ir.Node) -> str | None:
    """Why this LSTM is not unrolled (None: it is)."""
    attrs = node.attributes
    directions = 2 if attrs.get_string("direction", "forward") == "bidirectional" else 1
    acts = tuple(attrs.get_strings("activations", list(DEFAULT_ACTIVATIONS * directions)))
    if acts != DEFAULT_ACTIVATIONS * directions:
        return f"activations {list(acts)} (only sigmoid/tanh/tanh are written out)"
    if attrs.get_float("clip", 0.0) or attrs.get_int("input_forget", 0):
        return "clip or input_forget set"
    if attrs.get_int("layout", 0) != 0:
        return "layout 1 (batch first)"
    inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
    x, w, r, b, seq_lens, h0, c0, peep = inputs[:8]
    if seq_lens is not None or peep is not None:
        return "sequence_lens or peepholes given"
    for state in (h0, c0):
        if state is not None and (const_array(state) is None or np.any(const_array(state))):
            return "a nonzero or run-time initial state"
    if (
        const_array(w) is None
        or const_array(r) is None
        or (b is not None and const_array(b) is None)
    ):
        return "weights not constant"
    steps = x.shape[0] if x.shape is not None and len(x.shape) == 3 else None
    if not isinstance(steps, int):
        return "the sequence length is not known at compile time (pin it with --input-shape)"
    if steps > MAX_STEPS:
        return f"{steps} steps (more than {MAX_STEPS} to unroll)"
    return None


class UnrollLSTM(ir.passes.InPlacePass):
    """LSTM → per-step MatMul/Add/Sigmoid/Tanh/Mul (see the module docstring). Only
    integer-only pipelines run it; the QDQ targets keep ORT's LSTM kernel."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, modified = model.graph, False
        for node in [n for n in graph if n.op_type == "LSTM" and n.domain in ("", "ai.onnx")]:
            if unroll_refusal(node) is None:
                _Unroller(graph, node).write()
                modified = True
        return ir.passes.PassResult(model, modified)


class _Unroller:
    def __init__(self, graph: ir.Graph, node: ir.Node) -> None:
        self.graph, self.node = graph, node
        self.base = node.name or "lstm"
        self.made: list[ir.Node] = []
        self._ints: dict[str, ir.Value] = {}
        self.hidden = (
            node.attributes.get_int("hidden_size", 0) or const_array(node.inputs[2]).shape[-1]
        )

    def op(self, op_type: str, inputs: list[ir.Value], **attributes) -> ir.Value:
        step = ir.node(
            op_type, inputs, attributes=attributes, name=f"{self.base}_{op_type}_{len(self.made)}"
        )
        step.outputs[0].name = f"{step.name}_out"
        step.outputs[0].dtype = ir.DataType.FLOAT
        self.made.append(step)
        return step.outputs[0]

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        return add_initializer(self.graph, f"{self.base}_{name}", array)

    def ints(self, name: str, values: list[int]) -> ir.Value:
        if name not in self._ints:
            self._ints[name] = self.const(name, np.asarray(values, np.int64))
        return self._ints[name]

    def write(self) -> None:
        node, h = self.node, self.hidden
        x = node.inputs[0]
        steps = x.shape[0]
        w, r = const_array(node.inputs[1]), const_array(node.inputs[2])
        b = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else None
        direction = node.attributes.get_string("direction", "forward")
        orders = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}
        ys, hs, cs = [], [], []
        for d, reverse in enumerate(orders[direction]):
            bias = np.zeros(4 * h, np.float32) if b is None else b[d, : 4 * h] + b[d, 4 * h :]
            xw = self.op("MatMul", [x, self.const(f"w{d}_t", np.ascontiguousarray(w[d].T))])
            gates_x = self.op("Add", [xw, self.const(f"bias{d}", bias.astype(np.float32))])
            r_t = self.const(f"r{d}_t", np.ascontiguousarray(r[d].T))
            hidden, cell, outputs = None, None, {}
            for t in reversed(range(steps)) if reverse else range(steps):
                hidden, cell = self._step(gates_x, r_t, hidden, cell, t, d)
                outputs[t] = self.op("Unsqueeze", [hidden, self.ints("axis0", [0])])
            ys.append(self.op("Concat", [outputs[t] for t in range(steps)], axis=0))
            hs.append(self.op("Unsqueeze", [hidden, self.ints("axis0", [0])]))
            cs.append(self.op("Unsqueeze", [cell, self.ints("axis0", [0])]))
        stacked = [self.op("Unsqueeze", [y, self.ints("axis1", [1])]) for y in ys]
        results = [
            stacked[0] if len(stacked) == 1 else self.op("Concat", stacked, axis=1),
            hs[0] if len(hs) == 1 else self.op("Concat", hs, axis=0),
            cs[0] if len(cs) == 1 else self.op("Concat", cs, axis=0),
        ]
        self.graph.insert_before(node, self.made)
        for old, new in zip(node.outputs, results, strict=False):
            new.shape = old.shape
            if old.is_graph_output():  # the graph output keeps its name
                name, old.name = old.name, f"{old.name}_lstm"
                new.name = name
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        self.graph.remove(node, safe=True)

    def _step(self, gates_x, r_t, hidden, cell, t: int, d: int):
        h = self.hidden
        step = self.op("Slice", [gates_x, self.ints(f"t{t}", [t]), self.ints(f"t{t + 1}", [t + 1]),
                                 self.ints("axis0", [0])])  # fmt: skip
        gates = self.op("Squeeze", [step, self.ints("axis0", [0])])
        if hidden is not None:
            gates = self.op("Add", [gates, self.op("MatMul", [hidden, r_t])])
        last = self.ints("last_axis", [-1])

        def gate(k: int, activation: str) -> ir.Value:
            part = self.op("Slice", [gates, self.ints(f"g{k}", [k * h]),
                                     self.ints(f"g{k + 1}", [(k + 1) * h]), last])  # fmt: skip
            return self.op(activation, [part])

        i, o, f, g = (gate(k, a) for k, a in enumerate(("Sigmoid", "Sigmoid", "Sigmoid", "Tanh")))
        new_cell = self.op("Mul", [i, g])
        if cell is not None:
            new_cell = self.op("Add", [self.op("Mul", [f, cell]), new_cell])
        return self.op("Mul", [o, self.op("Tanh", [new_cell])]), new_cell
