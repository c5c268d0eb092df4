"""`qcompile batch`: manifests, the executors (this machine, Ray), reruns, failures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import builders
import numpy as np
import onnx
import pytest

from qcompile.errors import QCompileError
from qcompile.fleet import LocalExecutor, RayExecutor, Task, read_tasks, run_batch
from tests import fleet_work
from tests.conftest import QUIET, sha256

try:
    import ray  # noqa: F401

    HAVE_RAY = True
except ImportError:
    HAVE_RAY = False
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed (pip install '.[ray]')")

# no timing in the compiles: outputs must not depend on the machine's load
OPTIONS = {"speed_guard": False}


def _three_models(folder: Path, only: tuple[str, ...] = ("cnn", "mlp", "block")) -> Path:
    """cnn, mlp and block (or `only` some of them) with their data and a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    models = {
        "cnn": (builders.cnn(), builders.images(8, seed=1)),
        "mlp": (builders.mlp(), builders.features(32, seed=2)),
        "block": (builders.mobile_block(), builders.images(8, size=24, seed=3)),
    }
    models = {k: v for k, v in models.items() if k in only}
    for name, (proto, data) in models.items():
        onnx.save(proto, folder / f"{name}.onnx")
        np.savez(folder / f"{name}.npz", input=data)
    manifest = {
        "defaults": {"targets": ["cpu"], "options": OPTIONS},
        "models": [{"model": f"{n}.onnx", "calibration": f"{n}.npz"} for n in models],
    }
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def _hashes(out: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(out.glob("*.onnx"))}


def test_manifest_and_folder_give_the_same_tasks(tmp_path):
    manifest = _three_models(tmp_path / "models")
    tasks = read_tasks(manifest)
    assert [t.id for t in tasks] == ["cnn.cpu", "mlp.cpu", "block.cpu"]
    assert all(Path(t.model).is_file() and Path(t.calibration).is_file() for t in tasks)
    folder = read_tasks(tmp_path / "models", targets=["cpu", "fpga"])
    assert sorted(t.id for t in folder) == sorted(
        f"{n}.{t}" for n in ("cnn", "mlp", "block") for t in ("cpu", "fpga")
    )
    # the key follows content: same files → same key; another option → another key
    again = read_tasks(manifest)
    assert [t.key() for t in again] == [t.key() for t in tasks]
    other = tmp_path / "other.json"
    text = json.loads(manifest.read_text())
    text["defaults"]["options"] = {"speed_guard": False, "calib_method": "minmax"}
    for m in text["models"]:
        m["model"], m["calibration"] = (
            str(manifest.parent / m[k]) for k in ("model", "calibration")
        )
    other.write_text(json.dumps(text))
    assert read_tasks(other)[0].key() != tasks[0].key()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"models": []}, "lists no models"),
        ({"models": [{"model": "a.onnx"}]}, "needs 'model' and 'calibration'"),
        (
            {"models": [{"model": "a.onnx", "calibration": "a.npz", "targets": ["tpu"]}]},
            "unknown target 'tpu'",
        ),  # fmt: skip
    ],
)
def test_bad_manifests_are_user_errors(tmp_path, content, message):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(content))
    with pytest.raises(QCompileError, match=message):
        read_tasks(path)


def test_batch_compiles_measures_and_skips_what_is_done(tmp_path):
    tasks = read_tasks(_three_models(tmp_path / "models"))
    out = tmp_path / "out"
    result = run_batch(tasks, out, LocalExecutor(), bench_runs=3)
    assert [r["status"] for r in result.rows] == ["ok"] * 3, result.rows
    for row in result.rows:
        assert (out / row["output"]).is_file()
        assert row["speedup"] > 0 and row["output_sqnr_db"] > 10
        assert row["size_mb"] > 0 and row["fp32_size_mb"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"ok": 3, "refused": 0, "failed": 0}
    assert "| cnn.cpu | ok |" in (out / "summary.md").read_text()
    before = _hashes(out)
    rerun = run_batch(tasks, out, LocalExecutor(), bench_runs=3)
    assert all(r["cached"] for r in rerun.rows)
    assert _hashes(out) == before
    assert [r["speedup"] for r in rerun.rows] == [r["speedup"] for r in result.rows]


