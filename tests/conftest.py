"""Shared fixtures: the small models from tests/builders.py, written to disk, and data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import builders
import numpy as np
import onnx
import pytest


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def cnn_model() -> onnx.ModelProto:
    return builders.cnn()


@pytest.fixture(scope="session")
def mlp_model() -> onnx.ModelProto:
    return builders.mlp()


@pytest.fixture(scope="session")
def transformer_model() -> onnx.ModelProto:
    return builders.transformer_block()


@pytest.fixture
def cnn_path(tmp_path: Path, cnn_model: onnx.ModelProto) -> Path:
    path = tmp_path / "cnn.onnx"
    onnx.save(cnn_model, path)
    return path


@pytest.fixture
def cnn_calib(tmp_path: Path) -> Path:
    path = tmp_path / "cnn_calib.npz"
    np.savez(path, input=builders.images(20, seed=1))
    return path


# calibration confidence costs a quantize and three sessions per compile: its own tests
# turn it back on
FAST = {"progress": False, "bench_runs": 0, "speed_guard": False, "calib_confidence": False}
QUIET = ("--quiet", "--bench-runs", "0", "--no-speed-guard")  # the CLI's equivalent of FAST


def compile_transformer_fpga(**options):
    """The small transformer block compiled for the fpga target (shapes pinned, float
    scales); returns the result and its feeds."""
    import builders

    import qcompile

    proto = builders.transformer_block()
    feeds = [{"input": builders.token_embeddings(2, seed=i)} for i in range(8)]
    shapes = {"input": feeds[0]["input"].shape}
    result = qcompile.compile(
        proto,
        target="fpga",
        calibration=feeds,
        input_shapes=shapes,
        pow2_scales=False,
        **options,
        **FAST,
    )
    return result, feeds


def compile_integer_checked(model, feeds, *, margin_db: float = 0.5, min_db: float = 20.0):
    """`model` compiled for the fpga target, checked: no float island and nothing float
    between its quantizers, ONNX Runtime = the numpy reference on two feeds, and output
    SQNR within `margin_db` of the QDQ graph the lowering started from, above `min_db`.
    Returns the result."""
    import onnx_ir as ir
    import onnxruntime as ort

    import qcompile
    from qcompile.backends.reference import run_reference
    from qcompile.lower.integer_parts import float_ops_between

    result = qcompile.compile(model, target="fpga", calibration=feeds, **FAST)
    assert result.report.float_islands == []
    assert float_ops_between(result.model.graph) == []
    proto = ir.to_proto(result.model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for feed in feeds[:2]:
        np.testing.assert_array_equal(session.run(None, feed)[0], run_reference(proto, feed)[0])
    qdq = qcompile.compile(
        model, target="fpga", calibration=feeds, disabled_passes=("LowerToIntegerOnly",), **FAST
    )
    assert result.report.min_output_sqnr_db > qdq.report.min_output_sqnr_db - margin_db
    assert result.report.min_output_sqnr_db > min_db
    return result


def compile_cli(model, calib, out, *extra) -> int:
    """`qcompile compile MODEL -o OUT --calib CALIB [extra...]` through the CLI entry point."""
    from qcompile.cli import main

    return main(["compile", str(model), "-o", str(out), "--calib", str(calib), *extra])


def corpus_model(name: str):
    """(model, calibration feeds) of a cached corpus export, or skip the test."""
    from benchmarks import corpus

    entry = {e.name: e for e in corpus.all_models()}.get(name)
    if entry is None:
        pytest.skip("model corpus not cached: python -m benchmarks.corpus_torch")
    model = entry.load()
    return model, entry.feeds(model)
