"""Datasets as uint8 tensors, and a loader that keeps a split on the device.

Every dataset is returned as a :class:`Dataset` of CPU tensors: images uint8 ``(N, C, H, W)``,
labels int64 ``(N,)``, plus class names and the per-channel mean/std (in [0, 1] pixel units) that
the model's ``Normalize`` layer uses. Names (see ``config.DATASETS``):

- ``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist``: torchvision's files, downloaded on first
  use into ``root`` / ``$SPATLIB_DATA`` / ``~/.cache/spatlib``; offline with no files a
  :class:`DataError` says which files to put where.
- ``digits``: scikit-learn's bundled 8x8 digits (no download), a fixed stratified split.
- ``npz``: bring your own ``.npz`` (``x_train, y_train, x_test, y_test``; uint8 NHWC or NHW).
- ``synthetic``: seeded, learnable, any shape; for tests and benchmarks.

Model selection (:func:`select_validation`) validates on a stratified hold-out of the training
images by default; on test images only with ``data.val_split: test``, and then the run says so
(:func:`selection_label`).

:class:`DeviceLoader` holds a split on the device as uint8 and does the shuffling, pad-crop and
flip there, batched, from a generator seeded by (seed, epoch) so a resumed run sees the same
batches as an uninterrupted one.
"""
from __future__ import annotations

import math
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import DATASETS, DataConfig
from .util import ConfigError, derive_seed

# --------------------------------------------------------------------------------------------
# Per-dataset facts. mean/std: published per-channel constants of the full train split, in [0,1]
# units (None: computed from the train split at load time). pad/flip: the standard training
# augmentation (pad-and-random-crop in pixels, random horizontal flip). get: how to fetch
# torchvision's files by hand (the files and their folder: TORCHVISION_FILES).
_TORONTO = "https://www.cs.toronto.edu/~kriz/"
DATASET_FACTS: dict[str, dict] = {
    "cifar10": dict(tv="CIFAR10", pad=4, flip=True,
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616),
                    get="download " + _TORONTO + "cifar-10-python.tar.gz and extract it"),
    "cifar100": dict(tv="CIFAR100", pad=4, flip=True,
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                     get="download " + _TORONTO + "cifar-100-python.tar.gz and extract it"),
    # digits and MNIST strokes are not mirror-symmetric; clothes are (a mirrored shoe is a shoe)
    "mnist": dict(tv="MNIST", pad=2, flip=False, mean=(0.1307,), std=(0.3081,),
                  get="download the four *-ubyte.gz files from "
                      "https://ossci-datasets.s3.amazonaws.com/mnist/ and gunzip them"),
    "fashion_mnist": dict(tv="FashionMNIST", pad=2, flip=True, mean=(0.2860,), std=(0.3530,),
                          get="download the four *-ubyte.gz files from http://fashion-mnist."
                              "s3-website.eu-central-1.amazonaws.com/ and gunzip them"),
    "digits": dict(pad=1, flip=False, mean=None, std=None),   # 1 px of 8 is CIFAR's 4 of 32
    "npz": dict(pad=None, flip=None, mean=None, std=None),    # decided from the image shape
    "synthetic": dict(pad=0, flip=False, mean=None, std=None),
}
DIGITS_TEST_SIZE = 0.25        # fraction of the 1,797 digits held out for test (450 images)
DIGITS_SPLIT_SEED = 0          # fixed: every user sees the same digits split
MIN_STD = 1 / 255              # floor for computed std: a constant channel must not divide by 0


class DataError(ValueError):
    """A dataset cannot be loaded: missing files (and where to put them) or a malformed npz."""


@dataclass(repr=False)
class Dataset:
    """Train and test splits as CPU tensors: images uint8 (N, C, H, W), labels int64 (N,)."""
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: list[str]
    num_classes: int
    mean: tuple[float, ...]     # per channel, [0,1] pixel units
    std: tuple[float, ...]

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.x_train.shape[2:])

    def __repr__(self) -> str:  # the default would print every pixel
        c, h, w = self.x_train.shape[1:]
        return (f"Dataset({self.name!r}, train={len(self.x_train)}, test={len(self.x_test)}, "
                f"image={c}x{h}x{w}, classes={self.num_classes})")


