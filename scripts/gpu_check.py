"""Helpers of scripts/gpu_check.sh: compare a CPU and a GPU run, read one step's figures, and
write the summary. `python scripts/gpu_check.py compare A B OUT` | `run RUN_DIR` | `summary OUT`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Per-layer tolerances of the strict (fp32, TF32 off) CPU-vs-GPU comparison: float32 sums in
# another order move the Eq 5 errors in their 4th-5th digit; the GD-fitted Z moves more.
ERR_BEFORE_REL, ERR_AFTER_REL = 1e-3, 2e-2


def _result(run_dir: Path) -> dict:
    for name in ("results.json", "failed.json"):
        if (run_dir / name).exists():
            return json.loads((run_dir / name).read_text())
    raise SystemExit(f"VERDICT: no results.json or failed.json in {run_dir}")


def compare(cpu_dir: str, gpu_dir: str, out: str) -> int:
    """Exit 0: identical ranks and errors within tolerance; 1: not."""
    a, b = _result(Path(cpu_dir)), _result(Path(gpu_dir))
    if a.get("status") != "complete" or b.get("status") != "complete":
        print("VERDICT: a run did not complete:", a.get("error"), b.get("error"))
        return 1
    ranks_a, ranks_b = [r["rank"] for r in a["layers"]], [r["rank"] for r in b["layers"]]
    rel = {k: max(abs(y[k] - x[k]) / max(abs(x[k]), 1e-12) for x, y in zip(a["layers"], b["layers"]))
           for k in ("err_before", "err_after", "energy_loss")}
    ok = ranks_a == ranks_b and rel["err_before"] <= ERR_BEFORE_REL and rel["err_after"] <= ERR_AFTER_REL
    report = {"ranks_identical": ranks_a == ranks_b, "rank_flips": sum(x != y for x, y in zip(ranks_a, ranks_b)),
              "max_rel_diff": rel, "tolerance": {"err_before": ERR_BEFORE_REL, "err_after": ERR_AFTER_REL},
              "top1": {"cpu": a.get("top1"), "gpu": b.get("top1")}, "devices": [a["device"], b["device"]]}
    Path(out).write_text(json.dumps(report, indent=1))
    print(f"NOTE: ranks identical={report['ranks_identical']} max rel diff {json.dumps(rel)}")
    print("VERDICT:", "agree" if ok else "DISAGREE")
    return 0 if ok else 1


def run_figures(run_dir: str) -> int:
    """Print a finished run's stage seconds and top-1 (for the step's log and the summary)."""
    r = _result(Path(run_dir))
    print(f"NOTE: status={r.get('status')} device={r.get('device')} seconds={json.dumps(r.get('seconds'))}")
    if r.get("status") != "complete":
        print("VERDICT:", r.get("error"))
        return 1
    print(f"NOTE: top1 {r.get('top1')} params {r.get('params_before')} -> {r.get('params_after')}")
    return 0


def summary(out: str) -> int:
    """summary.json from summary.tsv plus each step's figures; exit 1 if any step failed."""
    root = Path(out)
    steps = []
    for line in (root / "summary.tsv").read_text().splitlines():
        name, status, seconds, note = (line.split("\t") + [""] * 4)[:4]
        steps.append({"step": name, "status": status, "seconds": int(seconds or 0), "note": note})
    figures = {}
    for name in ("agree.json",):
        if (root / name).exists():
            figures["cpu_vs_gpu"] = json.loads((root / name).read_text())
    bench = next(root.glob("bench/bench.json"), None)
    if bench is not None:
        b = json.loads(bench.read_text())
        figures["bench"] = {"summary": b.get("summary"), "targets": b.get("targets"), "machine": b.get("machine")}
    methods = next(root.glob("methods/methods.json"), None)
    if methods is not None:  # the cost of each method side by side (amrc-bench --method)
        m = json.loads(methods.read_text())
        figures["methods"] = {"end_to_end_s": {k: r["end_to_end_s"] for k, r in m["runs"].items()},
                              "image_passes": {k: r["image_passes"] for k, r in m["runs"].items()},
                              "vs_paper": m.get("vs_paper")}
    failed = [s["step"] for s in steps if s["status"] in ("FAIL", "TIMEOUT")]
    verdict = {"pass": not failed, "failed": failed, "steps": steps, "figures": figures}
    (root / "summary.json").write_text(json.dumps(verdict, indent=1))
    print(f"gpu_check: {'PASS' if not failed else 'FAIL'}; " + ", ".join(f"{s['step']} {s['status']}" for s in steps))
    return 0 if not failed else 1


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    raise SystemExit({"compare": compare, "run": run_figures, "summary": summary}[cmd](*args))
