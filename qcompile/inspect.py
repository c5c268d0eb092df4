"""`qcompile inspect`: what a model holds and what a target would quantize, without running it."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import onnx_ir as ir

from qcompile.data.feeds import input_specs
from qcompile.ir.shapes import infer_shapes
from qcompile.options import CompileOptions
from qcompile.passes.manager import run_phase
from qcompile.quantize.plan import QuantPlan, build_plan
from qcompile.targets import get_target


@dataclass
class Inspection:
    opset: int
    inputs: list[tuple[str, str, str]]  # name, dtype, shape
    outputs: list[tuple[str, str, str]]
    op_counts: dict[str, int]
    plan: QuantPlan
    # node name -> (op type, decision, reason)
    decisions: list[tuple[str, str, str, str]] = field(default_factory=list)


def _shape(value: ir.Value) -> str:
    if value.shape is None:
        return "?"
    return "[" + ", ".join(str(d) for d in value.shape) + "]"


def inspect_model(model: ir.Model, target: str, options: CompileOptions) -> Inspection:
    module = get_target(target)
    pipe = module.pipeline(options)
    infer_shapes(model)
    model, _ = run_phase(model, "rewrite", pipe.rewrite)
    infer_shapes(model)
    plan = build_plan(model, pipe.profile, options)
    specs = {s.name: s for s in input_specs(model)}
    result = Inspection(
        opset=model.opset_imports.get("", 0),
        inputs=[
            (v.name, str(specs[v.name].dtype) if v.name in specs else "?", _shape(v))
            for v in model.graph.inputs
        ],
        outputs=[
            (v.name, str(v.dtype) if v.dtype else "?", _shape(v)) for v in model.graph.outputs
        ],
        op_counts=dict(collections.Counter(n.op_type for n in model.graph)),
        plan=plan,
    )
    for node in model.graph:
        name = node.name or ""
        if name in plan.nodes:
            decision, reason = "quantized", plan.nodes[name]
        elif name in plan.fused_activations:
            decision, reason = "fused", f"into {plan.fused_activations[name]}'s output quantizer"
        elif name in plan.skipped:
            decision, reason = "float", plan.skipped[name]
        elif node.op_type in pipe.profile.passthrough_ops:
            decision, reason = "float", "data movement whose input is not quantized"
        elif node.op_type == "Softmax" and not options.quantize_softmax:
            decision, reason = "float", "Softmax is quantized only with --quantize-softmax"
        else:
            decision, reason = "float", f"no integer kernel for {node.op_type} on {target}"
        result.decisions.append((name, node.op_type, decision, reason))
    return result


def print_inspection(info: Inspection, console) -> None:
    from rich.table import Table

    io = Table(title=f"model (opset {info.opset})")
    for col in ("kind", "name", "dtype", "shape"):
        io.add_column(col)
    for name, dtype, shape in info.inputs:
        io.add_row("input", name, dtype, shape)
    for name, dtype, shape in info.outputs:
        io.add_row("output", name, dtype, shape)
    console.print(io)
    console.print("ops: " + ", ".join(f"{k}×{v}" for k, v in sorted(info.op_counts.items())))
    table = Table(title="quantization decisions")
    for col in ("node", "op", "decision", "why"):
        table.add_column(col)
    for row in info.decisions:
        table.add_row(*row)
    console.print(table)