# --------------------------------------------------------------------------------------------
# helpers
def _nchw(x) -> torch.Tensor:
    """uint8 (N,H,W) or (N,H,W,C) numpy/tensor -> contiguous uint8 tensor (N,C,H,W)."""
    x = torch.as_tensor(x)
    x = x.unsqueeze(-1) if x.ndim == 3 else x
    return x.permute(0, 3, 1, 2).contiguous()


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N,C,H,W), in [0,1] units.

    Exact, from a 256-bin histogram per channel, so a large split is never copied to float;
    rounded to 4 places like the published constants (they are written into run configs).
    """
    values = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        m = (counts * values).sum() / counts.sum()
        v = (counts * (values - m) ** 2).sum() / counts.sum()
        mean.append(round(m.item(), 4))
        std.append(round(max(v.sqrt().item(), MIN_STD), 4))
    return tuple(mean), tuple(std)


def _check_limit(limit: int | None, key: str) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DataError(f"{key}: expected None or an integer >= 0, got {limit!r}")


def _finish(name, x_train, y_train, x_test, y_test, class_names, num_classes,
            train_limit, test_limit) -> Dataset:
    """Convert raw splits to the Dataset layout; stats come from the full train split."""
    x_train, x_test = _nchw(x_train), _nchw(x_test)
    y_train = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    y_test = torch.from_numpy(np.asarray(y_test, dtype=np.int64))
    facts = DATASET_FACTS[name]
    mean, std = (facts["mean"], facts["std"]) if facts["mean"] else channel_stats(x_train)
    # clone the prefix so a small limit does not keep the whole split alive
    if train_limit is not None and train_limit < len(x_train):
        x_train, y_train = x_train[:train_limit].clone(), y_train[:train_limit].clone()
    if test_limit is not None and test_limit < len(x_test):
        x_test, y_test = x_test[:test_limit].clone(), y_test[:test_limit].clone()
    return Dataset(name, x_train, y_train, x_test, y_test, list(class_names), int(num_classes),
                   tuple(mean), tuple(std))


def default_root() -> Path:
    """$SPATLIB_DATA, else ~/.cache/spatlib."""
    return Path(os.environ.get("SPATLIB_DATA") or "~/.cache/spatlib").expanduser()


# --------------------------------------------------------------------------------------------
# the sources
def _load_torchvision(name: str, root: str | None, download: bool):
    import torchvision  # lazy: importing it is slow and most runs use digits

    facts, where = DATASET_FACTS[name], TORCHVISION_FILES[name]
    root = Path(root).expanduser() if root else default_root()
    cls = getattr(torchvision.datasets, facts["tv"])
    try:
        train, test = (cls(str(root), train=t, download=download) for t in (True, False))
    except (RuntimeError, OSError) as e:  # not found / corrupted, or no network for the download
        why = "download failed" if download else "files not found and download=False"
        raise DataError(
            f"{name}: {why} ({str(e).strip()}). Expected the files in {root / where['folder']} "
            f"({', '.join(where['files'])}): {facts['get']} so that they land there (or point root= / $SPATLIB_DATA at the "
            f"folder that holds them). Offline without them, use the 'npz' dataset with your "
            f"own x_train, y_train, x_test, y_test arrays.") from e
    # .data/.targets are whole arrays: no per-image PIL conversion
    return (train.data, np.asarray(train.targets), test.data, np.asarray(test.targets),
            [str(c) for c in train.classes], len(train.classes))


def _load_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # sklearn's digits are 0..16 intensities; rescale to the 0..255 of every other dataset
    x = np.round(bunch.images * (255 / 16)).astype(np.uint8)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=DIGITS_TEST_SIZE,
                                              random_state=DIGITS_SPLIT_SEED, stratify=y)
    return x_tr, y_tr, x_te, y_te, [str(k) for k in range(10)], 10


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npz_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a .npz dataset at all (missing, not a zip), or None."""
    if not path.is_file():
        return "file not found"
    if not zipfile.is_zipfile(path):
        # np.load would read such a file as a pickle and refuse it as one: say what it is not
        return ("is not a .npz archive (a zip of .npy arrays, as numpy.savez writes); it may be "
                "truncated, or another format renamed")
    return None


