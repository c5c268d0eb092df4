"""Mixed precision: the ILP, the switchable sensitivity session, and budgets end to end."""

from __future__ import annotations

import itertools

import builders
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import qcompile
from qcompile.errors import QCompileError
from qcompile.strategies import mixed
from qcompile.targets.cpu import PROFILE as CPU_PROFILE
from tests.conftest import FAST, compile_cli


def _layers(rng: np.random.Generator, n: int, k: int) -> list[mixed.LayerOptions]:
    return [
        mixed.LayerOptions(
            f"l{i}",
            "Conv",
            [
                mixed.Candidate(f"c{j}", float(rng.uniform(1, 10)), float(rng.uniform(0, 1e-3)))
                for j in range(k)
            ],
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("seed", range(5))
def test_ilp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    layers = _layers(rng, 6, 3)
    budget = float(
        np.median(
            [
                sum(c.nsr for c in combo)
                for combo in itertools.product(*[layer.candidates for layer in layers])
            ]
        )
    )
    best = None
    for combo in itertools.product(*[layer.candidates for layer in layers]):
        if sum(c.nsr for c in combo) <= budget:
            cost = sum(c.cost for c in combo)
            best = cost if best is None else min(best, cost)
    choice = mixed.solve(layers, nsr_budget=budget)
    cost, nsr = mixed.totals(layers, choice)
    assert nsr <= budget * (1 + 1e-9)
    assert cost == pytest.approx(best, rel=1e-6)
    # the reverse problem: least noise within a cost budget
    choice = mixed.solve(layers, cost_budget=cost)
    assert mixed.totals(layers, choice)[0] <= cost * (1 + 1e-9)


def _feeds(n: int = 12, size: int = 32, seed: int = 0) -> list[dict]:
    return [{"input": builders.images(8, size, seed=seed * 100 + i)} for i in range(n)]


def test_switch_session_measures_each_layer_alone_and_noise_adds_up():
    feeds = _feeds()
    base = qcompile.compile(builders.cnn(size=32), calibration=feeds, **FAST)
    layers = [w.node for w in base.plan.weights]
    spec = CPU_PROFILE.weight
    model, flags = mixed.switch_model(
        base.fp32_model, base.plan, base.qparams, {n: [("int8", spec)] for n in layers}
    )
    nsr = mixed.sensitivities(model, flags, feeds[:3])
    assert set(nsr) == {(n, "int8") for n in layers}
    assert all(0 < v < 1e-2 for v in nsr.values())
    # all switches on at once: roughly the sum of the parts (independent noise powers add)
    sess = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    off = {f: np.array(False) for f in flags.values()}
    on = {f: np.array(True) for f in flags.values()}
    ref = [sess.run(None, {**f, **off})[0] for f in feeds[:3]]
    got = [sess.run(None, {**f, **on})[0] for f in feeds[:3]]
    total = sum(np.sum((a - b) ** 2) for a, b in zip(ref, got, strict=True)) / sum(
        np.sum(a**2) for a in ref
    )
    assert 0.3 < total / sum(nsr.values()) < 3.0


def test_sensitivity_weighs_each_concatenated_branch_alike():
    # boxes (hundreds of pixels) and sigmoid scores concatenated into one output: pooled,
    # the score layer's noise vanished beside the boxes' signal (a detector's scores lost
    # their precision while the search kept box layers float)
    from tests.test_compile import _detector_head

    rng = np.random.default_rng(1)
    feeds = [{"x": rng.normal(0, 1, (8, 16, 8)).astype(np.float32)} for _ in range(4)]
    base = qcompile.compile(_detector_head(), calibration=feeds, **FAST)
    specs = {n: [("int8", CPU_PROFILE.weight)] for n in ("box", "cls")}
    model, flags = mixed.switch_model(base.fp32_model, base.plan, base.qparams, specs)
    nsr = mixed.sensitivities(model, flags, feeds)
    sess = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    off = {f: np.array(False) for f in flags.values()}
    ref = [sess.run(None, {**f, **off})[0] for f in feeds]
    got = [sess.run(None, {**f, **off, flags[("cls", "int8")]: np.array(True)})[0] for f in feeds]
    pooled = sum(np.sum((a - b) ** 2) for a, b in zip(ref, got, strict=True)) / sum(
        np.sum(a**2) for a in ref
    )
    scores = sum(np.sum((a[:, 4:] - b[:, 4:]) ** 2) for a, b in zip(ref, got, strict=True))
    own = scores / sum(np.sum(a[:, 4:] ** 2) for a in ref)
    assert nsr[("cls", "int8")] == pytest.approx(own / 2, rel=1e-6)  # mean over 2 branches
    assert nsr[("cls", "int8")] > 100 * pooled


def test_accuracy_budget_is_met_and_reported(tmp_path):
    png = tmp_path / "pareto.png"
    result = qcompile.compile(
        builders.cnn(size=32),
        calibration=_feeds(),
        max_accuracy_drop=0.001,
        pareto_png=str(png),
        **FAST,
    )
    mp = result.report.mixed_precision
    assert mp["budget_met"] and mp["verified_drop"] <= 0.001
    assert {layer["choice"] for layer in mp["layers"]} <= {"fp32", "int8"}
    assert mp["pareto"] and mp["search_seconds"] > 0
    assert png.stat().st_size > 1000
    excluded = {layer["node"] for layer in mp["layers"] if layer["choice"] == "fp32"}
    assert not excluded & set(result.plan.nodes)  # FP32 choices really stayed float
    assert result.report.to_json()  # serializable


def test_fpga_budget_picks_narrower_weights_where_it_can():
    feeds = _feeds()
    eight = qcompile.compile(builders.cnn(size=32), target="fpga", calibration=feeds, **FAST)
    result = qcompile.compile(
        builders.cnn(size=32), target="fpga", calibration=feeds, max_accuracy_drop=0.01, **FAST
    )
    mp = result.report.mixed_precision
    assert mp["objective"] == "size" and mp["budget_met"]
    bits = {layer["choice"] for layer in mp["layers"]}
    assert bits - {"w8"}  # some layer went below 8 bits
    assert result.report.fpga_weight_memory_bits < eight.report.fpga_weight_memory_bits


def test_fpga_latency_budget_trades_modelled_cycles_kernels_included():
    """--latency-budget-ms on fpga: the cost model's cycles at the clock, not this CPU's
    timings; the integer kernels weight bits do not change (here the pools and the
    requantizing Adds of the transformer block's LayerNorms, Softmax...) are the budget's
    fixed part, and a budget below them is refused before any measuring."""
    model = builders.transformer_block(dim=32, heads=2, ffn=64)
    feeds = [{"input": builders.token_embeddings(2, seq=8, dim=32, seed=i)} for i in range(6)]
    shapes = {"input": (2, 8, 32)}  # static: every MatMul's MACs known to the cost model
    eight = qcompile.compile(model, target="fpga", calibration=feeds, input_shapes=shapes, **FAST)
    clock = 200.0
    rows = eight.report.fpga_layers
    kernels = sum(r["cycles"] for r in rows if not r["weights"]) / clock / 1e3
    total = sum(r["cycles"] for r in rows) / clock / 1e3
    assert 0 < kernels < total
    budget = kernels + 0.6 * (total - kernels)  # the MAC layers must get faster
    result = qcompile.compile(
        model, target="fpga", calibration=feeds, input_shapes=shapes, latency_budget_ms=budget,
        **FAST,
    )  # fmt: skip
    mp = result.report.mixed_precision
    assert mp["objective"] == "fpga-latency"
    assert {layer["node"] for layer in mp["layers"]} <= {r["node"] for r in rows}
    assert {layer["choice"] for layer in mp["layers"]} - {"w8"}
    modelled = sum(r["cycles"] for r in result.report.fpga_layers) / clock / 1e3
    assert modelled <= budget * 1.001
    with pytest.raises(QCompileError, match="integer kernels that weight bits do not change"):
        qcompile.compile(
            model, target="fpga", calibration=feeds, input_shapes=shapes,
            latency_budget_ms=kernels * 0.9, **FAST,
        )  # fmt: skip


def test_size_budget_and_callable_metric():
    feeds = _feeds()
    fp32_mb = (
        sum(
            w.const_value.nbytes
            for w in qcompile.ir.load_model(builders.cnn(size=32)).graph.initializers.values()
        )
        / 1e6
    )
    result = qcompile.compile(
        builders.cnn(size=32), calibration=feeds, size_budget_mb=fp32_mb * 0.5, **FAST
    )
    mp = result.report.mixed_precision
    assert mp["objective"] == "size" and mp["predicted_cost"] <= fp32_mb * 0.5 * 8e6
    calls = []

    def drop(fp32_outs, quant_outs):
        calls.append(len(fp32_outs))
        return mixed.cosine_drop(fp32_outs, quant_outs)

    qcompile.compile(
        builders.cnn(size=32), calibration=feeds, max_accuracy_drop=0.01, metric=drop, **FAST
    )
    assert calls


def test_budget_errors_are_clear(tmp_path, cnn_path, cnn_calib):
    with pytest.raises(QCompileError, match="0.005"):
        qcompile.compile(builders.cnn(), calibration=_feeds(), max_accuracy_drop=5.0, **FAST)
    with pytest.raises(QCompileError, match="not both"):
        qcompile.compile(
            builders.cnn(), calibration=_feeds(), max_accuracy_drop=0.01, size_budget_mb=1.0, **FAST
        )
    out = tmp_path / "m.onnx"
    rc = compile_cli(
        cnn_path, cnn_calib, out, "--max-accuracy-drop", "1%", "--quiet", "--bench-runs", "0"
    )
    assert rc == 0 and out.exists()


def test_near_tie_feeds_picks_the_smallest_leads_in_data_order():
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((8, 3)).astype(np.float32)} for _ in range(3)]
    logits = [rng.standard_normal((8, 4)) for _ in range(3)]
    outs = [[p] for p in logits]
    picked = mixed.near_tie_feeds(feeds, outs, count=5, batch=4)
    assert [len(f["x"]) for f in picked] == [4, 1]
    all_x = np.concatenate([f["x"] for f in feeds])
    srt = np.sort(np.concatenate(logits), axis=1)
    smallest = np.sort(np.argsort(srt[:, -1] - srt[:, -2])[:5])  # data order
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in picked]), all_x[smallest])
    # feeds that cannot be split per sample: None, and the caller keeps its own feeds
    assert mixed.near_tie_feeds([{"x": np.zeros(3, np.float32)}], [[np.zeros((1, 4))]], 2) is None


