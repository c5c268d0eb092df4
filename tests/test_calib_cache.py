"""Calibration statistics in --cache-dir: content-addressed, reported, same model."""

import builders

import qcompile
from qcompile.driver import calib_cache
from tests.conftest import FAST

FAST = {**FAST, "calib_confidence": True}


def _feeds(seed: int = 0):
    return [{"input": builders.images(1, seed=seed + i)} for i in range(6)]


def _compile(tmp_path, name, feeds, **kw):
    out = tmp_path / f"{name}.onnx"
    result = qcompile.compile(
        builders.cnn(),
        calibration=feeds,
        output=out,
        cache_dir=str(tmp_path / "cache"),
        **FAST,
        **kw,
    )
    return result, out.read_bytes()


def _noted(result) -> bool:
    return any("read from the cache" in n for n in result.report.notes)


def test_a_rerun_reads_the_statistics_and_writes_the_same_model(tmp_path):
    first, first_bytes = _compile(tmp_path, "first", _feeds())
    assert not first.report.calibration_reused and not _noted(first)
    assert len(list((tmp_path / "cache" / "calibration").glob("*.pkl"))) == 1
    again, again_bytes = _compile(tmp_path, "again", _feeds())
    assert again.report.calibration_reused and _noted(again)
    assert again_bytes == first_bytes
    assert again.report.calibration_confidence == first.report.calibration_confidence


def test_other_data_or_settings_miss(tmp_path):
    _compile(tmp_path, "first", _feeds())
    other, _ = _compile(tmp_path, "other_data", _feeds(seed=50))
    assert not other.report.calibration_reused
    held, _ = _compile(tmp_path, "other_holdout", _feeds(), holdout_every=3)
    assert not held.report.calibration_reused
    assert len(list((tmp_path / "cache" / "calibration").glob("*.pkl"))) == 3


def test_a_torn_cache_file_is_a_miss(tmp_path):
    _compile(tmp_path, "first", _feeds())
    (path,) = (tmp_path / "cache" / "calibration").glob("*.pkl")
    path.write_bytes(b"not a pickle")
    assert calib_cache.read(path) is None
    again, _ = _compile(tmp_path, "again", _feeds())
    assert not again.report.calibration_reused
