"""From sweep directories to table cells: the complete runs (`load_results`), one row per run
(`runs_frame`), one row per cell with mean ± sample std over its seeds (`cells_frame`), and the
formatting and notes every table family shares (`Table`, `fmt_pm`, `cell`, `settings_note`).

Runs whose configs differ only in ``seed`` (and where they ran) are one cell. Runs marked
``synthetic`` (random weights or synthetic data) never fill an accuracy cell: it shows "—" in
Markdown and is empty in the CSV, while their parameter and MiB cells are valid.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from amrc_exp.experiment.results import inputs_of

log = logging.getLogger(__name__)

RESULTS = "results.json"
DASH = "—"
SYNTHETIC_NOTE = (f"{DASH}: the run used random weights or synthetic data (`synthetic: true` in its "
                  "results.json), so its accuracy is not a result; its parameter and MiB cells are valid.")

# --------------------------------------------------------------------------- the paper's numbers

# Architecture labels as the paper prints them, by timm model name (and ours for the embedded models).
ARCH = {
    "deit_base_patch16_224": "DeiT-B",
    "deit_small_patch16_224": "DeiT-S",
    "deit_tiny_patch16_224": "DeiT-T",
    "vit_base_patch16_224": "ViT-B",
    "vit_large_patch16_224": "ViT-L",
    "swin_base_patch4_window7_224": "Swin-B",
    "fmnist_vit": "FMNIST-ViT",
    "fmnist_vit_small": "FMNIST-ViT-S",
}


# --------------------------------------------------------------------------- loading runs


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """Every results.json under `paths` (a path may also be a results.json itself), sorted."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if p.is_file() and p.name == RESULTS:
            found.add(p)
        elif p.is_dir():
            found.update(p.rglob(RESULTS))
    return sorted(found)


def load_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """The complete runs under `paths`: each results.json dict plus `_dir` (its job directory).

    Unreadable files, runs whose status is not "complete", and failed.json are skipped."""
    runs = []
    roots = [Path(p) for p in paths]
    _INPUTS.clear()  # files may have changed since an earlier call in this process
    for path in find_results(roots):
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            log.warning("skipping unreadable %s (%s)", path, err)
            continue
        if not isinstance(res, dict) or res.get("status") != "complete":
            continue
        if "inputs" in res and _current_inputs(res["config"]) != res["inputs"]:
            log.warning("skipping stale %s: its weights file or data changed since it ran (rerun the job)", path)
            continue
        res["_dir"] = str(path.parent)
        res["_run"] = _relative(path.parent, roots)
        runs.append(res)
    return runs


# weights/data hashes per (weights, model name, data name, root): each file read once. The model's
# name is part of the key: a `shipped` checkpoint (and its SHA-256) is the model's own.
_INPUTS: dict[tuple, dict] = {}


def _current_inputs(config: dict[str, Any]) -> dict[str, Any]:
    key = (config["model"]["weights"], config["model"]["name"], config["data"]["name"], config["data"].get("root"))
    if key not in _INPUTS:
        _INPUTS[key] = inputs_of(config)
    return _INPUTS[key]


def _relative(job_dir: Path, roots: list[Path]) -> str:
    """`<sweep dir name>/<job subdir>`: how a run is named in the CSVs (no machine-specific prefix)."""
    for root in roots:
        base = root.parent if root.is_dir() else root.parent.parent
        try:
            return str(job_dir.resolve().relative_to(base.resolve()))
        except ValueError:
            continue
    return str(job_dir)


def method_of(config: dict[str, Any]) -> str:
    """The run's `method` label (set by conf/method/*.yaml), "dense" for compress=false, or a
    generic decomp/schedule/z_type/solver label for a run launched without one."""
    if is_dense_config(config):
        return "dense"
    if config.get("method") == "svd_ft" and not config["finetune"]["epochs"]:
        return "svd"  # the same baseline, reported without its fine-tuning
    if config.get("method"):
        return config["method"]
    return "/".join(str(config[k][f]) for k, f in (("decomp", "name"), ("schedule", "name"),
                                                     ("z_type", "name"), ("zfit", "solver")))


