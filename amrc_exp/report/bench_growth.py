"""`python -m amrc_exp.report.bench_growth results/cost/*.json`: how each method's cost grows with
the model, fitted from `amrc-bench --method` results (`bench_methods`), one file per model.

A series is one method under one set of settings (the shared overrides other than `model=`, and
the method's own `METHOD:key=value` ones), so rows measured with different refinement steps or
score images are never pooled. Per series and model: end-to-end seconds (the extrapolated ones
where the file has them) and forward passes (images). Fits, each a least-squares line in log-log:

* seconds ∝ width^k among the models of one depth (blocks), since the width sets every matmul;
* passes ∝ layers^k over all the models, since the pass counts do not depend on width.

Two sizes give a slope, not a fit: the table says how many sizes each slope has and, from three
points on, the largest residual as a factor (runs of one size that disagree show up there).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from amrc_exp.report.bench_methods import own_overrides, shared_overrides

__all__ = ["Point", "points", "common_settings", "power_fit", "markdown"]


@dataclass(frozen=True)
class Point:
    model: str
    blocks: int
    layers: int
    width: int
    seconds: float
    passes: float


@lru_cache(maxsize=None)
def model_width(name: str) -> int:
    """The embedding width of timm model `name` (Swin: its first stage's), built on the meta device."""
    import timm
    import torch

    import amrc_exp.models  # noqa: F401  (registers the embedded models)

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return int(getattr(model, "embed_dim", model.num_features))


def _settings(result: dict[str, Any]) -> dict[str, str]:
    """The shared overrides other than `model=`; the last value of a key wins, as in Hydra (the
    preset's calib.num_samples, then the user's)."""
    return dict(o.split("=", 1) for o in shared_overrides(result["overrides"]) if not o.startswith("model="))


def common_settings(results: list[dict[str, Any]]) -> dict[str, str]:
    """The settings every result shares: said once, so a series names only what sets it apart."""
    sets = [_settings(r) for r in results]
    return {k: v for k, v in sets[0].items() if all(s.get(k) == v for s in sets)} if sets else {}


def points(results: Iterable[dict[str, Any]], width=model_width) -> dict[str, list[Point]]:
    """{series: its points, in (blocks, width) order} from bench_methods results."""
    results = list(results)
    common = common_settings(results)
    out: dict[str, list[Point]] = {}
    for result in results:
        seconds = result.get("extrapolated_end_to_end_s") or {m: r["end_to_end_s"] for m, r in result["runs"].items()}
        own = sorted(f"{k}={v}" for k, v in _settings(result).items() if common.get(k) != v)
        for method, run in result["runs"].items():
            out.setdefault(" ".join([method, *own_overrides(result["overrides"], method), *own]), []).append(Point(
                result["model"], int(run["blocks"]), len(run["ranks"]), width(result["model"]),
                float(seconds[method]), float(run["image_passes"])))
    return {k: sorted(v, key=lambda p: (p.blocks, p.width)) for k, v in out.items()}


def power_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(k, worst) for y ≈ c·x^k by least squares on logs; worst: the largest residual as a factor ≥ 1."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    k = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
    return k, math.exp(max(abs(b - my - k * (a - mx)) for a, b in zip(lx, ly)))


def _slope(xs: list[float], ys: list[float]) -> str:
    sizes = len(set(xs))
    if sizes < 2:
        return "—"
    k, worst = power_fit(xs, ys)
    notes = [f"{sizes} sizes" + (": a slope, not a fit" if sizes == 2 else "")]
    if len(xs) > 2:  # several runs at one size also test the line
        notes.append(f"worst ×{worst:.2f}")
    return f"{k:.2f} ({', '.join(notes)})"


def markdown(series: dict[str, list[Point]], common: dict[str, str]) -> str:
    lines = ["# Cost growth per method (amrc-bench --method results)", "",
             "_Random weights and synthetic images: timings and pass counts only._", "",
             "End to end: at the file's `--extrapolate-to` calibration images where it has them.", "",
             "Settings of every row: " + " ".join(f"`{k}={v}`" for k, v in sorted(common.items())), "",
             "| series | model | blocks | layers | width | end to end s | passes (images) |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, pts in series.items():
        lines += [f"| {name} | {p.model} | {p.blocks} | {p.layers} | {p.width} | {p.seconds:.1f} | {p.passes:.0f} |" for p in pts]
    lines += ["", "| series | seconds ∝ width^k (k, per depth) | passes ∝ layers^k (k) |", "|---|---|---|"]
    for name, pts in series.items():
        per_depth = []
        for blocks in sorted({p.blocks for p in pts}):
            at = [p for p in pts if p.blocks == blocks]
            if len({p.width for p in at}) > 1:
                per_depth.append(f"{blocks} blocks: {_slope([p.width for p in at], [p.seconds for p in at])}")
        lines.append(f"| {name} | {'; '.join(per_depth) or '—'} | {_slope([p.layers for p in pts], [p.passes for p in pts])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amrc_exp.report.bench_growth", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="bench_methods JSON files (methods.json, results/cost/*.json)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = parser.parse_args(argv)
    results = [json.loads(f.read_text()) for f in args.files]
    results = [r for r in results if r.get("schema") == "amrc_exp.report.bench_methods/1"]
    text = markdown(points(results), common_settings(results))
    print(text, end="")
    if args.out:
        from amrc_exp.io import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
