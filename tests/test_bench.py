"""`python -m amrc_exp.report.bench --preset smoke` end to end, the stage meter, and the targets logic."""

from __future__ import annotations

import json
import time

import pytest
import torch

from amrc_exp.report import bench, bench_report
from amrc_exp.report.profiling import StageMeter


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("bench") / "smoke"
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = bench.main(["--preset", "smoke", "--out", str(out)])
    return rc, out, stdout.getvalue()


def test_smoke_writes_json_and_markdown(smoke):
    rc, out, stdout = smoke
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md"]  # no temp files, no cache left
    res = json.loads((out / "bench.json").read_text())
    md = (out / "bench.md").read_text()
    assert res["schema"] == "amrc_exp.report.bench/1" and res["preset"] == "smoke"
    assert res["synthetic"] is True and "SYNTHETIC" in md and "SYNTHETIC" in stdout
    assert "| calibrate |" in stdout and "| compensate |" in md  # where the time goes


def test_smoke_every_stage_has_time_and_memory(smoke):
    _, out, _ = smoke
    res = json.loads((out / "bench.json").read_text())
    gd, cf = res["runs"]["gd"], res["runs"]["closed_form"]
    assert set(gd["stages"]) >= set(bench_report.PIPELINE) - {"fisher"}  # fisher: only the methods that read it
    assert set(cf["stages"]) >= set(bench_report.PIPELINE) - {"data", "fisher"}  # data is built once
    rows = [*gd["stages"].values(), *cf["stages"].values(), res["floor"], res["throughput"]]
    for row in rows:
        assert row["seconds"] > 0 and row["rss_peak_mib"] > 0
        assert row["rss_peak_mib"] >= max(row["rss_start_mib"], row["rss_end_mib"]) - 1
        assert row["cuda_peak_mib"] is None if res["machine"]["device"] == "cpu" else row["cuda_peak_mib"] > 0
    assert res["floor"]["images"] == 32 + 16  # calibration + held-out images
    # GD calibrated afresh; the closed form reused it from the framework's cache.
    assert gd["calibration_cached"] is False and cf["calibration_cached"] is True
    assert gd["solver"] == "gd" and cf["solver"] == "closed_form" and res["setup"]["same_ranks"]
    assert 0 < gd["end_to_end_s"] == pytest.approx(sum(row["seconds"] for row in gd["stages"].values()),
                                                   abs=1e-2)
    assert cf["end_to_end_fresh_calibration_s"] > 0
    assert gd["params_after"] < gd["params_before"]


def test_smoke_throughput_targets_and_machine(smoke):
    _, out, _ = smoke
    res = json.loads((out / "bench.json").read_text())
    tp = res["throughput"]
    assert tp["ratio"] > 0 and tp["dense_ips"] > 0 and tp["compressed_ips"] > 0
    assert len(tp["dense_s"]) == len(tp["compressed_s"]) == tp["repeats"]
    assert tp["ratio"] == pytest.approx(tp["compressed_ips"] / tp["dense_ips"])
    names = {t["name"] for t in res["targets"]}
    assert names == {"end_to_end", "peak_rss", "zfit_gd", "throughput_ratio"}  # CPU targets
    for t in res["targets"]:
        assert isinstance(t["met"], bool) and t["applies"] is False  # DeiT-B targets, smoke model
    m = res["machine"]
    assert m["cpu_model"] and m["cpu_count"] >= 1 and m["torch"] == torch.__version__
    assert m["torch_threads"] == 1 and m["device"] == "cpu"


def test_stage_meter_sees_a_transient_allocation():
    meter = StageMeter(torch.device("cpu"))
    with meter("alloc"):
        x = torch.ones(50 * 2**20)  # 200 MiB, touched, then freed inside the stage
        time.sleep(0.05)  # several sampling intervals, even where ru_maxrss is already higher
        del x
    with meter("alloc"):
        pass
    rows = meter.take()
    assert list(rows) == ["alloc", "alloc_2"] and meter.take() == {}
    assert rows["alloc"]["rss_peak_mib"] - rows["alloc"]["rss_start_mib"] > 150


def test_targets_met_and_not_met():
    values = {"end_to_end_s": 901.0, "peak_rss_gib": 5.9, "compensate_gd_s": 60.0, "throughput_ratio": 1.29}
    rows = {t["name"]: t for t in bench_report.targets(values, "cpu", "deit_b")}
    assert {n: t["met"] for n, t in rows.items()} == {"end_to_end": False, "peak_rss": True, "zfit_gd": True,
                                                      "throughput_ratio": False}
    assert all(t["applies"] for t in rows.values())
    gpu = bench_report.targets({"end_to_end_s": 29.0}, "cuda", "deit_b")
    assert [(t["name"], t["limit"], t["met"]) for t in gpu] == [("end_to_end", 30.0, True)]