def test_a_budget_model_slower_than_fp32_says_so_or_the_guard_returns_fp32(monkeypatch):
    """When the kept FP32 layers make the result slower than FP32 (measured), the report
    says FP32 itself is the faster way to meet the budget; with the speed guard on (the
    default) the FP32 model is what comes back."""
    from qcompile.backends import ort as ort_backend

    def slower(sessions, feed, runs, **_):
        return {"fp32": 1.0, "q": 2.0}

    monkeypatch.setattr(ort_backend, "bench", slower)
    options = {"calibration": _feeds(), "max_accuracy_drop": 0.001, "progress": False}
    result = qcompile.compile(builders.cnn(size=32), bench_runs=3, speed_guard=False, **options)
    assert result.report.speedup == 0.5
    assert any("SLOWER than FP32" in n and "FP32 itself meets" in n for n in result.report.notes)
    guarded = qcompile.compile(builders.cnn(size=32), bench_runs=3, **options)
    assert guarded.report.quantized_ops == {} and guarded.report.mixed_precision is None
    assert not any("SLOWER than FP32" in n for n in guarded.report.notes)
    assert any("FP32 model returned" in n for n in guarded.report.notes)


def test_accuracy_drop_counts_labels_not_agreement():
    """Against labels a changed answer can also fix a sample: 0.5 − 0.5 = 0, where
    agreement with FP32 says half the answers changed."""
    fp32 = [[np.array([[1.0, 0.0], [1.0, 0.0]])], [np.array([[0.0, 1.0], [0.0, 1.0]])]]
    quant = [[np.array([[0.0, 1.0], [1.0, 0.0]])], [np.array([[1.0, 0.0], [0.0, 1.0]])]]
    labels = np.array([0, 1, 0, 1])  # FP32 right on samples 0 and 3, INT8 on 2 and 3
    assert mixed.accuracy_drop(labels)(fp32, quant) == pytest.approx(0.0)
    assert mixed.top1_drop(fp32, quant) == pytest.approx(0.5)
    assert mixed.accuracy_drop(np.array([0, 0, 1, 1]))(fp32, quant) == pytest.approx(0.5)
    with pytest.raises(QCompileError, match="3 labels but the budget is checked on 4"):
        mixed.accuracy_drop(labels[:3])(fp32, quant)