def _npz_layout(layout: dict[str, tuple[tuple[int, ...], np.dtype]], y_train: np.ndarray,
                y_test: np.ndarray, class_names: np.ndarray | None) -> list[str]:
    """The class names of an npz dataset from its arrays' (shape, dtype) and its labels; a
    :class:`DataError` (without the file's name) for a missing key, a wrong shape or dtype, or
    labels out of range. Shapes and dtypes are all it needs of the images: the batch's check
    (:func:`check_data`) reads them from the .npy headers without loading the images."""
    missing = ", ".join(k for k in NPZ_KEYS if k not in layout)
    if missing:
        raise DataError(f"missing key(s) {missing}; expected {', '.join(NPZ_KEYS)} "
                        f"(found: {', '.join(layout) or 'none'})")
    shapes = set()
    for split in ("train", "test"):
        (x_shape, x_dtype), (y_shape, y_dtype) = layout[f"x_{split}"], layout[f"y_{split}"]
        if x_dtype != np.uint8:
            raise DataError(f"x_{split} has dtype {x_dtype}; images must be uint8 (0..255)")
        if len(x_shape) not in (3, 4) or (len(x_shape) == 4 and x_shape[-1] not in (1, 3)):
            raise DataError(f"x_{split} has shape {x_shape}; expected (N, H, W) or "
                            f"(N, H, W, C) with C 1 or 3 (NHWC)")
        if len(y_shape) != 1 or not (np.issubdtype(y_dtype, np.integer) and y_dtype != np.bool_):
            raise DataError(f"y_{split} has shape {y_shape} and dtype {y_dtype}; labels "
                            f"must be a 1-D integer array")
        if x_shape[0] != y_shape[0]:
            raise DataError(f"x_{split} has {x_shape[0]} images but y_{split} has {y_shape[0]} labels")
        shapes.add(x_shape[1:] if len(x_shape) == 4 else x_shape[1:] + (1,))
    for split, y in (("train", y_train), ("test", y_test)):
        if len(y) and y.min() < 0:
            raise DataError(f"y_{split} has negative labels (min {y.min()}); labels must be 0..K-1")
    if len(shapes) != 1:
        raise DataError(f"train and test images differ in shape (H, W, C): {sorted(shapes)}")
    for split in ("train", "test"):
        if layout[f"x_{split}"][0][0] == 0:
            need = "training images" if split == "train" else "test images (every accuracy is measured on them)"
            raise DataError(f"x_{split} is empty; a run needs {need}")
    top = max(int(y.max()) for y in (y_train, y_test) if len(y))
    if class_names is None:
        return [str(k) for k in range(top + 1)]
    names = [str(s) for s in class_names.reshape(-1).tolist()]
    if top >= len(names):
        raise DataError(f"labels out of range: max label {top} but the file lists "
                        f"{len(names)} class names")
    return names


def _npz_class_names(f) -> np.ndarray | None:
    """The class names an npz holds (CIFAR-100 files name them fine_label_names), or None."""
    key = next((k for k in ("class_names", "fine_label_names") if k in f), None)
    return None if key is None else f[key]


