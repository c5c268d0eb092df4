"""Per-compile clocks: accumulators bound to a context variable for the duration of a
compile, so code deep inside (ORT sessions, calibration observers) adds to the clock of
the compile that called it, threads started inside included."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def bound(var: contextvars.ContextVar[T | None], clock: T) -> Iterator[T]:
    """Make `clock` the value of `var` inside the block."""
    token = var.set(clock)
    try:
        yield clock
    finally:
        var.reset(token)
