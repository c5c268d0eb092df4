"""Calibration readers and the .npz conventions users rely on."""

import numpy as np
import pytest

from qcompile.data.feeds import ImageSpec, InputSpec, open_calibration
from qcompile.errors import QCompileError

IMG = InputSpec("input", np.dtype(np.float32), (None, 3, 8, 8))
IMG_B2 = InputSpec("input", np.dtype(np.float32), (2, 3, 8, 8))
IDS = InputSpec("ids", np.dtype(np.int64), (None, None))
RATE = InputSpec("sr", np.dtype(np.int64), ())


def test_npz_stacked_on_batch_axis_splits_into_batch_size(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, input=np.zeros((10, 3, 8, 8), np.float32))
    feeds = list(open_calibration(path, [IMG], batch_size=4))
    assert [f["input"].shape[0] for f in feeds] == [4, 4, 2]
    feeds = list(open_calibration(path, [IMG_B2]))
    assert len(feeds) == 5 and all(f["input"].shape[0] == 2 for f in feeds)


def test_npz_fixed_batch_must_divide(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, input=np.zeros((5, 3, 8, 8), np.float32))
    with pytest.raises(QCompileError, match="batch size 2"):
        open_calibration(path, [IMG_B2])


def test_npz_rank_plus_one_lists_feeds(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, input=np.zeros((3, 2, 3, 8, 8), np.float32), ids=np.ones((3, 2, 5), np.int64))
    feeds = list(open_calibration(path, [IMG, IDS]))
    assert (
        len(feeds) == 3
        and feeds[0]["input"].shape == (2, 3, 8, 8)
        and feeds[0]["ids"].dtype == np.int64
    )


def test_scalar_inputs_pass_through(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, input=np.zeros((4, 3, 8, 8), np.float32), sr=np.array(16000))
    feeds = list(open_calibration(path, [IMG, RATE], batch_size=2))
    assert len(feeds) == 2 and all(int(f["sr"]) == 16000 for f in feeds)


def test_inconsistent_feed_counts(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, input=np.zeros((3, 2, 3, 8, 8), np.float32), ids=np.ones((4, 2, 5), np.int64))
    with pytest.raises(QCompileError, match="different numbers of feeds"):
        open_calibration(path, [IMG, IDS])


def test_extra_array_is_named(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, input=np.zeros((2, 3, 8, 8), np.float32), typo=np.zeros(3))
    with pytest.raises(QCompileError, match="typo"):
        open_calibration(path, [IMG])


def test_float64_is_cast_but_float_for_int_is_refused():
    feeds = list(open_calibration([{"input": np.zeros((1, 3, 8, 8))}], [IMG]))
    assert feeds[0]["input"].dtype == np.float32
    with pytest.raises(QCompileError, match="dtype float"):
        list(open_calibration([{"ids": np.zeros((1, 4))}], [IDS]))


def test_npy_single_input(tmp_path):
    path = tmp_path / "c.npy"
    np.save(path, np.zeros((4, 3, 8, 8), np.float32))
    assert len(list(open_calibration(path, [IMG], batch_size=2))) == 2
    with pytest.raises(QCompileError, match="one input"):
        open_calibration(path, [IMG, IDS])


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    (tmp_path / "notes.txt").write_text("ignored")
    spec = ImageSpec.parse("size=8x8,mean=0.5/0.5/0.5,std=0.25/0.25/0.25,layout=NCHW")
    feeds = list(open_calibration(tmp_path, [IMG], batch_size=2, image_spec=spec))
    assert [f["input"].shape for f in feeds] == [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    assert feeds[0]["input"].min() >= -2.0 - 1e-6 and feeds[0]["input"].max() <= 2.0 + 1e-6
    # fixed batch 2: the ragged tail is dropped
    assert len(list(open_calibration(tmp_path, [IMG_B2], image_spec=spec))) == 2
    with pytest.raises(QCompileError, match="image-spec"):
        open_calibration(tmp_path, [IMG])


def test_image_spec_errors():
    with pytest.raises(QCompileError, match="size"):
        ImageSpec.parse("mean=0/0/0")
    with pytest.raises(QCompileError, match="unknown"):
        ImageSpec.parse("size=8x8,blur=2")


def test_random_only_when_explicit():
    feeds = list(open_calibration("random", [IMG_B2], random_count=3))
    assert len(feeds) == 3
    with pytest.raises(QCompileError, match="not found"):
        open_calibration("rand0m", [IMG])


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("1,2")
    with pytest.raises(QCompileError, match="unsupported"):
        open_calibration(path, [IMG])
