"""One compile job, and what every variant of it shares.

A `CompileJob` is everything one compile reads: the model, the target, the calibration
data, the options and where to write. Strategies (calibration method, CLE on/off, pass
effects, mixed precision) run several variants of one job; a `Workspace` keeps what those
variants share so it is computed once: the loaded model, the opened calibration data, and
calibration statistics keyed by graph and data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompile.calibrate.observers import Observer
from qcompile.calibrate.runner import CalibrationStats
from qcompile.data.feeds import CalibrationSource, Feed, ImageSpec, InputSpec, open_calibration
from qcompile.driver import calib_cache
from qcompile.driver.safety import Outputs, run_outputs
from qcompile.errors import QCompileError
from qcompile.ir.io import ModelSource, load_model
from qcompile.options import CompileOptions

CalibrationInput = str | os.PathLike | Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class CompileJob:
    model: ModelSource
    target: str
    calibration: CalibrationInput
    options: CompileOptions
    output: str | os.PathLike | None = None
    image_spec: ImageSpec | None = None
    # data a mixed-precision search checks its budget on (default: the calibration data)
    verification: CalibrationInput | None = None

    def variant(self, output: str | os.PathLike | None = None, **changes: Any) -> CompileJob:
        """The same job with other options (and, by default, no output file)."""
        return dataclasses.replace(
            self, options=dataclasses.replace(self.options, **changes), output=output
        )

    @property
    def input_path(self) -> str | None:
        return str(self.model) if isinstance(self.model, (str, os.PathLike)) else None


def graph_fingerprint(model: ir.Model) -> str:
    """SHA-256 of the serialized model: two variants that rewrote the graph alike share it."""
    return hashlib.sha256(ir.to_proto(model).SerializeToString()).hexdigest()


# (graph fingerprint, tensor) -> (observer key, observer, observed dtype/shape or None)
_Entry = tuple[Hashable, Observer, tuple | None]


@dataclass
class _Run:
    """What a calibration run leaves besides its observers (same data, same hold-out)."""

    batches: int
    holdout: list
    holdout_is_calibration: bool


@dataclass
class Workspace:
    """Per-job state shared by every variant a strategy compiles."""

    _model: ir.Model | None = None
    _data: dict[Hashable, CalibrationSource] = field(default_factory=dict)
    _stats: dict[tuple[str, str], _Entry] = field(default_factory=dict)
    _runs: dict[str, _Run] = field(default_factory=dict)
    _reference: Outputs | None = None
    _digests: dict[int, str] = field(default_factory=dict)  # calibration data -> SHA-256
    hits: int = 0
    disk_hits: int = 0  # statistics read from --cache-dir
    # when the job's searches must stop (time.perf_counter(); --time-budget)
    deadline: float = math.inf

    def out_of_time(self) -> bool:
        return time.perf_counter() > self.deadline

    def reference(self, model: ir.Model, feed) -> Outputs:
        """The input model's outputs on `feed`, computed once per job (the safety net's
        reference); a model ONNX Runtime cannot run is the user's to fix."""
        if self._reference is None:
            try:
                self._reference = run_outputs(model, feed)
            except Exception as exc:
                raise QCompileError(
                    f"ONNX Runtime cannot run the input model: {str(exc).splitlines()[0]}",
                    hint="an op ORT does not implement, or a malformed graph; check the node "
                    "named above",
                ) from exc
        return self._reference

    def load(self, source: ModelSource) -> ir.Model:
        """The input model, loaded (and checked) once; each variant gets its own copy."""
        if self._model is None:
            self._model = load_model(source)
        return self._model.clone()

    def data(
        self,
        calibration: CalibrationInput,
        specs: Sequence[InputSpec],
        options: CompileOptions,
        image_spec: ImageSpec | None,
    ) -> CalibrationSource:
        """The calibration data for these model inputs, opened once."""
        key = (tuple(specs), options.calib_batch_size, options.seed, image_spec)
        if key not in self._data:
            self._data[key] = open_calibration(
                calibration,
                specs,
                batch_size=options.calib_batch_size,
                image_spec=image_spec,
                seed=options.seed,
            )
        return self._data[key]

    def observe(
        self,
        model: ir.Model,
        tensors: Sequence[str],
        key_for: Callable[[str], Hashable],
        run: Callable[[list[str]], CalibrationStats],
        settings: Hashable = (),
        data: Iterable[Feed] | None = None,
        cache_dir: str | None = None,
    ) -> CalibrationStats:
        """Statistics of `tensors` on this graph: from the cache when every tensor was
        observed before with the same observer kind (`key_for(tensor)`), otherwise from
        one calibration run over them all (`run`), which then fills the cache. `settings`:
        what else decides the statistics (hold-out, batch limit, token mask). With a
        `cache_dir`, the cache is also a content-addressed file there (calib_cache.py)."""
        fingerprint = graph_fingerprint(model)
        graph = f"{fingerprint}|{settings!r}"
        stats = self._cached(graph, tensors, key_for)
        if stats is not None:
            self.hits += 1
            return stats
        path = None
        if cache_dir is not None and data is not None:
            if id(data) not in self._digests:
                self._digests[id(data)] = calib_cache.data_digest(data)
            path = calib_cache.cache_path(cache_dir, fingerprint, self._digests[id(data)], settings)
            stored = calib_cache.read(path)
            entries = stored["tensors"] if stored else {}
            if tensors and all(t in entries and entries[t][0] == key_for(t) for t in tensors):
                self.disk_hits += 1
                for t in tensors:
                    self._stats[(graph, t)] = entries[t]
                self._runs[graph] = _Run(*stored["run"])
                stats = self._cached(graph, tensors, key_for)
                stats.cache_file = str(path)
                return stats
        stats = run(list(tensors))
        for t, observer in stats.observers.items():
            self._stats[(graph, t)] = (key_for(t), observer, stats.observed.get(t))
        self._runs[graph] = _Run(stats.batches, list(stats.holdout), stats.holdout_is_calibration)
        if path is not None:
            stored = calib_cache.read(path) or {"tensors": {}}
            stored["tensors"].update({t: self._stats[(graph, t)] for t in stats.observers})
            stored["run"] = (stats.batches, list(stats.holdout), stats.holdout_is_calibration)
            calib_cache.write(path, stored)
        return stats

    def _cached(
        self, graph: str, tensors: Sequence[str], key_for: Callable[[str], Hashable]
    ) -> CalibrationStats | None:
        """The statistics of `tensors` from memory, when each was observed on `graph` with
        the observer kind `key_for` gives it."""
        cached = [self._stats.get((graph, t)) for t in tensors]
        if not tensors or any(
            e is None or e[0] != key_for(t) for e, t in zip(cached, tensors, strict=True)
        ):
            return None
        meta = self._runs[graph]
        return CalibrationStats(
            observers={t: e[1] for t, e in zip(tensors, cached, strict=True)},
            observed={t: e[2] for t, e in zip(tensors, cached, strict=True) if e[2] is not None},
            batches=meta.batches,
            holdout=list(meta.holdout),
            holdout_is_calibration=meta.holdout_is_calibration,
            cached=True,
        )