def is_dense_config(config: dict[str, Any]) -> bool:
    """No compression (`compress: false`, the dense / PTQ-only path)."""
    return config.get("compress") is False


def runs_frame(runs: list[dict[str, Any]]):
    """One row per run with the fields the tables use (a pandas DataFrame)."""
    rows = []
    for r in runs:
        c = r["config"]
        t1 = r.get("table1") or {}
        cell = json.dumps({k: v for k, v in c.items() if k not in NOT_THE_CELL}, sort_keys=True, default=str)
        dense = is_dense_config(c) or (r.get("params_after") == r.get("params_before") and not r.get("layers"))
        rows.append({
            "run": r.get("_run", r["_dir"]),
            "cell": cell,
            "model": c["model"]["name"],
            "arch": ARCH.get(c["model"]["name"], c["model"]["name"]),
            "method": "dense" if dense else method_of(c),
            "decomp": c["decomp"]["name"],
            "schedule": c["schedule"]["name"],
            "z_type": c["z_type"]["name"],
            "zfit_solver": c["zfit"]["solver"],
            "ratio": None if dense else c.get("ratio"),
            "target_params": c.get("target_params"),
            "ptq_bits": int(c.get("ptq", {}).get("bits", 0)),
            "finetune_epochs": int(c["finetune"]["epochs"]),
            "seed": c.get("seed"),
            "synthetic": bool(r.get("synthetic", True)),  # unknown provenance never fills accuracy
            "params_before": r.get("params_before"),
            "params_after": r.get("params_after"),
            "ratio_achieved": r.get("ratio_achieved"),
            "top1_baseline": r.get("top1_baseline"),
            "top1_compressed": r.get("top1_compressed"),
            "top1_finetuned": r.get("top1_finetuned"),
            "top1_ptq": r.get("top1_ptq"),
            "top1": r.get("top1"),
            "size_mib_dense_fp16": r.get("size_mib_dense_fp16"),
            "size_mib_compressed_fp16": r.get("size_mib_compressed_fp16"),
            "size_mib_ptq": r.get("size_mib_ptq"),
            "z_overhead": t1.get("z_overhead"),
            "err_before": t1.get("err_before"),
            "err_after": t1.get("err_after"),
            "n_factorized": t1.get("n_factorized"),
            **{f"{short}_{stage}": (r.get("fidelity") or {}).get(stage, {}).get(key)
               for stage in ("compressed", "finetuned") for short, key in (("agree", "agreement"), ("kl", "kl"))},
            "compress_seconds": sum(v for k, v in (r.get("seconds") or {}).items() if k in COMPRESS_STAGES),
            "ptq_frontier": r.get("ptq_frontier") or [],
        })
    return pd.DataFrame(rows)


# Config keys that do not define a table cell: runs that differ only in them are repeats of
# one cell (`seed`: calibration sampling and fine-tune order) or the same run elsewhere.
NOT_THE_CELL = ("seed", "out_dir", "cache_dir", "logger")
# The measured fields a cell reports as mean, sample std and count over its seeds.
STAT_FIELDS = ("params_after", "ratio_achieved", "top1_baseline", "top1_compressed", "top1_finetuned", "top1_ptq",
               "top1", "size_mib_dense_fp16", "size_mib_compressed_fp16", "size_mib_ptq", "z_overhead",
               "err_before", "err_after", "agree_compressed", "kl_compressed", "agree_finetuned", "kl_finetuned",
               "compress_seconds")


def _missing(v: Any) -> bool:
    """A run without this value: None or NaN."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def mean_std(values: Iterable[Any]) -> tuple[float, float, int]:
    """(mean, sample std, n) of the values that are numbers (None and NaN left out); std 0 for n = 1.
    `statistics` sums exactly, so equal values give their value and a std of exactly 0."""
    vals = [float(v) for v in values if not _missing(v)]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def runs_text(values: Iterable[Any]) -> str:
    """Every run's value, `;`-separated in the cell's seed order (empty where a run has none): the
    CSVs' `<column>_runs`, so a reader can check a mean and std run by run."""
    return ";".join("" if _missing(v) else f"{float(v):.10g}" for v in values)


