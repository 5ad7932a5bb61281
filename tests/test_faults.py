"""Faults: kill -9 mid-run and mid-multirun, crashes inside atomic writes.

Whatever moment a process dies at, a later run never reads a torn or mismatched file as
valid: results.json and cache entries are either the old complete ones, new complete ones, or
absent (and then recomputed). Finished sweep jobs are never rerun or duplicated.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from amrc_exp import io
from amrc_exp.experiment import stats_cache as cache
from amrc_exp.compress.calibrate import LayerStats
from amrc_exp.experiment.results import RESULTS, finished_result
from tests.test_bad_input import RANDOM, ROOT, TINY

SLOW_Z = "zfit.iters=1000"  # ~2 s of Z fitting after calibration: a window to kill in


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", AMRC_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _cmd(*args: str, flags: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "amrc_exp", *flags, *TINY, RANDOM, SLOW_Z, *args]


def _run_and_kill(cmd: list[str], when, timeout: float = 150) -> list[str]:
    """Start `cmd`, SIGKILL it as soon as `when(lines so far)` holds; return the lines seen."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if when(lines):
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=30)
    finally:
        watchdog.cancel()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    return lines


def _finish(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _valid_cache_entries(cache_dir: Path) -> int:
    """Number of stats entries, asserting each one that has a manifest loads as valid."""
    manifests = list((cache_dir / "stats").glob("*.json"))
    for manifest in manifests:
        assert cache.load_stats(str(cache_dir), manifest.stem) is not None, manifest
    return len(manifests)


# ----------------------------------------------------------------------------- kill -9, one run


def test_kill9_mid_run_leaves_no_result_and_rerun_completes(tmp_path):
    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    cmd = _cmd(f"hydra.run.dir={run_dir}", f"cache_dir={cache_dir}")
    lines = _run_and_kill(cmd, lambda seen: "stage compensate ..." in seen[-1])
    assert any("stage calibrate done" in l for l in lines)
    assert not (run_dir / RESULTS).exists()
    assert _valid_cache_entries(cache_dir) == 1  # calibration finished before the kill: kept, valid

    _finish(cmd)
    res = json.loads((run_dir / RESULTS).read_text())
    assert res["status"] == "complete" and res["calibration_cached"] is True
    assert not list(tmp_path.rglob("*.tmp"))


# ----------------------------------------------------------------------------- kill -9, multirun


def test_kill9_mid_multirun_then_rerun_keeps_finished_jobs_and_completes_the_rest(tmp_path):
    sweep, cache_dir = tmp_path / "sweep", tmp_path / "cache"
    cmd = _cmd("ratio=0.3,0.4,0.5", f"hydra.sweep.dir={sweep}", f"cache_dir={cache_dir}", flags=("-m",))

    def in_second_job(seen: list[str]) -> bool:
        started = [i for i, l in enumerate(seen) if "#1 :" in l]
        return bool(started) and "stage compensate ..." in seen[-1] and len(seen) - 1 > started[0]

    _run_and_kill(cmd, in_second_job)
    first = sweep / "0" / RESULTS
    assert json.loads(first.read_text())["status"] == "complete"
    assert not (sweep / "1" / RESULTS).exists() and not (sweep / "2" / RESULTS).exists()
    before = (first.read_bytes(), first.stat().st_mtime_ns, (sweep / "0" / "model" / "model.safetensors").stat().st_mtime_ns)

    proc = _finish(cmd)
    log = proc.stdout + proc.stderr
    assert log.count("already holds a finished result") == 1  # job 0 skipped, not redone
    after = (first.read_bytes(), first.stat().st_mtime_ns, (sweep / "0" / "model" / "model.safetensors").stat().st_mtime_ns)
    assert after == before
    results = sorted(sweep.rglob(RESULTS))
    assert [p.parent.name for p in results] == ["0", "1", "2"]  # one each: nothing duplicated
    for job, ratio in zip(results, (0.3, 0.4, 0.5)):
        res = json.loads(job.read_text())
        assert res["status"] == "complete" and res["config"]["ratio"] == ratio
    assert not list(tmp_path.rglob("*.tmp"))


# ----------------------------------------------------------------------------- kill -9 while writing

_WRITER = textwrap.dedent("""
    import sys, torch
    from amrc_exp import io
    from amrc_exp.experiment import stats_cache as cache
    from amrc_exp.compress.calibrate import LayerStats
    cache_dir, results = sys.argv[1], sys.argv[2]
    def stats(v):
        s = LayerStats(H=torch.full((256, 256), v, dtype=torch.float64),
                       x_rep=torch.full((50, 256), v, dtype=torch.float64), n_samples=int(v), n_tokens=50)
        return {"calib": {f"l{i}": s for i in range(8)}}
    print("ready", flush=True)
    i = 0
    while True:  # alternate two versions of the same entry until killed
        v = 1.0 + i % 2
        cache.save_stats(cache_dir, "k", stats(v))
        io.atomic_write_json(results, {"status": "complete", "v": v, "pad": [v] * 50000})
        i += 1
""")


@pytest.mark.parametrize("trial", range(2))
def test_kill9_while_writing_never_leaves_a_file_read_as_valid(tmp_path, trial):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    results = tmp_path / "out" / RESULTS
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(results)],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3 + random.Random(trial).random() * 0.7)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    loaded = cache.load_stats(str(tmp_path / "cache"), "k")
    if loaded is not None:  # one complete version, never a mix of two saves
        s = loaded["calib"]["l0"]
        v = float(s.H[0, 0])
        assert v in (1.0, 2.0) and s.n_samples == int(v)
        assert all(torch.equal(x.H, torch.full_like(x.H, v)) for x in loaded["calib"].values())
    if results.exists():
        res = json.loads(results.read_text())  # never torn
        assert res["status"] == "complete" and res["pad"] == [res["v"]] * 50000


