"""Tests of spatlib.data: loading (digits, npz, synthetic), validation errors, DeviceLoader."""
from pathlib import Path

import numpy as np
import pytest
import torch

from spatlib.config import DataConfig
from spatlib.data import (DIGITS_SIZES, DataError, DeviceLoader, augmentation_defaults, channel_stats,
                          check_data, dataset_from_config, load_dataset, pad_crop_flip,
                          holdout_indices)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


# --------------------------------------------------------------------------------------------
# digits
def test_digits_layout_and_range(digits):
    assert digits.x_train.shape == (1347, 1, 8, 8) and digits.x_test.shape == (450, 1, 8, 8)
    assert digits.x_train.dtype == torch.uint8 and digits.y_train.dtype == torch.int64
    assert digits.x_train.device.type == "cpu"
    assert int(digits.x_train.max()) == 255 and int(digits.x_train.min()) == 0
    assert digits.num_classes == 10 and digits.class_names == [str(k) for k in range(10)]
    assert digits.in_channels == 1 and digits.image_size == (8, 8)
    # sklearn values are 0..16, so every pixel is one of 17 levels round(v * 255 / 16)
    levels = {round(v * 255 / 16) for v in range(17)}
    assert set(digits.x_train.unique().tolist()) <= levels
    assert digits.mean == channel_stats(digits.x_train)[0]


def test_digits_split_fixed_and_stratified(digits):
    again = load_dataset("digits")
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_test, digits.y_test)
    train_counts = torch.bincount(digits.y_train, minlength=10).double()
    test_counts = torch.bincount(digits.y_test, minlength=10).double()
    # stratified: each class's test share is 25% of its images, to within one image
    assert ((test_counts - 0.25 * (train_counts + test_counts)).abs() <= 1).all()


def test_limits_take_first_images(digits):
    small = load_dataset("digits", train_limit=100, test_limit=7)
    assert torch.equal(small.x_train, digits.x_train[:100]) and torch.equal(small.y_test, digits.y_test[:7])
    assert small.mean == digits.mean        # stats of the full train split
    with pytest.raises(DataError, match="train_limit"):
        load_dataset("digits", train_limit=-1)


def test_channel_stats_known_answer():
    x = torch.tensor([0, 255] * 8, dtype=torch.uint8).reshape(2, 1, 2, 4)
    mean, std = channel_stats(x)
    assert mean == (0.5,) and std == (0.5,)


# --------------------------------------------------------------------------------------------
# npz
def _shared(name):
    path = SHARED_DATA / f"{name}_prefix.npz"
    if not path.is_file():
        pytest.skip(f"{path} not available (real-data prefixes are only on the dev machine)")
    return path


def test_npz_cifar10_prefix():
    path = _shared("cifar10")
    ds = load_dataset("npz", path=str(path))
    assert ds.x_train.shape == (5438, 3, 32, 32) and ds.x_test.shape == (1017, 3, 32, 32)
    assert ds.num_classes == 10 and ds.class_names[0] == "airplane"
    raw = np.load(path)
    assert torch.equal(ds.x_train[5], torch.from_numpy(raw["x_train"][5]).permute(2, 0, 1))
    assert np.allclose(ds.mean, (0.4914, 0.4822, 0.4465), atol=0.01)   # near the published
    small = load_dataset("npz", path=str(path), train_limit=64, test_limit=32)
    assert small.x_train.shape == (64, 3, 32, 32) and small.y_test.shape == (32,)
    assert torch.equal(small.x_train, ds.x_train[:64])
    assert augmentation_defaults("npz", tuple(ds.x_train.shape[1:])) == {"pad": 4, "flip": True}


def test_npz_mnist_prefix():
    ds = load_dataset("npz", path=str(_shared("mnist")), test_limit=100)
    assert ds.x_train.shape == (17435, 1, 28, 28) and ds.x_test.shape == (100, 1, 28, 28)
    assert ds.y_train.dtype == torch.int64 and ds.num_classes == 10
    assert augmentation_defaults("npz", (1, 28, 28)) == {"pad": 2, "flip": False}


def _write(tmp_path, **arrays):
    base = dict(x_train=np.zeros((4, 6, 6, 3), np.uint8), y_train=np.array([0, 1, 2, 1]),
                x_test=np.zeros((2, 6, 6, 3), np.uint8), y_test=np.array([0, 2]))
    base.update(arrays)
    path = tmp_path / "data.npz"
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return str(path)


