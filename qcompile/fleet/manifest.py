"""What a batch compiles: a manifest (YAML or JSON) or a folder of models, as tasks.

A manifest::

    defaults:                 # optional: applied to every model
      targets: [cpu]
      options: {calib_method: mse}
    models:
      - name: resnet          # optional: the file's stem
        model: resnet.onnx    # relative paths are relative to the manifest
        calibration: resnet.npz
        targets: [cpu, fpga]  # optional: the defaults' targets
        options: {exclude: ["op:Softmax"]}   # CompileOptions fields, as in the Python API

A folder: every `NAME.onnx` in it, with its calibration data in `NAME.npz` beside it.

Each (model, target) is one `Task`. Its `key` addresses its content: the bytes of the
model and of the calibration data, the target, the options and the library versions, so
a rerun can skip what was compiled from exactly the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcompile.errors import QCompileError
from qcompile.targets import TARGETS


@dataclass(frozen=True)
class Task:
    name: str
    target: str
    model: str
    calibration: str
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def id(self) -> str:
        return f"{self.name}.{self.target}"

    def key(self) -> str:
        """SHA-256 of everything the compiled output depends on."""
        digest = hashlib.sha256()
        for part in (
            _file_digest(self.model),
            _file_digest(self.calibration),
            self.target,
            json.dumps(self.options, sort_keys=True, default=str),
            library_versions(),
        ):
            digest.update(part.encode())
            digest.update(b"\0")
        return digest.hexdigest()


def library_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    names = ("qcompile", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy")
    found = []
    for name in names:
        try:
            found.append(f"{name}={version(name)}")
        except PackageNotFoundError:
            found.append(f"{name}=?")
    return " ".join(found)


def _file_digest(path: str) -> str:
    if not os.path.isfile(path):  # e.g. 'random': the string is the input
        return f"literal:{path}"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_tasks(source: str | os.PathLike, targets: list[str] | None = None) -> list[Task]:
    """Tasks from a manifest file or a folder; `targets` (e.g. from --targets) replaces
    every model's targets."""
    path = Path(source)
    if path.is_dir():
        entries = _folder_entries(path)
        defaults: dict[str, Any] = {}
    elif path.is_file():
        manifest = _load(path)
        defaults = manifest.get("defaults") or {}
        entries = manifest.get("models")
        if not isinstance(entries, list) or not entries:
            raise QCompileError(
                "the manifest lists no models", path=str(path), hint="add a 'models:' list"
            )
        entries = [_entry(e, path.parent, i, path) for i, e in enumerate(entries)]
    else:
        raise QCompileError("no such manifest or folder", path=str(path))
    tasks: list[Task] = []
    for entry in entries:
        wanted = targets or entry.get("targets") or defaults.get("targets") or ["cpu"]
        options = {**(defaults.get("options") or {}), **(entry.get("options") or {})}
        for target in wanted:
            if target not in TARGETS:
                raise QCompileError(
                    f"unknown target '{target}'",
                    path=str(path),
                    hint=f"targets are: {', '.join(TARGETS)}",
                )
            tasks.append(Task(entry["name"], target, entry["model"], entry["calibration"], options))
    ids = [t.id for t in tasks]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise QCompileError(
            f"two manifest rows compile the same name for one target: {repeated[0]}",
            path=str(path),
            hint="give each model a distinct 'name'",
        )
    return tasks


def _load(path: Path) -> dict[str, Any]:
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise QCompileError(f"cannot read the manifest: {exc}", path=str(path)) from exc
    if not isinstance(data, dict):
        raise QCompileError("the manifest must be a mapping with 'models:'", path=str(path))
    return data


def _entry(raw: Any, base: Path, index: int, manifest: Path) -> dict[str, Any]:
    if not isinstance(raw, dict) or "model" not in raw or "calibration" not in raw:
        raise QCompileError(
            f"manifest model #{index + 1} needs 'model' and 'calibration'", path=str(manifest)
        )
    model = _resolve(raw["model"], base)
    calibration = raw["calibration"]
    if calibration != "random":
        calibration = _resolve(calibration, base)
    options = raw.get("options") or {}
    if not isinstance(options, dict):
        raise QCompileError(f"manifest model #{index + 1}: 'options' must be a mapping")
    return {
        "name": str(raw.get("name") or Path(model).stem),
        "model": model,
        "calibration": calibration,
        "targets": raw.get("targets"),
        "options": options,
    }


def _resolve(value: str, base: Path) -> str:
    path = Path(os.path.expanduser(str(value)))
    return str(path if path.is_absolute() else (base / path).resolve())


def _folder_entries(folder: Path) -> list[dict[str, Any]]:
    models = sorted(folder.glob("*.onnx"))
    if not models:
        raise QCompileError("the folder holds no .onnx models", path=str(folder))
    return [
        {"name": m.stem, "model": str(m.resolve()), "calibration": str(m.with_suffix(".npz"))}
        for m in models
    ]