def test_presets_compose(tmp_path):
    for name in bench.PRESETS:
        cfg = bench.compose_config(name, [], tmp_path / "out", tmp_path / "cache")
        assert cfg.data.synthetic and cfg.model.weights == "random" and cfg.finetune.epochs == 0
        assert cfg.ptq.bits == 0 and cfg.logger.name == "none" and cfg.z_type.name == "lowrank"
    b = bench.compose_config("deit_b", [], tmp_path / "out", tmp_path / "cache")
    assert (b.model.name, b.calib.num_samples, b.ratio, b.zfit.iters, b.model.img_size) == \
        ("deit_base_patch16_224", 1024, 0.5, 2000, 224)
    s = bench.compose_config("deit_s", [], tmp_path / "out", tmp_path / "cache")
    assert (s.model.name, s.calib.num_samples) == ("deit_small_patch16_224", 256)


def test_smoke_onnxruntime_side_by_side(smoke):
    """Step 5: dense and compressed under onnxruntime; the weight ratio is the ONNX files' own
    float32 bytes. The exporter folds some constants the same way in both (e.g. the class token
    into the position embedding), so the files differ by exactly the parameters compression removed."""
    pytest.importorskip("onnxruntime", reason="the dev extras (onnx, onnxruntime) are not installed")
    _, out, _ = smoke
    res = json.loads((out / "bench.json").read_text())
    o = res["onnxruntime"]
    assert o["measured"] is True and o["dense_ips"] > 0 and o["compressed_ips"] > 0
    assert o["ratio"] == pytest.approx(o["compressed_ips"] / o["dense_ips"])
    gd = res["runs"]["gd"]
    assert o["dense_weight_bytes"] - o["compressed_weight_bytes"] == 4 * (gd["params_before"] - gd["params_after"])
    assert o["dense_weight_bytes"] <= 4 * gd["params_before"]
    assert o["dense_rss_mib"] > 0 and o["compressed_rss_mib"] > 0
    assert "## onnxruntime" in (out / "bench.md").read_text()


@pytest.fixture(scope="module")
def methods(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("bench") / "methods"
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        rc = bench.main(["--preset", "smoke", "--out", str(out), "--method", "paper,svd,ours_oa,ours_wf",
                         "--extrapolate-to", "96", "calib.probe_samples=8"])
    return rc, out


def test_methods_side_by_side_count_passes(methods):
    """Per method: stages with seconds, memory and forward passes. `svd` reads the model only in
    calibration: exactly one pass of the 32 + 16 calibration images (the count is independent of
    the code counting it); ours_oa measures its sensitivities on the 8 probe images, block onward."""
    rc, out = methods
    assert rc == 0 and sorted(p.name for p in out.iterdir()) == ["methods.json", "methods.md"]
    res = json.loads((out / "methods.json").read_text())
    runs = res["runs"]
    assert set(runs) == {"paper", "svd", "ours_oa", "ours_wf"}
    assert runs["svd"]["image_passes"] == pytest.approx(48) and runs["svd"]["stages"]["calibrate"]["image_passes"] == 48
    oa = runs["ours_oa"]["stages"]["allocate"]["image_passes"]
    layers, candidates = 8, 6  # 2 blocks x 4 linears; at most `candidates` ranks each
    assert 8 < oa < 8 * (1 + layers * candidates)  # the dense pass + partial passes, fewer than whole ones
    assert "fisher" in runs["ours_wf"]["stages"] and runs["ours_wf"]["allocation_kl"]["refined"] >= 0
    for r in runs.values():
        assert r["end_to_end_s"] == pytest.approx(bench_report.end_to_end(r["stages"]))
    # Extrapolated: calibration is linear in images, the rest unchanged.
    paper = runs["paper"]
    assert res["extrapolated_end_to_end_s"]["paper"] == pytest.approx(
        paper["end_to_end_s"] + 48 * paper["calib_s_per_image"], abs=0.06)
    assert res["vs_paper"]["paper"] == 1.0


def test_an_unknown_method_names_the_allowed_ones(tmp_path, capsys):
    assert bench.main(["--preset", "smoke", "--out", str(tmp_path), "--method", "ours_xx"]) == 2
    err = capsys.readouterr().err
    assert "--method" in err and "ours_xx" in err and "ours_wf" in err and "paper" in err