def _load_npz(path: str | None):
    if not path:
        raise DataError("npz: a path is required (data.path: a .npz with x_train, y_train, "
                        "x_test, y_test)")
    path = Path(path).expanduser()
    problem = _npz_file_problem(path)
    if problem:
        raise DataError(f"npz: {path}: {problem}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # object arrays (pickles are refused), a damaged member
        raise DataError(f"npz: cannot read {path}: {e}") from e
    try:
        names = _npz_layout({k: (a.shape, a.dtype) for k, a in arrays.items()},
                            arrays.get("y_train"), arrays.get("y_test"), _npz_class_names(arrays))
    except DataError as e:
        raise DataError(f"npz: {path}: {e}") from None
    return (arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
            names, len(names))


def _load_synthetic(num_classes: int, shape, n_train: int, n_test: int, seed: int):
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(f"synthetic: shape must be (C, H, W) of positive ints, got {shape}")
    if num_classes < 1 or n_train < 1 or n_test < 0:
        raise DataError(f"synthetic: need num_classes >= 1, n_train >= 1, n_test >= 0; got "
                        f"{num_classes}, {n_train}, {n_test}")
    # one random pattern per class (its "object") + per-image noise: learnable, not trivial.
    # Each part has its own generator so n_train does not change the test images.
    protos = torch.rand((num_classes, *shape), generator=torch.Generator().manual_seed(
        derive_seed(seed, 0)))

    def draw(n: int, part: int):
        g = torch.Generator().manual_seed(derive_seed(seed, part))
        y = torch.arange(n) % num_classes             # balanced classes
        y = y[torch.randperm(n, generator=g)]
        x = 0.2 + 0.6 * protos[y] + 0.15 * torch.randn((n, *shape), generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1), y

    x_tr, y_tr = draw(n_train, 1)
    x_te, y_te = draw(n_test, 2)
    return x_tr, y_tr, x_te, y_te, [str(k) for k in range(num_classes)], num_classes


def load_dataset(name: str, root: str | None = None, download: bool = True, *,
                 path: str | None = None, train_limit: int | None = None,
                 test_limit: int | None = None, num_classes: int = 10,
                 shape: tuple[int, int, int] = (1, 8, 8), n_train: int = 512, n_test: int = 256,
                 seed: int = 0) -> Dataset:
    """Load a dataset by name as uint8 (N, C, H, W) / int64 (N,) CPU tensors.

    ``root``/``download``: torchvision datasets only; ``path``: npz only; ``num_classes``,
    ``shape`` (C, H, W), ``n_train``, ``n_test``, ``seed``: synthetic only. ``train_limit`` /
    ``test_limit`` keep the first N images of each split (deterministic) for every dataset;
    mean/std are always those of the full train split.
    """
    _check_limit(train_limit, "train_limit")
    _check_limit(test_limit, "test_limit")
    if name in ("cifar10", "cifar100", "mnist", "fashion_mnist"):
        raw = _load_torchvision(name, root, download)
    elif name == "digits":
        raw = _load_digits()
    elif name == "npz":
        raw = _load_npz(path)
    elif name == "synthetic":
        raw = _load_synthetic(num_classes, shape, n_train, n_test, seed)
    else:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return _finish(name, *raw, train_limit, test_limit)


def dataset_from_config(cfg: DataConfig) -> Dataset:
    """:func:`load_dataset` from a :class:`DataConfig` (val_size/augment are the trainer's)."""
    return load_dataset(cfg.name, cfg.root, cfg.download, path=cfg.path,
                        train_limit=cfg.train_limit, test_limit=cfg.test_limit,
                        num_classes=cfg.synthetic_classes, shape=tuple(cfg.synthetic_shape),
                        n_train=cfg.synthetic_train, n_test=cfg.synthetic_test, seed=0)


# --------------------------------------------------------------------------------------------
# the cheap check a batch runs before any work: the data resolved, no image loaded
# torchvision's datasets: the files its loader reads (under root) and the sizes they hold
TORCHVISION_FILES: dict[str, dict] = {
    "cifar10": dict(folder="cifar-10-batches-py", n_train=50000, n_test=10000, shape=(3, 32, 32),
                    classes=10, files=[f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]),
    "cifar100": dict(folder="cifar-100-python", n_train=50000, n_test=10000, shape=(3, 32, 32),
                     classes=100, files=["train", "test", "meta"]),
    "mnist": dict(folder="MNIST/raw", n_train=60000, n_test=10000, shape=(1, 28, 28), classes=10,
                  files=["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    "fashion_mnist": dict(folder="FashionMNIST/raw", n_train=60000, n_test=10000, shape=(1, 28, 28),
                          classes=10, files=["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
}
# sklearn's 1,797 digits split by DIGITS_TEST_SIZE (tests/test_data.py checks them against a load)
DIGITS_SIZES = dict(n_train=1347, n_test=450, shape=(1, 8, 8), classes=10)
# the image shapes (C, H, W) of the kit's named datasets, smallest first: what synthetic images
# for a model of unknown input are tried at (spat eval --dataset synthetic)
KNOWN_SHAPES: tuple[tuple[int, int, int], ...] = tuple(sorted(
    {DIGITS_SIZES["shape"], *(f["shape"] for f in TORCHVISION_FILES.values())}, key=math.prod))


def parse_shape(text: str, key: str = "shape") -> tuple[int, int, int]:
    """``"3,32,32"`` (or ``"3x32x32"``) -> (3, 32, 32): an image shape (C, H, W). Raises
    :class:`DataError` naming ``key`` for anything else."""
    try:
        shape = tuple(int(v) for v in re.split(r"[,x]", text.strip()))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(f"{key}: expected C,H,W (three positive integers, e.g. 3,32,32), got {text!r}")
    return shape  # type: ignore[return-value]


@dataclass(frozen=True)
class DataSummary:
    """What a data section resolves to, found without loading the images."""
    source: str                      # e.g. ``npz (/data/cifar10.npz)``
    n_train: int                     # training images after train_limit, before the val split
    n_test: int                      # test images after test_limit
    shape: tuple[int, int, int]      # (C, H, W)
    num_classes: int
    note: str = ""                   # e.g. that the files will be downloaded

    def describe(self) -> str:
        c, h, w = self.shape
        return (f"{self.source}: {self.n_train} train + {self.n_test} test images of {c}x{h}x{w}, "
                f"{self.num_classes} classes" + (f" ({self.note})" if self.note else ""))


def data_source(cfg: DataConfig) -> str:
    """The dataset's name and where it comes from: ``digits``, ``npz (/data/cifar10.npz)``,
    ``cifar10 (~/.cache/spatlib)``, ``synthetic (1x8x8)``."""
    if cfg.name == "npz":
        return f"npz ({Path(cfg.path).expanduser() if cfg.path else 'no path'})"
    if cfg.name in TORCHVISION_FILES:
        return f"{cfg.name} ({Path(cfg.root).expanduser() if cfg.root else default_root()})"
    if cfg.name == "synthetic":
        return "synthetic ({}x{}x{})".format(*cfg.synthetic_shape)
    return cfg.name


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the header of a .npy stream, reading no array data."""
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise DataError(f"a .npy member of format version {version[0]}.{version[1]}, "
                        f"which this check does not read; save it with numpy.savez")
    shape, _, dtype = read(f)
    return tuple(shape), dtype


def _npz_summary(path: Path) -> tuple[int, int, tuple[int, int, int], int]:
    """(train images, test images, (C, H, W), classes) of an npz dataset: the images' shapes and
    dtypes from their .npy headers (no image is read), the labels (small) in full."""
    problem = _npz_file_problem(path)
    if problem:
        raise DataError(problem)
    try:
        with zipfile.ZipFile(path) as z:
            layout = {}
            for member in z.namelist():
                if member.endswith(".npy"):
                    with z.open(member) as f:
                        layout[member[:-4]] = _npy_header(f)
        # the labels and class names are small: read them, as the loader will
        with np.load(path, allow_pickle=False) as f:
            labels = {k: f[k] for k in ("y_train", "y_test") if k in f}
            names = _npz_class_names(f)
    except (OSError, ValueError, zipfile.BadZipFile) as e:   # a damaged member, a pickled array
        raise DataError(f"cannot read it: {e}") from None
    classes = _npz_layout(layout, labels.get("y_train"), labels.get("y_test"), names)
    x_shape = layout["x_train"][0]
    h, w, c = x_shape[1:] if len(x_shape) == 4 else (*x_shape[1:], 1)
    return x_shape[0], layout["x_test"][0][0], (c, h, w), len(classes)


def check_data(cfg: DataConfig) -> DataSummary:
    """Resolve a data section cheaply, before any work: the npz file exists and holds
    ``x_train, y_train, x_test, y_test`` of consistent shapes and dtypes (read from the .npy
    headers, not the images), torchvision's files are present under the root (or will be
    downloaded: ``download`` true), and model selection gets its images (``val_size``,
    ``val_split``: :func:`validation_size`). Raises :class:`DataError` as ``data.KEY: ...`` naming the key at fault."""
    if cfg.name == "npz":
        if not cfg.path:
            raise DataError("data.path: required for data.name npz (a .npz with x_train, "
                            "y_train, x_test, y_test)")
        path = Path(cfg.path).expanduser()
        try:
            n_train, n_test, shape, classes = _npz_summary(path)
        except DataError as e:
            raise DataError(f"data.path: {path}: {e}") from None
        note = ""
    elif cfg.name in TORCHVISION_FILES:
        facts = TORCHVISION_FILES[cfg.name]
        folder = (Path(cfg.root).expanduser() if cfg.root else default_root()) / facts["folder"]
        missing = [f for f in facts["files"] if not (folder / f).is_file()]
        note = ""
        if missing and not cfg.download:
            lacks = ("holds none of its files" if len(missing) == len(facts["files"])
                     else f"lacks {', '.join(missing)}")
            raise DataError(f"data.root: {folder} {lacks} and data.download is false: "
                            f"{DATASET_FACTS[cfg.name]['get']} there, or set data.download: true")
        if missing:
            note = f"to be downloaded into {folder}"
        n_train, n_test, shape, classes = (facts[k] for k in ("n_train", "n_test", "shape", "classes"))
    elif cfg.name == "synthetic":
        n_train, n_test = cfg.synthetic_train, cfg.synthetic_test
        shape, classes, note = tuple(cfg.synthetic_shape), cfg.synthetic_classes, ""
    elif cfg.name == "digits":
        n_train, n_test, shape, classes = (DIGITS_SIZES[k] for k in ("n_train", "n_test", "shape", "classes"))
        note = ""
    else:
        raise DataError(f"data.name: unknown dataset {cfg.name!r}; expected one of {', '.join(DATASETS)}")
    if cfg.train_limit is not None:
        n_train = min(n_train, cfg.train_limit)
    if cfg.test_limit is not None:
        n_test = min(n_test, cfg.test_limit)
    try:   # the trainer's own rule for how many images model selection takes
        validation_size(cfg, n_train, n_test, int(classes))
    except ConfigError as e:
        raise DataError(str(e)) from None
    return DataSummary(data_source(cfg), n_train, n_test, tuple(shape), int(classes), note)


def augmentation_defaults(name: str, image_shape: tuple[int, ...] | None = None) -> dict:
    """``{"pad": int, "flip": bool}``: the standard training augmentation of a dataset.

    For ``npz`` pass ``image_shape`` (C, H, W): 3x32x32 gets CIFAR's pad 4 + flip, anything
    else (or no shape) pad 2 and no flip, since unknown classes may not be mirror-symmetric.
    """
    if name not in DATASET_FACTS:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if name == "npz":
        cifar_like = image_shape is not None and tuple(image_shape)[-3:] == (3, 32, 32)
        return augmentation_defaults("cifar10") if cifar_like else {"pad": 2, "flip": False}
    return {"pad": DATASET_FACTS[name]["pad"], "flip": DATASET_FACTS[name]["flip"]}


def holdout_indices(y: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices) of ``val_size`` examples held out of labels ``y``
    (N,), stratified by label, chosen by ``seed`` alone; both int64 and ascending.

    Each class gives its share of ``val_size`` (largest remainders break ties, lower label
    first). ``val_size=0`` gives an empty validation part.
    """
    n = len(y)
    if not 0 <= val_size < n:
        raise DataError(f"val_size: expected 0 <= val_size < {n} (the training images), "
                        f"got {val_size}")
    g = torch.Generator().manual_seed(derive_seed(seed, 1))
    perm = torch.randperm(n, generator=g)
    labels = y.cpu()[perm]
    order = torch.argsort(labels, stable=True)        # grouped by class, random within a class
    grouped = labels[order]
    counts = torch.bincount(grouped)
    share = counts.double() * val_size / n
    quota = share.floor().long()
    extra = torch.argsort(-(share - quota), stable=True)[: val_size - int(quota.sum())]
    quota[extra] += 1
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - start[grouped]            # position within its class
    val_idx = perm[order[rank < quota[grouped]]]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[val_idx] = True
    return (~mask).nonzero().squeeze(1), mask.nonzero().squeeze(1)


# --------------------------------------------------------------------------------------------
# model selection: which images the trainer validates on
VAL_AUTO_EVERY = 10      # data.val_size None: one training image in ten is held out ...
VAL_AUTO_MAX = 1000      # ... at most 1000 (the paper setups' 1,000 of CIFAR's 50,000) ...
VAL_TEST_DEFAULT = 512   # data.val_split test, val_size None: the first 512 test images


def validation_size(cfg: DataConfig, n_train: int, n_test: int, num_classes: int) -> int:
    """How many images model selection takes from ``cfg.val_split``, given the split sizes
    (after train_limit / test_limit) and the number of classes in the training labels.

    ``val_size`` None: a tenth of the training images (rounded), at least one per class and at
    most :data:`VAL_AUTO_MAX`, always leaving training images; on the test split the first
    :data:`VAL_TEST_DEFAULT`. Raises ConfigError naming ``data.val_size`` when the split cannot
    give that many.
    """
    if cfg.val_size == 0:
        raise ConfigError("data.val_size: 0 leaves model selection no images")
    if cfg.val_split == "test":
        if n_test == 0:
            raise ConfigError("data.val_split: test, but the test split is empty")
        if cfg.val_size is None:
            return min(VAL_TEST_DEFAULT, n_test)
        if cfg.val_size > n_test:
            raise ConfigError(f"data.val_size: {cfg.val_size} is more than the {n_test} test "
                              f"images of {cfg.name} (after test_limit)")
        return cfg.val_size
    if cfg.val_size is None:
        size = min(max((n_train + VAL_AUTO_EVERY // 2) // VAL_AUTO_EVERY, num_classes),
                   VAL_AUTO_MAX, n_train - 1)
        if size < 1:
            raise ConfigError(f"data.val_size: {cfg.name} has {n_train} training image(s) after "
                              f"train_limit: too few to hold any out for model selection")
        return size
    if cfg.val_size >= n_train:
        raise ConfigError(f"data.val_size: {cfg.val_size} leaves no training images "
                          f"({cfg.name} has {n_train} after train_limit)")
    return cfg.val_size


def selection_label(val_source: str | None, n_val: int | None = None) -> str:
    """How a run's checkpoint was selected, in words, from its ``val_source`` (metrics.json,
    history.csv): ``held-out training images (150)``, ``TEST images (512): optimistic``, or
    ``not recorded``."""
    if val_source == "train_holdout":
        return "held-out training images" + (f" ({n_val})" if n_val is not None else "")
    m = re.fullmatch(r"test\[:(\d+)\]", val_source or "")
    if m:
        return f"TEST images ({m.group(1)}): optimistic"
    return "not recorded"


@dataclass(frozen=True)
class Validation:
    """The images model selection uses: ``index`` (V,) into the ``split`` (``train`` or
    ``test``) images of a :class:`Dataset`, and ``train_index``, the training images left to
    train on (every one when the split is ``test``). Both int64, ascending."""
    split: str
    index: torch.Tensor
    train_index: torch.Tensor

    @property
    def source(self) -> str:
        """``train_holdout`` or ``test[:V]``: metrics.json's and history.csv's ``val_source``."""
        return "train_holdout" if self.split == "train" else f"test[:{len(self.index)}]"

    @property
    def label(self) -> str:
        """The selection in words (:func:`selection_label`), for tables and cards."""
        return selection_label(self.source, len(self.index))

    def images(self, ds: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_train, y_train, x_val, y_val)`` of ``ds``: what the trainer trains and selects on."""
        x, y = (ds.x_train, ds.y_train) if self.split == "train" else (ds.x_test, ds.y_test)
        return (ds.x_train[self.train_index], ds.y_train[self.train_index],
                x[self.index], y[self.index])


def select_validation(cfg: DataConfig, ds: Dataset, seed: int) -> Validation:
    """The validation images of a run (``cfg``: its data section, ``ds``: its dataset): a
    stratified hold-out of the training images chosen by ``seed`` (:func:`holdout_indices`),
    or with ``val_split: test`` the first test images (:func:`validation_size` says how many)."""
    n_train, n_test = len(ds.y_train), len(ds.y_test)
    size = validation_size(cfg, n_train, n_test, int(torch.unique(ds.y_train).numel()))
    if cfg.val_split == "test":
        return Validation("test", torch.arange(size), torch.arange(n_train))
    train_idx, val_idx = holdout_indices(ds.y_train, size, seed)
    return Validation("train", val_idx, train_idx)


# --------------------------------------------------------------------------------------------
# the device loader
def pad_crop_flip(x: torch.Tensor, pad: int, offsets: torch.Tensor | None = None,
                  flips: torch.Tensor | None = None) -> torch.Tensor:
    """Zero-pad by ``pad``, crop back to (H, W) at per-image ``offsets``, mirror where ``flips``.

    x: (B, C, H, W) any dtype; offsets: (B, 2) long (row, col) in [0, 2*pad], the crop's corner
    in the padded image (``(pad, pad)`` is the identity, as torchvision's RandomCrop(padding=));
    flips: (B,) bool. One gather for the whole batch, no loop over images.
    """
    b, c, h, w = x.shape
    dev = x.device
    if offsets is None:
        offsets = torch.full((b, 2), pad, dtype=torch.long, device=dev)
    rows = offsets[:, :1] + torch.arange(h, device=dev)          # (B, H) in padded coordinates
    cols = offsets[:, 1:] + torch.arange(w, device=dev)          # (B, W)
    if flips is not None:
        cols = torch.where(flips[:, None], cols.flip(1), cols)  # mirror = read columns backwards
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    return xp[torch.arange(b, device=dev)[:, None, None, None],
              torch.arange(c, device=dev)[None, :, None, None],
              rows[:, None, :, None], cols[:, None, None, :]]


class DeviceLoader:
    """Batches of a uint8 split kept on ``device``; shuffle and augmentation on the device.

    Call :meth:`set_epoch` before each epoch (like DistributedSampler): the order and the
    augmentation of epoch e depend only on (seed, e), so a resumed run repeats them exactly.
    Yields ``(x float32 (B, C, H, W) in [0, 1], y int64 (B,))`` on ``device``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, device="cpu",
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, pad: int = 0,
                 flip: bool = False, channels_last: bool = False):
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise DataError(f"DeviceLoader: x must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if len(x) != len(y):
            raise DataError(f"DeviceLoader: {len(x)} images but {len(y)} labels")
        if batch_size < 1 or pad < 0:
            raise DataError(f"DeviceLoader: need batch_size >= 1 and pad >= 0, got {batch_size}, {pad}")
        self.device = torch.device(device)
        self.x = x.to(self.device)          # uint8 on the device: 4x less memory than float
        self.y = y.to(self.device, torch.int64)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.pad, self.flip, self.channels_last = pad, flip, channels_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        n, dev = len(self.y), self.device
        g = torch.Generator(device=dev).manual_seed(derive_seed(self.seed, self.epoch))
        order = (torch.randperm(n, generator=g, device=dev) if self.shuffle
                 else torch.arange(n, device=dev))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            xb, yb = self.x[idx], self.y[idx]
            if self.pad or self.flip:     # crop/flip the uint8 batch: 4x less memory traffic
                b = len(idx)
                offsets = torch.randint(0, 2 * self.pad + 1, (b, 2), generator=g, device=dev)
                flips = (torch.rand(b, generator=g, device=dev) < 0.5) if self.flip else None
                xb = pad_crop_flip(xb, self.pad, offsets, flips)
            xb = xb.float().div_(255)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb
