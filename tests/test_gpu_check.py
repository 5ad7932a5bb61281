"""scripts/gpu_check.sh on the CPU (CHECK_DEVICE=cpu): its plumbing (steps, timeouts, the
agreement comparison, the summary) works here; on a GPU machine the same script measures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_script(out: Path, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, CHECK_DEVICE="cpu", SKIP_SETUP="1", OUT=str(out), OMP_NUM_THREADS="1", **env)
    full.pop("AMRC_DEVICE", None)  # the script chooses the devices itself
    return subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=600)


def test_gpu_check_plumbing_on_cpu(tmp_path):
    proc = _run_script(tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert proc.returncode == 0 and summary["pass"], proc.stdout + proc.stderr
    assert [s["step"] for s in summary["steps"]] == ["env", "cuda_tests", "agree_cpu", "agree_gpu",
                                                      "agree_compare", "bench", "methods", "full_run"]
    assert summary["figures"]["cpu_vs_gpu"]["ranks_identical"] is True
    assert summary["figures"]["bench"]["summary"]  # the benchmark's figures are carried over
    assert set(summary["figures"]["methods"]["vs_paper"]) == {"paper", "ours_oa", "ours_wf"}
    # an exhausted budget skips the later steps (never half-runs them) and still writes the summary
    proc = _run_script(tmp_path / "short", BUDGET_S="12")
    steps = json.loads((tmp_path / "short" / "summary.json").read_text())["steps"]
    assert steps[-1]["status"] == "SKIP" and "budget" in steps[-1]["note"]


def test_compare_flags_a_rank_flip_and_an_error_drift(tmp_path):
    def write(name: str, ranks: list[int], err: float) -> Path:
        d = tmp_path / name
        d.mkdir()
        layers = [{"rank": r, "err_before": err, "err_after": err / 2, "energy_loss": 0.1} for r in ranks]
        (d / "results.json").write_text(json.dumps({"status": "complete", "device": name, "layers": layers, "top1": 1.0}))
        return d

    cpu = write("cpu", [4, 5], 1e-2)
    script = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "compare", str(cpu)]
    ok = subprocess.run(script + [str(write("same", [4, 5], 1e-2 * (1 + 1e-5))), str(tmp_path / "a.json")])
    flip = subprocess.run(script + [str(write("flip", [4, 6], 1e-2)), str(tmp_path / "b.json")])
    drift = subprocess.run(script + [str(write("drift", [4, 5], 1.1e-2)), str(tmp_path / "c.json")])
    assert (ok.returncode, flip.returncode, drift.returncode) == (0, 1, 1)
    assert json.loads((tmp_path / "b.json").read_text())["rank_flips"] == 1


def test_every_cuda_test_is_selected_by_the_gpu_check():
    """gpu_check.sh's `cuda_tests` step runs `pytest -k cuda`: every test that skips without a GPU
    must carry "cuda" in its name, or a GPU machine never runs it."""
    import re

    decorated = re.compile(r"@pytest\.mark\.skipif\(not torch\.cuda\.is_available\(\)[^\n]*\n(?:@[^\n]*\n)*def (\w+)")
    found = [(path.name, name) for path in sorted((ROOT / "tests").glob("test_*.py"))
             for name in decorated.findall(path.read_text())]
    assert len(found) >= 7  # the pattern still finds the GPU tests (one per file today)
    assert [f"{file}::{name}" for file, name in found if "cuda" not in name] == []
