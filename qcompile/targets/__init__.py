"""Targets: one file each, holding the profile (data) and the pipeline (the compiler's story).

A target is registered here by name; everything outside this package reads its
capabilities from its profile and never compares target names.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from qcompile.errors import QCompileError

# name -> module with PROFILE and pipeline(options); one line per target
REGISTRY: dict[str, str] = {
    "cpu": "qcompile.targets.cpu",
    "gpu": "qcompile.targets.gpu",
    "fpga": "qcompile.targets.fpga",
    "npu": "qcompile.targets.npu",
}
TARGETS = tuple(REGISTRY)


def get_target(name: str) -> ModuleType:
    """The target module (with PROFILE and pipeline()) for a target name."""
    if name not in REGISTRY:
        raise QCompileError(f"unknown target '{name}'", hint=f"choose one of {', '.join(TARGETS)}")
    return importlib.import_module(REGISTRY[name])


__all__ = ["REGISTRY", "TARGETS", "get_target"]