# ----------------------------------------------------------------------------- crashes inside atomic writes


@pytest.mark.parametrize("crash", ["replace_fails", "writer_raises", "interrupted"])
def test_atomic_write_crash_keeps_old_file_and_no_temp(tmp_path, monkeypatch, crash):
    path = tmp_path / RESULTS
    io.atomic_write_json(path, {"status": "complete", "v": 1})
    old = path.read_bytes()
    if crash == "replace_fails":
        def boom(*a, **k):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(io.os, "replace", boom)
        with pytest.raises(OSError):
            io.atomic_write_json(path, {"status": "complete", "v": 2})
    else:
        exc = RuntimeError if crash == "writer_raises" else KeyboardInterrupt
        with pytest.raises(exc):
            with io.atomic_path(path) as tmp:
                tmp.write_text('{"status": "comp')  # half of the new file, then the crash
                raise exc("killed mid-write")
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == [RESULTS]


def test_torn_or_foreign_results_file_is_never_a_finished_result(tmp_path):
    config = {"ratio": 0.5, "out_dir": str(tmp_path), "cache_dir": "x"}
    path = tmp_path / RESULTS
    path.write_text("[]")  # valid JSON, not an object
    assert finished_result(path, config) is None
    path.unlink()
    (tmp_path / f".{RESULTS}.abc123.tmp").write_text('{"status": "complete", "config"')  # a kill's leftover
    assert finished_result(path, config) is None
    path.write_text(json.dumps({"status": "complete", "config": config})[:-7])  # torn (not atomic)
    assert finished_result(path, config) is None
    for other in ({"status": "failed", "config": config},
                  {"status": "complete", "config": dict(config, ratio=0.4)}):
        io.atomic_write_json(path, other)
        assert finished_result(path, config) is None
    io.atomic_write_json(path, {"status": "complete", "config": dict(config, out_dir="/elsewhere")})
    assert finished_result(path, config)["status"] == "complete"


def _stats(v: float) -> dict[str, dict[str, LayerStats]]:
    s = LayerStats(H=torch.eye(4, dtype=torch.float64) * v, x_rep=torch.ones(3, 4, dtype=torch.float64) * v,
                   n_samples=8, n_tokens=3)
    h = LayerStats(s.H.clone(), s.x_rep.clone(), 8, 3)
    return {"calib": {"blocks.0.mlp.fc1": s}, "heldout": {"blocks.0.mlp.fc1": h}}


