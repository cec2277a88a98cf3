import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genbench import sample_sets as ss
from genbench.errors import UserError


def _imgs(n=5, h=8, w=6, c=3, seed=0):
    x = np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)
    return x if c == 3 else x[..., 0]          # [N, H, W] for grey


def _write_pngs(folder: Path, x: np.ndarray, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"{i:03d}.png" for i in range(len(x))]
    for a, name in zip(x, names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(folder / name)
    return folder


def _png16(path: Path, arr: np.ndarray, colortype: int):
    """A 16-bit PNG by hand (Pillow writes 16-bit grey only): colortype 0 grey, 2 RGB."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colortype, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# --------------------------------------------------------------------------- loading


def test_png_folder_and_npz_load_identically(tmp_path):
    x = _imgs(6)
    # nested folders, taken in the sorted order of their relative paths; hidden files skipped
    names = ["a/0.png", "a/1.png", "b/0.png", "b/1.png", "c.png", "d.png"]
    _write_pngs(tmp_path / "pngs", x, names)
    (tmp_path / "pngs" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "pngs" / ".cache").mkdir()
    (tmp_path / "pngs" / ".cache" / "notes.txt").write_text("x")
    np.savez(tmp_path / "s.npz", arr_0=x)
    f = ss.load_sample_set(tmp_path / "pngs")
    z = ss.load_sample_set(str(tmp_path / "s.npz"))
    assert f.images.dtype == torch.uint8 and f.images.shape == (6, 3, 8, 6) and f.count == 6 == len(z)
    assert torch.equal(f.images, z.images) and torch.equal(f.images, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert f.sha256 == z.sha256 == ss.content_sha256(z.images) and len(f.sha256) == 64
    assert (f.kind, z.kind) == ("folder", "npz") and f.labels is None and z.labels is None
    assert [Path(p).relative_to(tmp_path / "pngs").as_posix() for p in f.files] == names
    assert z.files == [str(tmp_path / "s.npz")] and f.shape == (3, 8, 6)


def test_folder_with_a_symlink_loop_is_walked_once(tmp_path):
    _write_pngs(tmp_path / "f" / "sub", _imgs(2))
    (tmp_path / "f" / "sub" / "loop").symlink_to(tmp_path / "f", target_is_directory=True)
    s = ss.load_sample_set(tmp_path / "f")
    assert s.count == 2


def test_grey_folder_nhw_npz_and_palette(tmp_path):
    x = _imgs(4, c=1)
    _write_pngs(tmp_path / "g", x)
    np.savez(tmp_path / "g.npz", arr_0=x)                       # [N, H, W] means one channel
    np.savez(tmp_path / "g4.npz", arr_0=x[..., None])           # [N, H, W, 1] too
    a, b, c = (ss.load_sample_set(tmp_path / p) for p in ("g", "g.npz", "g4.npz"))
    assert a.images.shape == (4, 1, 8, 6) and torch.equal(a.images, b.images) and torch.equal(b.images, c.images)
    assert a.sha256 == b.sha256 == c.sha256
    # palette images come back as RGB; JPEG and WebP are read too
    rgb = _imgs(1)[0]
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    pal = np.array(Image.open(tmp_path / "p.png").convert("RGB"))
    (tmp_path / "pf").mkdir()
    os.replace(tmp_path / "p.png", tmp_path / "pf" / "p.png")
    Image.fromarray(pal).save(tmp_path / "pf" / "q.webp", lossless=True)
    Image.fromarray(pal).save(tmp_path / "pf" / "r.jpg")
    s = ss.load_sample_set(tmp_path / "pf")
    assert s.images.shape == (3, 3, 8, 6) and torch.equal(s.images[0], torch.from_numpy(pal).permute(2, 0, 1))
    assert torch.equal(s.images[1], s.images[0])


def test_npy_and_glob_of_shards(tmp_path):
    x = _imgs(7)
    y = np.arange(7) % 3
    np.save(tmp_path / "all.npy", x)
    np.savez(tmp_path / "all.npz", arr_0=x, arr_1=y)
    (tmp_path / "shards").mkdir()
    for k, sl in enumerate([slice(0, 3), slice(3, 5), slice(5, 7)]):
        np.savez(tmp_path / "shards" / f"part{k}.npz", arr_0=x[sl], arr_1=y[sl])
        np.save(tmp_path / "shards" / f"n{k}.npy", x[sl])
    one = ss.load_sample_set(tmp_path / "all.npy")
    ref = ss.load_sample_set(tmp_path / "all.npz")
    g = ss.load_sample_set(str(tmp_path / "shards" / "part*.npz"))
    n = ss.load_sample_set(str(tmp_path / "shards" / "n?.npy"))
    assert one.kind == "npy" and g.kind == "glob" == n.kind and len(g.files) == 3
    assert torch.equal(one.images, ref.images) and torch.equal(g.images, ref.images) and torch.equal(n.images, one.images)
    assert torch.equal(g.labels, ref.labels) and g.sha256 == ref.sha256 and n.sha256 == one.sha256
    assert one.sha256 != ref.sha256            # labels are part of the content hash


def test_labels_from_arr1_and_from_labels_file(tmp_path):
    x = _imgs(4)
    np.savez(tmp_path / "s.npz", arr_0=x, arr_1=np.array([3, 1, 0, 2], dtype=np.int32))
    s = ss.load_sample_set(tmp_path / "s.npz")
    assert s.labels.dtype == torch.int64 and s.labels.tolist() == [3, 1, 0, 2]
    (tmp_path / "l.txt").write_text("1\n1\n2\n0\n\n")
    (tmp_path / "l.csv").write_text("\ufeff1,\r\n1,\r\n2,\r\n0,\r\n")
    np.save(tmp_path / "l.npy", np.array([1, 1, 2, 0], dtype=np.uint8))
    for lab in ("l.txt", "l.csv", "l.npy"):
        o = ss.load_sample_set(tmp_path / "s.npz", labels=tmp_path / lab)   # overrides arr_1
        assert o.labels.tolist() == [1, 1, 2, 0] and torch.equal(o.images, s.images)
    r = ss.read_labels(str(tmp_path / "l.csv"), 4)
    assert r.dtype == torch.int64 and r.tolist() == [1, 1, 2, 0]
    with pytest.raises(UserError, match="4 labels for 5 images"):
        ss.read_labels(tmp_path / "l.txt", 5)
    _write_pngs(tmp_path / "f", x)
    f = ss.load_sample_set(tmp_path / "f", labels=str(tmp_path / "l.txt"))
    assert f.labels.tolist() == [1, 1, 2, 0]
    assert f.sha256 == ss.load_sample_set(tmp_path / "s.npz", labels=tmp_path / "l.npy").sha256


def test_check_compatible(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=_imgs(2, 8, 8, 3))
    s = ss.load_sample_set(tmp_path / "s.npz")
    ss.check_compatible(s, (3, 8, 8), "cifar10")
    with pytest.raises(UserError, match=r"3x8x8.*cifar10.*3x32x32"):
        ss.check_compatible(s, (3, 32, 32), "cifar10")
    with pytest.raises(UserError, match=r"1x8x8"):
        ss.check_compatible(s, (1, 8, 8), "fashion")


# --------------------------------------------------------------------------- writing


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("fmt", ["npz", "folder"])
def test_write_then_load_round_trip(tmp_path, c, fmt):
    x = torch.randint(0, 256, (5, c, 8, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(c))
    y = torch.tensor([4, 0, 2, 2, 9])
    for lab in (None, y):
        out = tmp_path / f"{lab is None}" / ("s.npz" if fmt == "npz" else "samples")
        assert ss.write_sample_set(x, out, labels=lab) == out
        s = ss.load_sample_set(out)
        assert torch.equal(s.images, x) and s.kind == fmt
        assert (s.labels is None) if lab is None else torch.equal(s.labels, y)
        assert s.sha256 == ss.content_sha256(x, lab)
        if fmt == "npz":
            with np.load(out, allow_pickle=False) as z:
                assert z["arr_0"].shape == (5, 8, 7, c) and z["arr_0"].dtype == np.uint8
                assert sorted(z.files) == (["arr_0"] if lab is None else ["arr_0", "arr_1"])
        else:
            pngs = sorted(p.name for p in out.glob("*.png"))
            assert pngs == [f"{i:06d}.png" for i in range(5)]
            assert Image.open(out / pngs[0]).mode == ("L" if c == 1 else "RGB")
        assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]   # no temp left


def test_write_folder_is_atomic_on_failure(tmp_path, monkeypatch):
    x = torch.zeros(5, 3, 4, 4, dtype=torch.uint8)
    real_save = Image.Image.save
    calls = []

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_save(self, *a, **k)

    monkeypatch.setattr(Image.Image, "save", flaky)
    out = tmp_path / "samples"
    with pytest.raises(OSError, match="disk full"):
        ss.write_sample_set(x, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # an empty folder given as output stays empty after a failure, and is filled on success
    out.mkdir()
    calls.clear()
    with pytest.raises(OSError):
        ss.write_sample_set(x, out)
    assert list(out.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["samples"]
    monkeypatch.setattr(Image.Image, "save", real_save)
    ss.write_sample_set(x, out)
    assert len(list(out.iterdir())) == 5


def test_write_npz_is_atomic_and_replaces(tmp_path, monkeypatch):
    out = tmp_path / "s.npz"
    ss.write_sample_set(torch.ones(2, 1, 4, 4, dtype=torch.uint8), out)
    before = out.read_bytes()

    def broken(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError):
        ss.write_sample_set(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), out)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["s.npz"]
    monkeypatch.undo()
    ss.write_sample_set(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), out)     # replaced
    assert ss.load_sample_set(out).count == 3


def test_check_output_refusals(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a.png").write_bytes(b"")
    (tmp_path / "dir.npz").mkdir()
    cases = {tmp_path / "file" / "s.npz": "is a file", tmp_path / "file" / "samples": "is a file",
             tmp_path / "dir.npz": "is a folder", tmp_path / "file": "is a file",
             tmp_path / "full": "not empty", tmp_path / "x.npy": "not a .npy", tmp_path / "grid.png": ".png"}
    for out, msg in cases.items():
        with pytest.raises(UserError, match=msg) as e:
            ss.check_output(out)
        assert "\n" not in str(e.value) and str(out) in str(e.value)
        with pytest.raises(UserError):
            ss.write_sample_set(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), out)
    assert ss.check_output(tmp_path / "new" / "deeper" / "s.npz") == tmp_path / "new" / "deeper" / "s.npz"
    assert not (tmp_path / "new").exists()                       # checking makes nothing
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            for out in (ro / "s.npz", ro / "samples"):
                with pytest.raises(UserError, match="not writable"):
                    ss.check_output(out)
        finally:
            ro.chmod(0o700)


# --------------------------------------------------------------------------- bad input


def _case_missing(d):
    return d / "nothing_here", None, "no such file"


def _case_empty_folder(d):
    (d / "empty").mkdir()
    return d / "empty", None, "no images"


def _case_glob_nothing(d):
    return str(d / "shard_*.npz"), None, "matches no files"


def _case_non_image(d):
    _write_pngs(d / "f", _imgs(2))
    (d / "f" / "000.txt").write_text("hello")
    (d / "f" / "zzz.json").write_text("{}")
    return d / "f", None, "000.txt: not an image"


def _case_corrupt_png(d):
    _write_pngs(d / "f", _imgs(3))
    raw = (d / "f" / "001.png").read_bytes()
    (d / "f" / "001.png").write_bytes(raw[: len(raw) // 2])
    return d / "f", None, "001.png: cannot read"


def _case_text_as_png(d):
    _write_pngs(d / "f", _imgs(2))
    (d / "f" / "002.png").write_text("not a png at all")
    return d / "f", None, "002.png: cannot read"


def _case_rgba(d):
    (d / "f").mkdir()
    Image.fromarray(np.zeros((4, 4, 4), np.uint8)).save(d / "f" / "a.png")
    return d / "f", None, "a.png: has an alpha"


def _case_la(d):
    (d / "f").mkdir()
    Image.new("LA", (4, 4)).save(d / "f" / "a.png")
    return d / "f", None, "a.png: has an alpha channel or transparency \\(LA\\)"


def _case_palette_transparency(d):
    (d / "f").mkdir()
    im = Image.new("P", (4, 4))
    im.info["transparency"] = 0
    im.save(d / "f" / "a.png", transparency=0)
    return d / "f", None, "a.png: has an alpha channel or transparency \\(P\\)"


def _case_webp_alpha(d):
    (d / "f").mkdir()
    Image.fromarray(np.zeros((4, 4, 4), np.uint8)).save(d / "f" / "a.webp")
    return d / "f", None, "a.webp: has an alpha"


def _case_grey16(d):
    (d / "f").mkdir()
    Image.fromarray(np.full((4, 4), 1000, np.uint16)).save(d / "f" / "a.png")
    return d / "f", None, "a.png: not an 8-bit image \\(16 bits per channel, mode I;16\\)"


def _case_rgb16(d):
    (d / "f").mkdir()
    _png16(d / "f" / "a.png", np.full((4, 4, 3), 1000, np.uint16), 2)
    return d / "f", None, "a.png: not an 8-bit image \\(16 bits per channel, mode RGB\\)"


def _case_mixed_sizes(d):
    _write_pngs(d / "f", _imgs(2, 8, 8))
    _write_pngs(d / "f", _imgs(1, 8, 9), ["x.png"])
    return d / "f", None, "000.png is 8x8 with 3 channels, .*x.png is 8x9 with 3 channels"


def _case_mixed_channels(d):
    _write_pngs(d / "f", _imgs(1, c=3))
    _write_pngs(d / "f", _imgs(1, c=1), ["x.png"])
    return d / "f", None, "000.png is 8x6 with 3 channels, .*x.png is 8x6 with 1 channel"


def _case_float_npz(d):
    np.savez(d / "s.npz", arr_0=_imgs(2).astype(np.float32) / 255)
    return d / "s.npz", None, "s.npz: images have dtype float32, not uint8"


def _case_float_npy(d):
    np.save(d / "s.npy", _imgs(2).astype(np.float64) / 255)
    return d / "s.npy", None, "dtype float64, not uint8"


def _case_int16_npy(d):
    np.save(d / "s.npy", _imgs(2).astype(np.int16))
    return d / "s.npy", None, "dtype int16, not uint8"


def _case_object_npz(d):
    np.savez(d / "s.npz", arr_0=np.array([_imgs(1)[0], None], dtype=object))
    return d / "s.npz", None, "s.npz: array 'arr_0' holds Python objects"


def _case_object_npy(d):
    np.save(d / "s.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return d / "s.npy", None, "s.npy: holds Python objects"


def _case_no_arr0(d):
    np.savez(d / "s.npz", x=_imgs(2))
    return d / "s.npz", None, "no array named 'arr_0'.*it has x"


def _case_not_a_zip(d):
    (d / "s.npz").write_bytes(b"garbage bytes, not a zip archive")
    return d / "s.npz", None, "s.npz: not a readable .npz archive \\(no .npy or zip header"


def _case_garbage_npy(d):
    (d / "s.npy").write_bytes(b"\x80\x04 garbage")
    return d / "s.npy", None, "s.npy: not a readable .npy array \\(no .npy or zip header"


def _case_npy_named_npz(d):
    np.save(d / "s.npy", _imgs(2))
    os.replace(d / "s.npy", d / "s.npz")
    return d / "s.npz", None, "s.npz: not an .npz archive \\(it holds a single array"


def _case_truncated_npy(d):
    np.save(d / "s.npy", _imgs(4))
    raw = (d / "s.npy").read_bytes()
    (d / "s.npy").write_bytes(raw[:200])
    return d / "s.npy", None, "s.npy: not a readable .npy"


def _case_npz_named_npy(d):
    np.savez(d / "s.npz", arr_0=_imgs(2))
    os.replace(d / "s.npz", d / "s.npy")
    return d / "s.npy", None, "s.npy: is an .npz archive, not an .npy array"


def _case_2d(d):
    np.save(d / "s.npy", np.zeros((4, 5), np.uint8))
    return d / "s.npy", None, "shape 4x5 \\(2 dims\\)"


def _case_5d(d):
    np.savez(d / "s.npz", arr_0=np.zeros((2, 4, 4, 3, 1), np.uint8))
    return d / "s.npz", None, "5 dims"


def _case_4_channels(d):
    np.savez(d / "s.npz", arr_0=np.zeros((2, 4, 4, 4), np.uint8))
    return d / "s.npz", None, "4 channels"


def _case_nchw(d):
    np.savez(d / "s.npz", arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    return d / "s.npz", None, "looks like NCHW"


def _case_zero_images(d):
    np.savez(d / "s.npz", arr_0=np.zeros((0, 8, 8, 3), np.uint8))
    return d / "s.npz", None, "zero images"


def _case_arr1_count(d):
    np.savez(d / "s.npz", arr_0=_imgs(3), arr_1=np.arange(4))
    return d / "s.npz", None, "4 labels for 3 images"


def _case_arr1_float(d):
    np.savez(d / "s.npz", arr_0=_imgs(3), arr_1=np.arange(3) + 0.5)
    return d / "s.npz", None, "labels have dtype float64, not integer"


def _case_arr1_negative(d):
    np.savez(d / "s.npz", arr_0=_imgs(3), arr_1=np.array([0, -1, 2]))
    return d / "s.npz", None, "negative label -1 at index 1"


def _case_labels_file_count(d):
    np.savez(d / "s.npz", arr_0=_imgs(3))
    (d / "l.txt").write_text("1\n2\n")
    return d / "s.npz", d / "l.txt", "l.txt: 2 labels for 3 images"


def _case_labels_file_text(d):
    np.savez(d / "s.npz", arr_0=_imgs(2))
    (d / "l.txt").write_text("1\n2.5\n")
    return d / "s.npz", d / "l.txt", "l.txt: line 2 is '2.5', not an integer"


def _case_labels_file_negative(d):
    np.savez(d / "s.npz", arr_0=_imgs(2))
    (d / "l.csv").write_text("0\n-3\n")
    return d / "s.npz", d / "l.csv", "l.csv: negative label -3"


def _case_labels_npy_float(d):
    np.savez(d / "s.npz", arr_0=_imgs(2))
    np.save(d / "l.npy", np.array([0.0, 1.0]))
    return d / "s.npz", d / "l.npy", "l.npy: labels have dtype float64"


def _case_labels_missing(d):
    np.savez(d / "s.npz", arr_0=_imgs(2))
    return d / "s.npz", d / "nolabels.txt", "nolabels.txt: no such file"


def _case_shards_shapes(d):
    np.savez(d / "p0.npz", arr_0=_imgs(2, 8, 8))
    np.savez(d / "p1.npz", arr_0=_imgs(2, 16, 16))
    return str(d / "p*.npz"), None, "p0.npz holds 8x8x3 images \\(HxWxC\\), .*p1.npz holds 16x16x3"


def _case_shards_mixed_kinds(d):
    np.savez(d / "p0.npz", arr_0=_imgs(2))
    np.save(d / "p1.npy", _imgs(2))
    return str(d / "p*"), None, "mixes .npz .*p0.npz.* and .npy .*p1.npy"


def _case_shards_other_file(d):
    np.savez(d / "p0.npz", arr_0=_imgs(2))
    (d / "p1.txt").write_text("x")
    return str(d / "p*"), None, "p1.txt, not an .npz or .npy"


def _case_shards_labels_some(d):
    np.savez(d / "p0.npz", arr_0=_imgs(2), arr_1=np.arange(2))
    np.savez(d / "p1.npz", arr_0=_imgs(2))
    return str(d / "p*.npz"), None, "p0.npz has labels \\(arr_1\\) but .*p1.npz has none"


def _case_single_image_file(d):
    Image.fromarray(_imgs(1)[0]).save(d / "one.png")
    return d / "one.png", None, "one.png: not a folder of images, an .npz or an .npy"


BAD = [v for k, v in sorted(globals().items()) if k.startswith("_case_")]


@pytest.mark.parametrize("case", BAD, ids=[f.__name__.removeprefix("_case_") for f in BAD])
def test_bad_input_is_one_line_naming_the_file(tmp_path, case):
    path, labels, pattern = case(tmp_path)
    with pytest.raises(UserError, match=pattern) as e:
        ss.load_sample_set(path, labels=labels)
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg
    named = Path(labels).name if labels is not None else Path(str(path)).name
    assert named in msg or str(path) in msg