def test_failures_are_rows_and_a_rerun_retries_only_them(tmp_path):
    folder = tmp_path / "models"
    _three_models(folder, only=("mlp",))  # one good model: each task is a process
    proto, data = builders.mlp(), builders.features(16)
    for name in ("crash", "raise"):
        onnx.save(proto, folder / f"{name}.onnx")
        np.savez(folder / f"{name}.npz", input=data)
    (folder / "nodata.onnx").write_bytes((folder / "mlp.onnx").read_bytes())  # no .npz
    tasks = read_tasks(folder)
    out = tmp_path / "out"
    result = run_batch(tasks, out, LocalExecutor(time_limit_s=120), work=fleet_work.faulty,
                       bench_runs=0)  # fmt: skip
    rows = {r["name"]: r for r in result.rows}
    assert rows["crash"]["status"] == "failed" and "died (exit code 3)" in rows["crash"]["reason"]
    assert (
        rows["raise"]["status"] == "failed" and "a bug in the compiler" in rows["raise"]["reason"]
    )
    assert rows["nodata"]["status"] == "refused" and "nodata.npz" in rows["nodata"]["reason"]
    assert rows["mlp"]["status"] == "ok"
    rerun = run_batch(tasks, out, LocalExecutor(time_limit_s=120), work=fleet_work.faulty,
                      bench_runs=0)  # fmt: skip
    attempts = {t.name: len((out / f"{t.id}.attempts").read_text()) for t in tasks}
    assert attempts == {"mlp": 1, "crash": 2, "raise": 2, "nodata": 1}
    assert len(rerun.failed) == 2


def test_a_compile_past_its_time_limit_is_stopped(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(builders.mlp(), folder / "hang.onnx")
    np.savez(folder / "hang.npz", input=builders.features(16))
    result = run_batch(read_tasks(folder), tmp_path / "out", LocalExecutor(time_limit_s=3),
                       work=fleet_work.faulty, bench_runs=0)  # fmt: skip
    (row,) = result.rows
    assert row["status"] == "failed" and "time limit of 3 s" in row["reason"]


def test_cli_batch_exit_codes(tmp_path):
    from qcompile.cli import main

    folder = tmp_path / "models"
    _three_models(folder, only=("mlp",))  # exit codes: one model is enough
    out = tmp_path / "out"
    assert main(["batch", str(folder / "manifest.json"), "-o", str(out), "--bench-runs", "0",
                 QUIET[0]]) == 0  # fmt: skip
    assert len(list(out.glob("*.onnx"))) == 1
    assert main(["batch", str(tmp_path / "missing.json"), "-o", str(out)]) == 2


@pytest.mark.slow  # 18 s; Ray in CI is covered by test_fanout's Ray test (CI's 6 minutes)
@needs_ray
def test_ray_gives_the_same_outputs_as_this_machine(tmp_path):
    tasks = read_tasks(_three_models(tmp_path / "models", only=("cnn", "mlp")))
    local = run_batch(tasks, tmp_path / "local", LocalExecutor(), bench_runs=0)
    remote = run_batch(tasks, tmp_path / "ray", RayExecutor(), bench_runs=0)
    assert _hashes(tmp_path / "local") == _hashes(tmp_path / "ray")
    metrics = ("status", "output_sqnr_db", "cosine", "size_mb")
    assert [[r[m] for m in metrics] for r in local.rows] == [
        [r[m] for m in metrics] for r in remote.rows
    ]


@pytest.mark.slow  # 32 s of Ray start-up and worker death: over CI's 6-minute budget
@needs_ray
def test_a_killed_ray_worker_is_a_failed_row(tmp_path):
    folder = tmp_path / "models"
    _three_models(folder)
    onnx.save(builders.mlp(), folder / "kill_worker.onnx")
    np.savez(folder / "kill_worker.npz", input=builders.features(16))
    tasks = read_tasks(folder)
    result = run_batch(tasks, tmp_path / "out", RayExecutor(time_limit_s=120),
                       work=fleet_work.faulty, bench_runs=0)  # fmt: skip
    rows = {r["name"]: r for r in result.rows}
    assert rows["kill_worker"]["status"] == "failed"
    assert "Ray worker died" in rows["kill_worker"]["reason"]
    assert rows["mlp"]["status"] == "ok"


def test_guarded_compiles_reserve_the_cores_they_time_on():
    from qcompile.fleet.executor import cpus_for

    def task(**options):
        return Task("m", "cpu", "m.onnx", "m.npz", options)

    assert cpus_for(task(threads=3)) == 3
    assert cpus_for(task()) == (os.cpu_count() or 1)
    assert cpus_for(task(speed_guard=False, threads=4)) == 1