def test_npz_valid_nhw_and_class_names(tmp_path):
    path = _write(tmp_path, x_train=np.full((4, 5, 5), 7, np.uint8), x_test=np.zeros((2, 5, 5), np.uint8),
                  class_names=np.array(["a", "b", "c", "d"]), extra=np.ones(3))
    ds = load_dataset("npz", path=path)
    assert ds.x_train.shape == (4, 1, 5, 5) and ds.num_classes == 4 and ds.class_names[3] == "d"
    assert load_dataset("npz", path=_write(tmp_path)).num_classes == 3   # max label + 1


NPZ_PROBLEMS = [
    (dict(y_test=None), "missing key.*y_test"),
    (dict(x_train=np.zeros((4, 6, 6, 3), np.float32)), "x_train.*float32.*uint8"),
    (dict(x_test=np.zeros((2, 6), np.uint8)), "x_test has shape"),
    (dict(y_train=np.array([0, 1, 2])), "4 images but y_train has 3 labels"),
    (dict(y_train=np.array([0, -1, 2, 1])), "negative labels"),
    (dict(y_train=np.array([0.0, 1.0, 2.0, 1.0])), "integer"),
    (dict(y_train=np.array([0, 1, 5, 1]), class_names=np.array(["a", "b", "c"])), "out of range"),
    (dict(x_test=np.zeros((0, 6, 6, 3), np.uint8), y_test=np.zeros(0, np.int64)),
     "x_test is empty; a run needs test images"),
]


@pytest.mark.parametrize("arrays, message", NPZ_PROBLEMS)
def test_npz_errors_name_the_problem(tmp_path, arrays, message):
    with pytest.raises(DataError, match=message):
        load_dataset("npz", path=_write(tmp_path, **arrays))


