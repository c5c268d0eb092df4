"""Calibration confidence: leaving the most influential feed out, measured."""

import builders
import numpy as np

import qcompile
from qcompile.calibrate.observers import MinMaxObserver
from qcompile.calibrate.runner import CalibrationStats
from qcompile.driver.confidence import range_shrinks
from tests.conftest import FAST

FAST = {**FAST, "calib_confidence": True}


def _feeds(outlier: float | None) -> list[dict[str, np.ndarray]]:
    images = builders.images(11, seed=3)
    if outlier is not None:
        images[2] *= outlier  # one feed far brighter than the rest
    # every 5th feed is held out (inputs 4 and 9): input 2 is calibration feed 2
    return [{"input": images[i : i + 1]} for i in range(len(images))]


def _confidence(outlier):
    result = qcompile.compile(builders.cnn(), calibration=_feeds(outlier), **FAST)
    return result.report.calibration_confidence


def test_range_shrinks_read_each_feeds_own_range():
    stats = CalibrationStats(observers={"t": MinMaxObserver("t")}, batches=3)
    for lo, hi in ((-1.0, 2.0), (-1.0, 8.0), (-0.5, 1.0)):
        stats.observers["t"].observe(np.array([lo, hi], np.float32))
    shrink = range_shrinks(stats)["t"]
    # without feed 1 the range is [-1, 2] instead of [-1, 8]
    np.testing.assert_allclose(shrink, [0.0, 1 - 3 / 9, 0.0])


def test_one_outlying_feed_is_found_and_flagged():
    calm = _confidence(None)
    loud = _confidence(6.0)
    assert loud["most_influential_feed"] == 2
    assert loud["ranges_set_by_one_feed"] > calm["ranges_set_by_one_feed"]
    assert loud["verdict"].startswith("sensitive")
    assert abs(loud["delta_db"]) >= 1.0
    assert loud["without_feed_sqnr_db"] != loud["worst_output_sqnr_db"]
    assert calm["verdict"].startswith("stable")


def test_confidence_can_be_turned_off_and_needs_two_feeds():
    off = qcompile.compile(
        builders.cnn(), calibration=_feeds(None), **{**FAST, "calib_confidence": False}
    )
    assert off.report.calibration_confidence == {}
    one = qcompile.compile(builders.cnn(), calibration=_feeds(None)[:1], **FAST)
    assert one.report.calibration_confidence["verdict"].startswith("no estimate")
