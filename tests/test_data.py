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


# --------------------------------------------------------------------------- path datasets: no casts, no pickles


def test_npz_dataset_layouts_still_accepted(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "nchw.npz", x=x.transpose(0, 3, 1, 2), y=np.array([0, 1, 1, 0], dtype=np.int32))
    np.savez(tmp_path / "nhw.npz", x=x[..., 0])
    a = data.load(str(tmp_path / "nchw.npz"))
    b = data.load(str(tmp_path / "nhw.npz"))
    assert torch.equal(a.x, torch.from_numpy(x).permute(0, 3, 1, 2)) and a.y.dtype == torch.int64
    assert a.num_classes == 2 and b.x.shape == (4, 1, 8, 8) and b.y is None


@pytest.mark.parametrize("arrays, msg", [
    (dict(x=np.full((3, 8, 8, 3), 0.5, np.float32)), r"d\.npz \(x\): images have dtype float32, not uint8"),
    (dict(x=np.full((3, 8, 8, 3), 7, np.int64)), r"dtype int64, not uint8"),
    (dict(x=np.array([None, 1], dtype=object)), r"array 'x' holds Python objects"),
    (dict(arr_0=np.zeros((3, 8, 8, 3), np.uint8)), r"no array named 'x'.*it has arr_0"),
    (dict(x=np.zeros((3, 8, 8, 5), np.uint8)), r"neither axis 1 nor the last"),
    (dict(x=np.zeros((3, 8), np.uint8)), r"shape \[3, 8\]"),
    (dict(x=np.zeros((0, 8, 8, 3), np.uint8)), r"zero images"),
    (dict(x=np.zeros((3, 8, 8, 3), np.uint8), y=np.array([0.0, 1.0, 1.0])), r"\(y\): labels have dtype float64"),
    (dict(x=np.zeros((3, 8, 8, 3), np.uint8), y=np.array([0, 1])), r"\(y\): 2 labels for 3 images"),
    (dict(x=np.zeros((3, 8, 8, 3), np.uint8), y=np.array([0, -1, 1])), r"negative label -1"),
])
def test_npz_dataset_refuses_instead_of_casting(tmp_path, arrays, msg):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(UserError, match=msg) as e:
        data.load(str(tmp_path / "d.npz"))
    assert "\n" not in str(e.value) and str(tmp_path / "d.npz") in str(e.value)


def test_npz_dataset_not_an_archive(tmp_path):
    (tmp_path / "d.npz").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(UserError, match=r"d\.npz: not a readable \.npz archive"):
        data.load(str(tmp_path / "d.npz"))


def test_folder_dataset_strict_about_images_lenient_about_other_files(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "dog").mkdir()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "cat" / "0.png")
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "imgs" / "dog" / "0.png")
    (tmp_path / "imgs" / "README.txt").write_text("not an image: left out, as before")
    d = data.load(f"folder:{tmp_path / 'imgs'}")
    assert d.x.shape == (2, 3, 8, 8) and d.y.tolist() == [0, 1]
    assert all(torch.equal(d.x[1, c], torch.from_numpy(grey)) for c in range(3))   # grey -> RGB, as before
    bad = tmp_path / "imgs" / "dog" / "1.png"
    bad.write_bytes((tmp_path / "imgs" / "dog" / "0.png").read_bytes()[:30])
    with pytest.raises(UserError, match=r"dog/1\.png: cannot read the image") as e:
        data.load(f"folder:{tmp_path / 'imgs'}")
    assert "\n" not in str(e.value)
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(bad)
    with pytest.raises(UserError, match=r"dog/1\.png: has an alpha channel"):
        data.load(f"folder:{tmp_path / 'imgs'}")
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(bad)
    with pytest.raises(UserError, match=r"cat/0\.png is 8x8, .*dog/1\.png is 9x8"):
        data.load(f"folder:{tmp_path / 'imgs'}")
    Image.fromarray(np.full((8, 8), 300, np.uint16)).save(bad)
    with pytest.raises(UserError, match=r"dog/1\.png: not an 8-bit image"):
        data.load(f"folder:{tmp_path / 'imgs'}")


