import gzip
import pickle

import numpy as np
import pytest
import torch

from genbench import data
from genbench.errors import DataNotFound, UserError


def test_digits_shipped_and_upscaled():
    d = data.load("digits", "train", image_size=32)
    assert d.x.dtype == torch.uint8 and d.x.shape[1:] == (1, 32, 32)
    t = data.load("digits", "test")
    assert len(d) + len(t) == 1797 and t.x.shape[1:] == (1, 16, 16)
    assert set(d.y.tolist()) == set(range(10)) and d.num_modes == 10


def _write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_from_data_root_padded_to_32(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (7, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, (7,)))
    d = data.load("fashion", "test", root=tmp_path)
    assert d.x.shape == (7, 1, 32, 32) and d.x[:, :, :2].sum() == 0   # 2-px zero padding
    assert d.y.shape == (7,)


def test_mnist_missing_is_one_clear_error(tmp_path):
    with pytest.raises(DataNotFound, match="--data-root"):
        data.load("mnist", "train", root=tmp_path)


def write_fake_cifar10(root, n_per_batch=20, seed=0):
    """Files in CIFAR-10's on-disk layout: data_batch_1..5 and test_batch, each a pickled dict with
    'batch_label', 'labels' (list of int), 'data' (uint8 [N, 3072], three 32x32 planes R, G, B, row-major)
    and 'filenames', plus batches.meta. The official files are Python 2 pickles whose str keys load
    as str with encoding='latin1' (torchvision's way); protocol 2 with str keys loads the same."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"batch_label": name, "labels": rng.integers(0, 10, n_per_batch).tolist(),
                 "data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 "filenames": [f"{i}.png" for i in range(n_per_batch)]}
        with open(base / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": n_per_batch}, f,
                    protocol=2)
    return base


def test_cifar10_real_layout(tmp_path):
    write_fake_cifar10(tmp_path)
    tr = data.load("cifar10", "train", root=tmp_path)
    te = data.load("cifar10", "test", root=tmp_path)
    assert tr.x.shape == (100, 3, 32, 32) and te.x.shape == (20, 3, 32, 32)
    # Row-major 3072 = 3 planes of 32x32: the first 1024 bytes are the red plane.
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="latin1")["data"]
    assert torch.equal(te.x[0, 0].flatten(), torch.from_numpy(raw[0, :1024]))


def test_cifar10_missing(tmp_path):
    with pytest.raises(DataNotFound, match="cifar-10-batches-py"):
        data.load("cifar10", "train", root=tmp_path)


def test_npz_and_folder(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(5))
    d = data.load(str(tmp_path / "d.npz"))
    assert d.x.shape == (5, 3, 8, 8) and d.num_classes == 5
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.fromarray(x[0]).save(tmp_path / "imgs" / c / "0.png")
    f = data.load(f"folder:{tmp_path / 'imgs'}")
    assert f.x.shape == (2, 3, 8, 8) and f.y.tolist() == [0, 1]


def test_stacked_has_1000_modes_from_channels():
    d = data.load("stacked-digits", "train", size=500, seed=1)
    assert d.x.shape == (500, 3, 16, 16) and d.num_modes == 1000
    assert d.modes.max() < 1000 and len(set(d.modes.tolist())) > 300


def test_mixtures_seeded():
    a = data.load("ring8", "train", seed=3, size=1000)
    b = data.load("ring8", "train", seed=3, size=1000)
    assert torch.equal(a.x, b.x) and a.mode_centers.shape == (8, 2)
    g = data.load("grid25", "test", size=100)
    assert g.num_modes == 25 and g.x.shape == (100, 2)


def test_unknown_dataset_and_split():
    with pytest.raises(UserError, match="digits"):
        data.load("imagenet")
    with pytest.raises(UserError, match="split"):
        data.load("digits", "validation")
