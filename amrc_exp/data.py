"""Datasets and the train / val / calib / heldout splits every stage reads.

Three sources, picked by `data.name` through the `DATASETS` registry:

- `fashion_mnist`: the IDX files Debian ships (`dataset-fashion-mnist`), read directly;
  torchvision's download is a fallback only when the files are missing AND a network exists.
- `imagenet`: `torchvision.datasets.ImageFolder` on `<data.root>/train` and `<data.root>/val`
  with timm's transforms for the model (train transform for fine-tuning, eval otherwise).
- `synthetic`: seeded random tensors of the model's input shape (timing/accounting only).

Every dataset item is `(float tensor C x H x W, normalised; int label)`. `build_splits` takes
typed settings (`DataConfig`, the model's input `ModelInput`, the calibration sizes and the seed):
the experiment layer converts its config once, a notebook passes its own.
"""

from __future__ import annotations

import gzip
import os
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from amrc_exp.compress.config import UNSET, as_choice, check, choices, optional_positive_int, positive_int
from amrc_exp.errors import ConfigError, DataError
from amrc_exp.io import network_available

FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530
FMNIST_NUM_CLASSES = 10
FMNIST_FILES = {  # split -> (images, labels) IDX base names; `.gz` or raw both accepted
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FMNIST_APT_HINT = "apt-get install dataset-fashion-mnist (files land in /usr/share/datasets/fashion-mnist)"
# Host torchvision downloads Fashion-MNIST from; probed (cheaply) before any download.
FMNIST_PROBE_HOST = ("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80)

# IDX type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "IDX format").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# Seed streams: independent, so changing one subset's size never reshuffles another.
_STREAM_CALIB, _STREAM_FINETUNE, _STREAM_EVAL, _STREAM_SYN_TRAIN, _STREAM_SYN_VAL = range(5)


# ----------------------------------------------------------------------------- IDX files


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or raw, detected by magic bytes) into a numpy array.

    Raises DataError on a truncated or malformed file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"cannot read IDX file {path}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: IDX header says shape {shape} ({expected} bytes), file has {len(raw)}")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)  # native order, writable


def _find_idx(root: Path, base: str) -> Optional[Path]:
    # Debian's layout, a raw copy, or torchvision's download layout.
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (base + ".gz", base):
            if (folder / name).is_file():
                return folder / name
    return None


def data_identity(name: str, root: Optional[str]) -> Optional[str]:
    """A SHA-256 that changes when the data a run reads changes, or None (synthetic data is a
    function of the config; missing data fails the run with its own message). Fashion-MNIST:
    the IDX files' bytes. ImageNet: the sorted (relative path, size) listing of train/ and val/
    (one directory walk, no image is read)."""
    if name == "synthetic" or root is None:
        return None
    import hashlib

    h, base = hashlib.sha256(), Path(str(root)).expanduser()
    if name == "fashion_mnist":
        files = [_find_idx(base, b) for bases in FMNIST_FILES.values() for b in bases]
        if any(f is None for f in files):
            return None
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
        return h.hexdigest()
    listing = sorted((str(p.relative_to(base)), p.stat().st_size)
                     for split in ("train", "val") for p in (base / split).rglob("*") if p.is_file())
    if not listing:
        return None
    for rel, size in listing:
        h.update(f"{rel}\0{size}\n".encode())
    return h.hexdigest()


