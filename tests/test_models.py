"""Model creation, weight loading and the embedded model's train-once cache.

No test touches the network (AMRC_OFFLINE=1, HF_HUB_OFFLINE=1, empty HF/torch caches).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import struct
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hydra import compose, initialize_config_dir

from amrc_exp.experiment.config import register_schema, to_run_config
from amrc_exp.experiment.inputs import load_model, load_splits
from amrc_exp.experiment.keys import stats_key, train_setup, weights_fields
from amrc_exp.errors import ConfigError, WeightsError
from amrc_exp.models.weights import load_file

from amrc_exp import CONF_DIR
FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")

# Parameter counts as timm reports them (Table 2's params column for the paper's models).
TIMM_PARAMS = {
    "deit_t": 5_717_416, "deit_s": 22_050_664, "deit_b": 86_567_656, "vit_b": 86_567_656,
    "vit_l": 304_326_632, "swin_b": 87_768_224,
}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    # Never reach a host; every cache (ours, HF's, torch hub's) is the test's empty temp dir.
    monkeypatch.setenv("AMRC_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("AMRC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


def make_cfg(*overrides: str):
    """The typed run config the CLI would build for `overrides`."""
    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_run_config(compose("config", overrides=list(overrides)))


def cache_paths(cfg, device_type: str = "cpu") -> tuple[Path, Path]:
    setup = train_setup(cfg, device_type)
    return setup.weights_path, setup.meta_path


def seeded_model(name: str = "fmnist_vit", seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, **kwargs)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ----------------------------------------------------------------------------- load_model


@pytest.mark.parametrize("option", sorted(p.stem for p in CONF_DIR.glob("model/*.yaml")))
def test_every_model_option_builds_with_random_weights(option):
    cfg = make_cfg(f"model={option}", "model.weights=random")
    model, info = load_model(cfg)
    assert not model.training and info["random_weights"] and info["weights"] == "random"
    assert info["params"] == sum(p.numel() for p in model.parameters())
    if option in TIMM_PARAMS:
        assert info["params"] == TIMM_PARAMS[option]
    x = torch.randn(1, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
    if info["params"] < 30e6:  # a forward pass on the small ones only: keeps the suite fast
        with torch.no_grad():
            assert model(x).shape == (1, cfg.model.num_classes)


def embedded_params(dim: int, depth: int, stem: int = 32, tokens: int = 49, classes: int = 10) -> int:
    """Independent count for the embedded ViTs: conv stem (3x3 conv no bias, BN, 3x3 conv),
    learned pos-embed without a cls token, pre-norm blocks, fc-norm, head."""
    mlp = 4 * dim
    block = 2 * 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (dim * mlp + mlp) + (mlp * dim + dim)
    embed = 9 * stem + 2 * stem + 9 * stem * dim + dim + tokens * dim
    return embed + depth * block + 2 * dim + dim * classes + classes


def test_embedded_models_are_timm_vits_with_a_conv_stem_to_49_tokens():
    from timm.models.vision_transformer import VisionTransformer

    for name, (dim, depth) in {"fmnist_vit": (64, 6), "fmnist_vit_small": (32, 6)}.items():
        model = timm.create_model(name)
        assert isinstance(model, VisionTransformer) and model.patch_embed.num_patches == 49
        assert model.cls_token is None and model.global_pool == "avg"
        assert sum(p.numel() for p in model.parameters()) == embedded_params(dim, depth)
        with torch.no_grad():  # the stem maps 28x28 to the 7x7 grid: 49 tokens of width dim
            assert model.patch_embed(torch.zeros(2, 1, 28, 28)).shape == (2, 49, dim)
    small, large = (sum(p.numel() for p in timm.create_model(n).parameters()) for n in ("fmnist_vit_small", "fmnist_vit"))
    assert 0.2 < small / large < 0.35  # like DeiT-B -> DeiT-S (0.25x) in Table 3


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ConfigError, match="model.name") as err:
        load_model(make_cfg("model.name=deit_tiny_patch16", "model.weights=random"))
    assert "deit_tiny_patch16_224" in str(err.value)


def test_hub_offline_fails_fast_naming_model_weights():
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="model.weights=") as err:
        load_model(make_cfg("model=deit_t", "model.weights=hub"))
    assert time.perf_counter() - start < 10
    assert "model.weights=random" in str(err.value)


def test_hub_loads_from_local_cache_without_network(tmp_path):
    """A pretrained file already in the HF cache is used offline (laid out as the hub does)."""
    from huggingface_hub import constants
    from safetensors.torch import save_file

    reference = seeded_model("deit_tiny_patch16_224", seed=3)
    snapshot = Path(constants.HF_HUB_CACHE) / "models--timm--deit_tiny_patch16_224.fb_in1k" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    save_file(reference.state_dict(), str(snapshot / "model.safetensors"))
    model, info = load_model(make_cfg("model=deit_t", "model.weights=hub"))
    assert info["weights"] == "hub" and not info["random_weights"]
    assert info["weights_path"].endswith("model.safetensors")
    assert_same_weights(model, reference)


# ----------------------------------------------------------------------------- weight files


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth_model_wrapper", "pth_ddp_prefix", "bin_state_dict",
                                 "pth_ema", "pth_compiled"])
def test_weight_file_roundtrip_is_exact(tmp_path, fmt):
    from safetensors.torch import save_file

    reference = seeded_model(seed=1)
    state = reference.state_dict()
    path = tmp_path / f"w.{fmt.split('_')[0]}"
    if fmt == "safetensors":
        save_file(state, str(path))
    elif fmt == "pth":
        torch.save(state, path)
    elif fmt == "pth_model_wrapper":
        torch.save({"model": state, "epoch": 3}, path)
    elif fmt == "pth_ddp_prefix":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif fmt == "pth_ema":  # a training checkpoint: the EMA weights are the ones to evaluate
        torch.save({"state_dict": seeded_model(seed=3).state_dict(), "state_dict_ema": state}, path)
    elif fmt == "pth_compiled":
        torch.save({f"_orig_mod.{k}": v for k, v in state.items()}, path)
    else:
        torch.save({"state_dict": state, "optimizer": {}}, path)
    model, info = load_model(make_cfg(f"model.weights={path}"))
    assert info["weights"] == "file" and info["weights_path"] == str(path) and not info["random_weights"]
    assert_same_weights(model, reference)
    assert not torch.equal(model.head.weight, seeded_model(seed=2).head.weight)  # not a fluke of the init


def test_weights_of_another_architecture_list_the_diff(tmp_path):
    torch.save(seeded_model("resnet10t", num_classes=10).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(WeightsError) as err:
        load_file(seeded_model(), tmp_path / "resnet.pth")
    message = str(err.value)
    assert "missing keys" in message and "unexpected keys" in message and "model.weights=" in message
    assert "pos_embed" in message and "conv1" in message

    torch.save(seeded_model("fmnist_vit_small").state_dict(), tmp_path / "small.pth")
    with pytest.raises(WeightsError, match="shape mismatches") as err:
        load_file(seeded_model(), tmp_path / "small.pth")
    assert "model.weights=" in str(err.value)


def test_wrong_class_count_says_set_num_classes(tmp_path):
    from safetensors.torch import save_file

    save_file(seeded_model(num_classes=5).state_dict(), str(tmp_path / "five.safetensors"))
    with pytest.raises(WeightsError, match=r"model\.num_classes=5"):
        load_model(make_cfg(f"model.weights={tmp_path / 'five.safetensors'}"))
    model, _ = load_model(make_cfg(f"model.weights={tmp_path / 'five.safetensors'}", "model.num_classes=5"))
    assert model.head.out_features == 5


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_corrupt_or_missing_weights_file(tmp_path, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(WeightsError, match="model.weights="):
        load_model(make_cfg(f"model.weights={path}"))
    with pytest.raises(WeightsError, match="model.weights="):
        load_model(make_cfg(f"model.weights={tmp_path / 'absent.safetensors'}"))


# ----------------------------------------------------------------------------- embedded training + cache


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture
def tiny_fmnist(tmp_path) -> Path:
    """The first 256 train / 128 test images of the real Fashion-MNIST, as a data.root."""
    from amrc_exp.data import load_fashion_mnist

    if not (FMNIST_ROOT / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed")
    arrays = load_fashion_mnist(FMNIST_ROOT)
    root = tmp_path / "tiny_fmnist"
    root.mkdir()
    for split, prefix, n in (("train", "train", 256), ("test", "t10k", 128)):
        images, labels = arrays[split]
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images[:n])
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels[:n])
    return root


def test_train_then_cache_roundtrip_and_corrupt_entry(tiny_fmnist):

    cfg = make_cfg("model.weights=train", f"data.root={tiny_fmnist}", "model.train.epochs=2", "model.train.batch_size=64",
                   "calib.num_samples=32", "calib.heldout_samples=16", "data.finetune_subset=null")
    splits = load_splits(cfg)
    first, info = load_model(cfg, splits)
    assert info["weights"] == "train" and info["cached"] is False and not info["random_weights"]
    assert info["steps"] == 2 * (256 // 64) and 0 <= info["test_top1"] <= 100 and info["train_seconds"] > 0
    weights_path, meta_path = cache_paths(cfg)
    assert info["weights_path"] == str(weights_path) and weights_path.is_file()
    assert json.loads(meta_path.read_text())["test_top1"] == info["test_top1"]
    # Independent check of the reported accuracy.
    with torch.no_grad():
        x = torch.stack([splits.val_full[i][0] for i in range(128)])
        y = torch.tensor([splits.val_full[i][1] for i in range(128)])
        assert abs(100.0 * (first(x).argmax(-1) == y).float().mean().item() - info["test_top1"]) < 1e-3

    second, info2 = load_model(cfg, splits)
    assert info2["cached"] is True and info2["test_top1"] == info["test_top1"]
    assert_same_weights(first, second)

    weights_path.write_bytes(b"corrupt")
    with pytest.warns(UserWarning, match="retraining"):
        third, info3 = load_model(cfg, splits)
    assert info3["cached"] is False
    assert_same_weights(first, third)  # seeded: retraining reproduces the same weights

    meta_path.unlink()  # an interrupted save (weights written, metrics not) is retrained too
    with pytest.warns(UserWarning, match="retraining"):
        assert load_model(cfg, splits)[1]["cached"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_model(cfg, splits)[1]["cached"] is True


def test_training_is_bit_identical_whatever_the_callers_thread_count(tiny_fmnist):
    """The thread count changes float summation order; training pins it (TRAIN_THREADS), so a
    sweep's OMP_NUM_THREADS=1 and a default 2-thread run give the same checkpoint. Fails if the
    pin is removed (1 vs 2 threads differ after a few steps on this CPU)."""
    from amrc_exp.models import _seeded_model
    from amrc_exp.models.train import train_embedded

    cfg = make_cfg(f"data.root={tiny_fmnist}", "model.train.epochs=2", "model.train.batch_size=32",
                   "calib.num_samples=32", "calib.heldout_samples=16", "data.finetune_subset=null")
    splits = load_splits(cfg)
    before = torch.get_num_threads()
    trained = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            model = _seeded_model(cfg.model, 0)
            info = train_embedded(model, splits, cfg.model)
            assert torch.get_num_threads() == threads  # the caller's setting is restored
            trained.append(model)
    finally:
        torch.set_num_threads(before)
    assert info["threads"] == 2 and info["torch"] == torch.__version__ and info["cpu_capability"]
    assert_same_weights(*trained)


def test_cache_key_depends_on_exactly_the_training_fields():
    base = make_cfg()
    key = lambda *o: cache_paths(make_cfg(*o))[0].name  # noqa: E731
    # The run seed (calibration sampling, fine-tune order) compresses the same trained model.
    assert key() == key("ratio=0.3", "z_type=diagonal", "calib.num_samples=512", "finetune.epochs=1", "seed=1")
    for override in ("model.train.lr=1e-3", "model.train.epochs=3", "model.train.seed=1", "data.root=/elsewhere",
                     "+model.kwargs.drop_path_rate=0.1", "model=fmnist_vit_small"):
        assert key(override) != key(), override
    assert weights_fields(base)["model"]["arch"]["patch_size"] == 4


def test_stats_key_follows_the_trained_weights(monkeypatch):
    """Calibration statistics of the embedded model depend on its weights, so a recipe or
    registry change the config does not show must still change the stats cache key."""
    from amrc_exp.models import fmnist_vit as registry, train as embedded

    cfg, cfg_random = make_cfg("model.weights=train"), make_cfg("model.weights=random")
    keys = lambda: (stats_key(cfg, 64), stats_key(cfg_random, 64))  # noqa: E731
    trained, random_init = keys()
    monkeypatch.setattr(embedded, "RECIPE_VERSION", embedded.RECIPE_VERSION + 1)
    bumped_trained, bumped_random = keys()
    assert bumped_trained != trained and bumped_random == random_init  # random init has no recipe
    monkeypatch.undo()
    monkeypatch.setitem(registry.EMBEDDED_ARCHS, "fmnist_vit", dict(registry.EMBEDDED_ARCHS["fmnist_vit"], stem_width=16))
    resized_trained, resized_random = keys()
    assert resized_trained != trained and resized_random != random_init


def test_stats_key_separates_device_and_autocast():
    """bf16 CUDA statistics must never be reused by a CPU fp32 run, or the other way round."""

    cfg = make_cfg()
    keys = {stats_key(cfg, 64, dev, amp) for dev, amp in (("cpu", False), ("cuda", False), ("cuda", True))}
    assert len(keys) == 3
    assert stats_key(cfg, 64, "cpu", False) == stats_key(make_cfg("device=cpu"), 64, "cpu", False)


def test_embedded_weights_trained_on_a_gpu_are_keyed_apart():
    """CPU keys are unchanged (existing caches stay valid); a GPU-trained checkpoint (other
    kernels, other weights) never stands in for a CPU one."""
    cfg = make_cfg()
    assert weights_fields(cfg) == weights_fields(cfg, "cpu")
    assert "device" not in weights_fields(cfg)
    assert cache_paths(cfg, "cuda")[0] != cache_paths(cfg, "cpu")[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_embedded_model_trains_on_the_run_device_cuda(tmp_path):

    cfg = make_cfg("device=cuda", "model.weights=train", "model.train.epochs=1", f"cache_dir={tmp_path}")
    model, info = load_model(cfg, load_splits(cfg))
    assert next(model.parameters()).is_cuda and info["cached"] is False
    assert cache_paths(cfg, "cuda")[0].exists()


# ----------------------------------------------------------------------------- the shipped checkpoints


@pytest.mark.parametrize("name", ["fmnist_vit", "fmnist_vit_small"])
def test_shipped_checkpoint_is_the_default_and_matches_its_sidecar(name):
    """Each embedded model's default weights: the file's SHA-256 (hashed here), the recipe a
    retrain would be keyed by, and the test top-1, recomputed here on the 10,000 test images."""
    from amrc_exp.models.shipped import CHECKPOINTS

    if not (FMNIST_ROOT / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (bash scripts/setup.sh installs it)")
    cfg = make_cfg(f"model={name}")
    assert cfg.model.weights == "shipped"
    record = json.loads((CHECKPOINTS / f"{name}.json").read_text())
    assert hashlib.sha256((CHECKPOINTS / f"{name}.safetensors").read_bytes()).hexdigest() == record["sha256"]
    assert record["fields"] == weights_fields(cfg)
    trained_by = record["trained_by"]
    assert trained_by["threads"] == 2 and trained_by["torch"] and trained_by["cpu_capability"] and trained_by["processor"]
    model, info = load_model(cfg)
    assert info["weights"] == "shipped" and info["weights_sha256"] == record["sha256"]
    test = load_splits(cfg).val_full
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test), 1000):
            x, y = zip(*(test[i] for i in range(start, min(start + 1000, len(test)))))
            correct += int((model(torch.stack(x)).argmax(-1) == torch.tensor(y)).sum())
    assert len(test) == 10_000
    # Another processor's float rounding may flip an image whose top two logits tie: 0.05 = 5 images.
    assert abs(100.0 * correct / len(test) - record["test_top1"]) <= 0.05


def test_shipped_checkpoint_refuses_other_settings_and_corrupt_bytes(tmp_path, monkeypatch):
    from amrc_exp.models import shipped

    with pytest.raises(ConfigError, match="model.weights=train") as err:
        load_model(make_cfg("model.train.epochs=2"))
    assert "model.train.epochs: shipped 8, asked 2" in str(err.value)
    with pytest.raises(ConfigError, match="no checkpoint ships for model.name=deit_tiny_patch16_224"):
        load_model(make_cfg("model=deit_t", "model.weights=shipped"))
    copy = tmp_path / "checkpoints"
    shutil.copytree(shipped.CHECKPOINTS, copy)
    monkeypatch.setattr(shipped, "CHECKPOINTS", copy)
    blob = bytearray((copy / "fmnist_vit.safetensors").read_bytes())
    blob[-1] ^= 1  # one bit of one weight
    (copy / "fmnist_vit.safetensors").write_bytes(bytes(blob))
    with pytest.raises(WeightsError, match="is corrupt .*model.weights=train"):
        load_model(make_cfg())
    (copy / "fmnist_vit.safetensors").unlink()
    with pytest.raises(WeightsError, match="is missing"):
        load_model(make_cfg())


def test_a_new_shipped_checkpoint_retires_its_statistics_and_results(tmp_path, monkeypatch):
    """The stats cache key and a result's recorded inputs carry the shipped file's SHA-256."""
    from amrc_exp.experiment.results import input_identity
    from amrc_exp.models import shipped

    cfg = make_cfg()
    before = stats_key(cfg, 64), input_identity("shipped", "fashion_mnist", None, "fmnist_vit")["weights_sha256"]
    copy = tmp_path / "checkpoints"
    shutil.copytree(shipped.CHECKPOINTS, copy)
    record = json.loads((copy / "fmnist_vit.json").read_text())
    assert before[1] == record["sha256"]
    (copy / "fmnist_vit.json").write_text(json.dumps(dict(record, sha256="0" * 64)))
    monkeypatch.setattr(shipped, "CHECKPOINTS", copy)
    after = stats_key(cfg, 64), input_identity("shipped", "fashion_mnist", None, "fmnist_vit")["weights_sha256"]
    assert after[0] != before[0] and after[1] == "0" * 64
