"""Where a search's independent measurements run: here, one after another, or as Ray tasks.

Mixed precision's sensitivity measurement (one ORT run per layer candidate and feed) and
`--calib-method auto`'s candidates (one scoring session per method) are many independent
runs of ONNX Runtime on models and feeds that fit in memory: `--fanout ray` spreads them
over a Ray cluster (`pip install 'qcompile[ray]'`), a local one started on the fly or the
one at `--ray-address`. Each task gets the model as bytes and the feeds as arrays through
Ray's object store (put once, shared by every task on a node), and returns numbers; the
strategy merges them in the serial run's order, so the choice is the serial run's.

What stays in the compiling process, and why:
- **timing** (the speed guard's variants, mixed precision's per-layer costs): a latency
  measured next to other work is not the deployment's latency (the batch measured 19 of
  35 guard decisions flip with two compiles on two cores), and the guard's rounds depend
  on each other (round i+1 leaves float what round i's profile found slow);
- **building candidates** (quantizing the graph, the switch model): cheap next to the
  runs, and they need the compile's calibration statistics.

Results equal the serial run's when each task runs ONNX Runtime on as many threads as the
serial run: tasks take `threads` (the option) threads each, one if it is unset, and
reserve that many Ray CPUs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from qcompile.errors import QCompileError

logger = logging.getLogger(__name__)

FANOUTS = ("serial", "ray")


class Fanout(Protocol):
    """Runs `fn(*shared, *args)` for every `args` and returns the results in order."""

    name: str

    def workers(self, threads: int) -> int:
        """How many tasks of `threads` threads run at once."""
        ...

    def map(
        self, fn: Callable[..., Any], shared: Sequence[Any], args: Sequence[Sequence[Any]]
    ) -> list[Any]: ...


class SerialFanout:
    """In this process, one call after another: the default."""

    name = "serial"

    def workers(self, threads: int) -> int:
        return 1

    def map(self, fn, shared, args) -> list[Any]:
        return [fn(*shared, *a) for a in args]


class RayFanout:
    """Every call a Ray task; `shared` goes to the object store once."""

    name = "ray"

    def __init__(self, address: str | None = None, threads: int = 1) -> None:
        self.address = address or None
        self.threads = max(1, threads)

    def _init(self):
        try:
            import ray
        except ImportError as exc:
            raise QCompileError(
                "--fanout ray needs Ray", hint="pip install 'qcompile[ray]' (or pip install ray)"
            ) from exc
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        return ray

    def workers(self, threads: int) -> int:
        ray = self._init()
        cpus = int(ray.cluster_resources().get("CPU", 1))
        return max(1, cpus // max(1, threads))

    def map(self, fn, shared, args) -> list[Any]:
        ray = self._init()
        refs = [ray.put(s) for s in shared]
        remote = ray.remote(max_retries=1)(fn).options(num_cpus=self.threads)
        futures = [remote.remote(*refs, *a) for a in args]
        try:
            return ray.get(futures)
        except ray.exceptions.RayError as exc:  # a task that fails fails the search
            first = str(exc).strip().splitlines()[-1][:300]  # the task's exception line
            raise RuntimeError(f"a --fanout ray task failed: {first}") from exc


def make_fanout(name: str, address: str | None, threads: int | None) -> Fanout:
    if name == "ray":
        return RayFanout(address, threads or 1)
    if name != "serial":
        raise QCompileError(f"fanout must be one of {', '.join(FANOUTS)}, got {name!r}")
    return SerialFanout()


def task_threads(fanout: Fanout, threads: int | None) -> int | None:
    """ONNX Runtime threads of one task: the option's; unset, every core for the serial
    run (it is alone) and one for a fanned-out task (it shares the node)."""
    if fanout.name == "serial":
        return threads
    return threads or 1


def chunks(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """`items` in `parts` contiguous runs of nearly equal length (none empty)."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + size + (1 if i < extra else 0)
        out.append(list(items[start:stop]))
        start = stop
    return out