def load_fashion_mnist(
    root: str | os.PathLike | None,
    download_dir: str | os.PathLike | None = None,
    network_probe: Callable[[], bool] = lambda: network_available(FMNIST_PROBE_HOST),
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST as `{"train": (60000x28x28 uint8, labels int64), "test": (10000x28x28, ...)}`.

    Reads the IDX files in `root`. If they are missing and `network_probe()` says a network
    exists, downloads them with torchvision into `download_dir` (or `root`) and reads those.
    """
    roots = [Path(root).expanduser()] if root else []
    if download_dir is not None:
        roots.append(Path(download_dir).expanduser())  # a previous fallback download
    for candidate in roots:
        found = {split: [_find_idx(candidate, b) for b in bases] for split, bases in FMNIST_FILES.items()}
        if all(p is not None for paths in found.values() for p in paths):
            return {split: _read_fmnist_split(*paths, root=root) for split, paths in found.items()}

    if network_probe():
        target = Path(download_dir or root or ".").expanduser()
        _download_fashion_mnist(target)
        return load_fashion_mnist(target, None, network_probe=lambda: False)

    missing = ", ".join(f"{b}.gz" for bases in FMNIST_FILES.values() for b in bases)
    raise DataError(
        f"Fashion-MNIST IDX files not found in data.root={root!r} (looked for {missing}) and no "
        f"network to download them. Install them with `{FMNIST_APT_HINT}` or set "
        f"data.root=/path/to/fashion-mnist."
    )


def _read_fmnist_split(images_path: Path, labels_path: Path, root: Any) -> tuple[np.ndarray, np.ndarray]:
    hint = f"Reinstall with `{FMNIST_APT_HINT}` or set data.root=/path/to/fashion-mnist (now {root!r})."
    try:
        images, labels = read_idx(images_path), read_idx(labels_path)
    except DataError as err:
        raise DataError(f"corrupt Fashion-MNIST file: {err}. {hint}") from err
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DataError(f"{images_path}: expected N x 28 x 28 uint8 images, got {images.shape} {images.dtype}. {hint}")
    if labels.shape != (images.shape[0],) or labels.size == 0 or labels.max() >= FMNIST_NUM_CLASSES:
        raise DataError(f"{labels_path}: labels {labels.shape} do not match images {images.shape}. {hint}")
    return images, labels.astype(np.int64)


def _download_fashion_mnist(target: Path) -> None:
    from torchvision.datasets import FashionMNIST

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30.0)  # a stalled mirror must not hang the run forever
    try:
        FashionMNIST(str(target), train=True, download=True)
        FashionMNIST(str(target), train=False, download=True)
    except Exception as err:  # torchvision raises RuntimeError/URLError/...; all mean "no data"
        raise DataError(
            f"Fashion-MNIST download into {target} failed ({err}). Install it with "
            f"`{FMNIST_APT_HINT}` or set data.root=/path/to/fashion-mnist."
        ) from err
    finally:
        socket.setdefaulttimeout(previous)


# ----------------------------------------------------------------------------- datasets


class FashionMNISTDataset(Dataset):
    """uint8 28x28 images -> normalised float `in_chans x img_size x img_size` tensors.

    `augment=True` (fine-tuning only): random crop with 2-pixel padding and horizontal flip,
    drawn from torch's global RNG so a seeded run is reproducible.
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, augment: bool = False,
        img_size: int = 28, in_chans: int = 1,
    ) -> None:
        self.images = torch.from_numpy(images)  # shares memory: train/calib views cost nothing
        self.labels = torch.from_numpy(labels)
        self.augment, self.img_size, self.in_chans = augment, img_size, in_chans

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index].float().div_(255.0).sub_(FMNIST_MEAN).div_(FMNIST_STD)[None]
        if self.augment:
            # Pad with the normalised value of a black pixel, not 0 (= mean grey).
            padded = F.pad(x, (2, 2, 2, 2), value=-FMNIST_MEAN / FMNIST_STD)
            dy, dx = torch.randint(0, 5, (2,)).tolist()
            x = padded[:, dy: dy + 28, dx: dx + 28]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        if self.img_size != 28:  # lets a 224-pixel model run on Fashion-MNIST
            x = F.interpolate(x[None], size=self.img_size, mode="bilinear", align_corners=False)[0]
        if self.in_chans != 1:
            x = x.expand(self.in_chans, -1, -1)
        return x.contiguous(), int(self.labels[index])


