"""Search fan-out: mixed precision's sensitivities and auto's candidates as tasks give the
serial run's results (in chunks here, and as Ray tasks when Ray is installed)."""

from __future__ import annotations

import builders
import onnx_ir as ir
import pytest

import qcompile
from qcompile.driver.fanout import SerialFanout, chunks
from qcompile.strategies import mixed
from qcompile.targets.cpu import PROFILE as CPU_PROFILE
from tests.conftest import FAST
from tests.test_fleet import needs_ray


def _feeds(n: int = 8, seed: int = 0) -> list[dict]:
    return [{"input": builders.images(8, 32, seed=seed * 100 + i)} for i in range(n)]


class ChunkingFanout(SerialFanout):
    """Serial, but reports three workers: the chunked path (serialized model, one
    session per chunk, merge) runs in this process."""

    name = "chunks"

    def __init__(self) -> None:
        self.calls = 0

    def workers(self, threads: int) -> int:
        return 3

    def map(self, fn, shared, args):
        self.calls += len(args)
        return super().map(fn, shared, args)


def test_chunks_cover_every_item_once_in_order():
    items = list(range(10))
    for parts in (1, 3, 4, 10, 20):
        got = chunks(items, parts)
        assert [x for c in got for x in c] == items
        assert len(got) == min(parts, 10) and all(got)
        assert max(map(len, got)) - min(map(len, got)) <= 1


def test_chunked_sensitivities_equal_the_serial_ones():
    feeds = _feeds()
    base = qcompile.compile(builders.cnn(size=32), calibration=feeds, threads=1, **FAST)
    specs = {w.node: [("int8", CPU_PROFILE.weight)] for w in base.plan.weights}
    model, flags = mixed.switch_model(base.fp32_model, base.plan, base.qparams, specs)
    skip = {next(iter(flags))}
    serial = mixed.sensitivities(model, flags, feeds[:3], 1, skip=skip)
    fanout = ChunkingFanout()
    chunked = mixed.sensitivities(model, flags, feeds[:3], 1, skip=skip, fanout=fanout)
    assert fanout.calls == 3 and len(flags) - 1 >= 3
    assert list(chunked) == list(serial) and chunked == serial  # same order, same values
    assert set(serial) == set(flags) - skip


def _bytes(result) -> bytes:
    return ir.to_proto(result.model).SerializeToString()


@pytest.fixture
def ray_session():
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


@needs_ray
def test_ray_fanout_gives_the_serial_compiles(ray_session):
    feeds = _feeds(12)
    runs = {}
    for fanout in ("serial", "ray"):
        options = {**FAST, "threads": 1, "fanout": fanout}
        mixed_run = qcompile.compile(
            builders.cnn(size=32), target="fpga", calibration=feeds, max_accuracy_drop=0.01,
            **options,
        )  # fmt: skip
        auto_run = qcompile.compile(
            builders.cnn(size=32), calibration=feeds, calib_method="auto", **options
        )
        runs[fanout] = (mixed_run, auto_run)
    (mixed_s, auto_s), (mixed_r, auto_r) = runs["serial"], runs["ray"]
    layers = [
        (c["node"], c["choice"], c["candidates"]) for c in mixed_s.report.mixed_precision["layers"]
    ]
    assert layers == [
        (c["node"], c["choice"], c["candidates"]) for c in mixed_r.report.mixed_precision["layers"]
    ]
    assert _bytes(mixed_s) == _bytes(mixed_r)
    assert auto_s.report.calib_method_scores == auto_r.report.calib_method_scores
    assert _bytes(auto_s) == _bytes(auto_r)
    assert len(auto_s.report.calib_method_scores) >= 3
