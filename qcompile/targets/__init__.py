"""Targets: one file each, holding the profile (data) and the pipeline (the compiler's story)."""

from __future__ import annotations

from qcompile.errors import QCompileError
from qcompile.targets.profile import TargetProfile

TARGETS = ("cpu", "gpu", "fpga")


def get_target(name: str):
    """The target module (with PROFILE and pipeline()) for a target name."""
    if name == "cpu":
        from qcompile.targets import cpu as module
    elif name == "gpu":
        from qcompile.targets import gpu as module
    elif name == "fpga":
        from qcompile.targets import fpga as module
    else:
        raise QCompileError(f"unknown target '{name}'", hint=f"choose one of {', '.join(TARGETS)}")
    return module


__all__ = ["TARGETS", "TargetProfile", "get_target"]