class SyntheticDataset(Dataset):
    """Seeded random images and labels: for timing and accounting only, never for a table.

    Each item is generated from its own seed, so nothing big is held in memory and any
    subset or worker sees the same tensors.
    """

    synthetic = True

    def __init__(self, num: int, shape: Sequence[int], num_classes: int, seed: int) -> None:
        self.num, self.shape, self.seed = num, tuple(shape), seed
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (num,), generator=gen)

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.num:
            raise IndexError(index)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randn(self.shape, generator=gen), int(self.labels[index])


class CorruptImageError(DataError):
    """An image file that does not decode (truncated, not an image)."""


def checked_loader(path: str) -> Any:
    """torchvision's default loader, with a decode failure named by its file."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CorruptImageError(f"cannot decode image {path} ({type(err).__name__}: {err}); fix or remove it, "
                                "or set data.skip_corrupt=true to skip such files (counted in results.json)") from err


class SkipCounter:
    """Images skipped as corrupt, counted across DataLoader workers (shared memory, fork)."""

    def __init__(self) -> None:
        import multiprocessing

        self._value = multiprocessing.get_context("fork").Value("i", 0)

    def add(self) -> None:
        with self._value.get_lock():
            self._value.value += 1

    @property
    def count(self) -> int:
        return int(self._value.value)


class TransformedView(Dataset):
    """The same underlying items (e.g. one ImageFolder scan) seen through another transform.

    With `skip` (data.skip_corrupt), an image that does not decode is replaced by the next one
    that does, and counted in `skipped` (shared by all views of one scan)."""

    def __init__(self, base: Dataset, transform: Callable[[Any], torch.Tensor], skip: Optional[SkipCounter] = None) -> None:
        self.base, self.transform, self.skip = base, transform, skip

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self.base)):
            try:
                image, label = self.base[(index + offset) % len(self.base)]
                return self.transform(image), int(label)
            except CorruptImageError as err:
                if self.skip is None:
                    raise
                self.skip.add()
                warnings.warn(f"skipping a corrupt image (data.skip_corrupt=true): {err}", stacklevel=2)
        raise DataError("every image of the split failed to decode")


# ----------------------------------------------------------------------------- sources


@dataclass
class Sources:
    """A dataset's two splits; the train split twice: augmented (fine-tune) and eval view."""

    train_augmented: Dataset
    train_eval: Dataset
    val: Dataset
    num_classes: int
    synthetic: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class ModelInput(Protocol):
    """What the data needs to know of the model (`models.ModelConfig` has it): its timm name (for
    timm's transforms), its classes and its input shape."""

    name: str
    num_classes: int
    img_size: int
    in_chans: int


def fashion_mnist_sources(data: "DataConfig", model: ModelInput, seed: int, cache_dir: Optional[str],
                          module: Optional[torch.nn.Module] = None) -> Sources:
    arrays = load_fashion_mnist(data.root, download_dir=None if cache_dir is None
                                else Path(str(cache_dir)).expanduser() / "datasets")
    shape = dict(img_size=int(model.img_size), in_chans=int(model.in_chans))
    (x_train, y_train), (x_test, y_test) = arrays["train"], arrays["test"]
    return Sources(
        train_augmented=FashionMNISTDataset(x_train, y_train, augment=bool(data.augment), **shape),
        train_eval=FashionMNISTDataset(x_train, y_train, augment=False, **shape),
        val=FashionMNISTDataset(x_test, y_test, augment=False, **shape),
        num_classes=FMNIST_NUM_CLASSES,
    )


def imagenet_sources(data: "DataConfig", model: ModelInput, seed: int, cache_dir: Optional[str],
                     module: Optional[torch.nn.Module] = None) -> Sources:
    """ImageFolder on `<root>/train` and `<root>/val`, with timm's transforms for the model."""
    from torchvision.datasets import ImageFolder

    root = data.root
    if not root:
        raise DataError("data=imagenet needs its ImageFolder root: set data.root=/path/to/imagenet "
                        "(a folder holding train/ and val/, one subfolder per class)")
    root = Path(str(root)).expanduser()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"{root / split} is not a directory: set data.root=/path/to/imagenet "
                            f"(a folder holding train/ and val/, one subfolder per class)")
    try:
        train = ImageFolder(str(root / "train"), loader=checked_loader)
        val = ImageFolder(str(root / "val"), loader=checked_loader)
    except (FileNotFoundError, OSError) as err:  # e.g. a class folder with no images
        raise DataError(f"cannot read ImageFolder under data.root={str(root)!r}: {err}") from err
    if train.classes != val.classes:
        # ImageFolder numbers classes by sorted folder name: different sets shift every label.
        only_train = sorted(set(train.classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train.classes))[:5]
        raise DataError(f"data.root={str(root)!r}: train/ and val/ must hold the same class folders "
                        f"(only in train: {only_train}, only in val: {only_val})")
    if len(train.classes) > data.num_classes:
        raise ConfigError("data.num_classes", data.num_classes,
                          f">= {len(train.classes)} (class folders found under {root / 'train'})")
    train_tf, eval_tf = timm_transforms(model, module)
    skip = SkipCounter() if data.skip_corrupt else None
    return Sources(
        train_augmented=TransformedView(train, train_tf if data.augment else eval_tf, skip),
        train_eval=TransformedView(train, eval_tf, skip),
        val=TransformedView(val, eval_tf, skip),
        num_classes=int(data.num_classes),
        info={"classes_found": len(train.classes)},
    )


def timm_transforms(model: ModelInput, module: Optional[torch.nn.Module] = None) -> tuple[Callable, Callable]:
    """(train, eval) transforms from timm's data config for the model `module` (or its name; our
    embedded names resolve once `amrc_exp.models` has registered them: data sits below models and
    never imports them)."""
    import timm
    from timm.data import create_transform, resolve_data_config

    input_size = (int(model.in_chans), int(model.img_size), int(model.img_size))
    if module is not None:
        data_cfg = resolve_data_config({"input_size": input_size}, model=module)
    else:
        pretrained = timm.models.get_pretrained_cfg(str(model.name))
        data_cfg = resolve_data_config(
            {"input_size": input_size}, pretrained_cfg=pretrained.to_dict() if pretrained else None
        )
    for key in ("mean", "std"):  # a 1-channel model on 3-channel defaults: average the stats
        if len(data_cfg[key]) != input_size[0]:
            data_cfg[key] = (float(np.mean(data_cfg[key])),) * input_size[0]
    train_tf = create_transform(**data_cfg, is_training=True)
    eval_tf = create_transform(**data_cfg, is_training=False)
    return train_tf, eval_tf


def synthetic_sources(data: "DataConfig", model: ModelInput, seed: int, cache_dir: Optional[str],
                      module: Optional[torch.nn.Module] = None) -> Sources:
    shape = (int(model.in_chans), int(model.img_size), int(model.img_size))
    num_classes = int(data.num_classes)
    train = SyntheticDataset(int(data.num_train), shape, num_classes, seed=_seed(seed, _STREAM_SYN_TRAIN))
    val = SyntheticDataset(int(data.num_val), shape, num_classes, seed=_seed(seed, _STREAM_SYN_VAL))
    return Sources(train, train, val, num_classes=num_classes, synthetic=True)


# data.name -> builder(data, model, seed, cache_dir, module) -> Sources
DATASETS: dict[str, Callable[..., Sources]] = {
    "fashion_mnist": fashion_mnist_sources,
    "imagenet": imagenet_sources,
    "synthetic": synthetic_sources,
}
DataName = choices("DataName", tuple(DATASETS))


