"""The accuracy-memory frontier (Table 8 and Fig 5): top-1 against stored model size for dense
RTN PTQ at several bit widths, ours low-rank alone (fp16) at every ratio, and ours low-rank +
N-bit PTQ, each point the mean ± sample std over the sweep's seeds, before and after fine-tuning;
ours fine-tuned on labels (`ours_oa`, the paper's cross-entropy) and by distillation from the
dense model (`ours_kd`), and by distillation plus feature matching (`ours_fm`), side by side.

Every ours point is set beside dense PTQ alone at the same size, interpolated linearly in MiB
between the two nearest dense points (no extrapolation: outside the dense points' range the gap
is left empty and the table says so).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from amrc_exp.report.cells import Table, fmt_pm, mean_std, runs_text, settings_note

# method -> row label (the fine-tune's loss; ours_wf: the two-sided, checked and refined variant, fine-tuned on labels)
OURS = {"ours_oa": "ours", "ours_kd": "ours KD-FT", "ours_fm": "ours KD+FM-FT", "ours_wf": "ours two-sided",
        "ours_wf_kd": "ours two-sided KD-FT"}
STYLE = {"ours_oa": ("o", "-"), "ours_kd": ("^", ":"), "ours_fm": ("s", "-."), "ours_wf": ("D", "--"),
         "ours_wf_kd": ("v", ":")}  # Fig 5: marker, line per method
# the rows' notes beyond ours / ours KD-FT, for the variants a sweep ran
VARIANT_NOTES = {
    "ours_fm": "distillation plus feature matching on the compressed layers' outputs (finetune.feature_weight = β = 1)",
    "ours_wf": "its own compressed model (`ours_wf`: decomp=whiten_fisher, schedule.check_uniform=true, "
               "schedule.refine_steps=50), fine-tuned on the labels",
    "ours_wf_kd": "the same compressed model as ours two-sided (`ours_wf_kd`), fine-tuned by distillation (T = 2)",
}
STAGES = ("compressed", "finetuned")  # before / after fine-tuning


def _points(cells) -> list[dict[str, Any]]:
    """One row per (method, ratio, bits) with size, before-FT and after-FT top-1 as (mean, std, n)."""
    out = []
    for _, c in cells[cells["method"].isin(["dense", *OURS]) & ~cells["synthetic"]].iterrows():
        dense = c["method"] == "dense"
        fp16 = {"size_mib": c["size_mib_dense_fp16" if dense else "size_mib_compressed_fp16"],
                "compressed": c["top1_baseline" if dense else "top1_compressed"],
                "finetuned": math.nan if dense else c["top1_finetuned"]}
        fp16_std = {"compressed": c["top1_baseline_std" if dense else "top1_compressed_std"],
                    "finetuned": math.nan if dense else c["top1_finetuned_std"]}
        fp16_runs = {"compressed": c["top1_baseline_runs" if dense else "top1_compressed_runs"],
                     "finetuned": "" if dense else c["top1_finetuned_runs"]}
        out.append({"method": c["method"], "ratio": 0.0 if dense else float(c["ratio"]), "bits": 16,
                    "size_mib": (fp16["size_mib"], 0.0, c["seeds"]), "seed": c["seed"], "runs": fp16_runs,
                    **{st: (fp16[st], fp16_std[st], 0 if dense and st == "finetuned" else c["seeds"])
                       for st in STAGES}})
        before = "top1_dense" if dense else "top1_compressed"
        for bits in sorted({int(row["bits"]) for run in c["ptq_frontiers"] for row in run}, reverse=True):
            # one entry per run, in seed order ({} where a run has no such width), so `runs` lines up
            rows = [next((row for row in run if int(row["bits"]) == bits), {}) for run in c["ptq_frontiers"]]
            out.append({"method": c["method"], "ratio": 0.0 if dense else float(c["ratio"]), "bits": bits,
                        "size_mib": mean_std(r.get("size_mib") for r in rows), "seed": c["seed"],
                        "runs": {"compressed": runs_text(r.get(before) for r in rows),
                                 "finetuned": runs_text(r.get("top1_finetuned") for r in rows)},
                        "compressed": mean_std(r.get(before) for r in rows),
                        "finetuned": mean_std(r.get("top1_finetuned") for r in rows)})
    return out


def dense_at(points: list[dict[str, Any]], mib: float) -> float:
    """Dense PTQ's top-1 at `mib`, linear between the nearest dense points; NaN outside their range."""
    dense = sorted((p["size_mib"][0], p["compressed"][0]) for p in points if p["method"] == "dense")
    for (x0, y0), (x1, y1) in zip(dense, dense[1:]):
        if x0 <= mib <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (mib - x0) / (x1 - x0)
    return math.nan


def best_stage(p: dict[str, Any]) -> str:
    """The point's reported stage: after fine-tuning where it was fine-tuned."""
    return "finetuned" if p["finetuned"][2] else "compressed"


def table8(df) -> Table:
    points = sorted(_points(df), key=lambda p: -p["size_mib"][0])
    md, csv = [], []
    for p in points:
        label = "dense" if p["method"] == "dense" else f"{OURS[p['method']]} −{100 * p['ratio']:g}%"
        label += " fp16" if p["bits"] == 16 else f" + {p['bits']}-bit"
        ref = math.nan if p["method"] == "dense" else dense_at(points, p["size_mib"][0])
        top = p[best_stage(p)][0]
        md.append({"point": label, "MiB": f"{p['size_mib'][0]:.4f}", "top-1 before FT": fmt_pm(*p["compressed"]),
                   "top-1 after FT": fmt_pm(*p["finetuned"]),
                   "dense PTQ at this MiB": "" if p["method"] == "dense" else
                   ("outside the dense points" if math.isnan(ref) else f"{ref:.2f}"),
                   "gap": "" if math.isnan(ref) else f"{top - ref:+.2f}"})
        csv.append({"method": p["method"], "ratio": p["ratio"], "bits": p["bits"], "size_mib": p["size_mib"][0],
                    **{f"top1_{st}{suffix}": p[st][i] for st in STAGES for i, suffix in ((0, ""), (1, "_std"))},
                    **{f"top1_{st}_runs": p["runs"][st] for st in STAGES},
                    "seeds": p["compressed"][2], "seed": p["seed"], "dense_ptq_interp": ref, "gap": top - ref})
    notes = ["Size: stored MiB (fp16 everything; N-bit: RTN channel-wise codes of every weight matrix plus an fp16 "
             "scale and zero point per channel, App. B). Dense PTQ has no fine-tuning; ours is fine-tuned "
             "(fp16; the partial set unless the settings line says otherwise), then quantized: `top-1 after FT` "
             "is the quantized fine-tuned model.",
             "gap: ours at its reported stage (after fine-tuning) minus dense PTQ alone interpolated at the same "
             "MiB, linear between the two nearest dense points; empty outside the dense points' range.",
             "Dense PTQ is deterministic (no calibration sample, no fine-tuning): its std over seeds is 0."]
    extra = "".join(f"; {OURS[m]}: {text}" for m, text in VARIANT_NOTES.items() if (df["method"] == m).any())
    notes.append("ours: fine-tuned on the labels (cross-entropy, the paper's); ours KD-FT: by distillation from "
                 f"the dense model (finetune.loss=kd, T = 2){extra}; the same compressed model before fine-tuning.")
    note = settings_note(df[df["method"].isin(["dense", *OURS])])
    if note:
        notes.append(note)
    return Table(8, "The accuracy-memory frontier: top-1 (%) against stored size (MiB)", pd.DataFrame(md),
                 pd.DataFrame(csv), notes)


def plot_frontier(df, ax) -> None:
    """Fig 5 on `ax`: top-1 vs MiB, dense PTQ as a line, ours per bit width (after fine-tuning)."""
    points = _points(df)
    dense = sorted((p["size_mib"][0], p["compressed"][0], p["bits"]) for p in points if p["method"] == "dense")
    ax.plot([d[0] for d in dense], [d[1] for d in dense], "k--o", label="dense + N-bit PTQ (no FT)")
    for x, y, b in dense:
        ax.annotate(f"{b}b", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    for method, name in OURS.items():
        for bits in sorted({p["bits"] for p in points if p["method"] == method}, reverse=True):
            ours = sorted((p["size_mib"][0], p[best_stage(p)], p["ratio"]) for p in points
                          if p["method"] == method and p["bits"] == bits)
            ax.errorbar([o[0] for o in ours], [o[1][0] for o in ours], yerr=[o[1][1] for o in ours],
                        marker=STYLE[method][0], linestyle=STYLE[method][1],
                        capsize=2, label=f"{name} low-rank{' fp16' if bits == 16 else f' + {bits}-bit'} (after FT)")
    ax.set_xscale("log")
    ax.set_xlabel("stored size (MiB, log)")
    ax.set_ylabel("top-1 (%)")
    ax.legend(fontsize=7)