def cells_frame(df):
    """One row per table cell (runs whose configs differ only in NOT_THE_CELL): every STAT_FIELDS
    column is the mean over the cell's runs, with `<field>_std` (sample std), `<field>_n` and
    `<field>_runs` (`runs_text`); `seeds` counts the runs, `seed` lists them, `run` is the first
    run and `runs` all of them, in the same order.
    A cell is synthetic if any of its runs is."""
    if df.empty:
        return df
    rows = []
    for _, g in df.groupby("cell", sort=False):
        # seed order, so that `seed`, `runs`, `<field>_runs` and `ptq_frontiers` line up run by run
        g = g.assign(_seed=g["seed"].map(str)).sort_values(["_seed", "run"]).drop(columns="_seed")
        row = g.iloc[0].to_dict()
        for f in STAT_FIELDS:
            row[f], row[f"{f}_std"], row[f"{f}_n"] = mean_std(g[f].tolist())
            row[f"{f}_runs"] = runs_text(g[f].tolist())
        row.update(ptq_frontiers=g["ptq_frontier"].tolist(),  # one list per run (ptq.frontier_bits)
                   seeds=len(g), seed=",".join(str(s) for s in g["seed"]),
                   runs=";".join(g["run"]), synthetic=bool(g["synthetic"].any()))
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- tables


@dataclass
class Table:
    """One paper table: its number, title, Markdown frame (formatted), CSV frame (numbers), notes."""

    number: int
    title: str
    markdown: Any  # DataFrame of display strings
    csv: Any  # DataFrame of numbers (NaN where empty)
    notes: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        lines = [f"## Table {self.number}. {self.title}", ""]
        lines.append(self.markdown.to_markdown(index=False, disable_numparse=True) if len(self.markdown) else "_(no runs)_")
        if self.notes:
            lines += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines) + "\n"


def fmt_pm(mean: float, std: float, n: int, digits: int = 2) -> str:
    """`mean ± std` (one run: the mean alone; none: —)."""
    if n == 0 or mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return DASH
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def cell(r: Any, field: str, digits: int = 2) -> str:
    """A cell's accuracy-like `field` as mean ± std over its seeds; — for a synthetic run."""
    if r["synthetic"]:
        return DASH
    return fmt_pm(r[field], r[f"{field}_std"], r[f"{field}_n"], digits)


def cell_sig(r: Any, field: str) -> str:
    """The mean to three significant digits (errors span 1e-4 .. 1 across models), the std to the
    same decimal place: 0.00300 ± 0.00003."""
    mean, std, n = r[field], r[f"{field}_std"], r[f"{field}_n"]
    if not n:
        return DASH
    if n == 1:
        return fmt_sig(mean)
    text = f"{mean:#.3g}".rstrip(".")
    decimals = len(text.split(".")[1]) if "." in text and "e" not in text else 0
    return f"{text} ± {std:.{decimals}f}"


def stat_csv(r: Any, column: str, field: str | None, accuracy: bool = True) -> dict[str, Any]:
    """A cell's CSV columns: `column` (the mean), `column_std` and `column_runs` (every run's
    value, in the order of the CSV's `seed`). No `field`, or a synthetic run's accuracy: empty."""
    if not field or (accuracy and r["synthetic"]):
        return {column: math.nan, f"{column}_std": math.nan, f"{column}_runs": ""}
    return {column: r[field], f"{column}_std": r[f"{field}_std"], f"{column}_runs": r[f"{field}_runs"]}


def fmt_sig(v: Any, digits: int = 3) -> str:
    """Three significant digits (errors span 1e-4 .. 1 across models)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return DASH
    return f"{v:.{digits}g}"


def fmt_mib(v: Any) -> str:
    """MiB as the paper prints them (one decimal), three decimals for sub-10 MiB models."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return DASH
    return f"{v:.1f}" if v >= 10 else f"{v:.3f}"