# --------------------------------------------------------------------------- CIFAR-10: a restricted unpickler


def _py2_style_batch(data_u8: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2 pickled it (what the official download holds): str keys and the array's raw
    data as SHORT/BINSTRING (py2 str), numpy.core.multiarray._reconstruct, numpy.dtype('u1')."""
    def s(b: bytes) -> bytes:
        return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + len(b).to_bytes(4, "little")) + b
    n = data_u8.shape[0]
    arr = (b"cnumpy.core.multiarray\n_reconstruct\n" b"cnumpy\nndarray\n" b"K\x00\x85" + s(b"b") + b"\x87R"
           b"(K\x01" b"J" + n.to_bytes(4, "little") + b"M\x00\x0c\x86"
           b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R" + b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
           b"\x89" + s(data_u8.tobytes()) + b"tb")
    labs = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"batch_label") + s(b"testing batch 1 of 1") + s(b"data") + arr + s(b"labels") + labs + b"u."


def test_cifar10_python2_pickles_load(tmp_path):
    base = write_fake_cifar10(tmp_path)
    raw = np.random.default_rng(3).integers(0, 256, (4, 3072), dtype=np.uint8)
    (base / "test_batch").write_bytes(_py2_style_batch(raw, [3, 1, 4, 1]))
    te = data.load("cifar10", "test", root=tmp_path)
    assert te.y.tolist() == [3, 1, 4, 1] and torch.equal(te.x.reshape(4, -1), torch.from_numpy(raw))


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("how", ["os.system", "builtins.exec", "subprocess"])
def test_cifar10_refuses_a_pickle_that_runs_code(tmp_path, monkeypatch, how, protocol):
    import builtins
    import os
    import subprocess

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    evil = {"os.system": _Evil(os.system, f"touch {marker}"),
            "builtins.exec": _Evil(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
            "subprocess": _Evil(subprocess.check_call, ["touch", str(marker)])}[how]
    base = write_fake_cifar10(tmp_path / "root")
    entry = {"batch_label": "x", "labels": [0] * 20, "data": evil, "filenames": []}
    (base / "test_batch").write_bytes(pickle.dumps(entry, protocol=protocol))
    with pytest.raises(UserError, match=r"test_batch: refused to unpickle: the file asks for \w+\.\w+") as e:
        data.load("cifar10", "test", root=tmp_path / "root")
    assert "\n" not in str(e.value) and not marker.exists()
    # protocol 2 writes Python 2's module names (find_class sees them before any mapping)
    want = {"os.system": "posix.system", "builtins.exec": "builtins.exec" if protocol > 2 else "__builtin__.exec",
            "subprocess": "subprocess.check_call" if protocol > 2 else "commands.check_call"}[how]
    assert f"asks for {want}," in str(e.value)


@pytest.mark.parametrize("content, msg", [
    (b"\x80\x02}q\x00(U\x04data", r"not a CIFAR-10 batch file"),                     # truncated
    (b"no pickle here", r"not a CIFAR-10 batch file"),
    (pickle.dumps([1, 2, 3], protocol=2), r"holds a list, not a dict"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}, protocol=2), r"float32 \[2, 3072\]"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, protocol=2), r"1 labels for 2 images"),
    (pickle.dumps({"labels": [0]}, protocol=2), r"no 'data' and 'labels'"),
])
def test_cifar10_corrupt_batch_is_one_line(tmp_path, content, msg):
    base = write_fake_cifar10(tmp_path)
    (base / "test_batch").write_bytes(content)
    with pytest.raises(UserError, match=msg) as e:
        data.load("cifar10", "test", root=tmp_path)
    assert "test_batch" in str(e.value) and "\n" not in str(e.value)
