"""The FPGA cost model (qcompile/targets/fpga_cost.py, fpga_kernels.py) covers every
integer kernel: MAC layers (attention's two-activation products included) and the
norms, Softmax, lookup tables and requantizing adds, with their divisions and lookups."""

from __future__ import annotations

import builders
from conftest import FAST

import qcompile
from qcompile.targets.fpga_kernels import DIVIDE_STEPS, ISQRT_STEPS

SEQ, DIM, HEADS, FFN = 16, 64, 4, 128  # builders.transformer_block's defaults


def test_cost_model_covers_every_integer_kernel_of_a_transformer_block():
    feeds = [{"input": builders.token_embeddings(4, seed=i)} for i in range(8)]
    report = qcompile.compile(
        builders.transformer_block(), target="fpga", calibration=feeds, **FAST
    ).report
    layers = {layer["node"]: layer for layer in report.fpga_layers}
    assert layers["q_proj"]["macs"] == SEQ * DIM * DIM
    # the output projection reads heads merged by a Reshape of a dynamic shape: its MACs
    # come from the tensor the Reshape moved
    assert layers["out_proj"]["macs"] == SEQ * DIM * DIM
    assert layers["qk_matmul"]["macs"] == SEQ * SEQ * DIM  # two activations, no weights
    assert layers["qk_matmul"]["weights"] == 0
    norm = layers["ln1"]
    # one division per element (by the row's root) and the Newton steps per row
    assert norm["divisions"] == SEQ * DIM + ISQRT_STEPS * SEQ
    assert norm["accumulator_bits"] == 64
    softmax = layers["softmax"]
    scores = HEADS * SEQ * SEQ
    assert softmax["lookups"] == 2 * scores and softmax["divisions"] == scores
    gelu = next(x for x in report.fpga_layers if x["op_type"] == "Gelu")
    assert gelu["lookups"] == SEQ * FFN and gelu["divisions"] == 0
    # the divisions dominate a norm's cycles on the MAC budget's lanes
    lanes = report.fpga_macs_per_cycle
    steps = norm["ops"] + norm["lookups"] + DIVIDE_STEPS * norm["divisions"]
    assert norm["cycles"] == -(-steps // lanes)
    total = sum(x["cycles"] for x in report.fpga_layers)
    assert report.fpga_latency_ms == total / (report.fpga_clock_mhz * 1e3)
    assert total > sum(x["cycles"] for x in report.fpga_layers if x["macs"])