def fmt_params(n: float, reduction_pct: float | None = None) -> str:
    """Millions as the paper prints them (one decimal), more digits for sub-10M models."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return DASH
    m = n / 1e6
    s = f"{m:.1f}" if m >= 10 else f"{m:.3f}"
    if reduction_pct is not None and not math.isnan(reduction_pct) and round(reduction_pct) != 0:
        s += f" ({-reduction_pct:+.0f}%)"  # a reduction prints as -50%, a growth as +5%
    return s


def ratio_pct(ratio: Any) -> int | None:
    """A config ratio as a whole percentage (0.4 -> 40), None when absent."""
    if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)):
        return None
    return int(round(100 * float(ratio)))


def settings_note(df, finetune: bool = True, accuracy: bool = True) -> str | None:
    """The run settings that differ from the paper's Sec 4.1 (one sentence); `finetune` and
    `accuracy` say whether the table depends on fine-tuning and on the evaluation subset."""
    if df.empty:
        return None
    runs = df["run"].tolist()
    configs = [CONFIGS.get(r) for r in runs if CONFIGS.get(r)]
    compressing = [c for c in configs if not is_dense_config(c)] or configs
    if not configs:
        return None
    parts = []

    def values(get):
        return sorted({str(get(c)) for c in configs})

    ft = sorted({str(c["finetune"]["epochs"]) for c in compressing})
    if finetune and ft != ["20"]:
        subsets = sorted({str(c["data"].get("finetune_subset")) for c in compressing})
        parts.append(f"fine-tuning {'/'.join(ft)} epoch(s) (paper: 20)"
                     + (f" on {'/'.join(subsets)} images" if subsets != ["None"] else ""))
    scope = sorted({str(c["finetune"].get("params", "partial")) for c in compressing})
    if finetune and ft != ["0"] and scope != ["partial"]:
        parts.append(f"fine-tuned parameters: {'/'.join(scope)} (paper: partial, LN, biases, head, patch embedding)")
    it = sorted({str(c["zfit"]["iters"]) for c in compressing if c["zfit"]["solver"] == "gd"} or {"2000"})
    if it != ["2000"]:
        parts.append(f"Adam Z fit {'/'.join(it)} iterations (paper: 2000)")
    cal = values(lambda c: c["calib"]["num_samples"])
    if cal != ["1024"]:
        parts.append(f"{'/'.join(cal)} calibration samples (paper: 1024)")
    ev = values(lambda c: c["data"].get("eval_subset"))
    if accuracy and ev != ["None"]:
        parts.append(f"top-1 on a seeded {'/'.join(ev)}-image subset of the test/val split")
    data = values(lambda c: c["data"]["name"])
    head = f"Data: {', '.join(data)}."
    return (head + (" Reduced settings: " + "; ".join(parts) + "." if parts else " Settings: the paper's Sec 4.1.")
            + _seeds_note(df))


def _seeds_note(df) -> str:
    """What a cell is when some cells repeat over seeds (empty when every cell is one run)."""
    if df["seeds"].max() <= 1:
        return ""
    seeds = sorted({s for cell in df["seed"] for s in str(cell).split(",")}, key=lambda s: (len(s), s))
    counts = sorted(set(df["seeds"]))
    n = f"{counts[0]} per cell" if len(counts) == 1 else f"{counts[0]}-{counts[-1]} per cell: CSV column `seeds`"
    return (f" Each cell: mean ± sample std over seeds {', '.join(seeds)} ({n}; `seed` sets calibration "
            "sampling and fine-tune order, for one trained model).")


CONFIGS: dict[str, dict[str, Any]] = {}  # run dir -> config, filled by build_tables
# seconds of the compression itself (calibration included; evaluation and fine-tuning not)
COMPRESS_STAGES = ("calibrate", "fisher", "decompose", "allocate", "compensate", "apply")


def empty_frame():
    return pd.DataFrame()


def make_table(number: int, title: str, md: list, csv: list, notes: list[str], any_synth: bool, runs: Any) -> Table:
    """A Table with the notes every table ends with: the synthetic-runs note and the settings."""
    if any_synth:
        notes.append(SYNTHETIC_NOTE)
    note = settings_note(runs)
    if note:
        notes.append(note)
    return Table(number, title, pd.DataFrame(md), pd.DataFrame(csv), notes)
