"""notebooks/figures.ipynb runs headless (nbclient) on a tiny embedded sweep's output and saves
Figs 1-3 as PNG; amrc_exp.experiment.sensitivity produces Fig 2's data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from amrc_exp import NOTEBOOK_DIR
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = NOTEBOOK_DIR / "figures.ipynb"
TINY = ["model=fmnist_vit_small", "model.weights=random", "calib.num_samples=32", "calib.heldout_samples=16",
        "calib.batch_size=16", "zfit.iters=10", "zfit.batch_size=16", "data.eval_subset=64",
        "data.finetune_subset=64", "finetune.batch_size=32", "eval.batch_size=64", "finetune.epochs=0",
        "seed=0"]  # one seed of the table sweep's three


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, AMRC_OFFLINE="1", HF_HUB_OFFLINE="1", WANDB_SILENT="true", OMP_NUM_THREADS="1", **extra)
    env.pop("AMRC_CACHE_DIR", None)
    return env


@pytest.fixture(scope="module")
def sweep_output(tmp_path_factory):
    """A tiny table2_embedded sweep (svd, asvd_mean, asvd_whiten) and a tiny fig2_embedded sweep."""
    root = tmp_path_factory.mktemp("nb")
    cache = root / "cache"
    t2 = run_cli(["-m", "--config-dir", str(ROOT / "sweeps"), "--config-name", "table2_embedded",
                  f"hydra.sweep.dir={root / 't2'}", f"cache_dir={cache}", "method=paper,ours,svd_ft", "ratio=0.5",
                  *TINY])  # in this process: the launcher and jobs are the CLI's own, without ~5 s of imports
    assert t2.returncode == 0, (t2.stdout + t2.stderr)[-3000:]
    fig2 = subprocess.run(
        [sys.executable, "-m", "amrc_exp.experiment.sensitivity", "-m", "--config-dir", "sweeps", "--config-name", "fig2_embedded",
         f"hydra.sweep.dir={root / 'fig2'}", f"cache_dir={cache}", "decomp=svd,asvd_whiten",
         "sensitivity.fractions=[0.5,0.1]", *TINY],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert fig2.returncode == 0, (fig2.stdout + fig2.stderr)[-3000:]
    return root


def test_sensitivity_output(sweep_output):
    (path,) = [p for p in (sweep_output / "fig2").rglob("sensitivity.json") if "asvd_whiten" in str(p)]
    res = json.loads(path.read_text())
    assert res["status"] == "complete" and res["synthetic"] is True and res["decomp"] == "asvd_whiten"
    assert res["fractions"] == [0.5, 0.1]
    from amrc_exp.models.fmnist_vit import EMBEDDED_ARCHS

    depth = EMBEDDED_ARCHS["fmnist_vit_small"]["depth"]
    assert sorted(res["blocks"], key=lambda b: int(b.split(".")[1])) == [f"blocks.{i}" for i in range(depth)]
    assert sorted(res["types"]) == ["attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2"]
    assert all(len(v) == 2 and all(0 <= a <= 100 for a in v) for v in {**res["blocks"], **res["types"]}.values())
    # ranks kept: round(fraction * min(in, out)), independently from the layer shapes
    for layer, ranks in res["ranks"]["types"]["mlp.fc1"].items():
        shape = res["layers"][layer]
        assert ranks == [max(1, round(f * min(shape["n_in"], shape["n_out"]))) for f in (0.5, 0.1)]


def test_rank_reduction_restores_weights():
    import torch

    from amrc_exp.math.decompose import decompose
    from amrc_exp.experiment.sensitivity import group_layers, reduced_rank

    torch.manual_seed(0)
    layers = {"blocks.0.attn.qkv": torch.nn.Linear(8, 12), "blocks.0.mlp.fc1": torch.nn.Linear(8, 16),
              "blocks.1.attn.qkv": torch.nn.Linear(8, 12)}
    spectra = {n: decompose("svd", l.weight.detach().double().T) for n, l in layers.items()}
    before = {n: l.weight.detach().clone() for n, l in layers.items()}
    assert group_layers(list(layers), "blocks") == {"blocks.0": ["blocks.0.attn.qkv", "blocks.0.mlp.fc1"],
                                                    "blocks.1": ["blocks.1.attn.qkv"]}
    assert group_layers(list(layers), "types") == {"attn.qkv": ["blocks.0.attn.qkv", "blocks.1.attn.qkv"],
                                                   "mlp.fc1": ["blocks.0.mlp.fc1"]}
    with reduced_rank(layers, spectra, ["blocks.0.attn.qkv"], 0.25) as ranks:
        assert ranks == {"blocks.0.attn.qkv": 2}
        w = layers["blocks.0.attn.qkv"].weight.detach().double()
        u, s, vh = torch.linalg.svd(before["blocks.0.attn.qkv"].double())
        assert torch.allclose(w, (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5)  # best rank-2 approximation
        assert torch.equal(layers["blocks.1.attn.qkv"].weight, before["blocks.1.attn.qkv"])  # others untouched
    assert all(torch.equal(layers[n].weight, before[n]) for n in layers)  # restored


def test_notebook_executes_headless(sweep_output, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    figs = tmp_path / "figs"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env = {"AMRC_SWEEP_DIRS": str(sweep_output / "t2"), "AMRC_FIG2_DIRS": str(sweep_output / "fig2"),
           "AMRC_PEERS_DIRS": str(tmp_path / "no_peers"), "AMRC_FIG_DIR": str(figs)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits them
    try:
        NotebookClient(nb, timeout=120, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "3 complete compression run(s), 2 sensitivity run(s)" in text
    assert not any(f"Fig {n} skipped" in text for n in (1, 2, 3)) and "Fig 4 skipped" in text  # no peers given
    meta = {m["figure"]: m for m in (json.loads(line.split("figure-meta:", 1)[1]) for line in text.splitlines()
                                     if line.startswith("figure-meta:"))}
    fig1, fig2, fig3 = (meta[f"fig{n}_{k}.png"] for n, k in ((1, "energy_loss"), (2, "rank_sensitivity"), (3, "layer_error")))
    for m in (fig1, fig2, fig3):  # titles name the model and the data, and say the run is synthetic
        assert "fmnist_vit_small" in m["suptitle"] and "Fashion-MNIST" in m["suptitle"] and "SYNTHETIC" in m["suptitle"]
    assert all(ax["yscale"] == "log" for ax in fig1["axes"])  # Fig 1: log energy axis
    assert all(ax["xscale"] == "log" for ax in fig2["axes"])  # Fig 2: log fraction axis
    for col in (0, 1):  # Fig 2: one y range per column (2 decompositions = 2 rows)
        ylims = {tuple(ax["ylim"]) for ax in fig2["axes"][col::2]}
        assert len(fig2["axes"][col::2]) == 2 and len(ylims) == 1
    proj = fig3["axes"][0]["xticklabels"]  # Fig 3: layer names on x
    assert proj and all(t.startswith("blocks.") and t.endswith("attn.proj") for t in proj)
    assert "-50%" in fig3["suptitle"]
    for name in ("fig1_energy_loss.png", "fig2_rank_sensitivity.png", "fig3_layer_error.png"):
        png = figs / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    md = [o["data"]["text/markdown"] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
          if "text/markdown" in o.get("data", {})]
    assert any(m.startswith("## Table 2.") and "Vanilla SVD (no FT)" in m and "asvd_whiten" in m for m in md)


def test_figures_command_writes_the_pngs(sweep_output, tmp_path, capsys):
    """`python -m amrc_exp.report.figures`: the notebook executed headless into --fig-dir."""
    from amrc_exp.report import figures

    import nbformat

    from tests.test_tables import write_run

    peers = tmp_path / "peers"  # hand-made peers runs: two methods, two ratios, two seeds
    for method in ("svdllm", "ours_oa"):
        for ratio in (0.5, 0.8):
            for seed in (0, 1):
                name = f"{method}_{ratio}_{seed}"
                write_run(peers, name, model="fmnist_vit", ratio=ratio, finetune=2, top1=(89.9, 80 + seed, 85 + seed))
                path = peers / name / "results.json"
                res = json.loads(path.read_text())
                res["config"].update(method=method, seed=seed)
                res["config"]["data"]["name"] = "fashion_mnist"
                path.write_text(json.dumps(res))
    frontier = tmp_path / "frontier"  # hand-made frontier runs: dense PTQ and ours at one ratio
    for method, extra in (("dense", {"bits": 4, "size_mib": 0.18, "top1_dense": 89.0}),
                          ("ours_oa", {"bits": 4, "size_mib": 0.09, "top1_compressed": 80.0, "top1_finetuned": 88.0})):
        write_run(frontier, method, model="fmnist_vit", method="dense" if method == "dense" else "ours", ratio=0.8,
                  finetune=2, top1=(89.9, 85.0, 88.5), sizes=(0.62, 0.31, None))
        path = frontier / method / "results.json"
        res = json.loads(path.read_text())
        res["config"]["method"] = method
        res["ptq_frontier"] = [extra]
        path.write_text(json.dumps(res))
    out = tmp_path / "figs"
    env_before = {k: os.environ.get(k) for k in ("AMRC_SWEEP_DIRS", "AMRC_FIG2_DIRS", "AMRC_PEERS_DIRS",
                                                 "AMRC_FRONTIER_DIRS", "AMRC_FIG_DIR")}
    try:
        assert figures.main(["--fig-dir", str(out), "--sweep-dirs", str(sweep_output / "t2"),
                             "--fig2-dirs", str(sweep_output / "fig2"), "--peers-dirs", str(peers),
                             "--frontier-dirs", str(frontier)]) == 0
    finally:
        for k, v in env_before.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    assert sorted(p.name for p in out.iterdir()) == ["fig1_energy_loss.png", "fig2_rank_sensitivity.png",
                                                      "fig3_layer_error.png", "fig4_peers.png", "fig5_frontier.png",
                                                      "figures.ipynb"]
    assert "fig4_peers.png" in capsys.readouterr().out
    executed = nbformat.read(out / "figures.ipynb", as_version=4)  # saved with its outputs
    text = "\n".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "3 complete compression run(s), 2 sensitivity run(s)" in text and "Fig 4 skipped" not in text
    assert "Fig 5 skipped" not in text
    # the executed notebook embeds each written PNG itself, byte for byte
    assert embedded_figures(out / "figures.ipynb") == {p.name: p.read_bytes() for p in out.glob("*.png")}


def embedded_figures(notebook: Path) -> dict[str, bytes]:
    """{PNG name: the image bytes} of an executed figures notebook: each figure cell prints its
    `figure-meta:` line (with the file name) and then displays the saved PNG file itself."""
    import base64

    import nbformat

    out: dict[str, bytes] = {}
    for cell in nbformat.read(notebook, as_version=4).cells:
        names = [json.loads(line.split("figure-meta:", 1)[1])["figure"]
                 for o in cell.get("outputs", []) if o.get("output_type") == "stream"
                 for line in o.get("text", "").splitlines() if line.startswith("figure-meta:")]
        images = [base64.b64decode(o["data"]["image/png"]) for o in cell.get("outputs", [])
                  if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
        assert len(names) == len(images), (names, len(images))
        out.update(zip(names, images))
    return out


def test_committed_figures_are_the_ones_the_executed_notebook_shows():
    """results/figures/: every committed PNG is the image the committed executed notebook
    embeds, byte for byte, and the notebook embeds no figure that is not committed (a PNG
    redrawn alone, or a notebook run that skipped a figure, fails here)."""
    figures = ROOT / "results" / "figures"
    embedded = embedded_figures(figures / "figures.ipynb")
    committed = {p.name: p.read_bytes() for p in figures.glob("*.png")}
    assert sorted(embedded) == sorted(committed)
    for name, data in committed.items():
        assert embedded[name] == data, f"{name}: the PNG differs from the notebook's embedded image"
