"""The cost-growth fit of `amrc-bench --method` results (report/bench_growth.py), checked on
results made here with a known power law."""

import math

import pytest

from amrc_exp.report import bench_growth as bg

WIDTHS = {"tiny": 192, "small": 384, "base": 768, "embedded": 64}
COMMON = ["model.weights=random", "data=synthetic", "calib.num_samples=1024", "calib.num_samples=64"]


def result(model: str, blocks: int, seconds: dict[str, float], passes: dict[str, float], extra=()) -> dict:
    runs = {m: {"blocks": blocks, "ranks": [1] * (4 * blocks), "end_to_end_s": s, "image_passes": passes[m]}
            for m, s in seconds.items()}
    return {"schema": "amrc_exp.report.bench_methods/1", "model": model, "runs": runs,
            "overrides": [*COMMON, f"model={model}", *extra]}


def test_the_fit_recovers_a_known_power_law_and_its_worst_residual():
    xs = [192.0, 384.0, 768.0]
    k, worst = bg.power_fit(xs, [3.0 * x ** 1.7 for x in xs])
    assert (k, worst) == (pytest.approx(1.7, abs=1e-12), pytest.approx(1.0, abs=1e-12))
    # the middle point ×1.1: the slope from a brute-force least squares on a grid, the worst residual
    # in closed form (equally spaced logs: the middle point keeps 2/3 of its offset)
    ys = [3.0 * x ** 1.7 for x in xs]
    ys[1] *= 1.1
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    best = min(((sum((b - (c + kk * a)) ** 2 for a, b in zip(lx, ly)), kk, c)
                for kk in [1.6 + i * 1e-4 for i in range(2001)] for c in [math.log(3.0) + j * 1e-3 for j in range(-200, 201)]))
    k, worst = bg.power_fit(xs, ys)
    assert k == pytest.approx(best[1], abs=2e-4)
    assert worst == pytest.approx(math.exp(2 / 3 * math.log(1.1)), rel=1e-9)  # the middle point's residual


def test_series_keep_different_settings_apart_and_widths_fix_the_slope_per_depth():
    results = [result(m, 12, {"paper": 2.0 * WIDTHS[m] ** 1.9, "ours_wf": 5.0 * WIDTHS[m] ** 1.5},
                      {"paper": 96, "ours_wf": 2000}, extra=["ours_wf:schedule.refine_steps=10"] if m == "base" else [])
               for m in ("tiny", "small", "base")]
    results.append(result("embedded", 6, {"paper": 1.0, "ours_wf": 1.0}, {"paper": 96, "ours_wf": 1000}))
    series = bg.points(results, width=WIDTHS.__getitem__)
    assert sorted(series) == ["ours_wf", "ours_wf schedule.refine_steps=10", "paper"]
    assert [p.width for p in series["paper"]] == [64, 192, 384, 768]  # (blocks, width) order
    text = bg.markdown(series, bg.common_settings(results))
    paper = next(line for line in text.splitlines() if line.startswith("| paper | 12 blocks"))
    assert "12 blocks: 1.90 (3 sizes, worst ×1.00)" in paper and "passes ∝" not in paper
    assert paper.endswith("| 0.00 (2 sizes: a slope, not a fit, worst ×1.00) |")  # 96 passes at 24 and 48 layers
    wf = next(line for line in text.splitlines() if line.startswith("| ours_wf | 12 blocks"))
    assert "12 blocks: 1.50 (2 sizes: a slope, not a fit)" in wf and wf.endswith("| 1.00 (2 sizes: a slope, not a fit, worst ×1.00) |")
    assert "`calib.num_samples=64`" in text  # the last value of a key, said once for every row


def test_results_that_differ_in_a_shared_setting_are_two_series():
    a = result("tiny", 12, {"paper": 1.0}, {"paper": 96})
    b = result("base", 12, {"paper": 2.0}, {"paper": 96}, extra=["schedule.score_samples=8"])
    assert sorted(bg.points([a, b], width=WIDTHS.__getitem__)) == ["paper", "paper schedule.score_samples=8"]


def test_model_width_is_the_embedding_width_of_the_timm_model():
    # DeiT-Ti/S/B widths from the DeiT paper (Touvron et al. 2021, Table 1); the embedded model's from its recipe
    assert [bg.model_width(n) for n in ("deit_tiny_patch16_224", "deit_small_patch16_224",
                                        "deit_base_patch16_224")] == [192, 384, 768]