def test_npz_missing_file_and_pickles(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset("npz", path=str(tmp_path / "nope.npz"))
    path = _write(tmp_path, y_train=np.array([0, 1, 2, 1], dtype=object))
    with pytest.raises(DataError, match="cannot read"):
        load_dataset("npz", path=path)


def test_npz_that_is_not_a_zip_is_named_so_not_pickled_data(tmp_path):
    for content in (b"x_train,y_train\n1,2\n", np.random.default_rng(0).bytes(256)):
        path = tmp_path / "data.npz"
        path.write_bytes(content)
        with pytest.raises(DataError) as e:
            load_dataset("npz", path=str(path))
        assert "is not a .npz archive" in str(e.value) and "pickle" not in str(e.value)


# --------------------------------------------------------------------------------------------
# the cheap check a batch runs first: what the loader would refuse, named by its key
@pytest.mark.parametrize("arrays, message", NPZ_PROBLEMS)
def test_check_data_refuses_what_the_loader_refuses_naming_data_path(tmp_path, arrays, message):
    path = _write(tmp_path, **arrays)
    with pytest.raises(DataError) as loaded:
        load_dataset("npz", path=path)
    with pytest.raises(DataError) as checked:
        check_data(DataConfig(name="npz", path=path))
    assert str(loaded.value) == f"npz: {path}: " + str(checked.value).split(f"data.path: {path}: ", 1)[1]


def test_check_data_sizes_match_a_load_and_name_the_key_at_fault(tmp_path, digits):
    assert (DIGITS_SIZES["n_train"], DIGITS_SIZES["n_test"]) == (len(digits.y_train), len(digits.y_test))
    assert check_data(DataConfig()).describe() == "digits: 1347 train + 450 test images of 1x8x8, 10 classes"
    path = _write(tmp_path, class_names=np.array(["a", "b", "c", "d"]))
    summary = check_data(DataConfig(name="npz", path=path, train_limit=3, val_size=2))
    ds = load_dataset("npz", path=path, train_limit=3)
    assert (summary.n_train, summary.n_test, summary.shape, summary.num_classes) == (
        len(ds.y_train), len(ds.y_test), tuple(ds.x_train.shape[1:]), ds.num_classes)
    assert summary.source == f"npz ({path})"
    with pytest.raises(DataError, match=r"^data.path: .*nope.npz: file not found$"):
        check_data(DataConfig(name="npz", path=str(tmp_path / "nope.npz")))
    with pytest.raises(DataError, match=r"^data.path: required"):
        check_data(DataConfig(name="npz"))
    with pytest.raises(DataError, match=r"^data.val_size: 3 leaves no training images "
                                        r"\(npz has 3 after train_limit\)$"):
        check_data(DataConfig(name="npz", path=path, train_limit=3, val_size=3))
    with pytest.raises(DataError, match=r"^data.val_size: 2000 .*digits has 1347 after train_limit"):
        check_data(DataConfig(val_size=2000))
    with pytest.raises(DataError, match=r"^data.val_size: 0 leaves model selection no images"):
        check_data(DataConfig(val_size=0))
    # torchvision's files: absent and no download is an error naming the folder; a download is noted
    with pytest.raises(DataError, match=rf"^data.root: {tmp_path / 'cifar-10-batches-py'} holds none "
                                        r"of its files and data.download is false"):
        check_data(DataConfig(name="cifar10", root=str(tmp_path), download=False))
    assert "to be downloaded into" in check_data(DataConfig(name="mnist", root=str(tmp_path))).describe()
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        (raw / f).write_bytes(b"")
    with pytest.raises(DataError, match="lacks t10k-labels-idx1-ubyte and data.download is false"):
        check_data(DataConfig(name="mnist", root=str(tmp_path), download=False))


# --------------------------------------------------------------------------------------------
# torchvision (offline), synthetic, config, augmentation table, validation split
def test_cifar10_offline_error_names_folder(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", root=str(tmp_path), download=False)
    msg = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "cifar-10-python.tar.gz" in msg
    assert "npz" in msg


def test_unknown_name():
    with pytest.raises(DataError, match="unknown dataset 'imagenet'.*digits"):
        load_dataset("imagenet")


def test_synthetic_seeded_and_learnable():
    a = load_dataset("synthetic", num_classes=3, shape=(3, 5, 7), n_train=60, n_test=30, seed=1)
    b = load_dataset("synthetic", num_classes=3, shape=(3, 5, 7), n_train=60, n_test=30, seed=1)
    c = load_dataset("synthetic", num_classes=3, shape=(3, 5, 7), n_train=60, n_test=30, seed=2)
    assert a.x_train.shape == (60, 3, 5, 7) and a.x_train.dtype == torch.uint8
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    assert torch.bincount(a.y_train).tolist() == [20, 20, 20] and a.num_classes == 3
    # learnable: nearest class mean of the train split classifies the test split
    means = torch.stack([a.x_train[a.y_train == k].float().mean(0) for k in range(3)])
    dist = ((a.x_test.float()[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    assert (dist.argmin(1) == a.y_test).float().mean() > 0.9


def test_dataset_from_config():
    cfg = DataConfig(name="synthetic", synthetic_classes=4, synthetic_shape=[2, 6, 6],
                     synthetic_train=40, synthetic_test=12, train_limit=30)
    ds = dataset_from_config(cfg)
    assert ds.x_train.shape == (30, 2, 6, 6) and ds.x_test.shape == (12, 2, 6, 6)
    assert ds.num_classes == 4


def test_augmentation_defaults():
    assert augmentation_defaults("cifar10") == {"pad": 4, "flip": True}
    assert augmentation_defaults("cifar100") == {"pad": 4, "flip": True}
    assert augmentation_defaults("mnist") == {"pad": 2, "flip": False}
    assert augmentation_defaults("digits") == {"pad": 1, "flip": False}
    assert augmentation_defaults("synthetic") == {"pad": 0, "flip": False}
    assert augmentation_defaults("npz") == {"pad": 2, "flip": False}


def test_holdout_indices(digits):
    x, y = digits.x_train, digits.y_train

    def split(val_size, seed):
        tr, val = holdout_indices(y, val_size, seed)
        return x[tr], y[tr], x[val], y[val]
    x_tr, y_tr, x_val, y_val = split(100, seed=3)
    assert len(y_val) == 100 and len(y_tr) == len(y) - 100
    again = split(100, seed=3)
    assert torch.equal(again[3], y_val) and torch.equal(again[2], x_val)
    assert not torch.equal(split(100, seed=4)[2], x_val)
    counts, val_counts = torch.bincount(y).double(), torch.bincount(y_val, minlength=10).double()
    assert ((val_counts - 100 * counts / len(y)).abs() < 1).all()       # stratified
    # a partition: train + val hold every image exactly once
    both = torch.cat([x_tr, x_val]).flatten(1)
    assert torch.equal(both.sum(0), x.flatten(1).sum(0)) and len(both) == len(x)
    x_tr0, y_tr0, x_val0, y_val0 = split(0, seed=0)
    assert torch.equal(x_tr0, x) and x_val0.shape == (0, 1, 8, 8) and y_val0.shape == (0,)
    with pytest.raises(DataError, match="val_size"):
        split(len(y), seed=0)


# --------------------------------------------------------------------------------------------
# DeviceLoader and the augmentation
def _indexed(n, shape=(1, 4, 4)):
    """Images whose pixels are all their index (mod 256), labels = index."""
    x = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, *shape).contiguous()
    return x, torch.arange(n)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [(xb.clone(), yb.clone()) for xb, yb in loader]


def test_loader_covers_every_index_once():
    x, y = _indexed(50)
    loader = DeviceLoader(x, y, 16, seed=0)
    batches = _epoch(loader, 0)
    assert len(loader) == len(batches) == 4 and [len(b[1]) for b in batches] == [16, 16, 16, 2]
    seen = torch.cat([b[1] for b in batches])
    assert torch.equal(seen.sort().values, y) and not torch.equal(seen, y)   # shuffled
    assert all(torch.equal(xb[:, 0, 0, 0] * 255, yb.float()) for xb, yb in batches)  # pairs kept
    dropped = DeviceLoader(x, y, 16, drop_last=True)
    assert len(dropped) == 3 and sum(len(b[1]) for b in _epoch(dropped, 0)) == 48
    ordered = torch.cat([b[1] for b in _epoch(DeviceLoader(x, y, 16, shuffle=False), 0)])
    assert torch.equal(ordered, y)


def test_loader_epoch_determinism():
    x = torch.randint(0, 256, (40, 3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(40)
    make = lambda seed: DeviceLoader(x, y, 8, seed=seed, pad=2, flip=True)
    a, b = _epoch(make(0), 5), _epoch(make(0), 5)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    other_epoch = torch.cat([yb for _, yb in _epoch(make(0), 6)])
    assert not torch.equal(other_epoch, torch.cat([yb for _, yb in a]))
    assert not torch.equal(torch.cat([yb for _, yb in _epoch(make(1), 5)]), torch.cat([yb for _, yb in a]))


def test_loader_without_augmentation_is_exact():
    x = torch.randint(0, 256, (10, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    loader = DeviceLoader(x, torch.arange(10), 10, shuffle=False)
    (xb, yb), = list(loader)
    assert xb.dtype == torch.float32 and torch.equal(xb, x.float() / 255)
    (xc, _), = list(DeviceLoader(x, torch.arange(10), 10, shuffle=False, channels_last=True))
    assert xc.is_contiguous(memory_format=torch.channels_last) and torch.equal(xc, xb)


def test_loader_augmented_values():
    x = torch.randint(1, 256, (64, 1, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    loader = DeviceLoader(x, torch.arange(64), 64, pad=2, flip=True)
    (xb, yb), = _epoch(loader, 0)
    assert xb.dtype == torch.float32 and xb.min() >= 0 and xb.max() <= 1
    assert (xb == 0).any()          # some crops show the zero padding (x itself has no zeros)
    flipped_only = DeviceLoader(x, torch.arange(64), 64, flip=True, shuffle=False)
    (xf, _), = _epoch(flipped_only, 0)
    ref = x.float() / 255
    is_flip = (xf == ref.flip(3)).flatten(1).all(1)
    assert ((xf == ref).flatten(1).all(1) | is_flip).all() and 10 < int(is_flip.sum()) < 54


def test_pad_crop_flip_known_offsets():
    x = torch.arange(2 * 16, dtype=torch.uint8).view(2, 1, 4, 4) + 1
    out = pad_crop_flip(x, 1, torch.tensor([[0, 0], [2, 1]]))
    # offset (0, 0): the window starts one pixel up-left of the image -> shift down-right
    expected0 = torch.zeros(1, 4, 4, dtype=torch.uint8)
    expected0[:, 1:, 1:] = x[0, :, :3, :3]
    # offset (2, 1): one pixel down, same column -> shift up, bottom row is padding
    expected1 = torch.zeros(1, 4, 4, dtype=torch.uint8)
    expected1[:, :3, :] = x[1, :, 1:, :]
    assert torch.equal(out[0], expected0) and torch.equal(out[1], expected1)
    assert torch.equal(pad_crop_flip(x, 1, torch.tensor([[1, 1], [1, 1]])), x)   # centre = identity
    flipped = pad_crop_flip(x, 0, None, torch.tensor([True, False]))
    assert torch.equal(flipped[0], x[0].flip(-1)) and torch.equal(flipped[1], x[1])
    both = pad_crop_flip(x, 1, torch.tensor([[0, 0], [1, 1]]), torch.tensor([True, False]))
    assert torch.equal(both[0], expected0.flip(-1))   # crop first, then mirror the crop
