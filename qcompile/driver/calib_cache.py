"""Calibration statistics kept in `--cache-dir`, content-addressed.

Calibration is one run of the FP32 graph over every feed, often the longest step of a
compile; reruns of a job (another target's options, a batch retried, a budget changed)
observe the same tensors of the same graph on the same data. The file's key hashes what
decides the statistics: the rewritten graph (its serialized bytes), the calibration
data (every feed's names, dtypes, shapes and bytes), the hold-out/batch/token-mask
settings, and the versions of qcompile, ONNX Runtime and numpy; each tensor inside is
stored with its observer kind. Anything else misses. The directory may be shared by
several machines (writes are atomic renames); it holds pickles, so it must be trusted
like the code itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.data.feeds import Feed

logger = logging.getLogger(__name__)

_VERSION = "1"  # bump when observers or what they keep change


def data_digest(feeds: Iterable[Feed]) -> str:
    """SHA-256 of the calibration feeds, in order."""
    digest = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            array = np.ascontiguousarray(feed[name])
            digest.update(f"{name}|{array.dtype}|{array.shape}|".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def cache_path(cache_dir: str | os.PathLike, graph: str, data: str, settings: Hashable) -> Path:
    import onnxruntime

    from qcompile import __version__

    key = "|".join(
        [
            _VERSION,
            graph,
            data,
            repr(settings),
            __version__,
            onnxruntime.__version__,
            np.__version__,
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return Path(cache_dir) / "calibration" / f"{digest}.pkl"


def read(path: Path) -> dict[str, Any] | None:
    """{"tensors": {name: (observer kind, observer, observed)}, "run": (batches, holdout,
    holdout_is_calibration)}, or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with path.open("rb") as f:
            return pickle.load(f)  # noqa: S301 - our own cache directory (module docstring)
    except Exception as exc:  # a torn or foreign file is a miss, never an error
        logger.warning("ignoring an unreadable calibration cache %s: %s", path, exc)
        return None


def write(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        pickle.dump(content, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