@dataclass
class DataConfig:
    """Which data, and how much of it each stage reads (the `data` node of the run config)."""

    name: DataName = UNSET  # fashion_mnist | imagenet | synthetic
    root: Optional[str] = None
    num_classes: int = 10
    synthetic: bool = False  # True: random tensors, results are marked and never fill a table
    num_train: int = 1024  # synthetic only: sizes of the random splits
    num_val: int = 256
    augment: bool = True  # fine-tuning images: train transforms (crop/flip) or the eval view
    finetune_subset: Optional[int] = None  # fine-tune on a seeded subset of train (None: all)
    eval_subset: Optional[int] = None  # evaluate on a seeded subset of val (None: all)
    skip_corrupt: bool = False  # ImageFolder: skip images that do not decode (counted) instead of failing
    num_workers: Optional[int] = None  # null: by device (0 on the CPU, up to 8 on a GPU; loader_options)

    def __post_init__(self) -> None:
        self.name = as_choice(DataName, "data.name", self.name)
        for key in ("num_classes", "num_train", "num_val"):
            positive_int(f"data.{key}", getattr(self, key))
        optional_positive_int("data.finetune_subset", self.finetune_subset)
        optional_positive_int("data.eval_subset", self.eval_subset)
        check("data.num_workers", self.num_workers, lambda v: v is None or (isinstance(v, int) and v >= 0),
              "null (by device) or an integer >= 0")


# ----------------------------------------------------------------------------- splits


@dataclass
class Splits:
    """What every stage reads. Subsets index into the full splits; sizes in `describe()`."""

    train: Dataset  # fine-tuning (augmented), full train split or a seeded subset
    val: Dataset  # evaluation: the test/val split or a seeded subset
    calib: Dataset  # calibration proxy set: seeded subset of train, eval transforms
    heldout: Dataset  # seeded subset of train disjoint from calib, eval transforms
    synthetic: bool
    num_classes: int
    train_full: Optional[Dataset] = None  # the whole augmented train split (embedded training)
    train_plain: Optional[Dataset] = None  # the whole train split, eval transforms (calib's base)
    val_full: Optional[Dataset] = None  # the whole val split (embedded model's test top-1)
    name: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def corrupt_skipped(self) -> int:
        """Images skipped as corrupt so far (data.skip_corrupt=true), over every split."""
        counters = {}
        for ds in (self.train, self.val, self.calib, self.heldout):
            while isinstance(ds, Subset):
                ds = ds.dataset
            skip = getattr(ds, "skip", None)
            if skip is not None:
                counters[id(skip)] = skip.count
        return sum(counters.values())

    def describe(self) -> dict[str, Any]:
        """Short summary for results.json."""
        return {
            "name": self.name, "synthetic": self.synthetic, "num_classes": self.num_classes,
            "train": len(self.train), "val": len(self.val),
            "calib": len(self.calib), "heldout": len(self.heldout), **self.info,
        }


