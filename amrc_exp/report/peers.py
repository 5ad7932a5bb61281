"""The peers tables (Tables 5-7 of our results, not the paper's): every method side by side at
every ratio, each cell the mean ± sample std over the sweep's seeds.

* Table 5: top-1 before fine-tuning; the best mean per ratio in bold and ours minus the best
  peer (ours: `ours_wf` where the sweep ran it, else `ours_oa`; the other is an ablation row);
* Table 6: the same after fine-tuning;
* Table 7: every (ratio, method): parameters, top-1 / agreement with the dense model / mean
  KL(dense ‖ compressed) before and after fine-tuning, and the compression's seconds.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pandas as pd

from amrc_exp.report.cells import Table, fmt_pm, settings_note

log = logging.getLogger(__name__)

# method label -> what the column says (and its citation)
PEER_LABELS = {
    "svd": "SVD",
    "svdllm": "SVD-LLM [Wang+24]",
    "svdllm_v2": "SVD-LLM V2 [Wang+25]",
    "dobi": "Dobi-SVD [Wang+25b]",
    "asvd": "ASVD + search [Yuan+23]",
    "fwsvd": "FWSVD [Hsu+22]",
    "paper": "paper (as published)",
    "ours_oa": "ours (output-aware)",
    "ours_wf": "ours (two-sided, checked, refined)",
}
OURS = ("ours_wf", "ours_oa")  # our methods, the headline first: the gap column compares it with the peers
CITATIONS = ("SVD-LLM: Wang et al. 2024, arXiv:2403.07378; SVD-LLM V2: Wang et al. 2025, arXiv:2503.12340; Dobi-SVD: Qinsi Wang et al. 2025, arXiv:2502.02723; ASVD: Yuan et al. 2023, arXiv:2312.05821; "
             "FWSVD: Hsu et al. 2022, ICLR, arXiv:2207.00112 (our implementations of their published "
             "algorithms: amrc_exp/math/decompose.py, amrc_exp/math/allocate.py, amrc_exp/compress/dobi.py).")


PEER_FIELDS = ("top1_compressed", "top1_finetuned", "agree_compressed", "kl_compressed", "agree_finetuned",
               "kl_finetuned", "compress_seconds", "params_after", "ratio_achieved")


def peer_cells(cells) -> dict[tuple[float, str], dict[str, Any]]:
    """{(ratio, method): {field: (mean, std, n, runs)}} from `cells.cells_frame` (one row per cell,
    its seeds aggregated; `runs`: every run's value, `cells.runs_text`, in the order of `seed`). Two cells with one (ratio, method) differ in more than the seed: the first
    is kept and the other named in a warning rather than pooled."""
    out: dict[tuple[float, str], dict[str, Any]] = {}
    rows = cells[cells["method"].isin(PEER_LABELS) & ~cells["synthetic"]].sort_values("run")
    for _, r in rows.iterrows():
        key = (float(r["ratio"]), str(r["method"]))
        if key in out:
            log.warning("peers: %s is a second cell for ratio %g, method %s (its config differs in more than "
                        "the seed): left out", r["run"], *key)
            continue
        out[key] = {f: (r[f], r[f"{f}_std"], r[f"{f}_n"], r[f"{f}_runs"]) for f in PEER_FIELDS}
        out[key]["seed"] = r["seed"]
    return out


def _compact(df, field: str, number: int, title: str) -> Table:
    cells = peer_cells(df)
    ratios = sorted({r for r, _ in cells})
    methods = [m for m in PEER_LABELS if any((r, m) in cells for r in ratios)]
    md, csv, notes = [], [], []
    for ratio in ratios:
        means = {m: cells[(ratio, m)][field][0] for m in methods if (ratio, m) in cells and cells[(ratio, m)][field][2]}
        best = max(means.values()) if means else math.nan
        row = {"ratio": f"-{100 * ratio:g}%"}
        for m in methods:
            mean, std, n, runs = cells.get((ratio, m), {}).get(field, (math.nan, math.nan, 0, ""))
            text = fmt_pm(mean, std, n) if (ratio, m) in cells else "refused / not run"
            row[PEER_LABELS[m]] = f"**{text}**" if n and mean == best else text
            csv.append({"ratio": ratio, "method": m, f"{field}_mean": mean, f"{field}_std": std, "seeds": n,
                        "seed": cells.get((ratio, m), {}).get("seed", ""), f"{field}_runs": runs})
        peers = [v for m, v in means.items() if m not in OURS]
        ours = next((means[m] for m in OURS if m in means), None)
        if ours is not None and peers:
            row["ours − best peer"] = f"{ours - max(peers):+.2f}"
        md.append(row)
    notes.append("Bold: the best mean of the row. Whole-model budget; 10,000 test images.")
    notes.append(CITATIONS)
    note = settings_note(df[df["method"].isin(PEER_LABELS)])
    if note:
        notes.append(note)
    return Table(number, title, pd.DataFrame(md), pd.DataFrame(csv), notes)


def table5(df) -> Table:
    return _compact(df, "top1_compressed", 5, "Peers side by side: top-1 (%) before fine-tuning")


def table6(df) -> Table:
    return _compact(df, "top1_finetuned", 6, "Peers side by side: top-1 (%) after fine-tuning")


def table7(df) -> Table:
    cells = peer_cells(df)
    md, csv = [], []
    for (ratio, method) in sorted(cells, key=lambda k: (k[0], list(PEER_LABELS).index(k[1]))):
        c = {f: v[:3] for f, v in cells[(ratio, method)].items() if f in PEER_FIELDS}  # (mean, std, n)
        runs = {f: v[3] for f, v in cells[(ratio, method)].items() if f in PEER_FIELDS}
        md.append({
            "ratio": f"-{100 * ratio:g}%", "method": PEER_LABELS[method],
            "params (M)": f"{c['params_after'][0] / 1e6:.3f}",
            "top-1 no FT": fmt_pm(*c["top1_compressed"]), "agree no FT": fmt_pm(*c["agree_compressed"]),
            "KL no FT": fmt_pm(*c["kl_compressed"], digits=4),
            "top-1 FT": fmt_pm(*c["top1_finetuned"]), "agree FT": fmt_pm(*c["agree_finetuned"]),
            "KL FT": fmt_pm(*c["kl_finetuned"], digits=4),
            "compress s": fmt_pm(*c["compress_seconds"], digits=1), "seeds": c["top1_compressed"][2],
        })
        csv.append({"ratio": ratio, "method": method, "seed": cells[(ratio, method)]["seed"],
                    **{f"{k}_{s}": v[i] for k, v in c.items() for i, s in enumerate(("mean", "std", "n"))},
                    **{f"{k}_runs": v for k, v in runs.items()}})
    notes = ["agree: top-1 agreement with the dense model (%); KL: mean KL(dense ‖ compressed) in nats over "
             "the evaluation set; compress s: calibration (or its cache hit) + decomposition + allocation + "
             "compensation + apply, wall seconds on the machine that ran the job.", CITATIONS]
    return Table(7, "Peers in detail: fidelity to the dense model and compression time", pd.DataFrame(md),
                 pd.DataFrame(csv), notes)
