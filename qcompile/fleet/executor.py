"""Where a batch's tasks run: one after another on this machine, or as Ray tasks.

Either way each task runs in a child process of its own, started fresh ("spawn"): a
crash (a segfault in a native library, an `os._exit`), memory exhaustion or a task past
its time limit ends that process, and the task becomes a failed row with the reason;
the batch goes on. That is why there is no plain in-process mode: a compile that hangs
or crashes inside ONNX Runtime cannot be stopped from the same Python process.

With Ray (`pip install 'qcompile[ray]'`), every task is a Ray task (no retries: a
rerun of the batch retries failures; a guarded compile reserves the cores it times on,
see cpus_for) that starts the same child process on
whichever node Ray schedules it; a Ray worker that dies (killed, out of memory, node
lost) is a failed row too. Paths in the tasks (models, data, the output folder) must be
readable and writable on every node: a shared filesystem on a cluster.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from qcompile.errors import QCompileError, find_qcompile_error
from qcompile.fleet.manifest import Task

logger = logging.getLogger(__name__)

# work(task, out_dir) -> row fields; runs in the child process, must be importable there
Work = Callable[[Task, str], dict[str, Any]]


def _child(work: Work, task: Task, out_dir: str, conn) -> None:
    try:
        conn.send(("done", work(task, out_dir)))
    except BaseException as exc:  # noqa: BLE001 - every failure becomes the task's row
        user = find_qcompile_error(exc)
        if user is not None:
            conn.send(("refused", {"reason": str(user).splitlines()[0][:300]}))
        else:
            text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            conn.send(("failed", {"reason": text, "traceback": traceback.format_exc()}))
    finally:
        conn.close()


def run_isolated(work: Work, task: Task, out_dir: str, time_limit_s: float | None) -> dict:
    """Run `work(task, out_dir)` in a fresh child process; always returns a row."""
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    start = time.perf_counter()
    proc = ctx.Process(target=_child, args=(work, task, out_dir, send), daemon=True)
    proc.start()
    send.close()
    message = None
    deadline = start + time_limit_s if time_limit_s else float("inf")
    # poll in steps: a child that dies without a word may not close the pipe here
    while time.perf_counter() < deadline:
        if receive.poll(0.2):
            with contextlib.suppress(EOFError):  # EOF: the child died before sending
                message = receive.recv()
            break
        if not proc.is_alive():
            if receive.poll(0):
                message = receive.recv()
            break
    else:  # the deadline passed with the child still at work
        proc.kill()
        proc.join()
        return {
            "status": "failed",
            "reason": f"exceeded the time limit of {time_limit_s:g} s",
            "seconds": time.perf_counter() - start,
        }
    seconds = time.perf_counter() - start
    proc.join()
    if message is None:
        code = proc.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return {
            "status": "failed",
            "reason": f"the compile process died ({how})",
            "seconds": seconds,
        }
    status, fields = message
    return {"status": "ok" if status == "done" else status, **fields, "seconds": seconds}


class LocalExecutor:
    """Tasks one after another on this machine, each in its own child process."""

    name = "local"

    def __init__(self, time_limit_s: float | None = None) -> None:
        self.time_limit_s = time_limit_s

    def map(self, work: Work, tasks: Sequence[Task], out_dir: str) -> Iterator[tuple[Task, dict]]:
        for task in tasks:
            yield task, run_isolated(work, task, out_dir, self.time_limit_s)


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise QCompileError(
            "--ray needs Ray", hint="pip install 'qcompile[ray]' (or pip install ray)"
        ) from exc
    return ray


class RayExecutor:
    """Tasks as Ray tasks: on a local Ray started here, or on the cluster at `address`."""

    name = "ray"

    def __init__(self, address: str | None = None, time_limit_s: float | None = None) -> None:
        self.address = address
        self.time_limit_s = time_limit_s

    def map(self, work: Work, tasks: Sequence[Task], out_dir: str) -> Iterator[tuple[Task, dict]]:
        ray = _ray()
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        try:
            remote = ray.remote(max_retries=0)(run_isolated)
            pending = {
                remote.options(num_cpus=cpus_for(task)).remote(
                    work, task, out_dir, self.time_limit_s
                ): task
                for task in tasks
            }
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                ref = done[0]
                task = pending.pop(ref)
                try:
                    row = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a worker that died is a row
                    reason = f"the Ray worker died: {type(exc).__name__}"
                    row = {"status": "failed", "reason": reason}
                yield task, row
        finally:
            if started_here:
                ray.shutdown()


def cpus_for(task: Task) -> int:
    """Cores a task reserves on its node. The speed guard (on by default) times the
    compiled model against FP32 inside the compile: sharing cores with other compiles made
    it keep quantized variants that are slower on a quiet machine (19 of 35 corpus models
    decided differently with two compiles on two cores), so a guarded compile reserves
    the threads it times with (its `threads` option, else every core: one guarded compile
    per node at a time). An unguarded compile takes one core."""
    if task.options.get("speed_guard") is False:
        return 1
    return max(1, int(task.options.get("threads") or os.cpu_count() or 1))


def make_executor(ray_address: str | None, use_ray: bool, time_limit_s: float | None):
    if use_ray:
        return RayExecutor(ray_address, time_limit_s)
    return LocalExecutor(time_limit_s)