def build_splits(data: DataConfig, model: ModelInput, *, calib_samples: int, heldout_samples: int, seed: int,
                 cache_dir: Optional[str] = None, module: Optional[torch.nn.Module] = None) -> Splits:
    """Build train / val / calib / heldout: `calib_samples` calibration and `heldout_samples`
    held-out images drawn from train by `seed` (disjoint), fine-tune and eval subsets per `data`.

    `cache_dir` holds a Fashion-MNIST download (only if its files are missing and a network
    exists); `module` (optional) only refines the timm transforms of ImageFolder data.
    """
    name = str(data.name)
    if name not in DATASETS:
        raise ConfigError("data.name", name, "one of " + ", ".join(DATASETS))
    sources = DATASETS[name](data, model, seed, cache_dir, module)
    if sources.num_classes > int(model.num_classes):
        found = sources.info.get("classes_found")
        fewer = (f"; the data has {found} classes: set data.num_classes={found} to match"
                 if found is not None and found <= int(model.num_classes) else "")
        raise ConfigError("model.num_classes", model.num_classes,
                          f">= {sources.num_classes} (data.num_classes of data={name}){fewer}")

    n_train, n_val = len(sources.train_eval), len(sources.val)
    n_calib, n_held = int(calib_samples), int(heldout_samples)
    if n_calib + n_held > n_train:
        raise ConfigError("calib.num_samples", n_calib,
                          f"at most {max(n_train - n_held, 0)}: calib.num_samples + calib.heldout_samples "
                          f"({n_held}) must fit in the {n_train}-image train split")
    perm = _permutation(n_train, _seed(seed, _STREAM_CALIB))
    calib_idx, held_idx = np.sort(perm[:n_calib]), np.sort(perm[n_calib: n_calib + n_held])

    train = _maybe_subset(sources.train_augmented, data.finetune_subset, "data.finetune_subset",
                          _seed(seed, _STREAM_FINETUNE))
    val = _maybe_subset(sources.val, data.eval_subset, "data.eval_subset", _seed(seed, _STREAM_EVAL))
    return Splits(
        train=train, val=val,
        calib=Subset(sources.train_eval, calib_idx.tolist()),
        heldout=Subset(sources.train_eval, held_idx.tolist()),
        synthetic=sources.synthetic or bool(data.synthetic),
        num_classes=sources.num_classes,
        train_full=sources.train_augmented, train_plain=sources.train_eval, val_full=sources.val, name=name,
        info={"root": None if data.root is None else str(data.root), "seed": int(seed),
              "train_full": n_train, "val_full": n_val, **sources.info},
    )


def _seed(seed: int, stream: int) -> int:
    # One int per (run seed, purpose): stable across numpy/torch versions.
    return int(np.random.SeedSequence([int(seed), stream]).generate_state(1)[0])


def _permutation(n: int, seed: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64(seed)).permutation(n)


def _maybe_subset(dataset: Dataset, size: Optional[int], key: str, seed: int) -> Dataset:
    if size is None:
        return dataset
    if size > len(dataset):
        raise ConfigError(key, size, f"null or at most {len(dataset)} (the split's size)")
    return Subset(dataset, np.sort(_permutation(len(dataset), seed)[:size]).tolist())


# ----------------------------------------------------------------------------- loaders


def loader_options(data: DataConfig, device: torch.device | str) -> dict[str, Any]:
    """`make_loader` options that keep `device` fed: `data.num_workers` (null: 0 on the CPU, where
    workers only compete with the compute for the cores; up to 8 on a GPU) and pinned host
    memory on CUDA, so `non_blocking=True` copies really are asynchronous."""
    cuda = torch.device(device).type == "cuda"
    workers = data.num_workers
    if workers is None:
        workers = min(8, max(1, (os.cpu_count() or 2) // 2)) if cuda else 0
    return {"num_workers": int(workers), "pin_memory": cuda}


class _Loader(DataLoader):
    """A DataLoader that stops its worker processes at once when an exception (a corrupt image,
    Ctrl-C) ends an iteration. Left to the garbage collector, the iterator sits in a reference
    cycle with the traceback; its queues can be finalised before it, the workers never get the
    stop message, and each costs a 5 s join timeout (pytorch/pytorch#39570)."""

    def __iter__(self):
        it = super().__iter__()
        try:
            yield from it
        except (Exception, KeyboardInterrupt):  # not GeneratorExit: a `break` leaves no cycle
            stop = getattr(it, "_shutdown_workers", None)  # only multi-process iterators have one
            if stop is not None:
                stop()
                self._iterator = None  # persistent_workers: the next epoch starts new workers
            raise


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0,
    drop_last: bool = False, pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader whose order (and workers' RNG) depends only on `seed`."""
    generator = torch.Generator().manual_seed(int(seed))
    return _Loader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
        num_workers=num_workers, drop_last=drop_last, worker_init_fn=_seed_worker,
        persistent_workers=num_workers > 0, pin_memory=pin_memory,
    )


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy/random follow it.
    import random

    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)
