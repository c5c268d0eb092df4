"""Work functions for the batch tests: a real compile, and faults a batch must survive.
They run in the batch's child processes, so they live in a module those can import."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from qcompile.fleet import compile_task


def _count(out_dir: str, task) -> None:
    """Leave a mark per attempt, so a test can count which tasks a rerun retried."""
    with open(Path(out_dir) / f"{task.id}.attempts", "a") as f:
        f.write("x")


def faulty(task, out_dir: str):
    """The fault a model's name asks for; a plain compile otherwise."""
    _count(out_dir, task)
    if task.name == "crash":
        os._exit(3)  # the compile process dies without a word
    if task.name == "hang":
        time.sleep(600)
    if task.name == "raise":
        raise RuntimeError("a bug in the compiler")
    if task.name == "kill_worker":  # the process that started us (a Ray worker) dies
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(600)
    return compile_task(task, out_dir)