def test_cache_save_interrupted_before_manifest_is_never_valid(tmp_path, monkeypatch, caplog):
    d = str(tmp_path)
    real = cache.atomic_write_json

    def killed(*a, **k):  # dies after the tensors were renamed into place, before the manifest
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.save_stats(d, "k", _stats(1.0))
    assert cache.load_stats(d, "k") is None  # tensors without a manifest: absent

    monkeypatch.setattr(cache, "atomic_write_json", real)
    cache.save_stats(d, "k", _stats(1.0))
    assert float(cache.load_stats(d, "k")["calib"]["blocks.0.mlp.fc1"].H[0, 0]) == 1.0
    monkeypatch.setattr(cache, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.save_stats(d, "k", _stats(2.0))  # new tensors next to the old manifest
    assert cache.load_stats(d, "k") is None and "different saves" in caplog.text
    monkeypatch.setattr(cache, "atomic_write_json", real)
    cache.save_stats(d, "k", _stats(2.0))
    assert float(cache.load_stats(d, "k")["calib"]["blocks.0.mlp.fc1"].H[0, 0]) == 2.0
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncated_tensors", "garbage_manifest", "missing_tensors",
                                    "missing_layer", "nan_statistics"])
def test_corrupt_cache_entry_is_reported_and_recomputed(tmp_path, caplog, damage):
    d = str(tmp_path)
    cache.save_stats(d, "k", _stats(1.0))
    tensors, manifest = tmp_path / "stats" / "k.safetensors", tmp_path / "stats" / "k.json"
    if damage == "truncated_tensors":
        tensors.write_bytes(tensors.read_bytes()[:100])
    elif damage == "garbage_manifest":
        manifest.write_text('{"format": 1, "sets": {')
    elif damage == "missing_tensors":
        tensors.unlink()
    elif damage == "missing_layer":
        m = json.loads(manifest.read_text())
        m["sets"]["calib"]["blocks.1.attn.qkv"] = {"n_samples": 8, "n_tokens": 3, "n_skipped": 0}
        manifest.write_text(json.dumps(m))
    else:
        bad = _stats(1.0)
        bad["calib"]["blocks.0.mlp.fc1"].H[1, 2] = float("nan")
        cache.save_stats(d, "k", bad)
    assert cache.load_stats(d, "k") is None
    assert "corrupt" in caplog.text and not manifest.exists()  # reported, and retired
    cache.save_stats(d, "k", _stats(1.0))  # the recomputed entry is then used
    assert cache.load_stats(d, "k") is not None


def test_unwritable_cache_never_costs_the_statistics(tmp_path, monkeypatch, caplog):
    from safetensors import SafetensorError

    def full(*a, **k):  # what safetensors raises when the disk fills up mid-write
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(cache, "save_file", full)
    cache.save_stats(str(tmp_path), "k", _stats(1.0))  # warns, does not raise
    assert "continuing without caching" in caplog.text
    assert cache.load_stats(str(tmp_path), "k") is None and not list(tmp_path.rglob("*.tmp"))


def test_tracking_failure_mid_run_never_costs_the_results(tmp_path, monkeypatch, caplog, one_thread):
    """W&B dying mid-run (full disk, crashed service) disables tracking, not the run."""
    from amrc_exp.experiment import run as run_module
    from amrc_exp.experiment.tracking import WandbTracker
    from tests.conftest import compose_cfg

    class DeadRun:
        summary: dict = {}

        def log(self, metrics):
            raise OSError(28, "No space left on device")

        def finish(self):
            raise RuntimeError("wandb service process is gone")

    def dead_tracker(*args, **kwargs):
        tracker = WandbTracker.__new__(WandbTracker)
        tracker.run, tracker._wandb, tracker._broken, tracker.mode = DeadRun(), None, False, "offline"
        return tracker

    monkeypatch.setattr(run_module, "make_tracker", dead_tracker)
    res = run_module.run(compose_cfg(TINY + [RANDOM, f"out_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'c'}"]))
    assert res["status"] == "complete"
    assert json.loads((tmp_path / "out" / RESULTS).read_text())["status"] == "complete"
    assert caplog.text.count("tracking disabled") == 2  # the first log call, then finish
