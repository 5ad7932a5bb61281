"""Data loading: IDX reader, Fashion-MNIST, ImageFolder, synthetic data, splits, loaders.

Every check compares with an independent computation (a hand-built IDX header, numpy on the
raw bytes, torchvision transforms written out by hand). No test touches the network.
"""

from __future__ import annotations

import contextlib
import gzip
import multiprocessing
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import amrc_exp

from amrc_exp.experiment.config import register_schema
from amrc_exp.experiment.inputs import load_splits
from amrc_exp.data import FMNIST_MEAN, FMNIST_STD, load_fashion_mnist, make_loader, read_idx
from amrc_exp.errors import ConfigError, DataError

CONF_DIR = str(amrc_exp.CONF_DIR)
FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_ROOT / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    # Never reach a host; keep every cache inside the test's temp dir.
    monkeypatch.setenv("AMRC_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("AMRC_CACHE_DIR", str(tmp_path / "cache"))


def make_cfg(*overrides: str):
    register_schema()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """Independent IDX writer: magic 0 0 <type> <ndim>, big-endian dims, big-endian data."""
    codes = {np.dtype("uint8"): 0x08, np.dtype("int32"): 0x0C, np.dtype("float32"): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def _subset_indices(dataset) -> list[int]:
    return list(dataset.indices)


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    ints = rng.integers(-(2**31), 2**31 - 1, size=(4, 6), dtype=np.int32)
    floats = rng.standard_normal(9).astype(np.float32)
    for name, array in (("u8", images), ("i32", ints), ("f32", floats)):
        path = tmp_path / f"{name}.idx"
        write_idx(path, array, gz=gz)
        out = read_idx(path)
        assert out.shape == array.shape and out.dtype == array.dtype
        np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_bad_files(tmp_path):
    path = tmp_path / "x.idx"
    write_idx(path, np.zeros((4, 4), np.uint8))
    path.write_bytes(path.read_bytes()[:-3])  # truncated payload
    with pytest.raises(DataError, match="IDX header says"):
        read_idx(path)
    path.write_bytes(b"not an idx file at all")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(path)
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(DataError):
        read_idx(tmp_path / "bad.gz")


# ----------------------------------------------------------------------------- Fashion-MNIST


@needs_fmnist
def test_fashion_mnist_matches_raw_bytes():
    arrays = load_fashion_mnist(FMNIST_ROOT)
    (x_train, y_train), (x_test, y_test) = arrays["train"], arrays["test"]
    assert x_train.shape == (60000, 28, 28) and x_train.dtype == np.uint8
    assert x_test.shape == (10000, 28, 28) and y_test.shape == (10000,)
    assert set(np.unique(y_train)) == set(range(10)) == set(np.unique(y_test))
    assert np.bincount(y_train).tolist() == [6000] * 10  # Fashion-MNIST is balanced
    # Independent decode: IDX3 header is 16 bytes, IDX1 header 8 bytes.
    raw = np.frombuffer(gzip.open(FMNIST_ROOT / "t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    np.testing.assert_array_equal(x_test, raw.reshape(10000, 28, 28))
    raw = np.frombuffer(gzip.open(FMNIST_ROOT / "train-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    np.testing.assert_array_equal(y_train, raw)
    # The normalisation constants are the train set's statistics.
    assert abs(x_train.mean() / 255 - FMNIST_MEAN) < 1e-3 and abs(x_train.std() / 255 - FMNIST_STD) < 1e-3


@needs_fmnist
def test_fashion_mnist_splits_items_are_normalised():
    cfg = make_cfg()
    splits = load_splits(cfg)
    assert not splits.synthetic and splits.num_classes == 10
    assert len(splits.val) == 10000 and len(splits.train) == cfg.data.finetune_subset
    assert len(splits.train_full) == 60000
    x_train = load_fashion_mnist(FMNIST_ROOT)["train"][0]
    index = _subset_indices(splits.calib)[3]
    image, label = splits.calib[3]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and isinstance(label, int)
    expected = (x_train[index].astype(np.float32) / 255 - 0.2860) / 0.3530
    np.testing.assert_allclose(image[0].numpy(), expected, rtol=1e-5, atol=1e-5)
    # Augmented training items keep the shape and the value range of the data.
    aug, _ = splits.train[0]
    assert aug.shape == (1, 28, 28)
    assert aug.min() >= -0.2860 / 0.3530 - 1e-5 and aug.max() <= (1 - 0.2860) / 0.3530 + 1e-5


def test_missing_fashion_mnist_root_fails_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DataError, match="data.root") as err:
        load_splits(make_cfg(f"data.root={tmp_path / 'nowhere'}"))
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert time.perf_counter() - start < 5


def test_corrupt_fashion_mnist_names_data_root(tmp_path):
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 20))
    with pytest.raises(DataError, match="data.root"):
        load_fashion_mnist(tmp_path)


def test_download_fallback_only_with_network(tmp_path, monkeypatch):
    """Missing files + a network -> torchvision download (stubbed here: it writes tiny IDX files)."""
    import amrc_exp.data as data

    calls = []

    def fake_download(target: Path) -> None:
        calls.append(target)
        raw = target / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for split, n in (("train", 12), ("t10k", 5)):
            write_idx(raw / f"{split}-images-idx3-ubyte.gz", np.full((n, 28, 28), 7, np.uint8), gz=True)
            write_idx(raw / f"{split}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8), gz=True)

    monkeypatch.setattr(data, "_download_fashion_mnist", fake_download)
    with pytest.raises(DataError):  # no network: no download attempted
        load_fashion_mnist(tmp_path / "empty", download_dir=tmp_path / "dl", network_probe=lambda: False)
    assert calls == []
    arrays = load_fashion_mnist(tmp_path / "empty", download_dir=tmp_path / "dl", network_probe=lambda: True)
    assert calls == [tmp_path / "dl"] and arrays["train"][0].shape == (12, 28, 28)
    # The downloaded copy is found again without the network.
    arrays = load_fashion_mnist(tmp_path / "empty", download_dir=tmp_path / "dl", network_probe=lambda: False)
    assert len(calls) == 1 and arrays["test"][1].tolist() == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- splits


def test_splits_disjoint_sized_and_seeded():
    # Synthetic data: same split logic as the real datasets, no files needed.
    base = ["data=synthetic", "data.num_train=500", "data.num_val=60", "calib.num_samples=300",
            "calib.heldout_samples=150", "data.finetune_subset=100", "data.eval_subset=50"]
    a, b, c = load_splits(make_cfg(*base)), load_splits(make_cfg(*base)), load_splits(make_cfg(*base, "seed=1"))
    calib, held = _subset_indices(a.calib), _subset_indices(a.heldout)
    assert len(calib) == 300 and len(held) == 150 and not set(calib) & set(held)
    assert len(set(calib)) == 300 and max(calib + held) < 500
    assert len(a.train) == 100 and len(a.val) == 50
    assert calib == _subset_indices(b.calib) and held == _subset_indices(b.heldout)
    assert _subset_indices(a.train) == _subset_indices(b.train)
    assert calib != _subset_indices(c.calib) and _subset_indices(a.val) != _subset_indices(c.val)
    described = a.describe()
    assert described["synthetic"] is True and described["calib"] == 300 and described["heldout"] == 150


def test_too_large_calibration_names_the_key():
    with pytest.raises(ConfigError, match="calib.num_samples") as err:
        load_splits(make_cfg("data=synthetic", "data.num_train=1000", "calib.num_samples=900"))
    assert "at most 744" in str(err.value)  # 1000 - 256 held-out samples
    with pytest.raises(ConfigError, match="data.eval_subset"):
        load_splits(make_cfg("data=synthetic", "data.eval_subset=100000"))


def test_synthetic_items_match_model_input_and_are_deterministic():
    splits = load_splits(make_cfg("data=synthetic", "model=deit_t", "model.weights=random"))
    assert splits.synthetic and splits.num_classes == 1000
    assert len(splits.train_full) == 1280 and len(splits.val) == 256
    x, y = splits.calib[5]
    assert x.shape == (3, 224, 224) and 0 <= y < 1000
    assert torch.equal(x, splits.calib[5][0])
    assert not torch.equal(x, splits.calib[6][0])
    labels = [splits.val[i][1] for i in range(256)]
    assert len(set(labels)) > 100  # random labels over 1000 classes


def test_make_loader_is_deterministic():
    data = torch.utils.data.TensorDataset(torch.arange(100))
    order = lambda seed: torch.cat([b[0] for b in make_loader(data, 16, shuffle=True, seed=seed)]).tolist()  # noqa: E731
    assert order(3) == order(3) and order(3) != order(4) and sorted(order(3)) == list(range(100))
    assert torch.cat([b[0] for b in make_loader(data, 16, shuffle=False, seed=0)]).tolist() == list(range(100))


# ----------------------------------------------------------------------------- ImageFolder


@pytest.fixture
def image_folder(tmp_path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        for cls in ("n01440764", "n01443537"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, size=(40 + 10 * i, 50, 3), dtype=np.uint8)
                suffix = "JPEG" if i else "png"
                Image.fromarray(pixels).save(root / split / cls / f"img{i}.{suffix}")
    return root


def test_image_folder_through_load_splits(image_folder):
    from PIL import Image
    from torchvision import transforms as T

    cfg = make_cfg("model=deit_t", "data=imagenet", f"data.root={image_folder}",
                   "calib.num_samples=2", "calib.heldout_samples=1", "data.num_workers=0")
    splits = load_splits(cfg)
    assert len(splits.train) == 4 and len(splits.val) == 4 and len(splits.calib) == 2 and len(splits.heldout) == 1
    assert splits.info["classes_found"] == 2 and not splits.synthetic
    # Eval transform of deit_tiny (timm pretrained cfg: bicubic, crop_pct 0.9, ImageNet stats).
    expected_tf = T.Compose([
        T.Resize(int(224 / 0.9), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(224), T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    x, y = splits.val[3]
    assert x.shape == (3, 224, 224) and y == 1
    path = sorted((image_folder / "val" / "n01443537").iterdir())[1]
    expected = expected_tf(Image.open(path).convert("RGB"))
    torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-4)
    # Calibration uses eval transforms (deterministic); training uses random augmentation.
    assert torch.equal(splits.calib[0][0], splits.calib[0][0])
    torch.manual_seed(0)
    assert splits.train[0][0].shape == (3, 224, 224)


def test_a_small_image_folder_names_data_num_classes(image_folder):
    """2 class folders and model.num_classes=2: data=imagenet still says 1000 classes, so the
    message must name the key that fixes it, data.num_classes, with the count it found."""
    with pytest.raises(ConfigError) as err:
        load_splits(make_cfg("model=deit_t", "data=imagenet", f"data.root={image_folder}", "model.num_classes=2"))
    assert "model.num_classes=2" in str(err.value) and "set data.num_classes=2" in str(err.value)
    cfg = make_cfg("model=deit_t", "data=imagenet", f"data.root={image_folder}", "model.num_classes=2",
                   "data.num_classes=2", "calib.num_samples=2", "calib.heldout_samples=1")
    assert load_splits(cfg).info["classes_found"] == 2


def test_image_folder_errors_name_data_root(image_folder, tmp_path):
    with pytest.raises(DataError, match="data.root"):
        load_splits(make_cfg("model=deit_t", "data=imagenet"))  # root: null
    with pytest.raises(DataError, match="data.root"):
        load_splits(make_cfg("model=deit_t", "data=imagenet", f"data.root={tmp_path / 'missing'}"))
    import shutil

    shutil.rmtree(image_folder / "val")
    with pytest.raises(DataError, match="data.root"):
        load_splits(make_cfg("model=deit_t", "data=imagenet", f"data.root={image_folder}"))


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_is_named_or_skipped_and_counted(image_folder, workers):
    """A truncated JPEG: by default an error naming the file and data.skip_corrupt (and the
    workers stopped); with data.skip_corrupt=true the next image stands in and the skip is
    counted (across workers)."""
    from amrc_exp.data import CorruptImageError

    bad = sorted((image_folder / "val" / "n01440764").iterdir())[1]
    bad.write_bytes(bad.read_bytes()[:200])  # header intact, data cut
    base = ["model=deit_t", "model.img_size=32", "data=imagenet", f"data.root={image_folder}", "calib.num_samples=2",
            "calib.heldout_samples=1", f"data.num_workers={workers}"]
    splits = load_splits(make_cfg(*base))
    with pytest.raises(CorruptImageError, match=rf"cannot decode image {bad}.*data.skip_corrupt=true"):
        list(make_loader(splits.val, 2, shuffle=False, seed=0, num_workers=workers))
    # the error stopped the workers at once (left to the garbage collector, each waits out a 5 s join)
    assert not multiprocessing.active_children()
    splits = load_splits(make_cfg(*base, "data.skip_corrupt=true"))
    with pytest.warns(UserWarning, match="skipping a corrupt image") if workers == 0 else contextlib.nullcontext():
        labels = [int(y) for _, ys in make_loader(splits.val, 2, shuffle=False, seed=0, num_workers=workers) for y in ys]
    assert len(labels) == 4 and splits.corrupt_skipped() == 1
