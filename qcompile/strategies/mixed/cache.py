"""Measurements kept between searches (`--cache-dir`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qcompile.errors import QCompileError
from qcompile.ir.io import write_text_atomic

logger = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]


# -- measurements kept between runs ---------------------------------------------------------

_CACHE_VERSION = "1"  # bump when what is measured, or how, changes
_KEY_SEP = "\x1f"


class MeasurementCache:
    """A search's measured sensitivities and per-layer costs, kept as JSON in `cache_dir`.

    The key hashes the switch model (FP32 graph, candidate weights and quantizers), the
    all-INT8 model, the measurement feeds, the objective and the thread count: a rerun
    with another budget or metric over the same model, quantization and data reads the
    measurements instead of repeating them (most of a search's time); anything that
    changes what would be measured misses. Without a `cache_dir` nothing is kept."""

    def __init__(self, path: Path | None, data: dict):
        self.path = path
        self.data = data
        self.hit = bool(data)

    @classmethod
    def open(
        cls,
        cache_dir: str | os.PathLike | None,
        switch: ir.Model,
        int8: ir.Model,
        feeds: Sequence[Feed],
        objective: str,
        threads: int | None,
    ) -> MeasurementCache:
        if cache_dir is None:
            return cls(None, {})
        digest = hashlib.sha256(f"{_CACHE_VERSION}|{objective}|{threads}".encode())
        for model in (switch, int8):
            digest.update(ir.to_proto(model).SerializeToString())
        for feed in feeds:
            for name in sorted(feed):
                array = np.ascontiguousarray(feed[name])
                digest.update(f"{name}|{array.dtype}|{array.shape}".encode())
                digest.update(array.tobytes())
        path = Path(cache_dir) / f"mixed-{digest.hexdigest()[:32]}.json"
        data = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                logger.warning("ignoring an unreadable measurement cache %s", path)
        return cls(path, data)

    def get(self, key: str):
        value = self.data.get(key)
        if value is None:
            return None
        if key == "nsr":
            return {tuple(k.split(_KEY_SEP, 1)): v for k, v in value.items()}
        return value

    def put(self, key: str, value):
        if self.path is None:
            return value
        stored = {_KEY_SEP.join(k): v for k, v in value.items()} if key == "nsr" else value
        self.data[key] = stored
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(self.data))
        except OSError as exc:
            raise QCompileError(
                f"cannot write the measurement cache: {exc}",
                path=str(self.path),
                hint="give a writable --cache-dir, or none",
            ) from exc
        return value