def test_accuracy_budget_with_labels_end_to_end(tmp_path, cnn_path, cnn_calib):
    feeds = _feeds()
    fp32 = ort.InferenceSession(
        builders.cnn(size=32).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    labels = np.concatenate([fp32.run(None, f)[0].argmax(1) for f in feeds])
    result = qcompile.compile(
        builders.cnn(size=32),
        calibration=feeds,
        max_accuracy_drop=0.02,
        metric="accuracy",
        labels=labels,
        **FAST,
    )
    mp = result.report.mixed_precision
    assert mp["budget_met"] and mp["verified_drop"] <= 0.02 and mp["metric"] == "accuracy"
    with pytest.raises(QCompileError, match="needs --labels"):
        qcompile.compile(builders.cnn(size=32), calibration=feeds, metric="accuracy", **FAST)
    with pytest.raises(QCompileError, match="labels file not found"):
        qcompile.compile(
            builders.cnn(size=32),
            calibration=feeds,
            max_accuracy_drop=0.02,
            metric="accuracy",
            labels=str(tmp_path / "missing.npy"),
            **FAST,
        )
    # the CLI reads labels from a text file; too few labels is a user error (exit 2)
    (tmp_path / "few.txt").write_text("0\n1\n")
    rc = compile_cli(
        cnn_path,
        cnn_calib,
        tmp_path / "out.onnx",
        "--max-accuracy-drop",
        "1%",
        "--metric",
        "accuracy",
        "--labels",
        str(tmp_path / "few.txt"),
        "--quiet",
        "--bench-runs",
        "0",
    )
    assert rc == 2 and not (tmp_path / "out.onnx").exists()


def test_measurement_cache_makes_a_rerun_skip_the_measurements(tmp_path, monkeypatch):
    feeds = _feeds()
    first = qcompile.compile(
        builders.cnn(size=32),
        calibration=feeds,
        max_accuracy_drop=0.001,
        cache_dir=str(tmp_path / "cache"),
        **FAST,
    )
    assert first.report.mixed_precision["measurements_cached"] is False
    assert len(list((tmp_path / "cache").glob("mixed-*.json"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(mixed, "sensitivities", fail)
    monkeypatch.setattr("qcompile.strategies.mixed.precision.node_times_ms", fail)
    again = qcompile.compile(
        builders.cnn(size=32),
        calibration=feeds,
        max_accuracy_drop=0.005,  # another budget: same measurements
        cache_dir=str(tmp_path / "cache"),
        **FAST,
    )
    mp, mp0 = again.report.mixed_precision, first.report.mixed_precision
    assert mp["measurements_cached"] is True
    assert [c["candidates"] for c in mp["layers"]] == [c["candidates"] for c in mp0["layers"]]
    # other data: a miss, so it measures (and here fails on purpose)
    with pytest.raises(AssertionError, match="measured again"):
        qcompile.compile(
            builders.cnn(size=32),
            calibration=_feeds(seed=1),
            max_accuracy_drop=0.005,
            cache_dir=str(tmp_path / "cache"),
            **FAST,
        )


def test_trace_sensitivity_ranks_layers_like_the_measured_one():
    """HAWQ-V2's trace × error power (random probes of the error's power) and the real
    error should agree on which layers matter, not to the decibel."""
    from scipy.stats import spearmanr

    feeds = _feeds()
    base = qcompile.compile(builders.cnn(size=32), calibration=feeds, **FAST)
    specs = {n: [("int8", CPU_PROFILE.weight)] for n in (w.node for w in base.plan.weights)}
    measured = mixed.sensitivities(
        *mixed.switch_model(base.fp32_model, base.plan, base.qparams, specs), feeds[:4]
    )
    traced = mixed.sensitivities(
        *mixed.switch_model(base.fp32_model, base.plan, base.qparams, specs, trace=True),
        feeds[:4],
    )
    keys = sorted(measured)
    a = np.log([measured[k] for k in keys])
    b = np.log([traced[k] for k in keys])
    assert spearmanr(a, b).statistic > 0.6
    assert np.all(np.abs(a - b) < np.log(30))  # same order of magnitude per layer
    assert not np.allclose(a, b)  # and really a different estimate
    result = qcompile.compile(
        builders.cnn(size=32),
        calibration=feeds,
        max_accuracy_drop=0.01,
        sensitivity="trace",
        **FAST,
    )
    assert result.report.mixed_precision["sensitivity"] == "trace"


def test_time_budget_makes_the_search_anytime():
    """A budget spent before the search returns the all-INT8 base with its measured drop
    and says so; a budget spent during it keeps the best verified choice."""
    feeds = _feeds(6)
    result = qcompile.compile(
        builders.cnn(size=32), calibration=feeds, max_accuracy_drop=0.01,
        mixed_verify_feeds=4, time_budget_s=1e-3, **FAST,
    )  # fmt: skip
    mp = result.report.mixed_precision
    assert mp["stopped_by_time_budget"] and len(mp["steps"]) == 1 and mp["layers"] == []
    assert mp["verified_drop"] >= 0 and mp["budget_met"] == (mp["verified_drop"] <= 0.01)
    assert any("--time-budget" in n and "all-INT8" in n for n in result.report.notes)
    ort.InferenceSession(ir.to_proto(result.model).SerializeToString())
    # a budget long enough for the measurements: the search runs and stops in time
    full = qcompile.compile(
        builders.cnn(size=32), calibration=feeds, max_accuracy_drop=0.01,
        mixed_verify_feeds=4, time_budget_s=60, **FAST,
    )  # fmt: skip
    assert not full.report.mixed_precision["stopped_by_time_budget"]
    assert full.report.mixed_precision["layers"]
