"""Sets of generated images made outside genbench: load them for `genbench eval --samples PATH` and write
them for `genbench sample --out PATH`.

A sample set is read from
  * a folder of PNG / JPEG / WebP files, found recursively and taken in the sorted order of their paths
    relative to the folder (files and folders whose name starts with '.' are skipped; any other file is
    refused). 'L' (grey) images give one channel, 'RGB' three; palette images are converted to RGB.
    Images with alpha or transparency, 16-bit images and other colour modes are refused. A top-level
    `labels.txt` (one integer per line, what `write_sample_set` writes next to the PNGs) holds the labels;
  * an `.npz` in the layout of the ADM / guided-diffusion evaluator: `arr_0` uint8 [N, H, W, C] with C 1
    or 3 (or [N, H, W], one channel), optional `arr_1` integer labels [N];
  * an `.npy` uint8 [N, H, W, C] or [N, H, W];
  * a glob pattern (with '*', '?' or '[') matching `.npz` or `.npy` shards of one kind, concatenated in
    sorted order.
Arrays are never cast: anything but uint8 (floats in [0, 1] included) is refused, and nothing is
unpickled (allow_pickle=False). Every problem is one `UserError` line naming the file.
"""
from __future__ import annotations

import glob as globlib
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from genbench import store
from genbench.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
LABELS_FILE = "labels.txt"
KINDS = ("folder", "npz", "npy", "glob")
_GLOB_CHARS = re.compile(r"[*?\[]")
_INT_LINE = re.compile(r"^[+-]?[0-9]+$")
_HASH_TAG = b"genbench-sample-set-v1"


@dataclass
class SampleSet:
    """Images as uint8 [N, C, H, W] (C 1 or 3) with optional int64 labels [N].

    kind: "folder", "npz", "npy" or "glob". files: the image files of a folder (the folder joined with
    each relative path, in load order), else the array files read. source: the path as given.

    sha256 is the hex sha256 of the decoded content in a canonical form, not of the files: a header with
    the shape N, C, H, W, then the uint8 NCHW bytes, then (only when there are labels) a header with N
    and the labels as little-endian int64. The same pixels give the same sha256 whether they came as a
    folder of PNGs, an .npz, an .npy or shards (`content_sha256` computes it)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    kind: str
    files: list[str]
    sha256: str
    source: str = ""

    @property
    def count(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """[C, H, W] of one image."""
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.count


def content_sha256(images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | None = None) -> str:
    """The canonical sha256 of uint8 NCHW `images` (and int labels): see `SampleSet`."""
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"content_sha256 wants uint8 [N, C, H, W], got {x.dtype} {list(x.shape)}")
    h = hashlib.sha256()
    h.update(_HASH_TAG + b" images uint8 NCHW " + "x".join(str(int(s)) for s in x.shape).encode() + b"\n")
    step = max(1, (64 << 20) // max(1, x[0].size))             # ~64 MiB at a time: no full copy
    for i in range(0, len(x), step):
        h.update(np.ascontiguousarray(x[i:i + step]).data)
    if labels is not None:
        y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        h.update(_HASH_TAG + f" labels int64 {len(y)}\n".encode())
        h.update(np.ascontiguousarray(y.astype("<i8")).data)
    return h.hexdigest()


# --------------------------------------------------------------------------- validation shared with data.py


def _shape(a: np.ndarray | tuple) -> str:
    return "x".join(str(int(s)) for s in (a.shape if isinstance(a, np.ndarray) else a))


def check_uint8(arr: np.ndarray, name: str) -> np.ndarray:
    """`arr` when it is a plain uint8 array; UserError naming `name` and the dtype otherwise (no cast)."""
    if arr.dtype == object or arr.dtype.hasobject:
        raise UserError(f"{name}: holds Python objects (a pickled array); genbench never unpickles arrays, "
                        "save uint8 pixels")
    if arr.dtype != np.uint8:
        hint = " (floats are not scaled for you: convert to uint8 0..255 first)" if arr.dtype.kind == "f" else ""
        raise UserError(f"{name}: images have dtype {arr.dtype}, not uint8{hint}")
    return arr


def images_nhwc(arr: np.ndarray, name: str) -> np.ndarray:
    """uint8 [N, H, W, C] (C 1 or 3) from an [N, H, W, C] or [N, H, W] array, checked; UserError otherwise."""
    check_uint8(arr, name)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise UserError(f"{name}: images have shape {_shape(arr)} ({arr.ndim} dims); want [N, H, W, C] "
                        "or [N, H, W]")
    if arr.shape[-1] not in (1, 3):
        hint = " (this looks like NCHW; save NHWC)" if arr.shape[1] in (1, 3) else ""
        raise UserError(f"{name}: images have {arr.shape[-1]} channels (shape {_shape(arr)}, last axis); "
                        f"want 1 or 3{hint}")
    if arr.shape[0] == 0:
        raise UserError(f"{name}: holds zero images")
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise UserError(f"{name}: images have shape {_shape(arr)}; height and width must be at least 1")
    return arr


def check_labels(y: np.ndarray, n: int | None, name: str) -> np.ndarray:
    """int64 [N] labels from an integer array, checked (1-D, count `n` when given, non-negative)."""
    if y.dtype == object or y.dtype.hasobject:
        raise UserError(f"{name}: labels hold Python objects (pickled); save integer labels")
    if y.dtype.kind not in "iu":
        raise UserError(f"{name}: labels have dtype {y.dtype}, not integer")
    if y.ndim != 1:
        raise UserError(f"{name}: labels have shape {_shape(y)}; want one label per image, [N]")
    if n is not None and len(y) != n:
        raise UserError(f"{name}: {len(y)} labels for {n} images")
    if len(y):
        lo, hi = y.min(), y.max()
        if lo < 0:
            raise UserError(f"{name}: negative label {int(lo)} at index {int(np.argmin(y))}")
        if int(hi) > np.iinfo(np.int64).max:
            raise UserError(f"{name}: label {int(hi)} does not fit int64")
    return y.astype(np.int64)


def _pil():
    from PIL import Image

    return Image


def decode_image(path: Path) -> np.ndarray:
    """One 8-bit image file as uint8 [H, W] (grey) or [H, W, 3] (RGB; palette images converted).
    UserError naming the file when it cannot be read, has alpha/transparency, is not 8-bit, is
    animated or has another colour mode."""
    Image = _pil()
    try:
        with Image.open(path) as im:
            mode = im.mode
            raw = [t.args if isinstance(t.args, str) else (t.args[0] if t.args and isinstance(t.args[0], str)
                                                            else "") for t in (im.tile or [])]
            if mode.startswith("I") or mode == "F" or any(";16" in r for r in raw):
                bits = 16 if mode.startswith("I;16") or any(";16" in r for r in raw) else 32
                raise UserError(f"{path}: not an 8-bit image ({bits} bits per channel, mode {mode}); "
                                "save 8-bit grey or RGB")
            if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
                raise UserError(f"{path}: has an alpha channel or transparency ({mode}); save RGB or grey "
                                "without alpha")
            if mode not in ("L", "RGB", "P", "1"):
                raise UserError(f"{path}: colour mode {mode} is not supported; save 8-bit grey (L) or RGB")
            if getattr(im, "n_frames", 1) > 1:
                raise UserError(f"{path}: an animation with {im.n_frames} frames; save one still image")
            im.load()
            if mode == "P":
                im = im.convert("RGB")
            elif mode == "1":
                im = im.convert("L")
            a = np.asarray(im)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 -- any failure to decode a user's file is a user error
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: cannot read the image ({msg})") from None
    if a.dtype != np.uint8 or a.ndim not in (2, 3):
        raise UserError(f"{path}: decodes to {a.dtype} {_shape(a)}; save 8-bit grey or RGB")
    return a


def image_files(root: Path, suffixes=IMAGE_SUFFIXES, strict: bool = True,
                skip: set[str] | frozenset[str] = frozenset()) -> list[Path]:
    """Image files under `root`, recursively, sorted by their relative path; names starting with '.'
    (files or folders) and the relative paths in `skip` are left out. `strict`: UserError naming the
    first other file; else other files are left out too."""
    found: list[tuple[str, Path]] = []
    seen: set[tuple[int, int]] = set()      # folders already walked: a symlink loop is walked once
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = Path(dirpath)
        for f in filenames:
            if not f.startswith("."):
                p = base / f
                found.append((p.relative_to(root).as_posix(), p))
    found.sort(key=lambda t: t[0])
    out = []
    for rel, p in found:
        if rel in skip:
            continue
        if p.suffix.lower() in suffixes:
            out.append(p)
        elif strict:
            raise UserError(f"{p}: not an image ({', '.join(suffixes)}); a sample folder holds only images")
    return out


def decode_images(files: list[Path], what: str) -> np.ndarray:
    """uint8 [N, C, H, W] from image files that must all share one size and channel count. The array
    is allocated once from the first image and filled in place (no growing concatenation, no copy)."""
    first = decode_image(files[0])
    want = first.shape
    out = np.empty((len(files), 1 if first.ndim == 2 else 3, *first.shape[:2]), dtype=np.uint8)
    for i, f in enumerate(files):
        a = first if i == 0 else decode_image(f)
        if a.shape != want:
            raise UserError(f"{what}: images differ in size or channels: {files[0]} is {_img_shape(want)}, "
                            f"{f} is {_img_shape(a.shape)}; all images need one size")
        if a.ndim == 2:
            out[i, 0] = a
        else:
            out[i] = a.transpose(2, 0, 1)
    return out


def _img_shape(hw: tuple) -> str:
    c = 1 if len(hw) == 2 else hw[2]
    return f"{hw[0]}x{hw[1]} with {c} channel{'s' if c != 1 else ''}"


# --------------------------------------------------------------------------- array files


def read_npz(path: Path, image_key: str = "arr_0", label_key: str | None = "arr_1",
             hint: str = "the ADM evaluator's layout") -> tuple[np.ndarray, np.ndarray | None]:
    """(images array, labels array or None) from an .npz, never unpickling; UserError naming the file."""
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: not a readable .npz archive ({_load_problem(e)})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise UserError(f"{path}: not an .npz archive (it holds a single array; name it .npy)")
    with z:
        if image_key not in z.files:
            has = ", ".join(z.files) or "no arrays"
            raise UserError(f"{path}: no array named {image_key!r} ({hint}); it has {has}")
        x = _npz_array(z, image_key, path)
        y = _npz_array(z, label_key, path) if label_key and label_key in z.files else None
    return x, y


def _npz_array(z, key: str, path: Path) -> np.ndarray:
    try:
        return z[key]
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise UserError(f"{path}: array {key!r} holds Python objects (pickled); genbench never unpickles, "
                            "save uint8 pixels") from None
        raise UserError(f"{path}: array {key!r} cannot be read ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 -- truncated/corrupt member
        raise UserError(f"{path}: array {key!r} cannot be read ({_first_line(e)})") from None


def read_npy(path: Path) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "object arrays" in str(e).lower():
            raise UserError(f"{path}: holds Python objects (pickled); genbench never unpickles, "
                            "save a uint8 array") from None
        raise UserError(f"{path}: not a readable .npy array ({_load_problem(e)})") from None
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: not a readable .npy array ({_load_problem(e)})") from None
    if not isinstance(a, np.ndarray):
        a.close()
        raise UserError(f"{path}: is an .npz archive, not an .npy array; name it .npz")
    return a


def _load_problem(e: BaseException) -> str:
    """np.load's complaint in a line; its "contains pickled data" means: neither .npy nor zip magic."""
    if "pickled" in str(e).lower():
        return "no .npy or zip header; genbench never loads pickles"
    return _first_line(e)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _read_shard(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(NHWC uint8, checked labels or None) of one .npz or .npy file."""
    if path.suffix.lower() == ".npz":
        x, y = read_npz(path)
    else:
        x, y = read_npy(path), None
    x = images_nhwc(x, str(path))
    if y is not None:
        y = check_labels(y, len(x), f"{path} (arr_1)")
    return x, y


def read_labels_file(path: Path, n: int | None) -> np.ndarray:
    """int64 labels from a .npy of integers or a text/CSV file with one integer per line."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"labels {path}: no such file")
    if not path.is_file():
        raise UserError(f"labels {path}: is a folder, not a file")
    if path.suffix.lower() == ".npy":
        return check_labels(read_npy(path), n, str(path))
    if path.suffix.lower() == ".npz":
        raise UserError(f"labels {path}: give labels as a .npy or a text file with one integer per line")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file of labels (one integer per line) or a .npy") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    vals = []
    for i, line in enumerate(lines, 1):
        s = line.strip().rstrip(",").strip()
        if not _INT_LINE.match(s):
            shown = line.strip()[:40]
            raise UserError(f"{path}: line {i} is {shown!r}, not an integer label (one integer per line)")
        v = int(s)
        if abs(v) > np.iinfo(np.int64).max:
            raise UserError(f"{path}: line {i}: label {v} does not fit int64")
        vals.append(v)
    if not vals:
        raise UserError(f"{path}: holds no labels")
    return check_labels(np.array(vals, dtype=np.int64), n, str(path))


def read_labels(path: str | Path, n: int | None = None) -> torch.Tensor:
    """int64 [N] labels from a .npy of integers or a text/CSV file with one integer per line (`n`:
    the count they must have); UserError naming the file otherwise."""
    return torch.from_numpy(read_labels_file(Path(path), n))


# --------------------------------------------------------------------------- loading


def _is_glob(s: str) -> bool:
    return bool(_GLOB_CHARS.search(s))


def load_sample_set(path: str | Path, labels: str | Path | None = None) -> SampleSet:
    """The sample set at `path` (a folder of images, an .npz, an .npy, or a glob of .npz/.npy shards);
    `labels`, a .npy or a text file of integers, overrides the labels the set carries. UserError (one
    line, naming the file) for anything it cannot take as it is."""
    src = str(path)
    p = Path(path)
    y: np.ndarray | None = None
    if p.exists():
        if p.is_dir():
            kind = "folder"
            files = image_files(p, skip={LABELS_FILE})
            if not files:
                raise UserError(f"{p}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            nchw = decode_images(files, str(p))
            x = nchw.transpose(0, 2, 3, 1)          # a view; made NCHW again below without a copy
            names = [str(f) for f in files]
        elif p.suffix.lower() == ".npz":
            kind, names = "npz", [src]
            x, y = _read_shard(p)
        elif p.suffix.lower() == ".npy":
            kind, names = "npy", [src]
            x, y = _read_shard(p)
        else:
            raise UserError(f"{p}: not a folder of images, an .npz or an .npy")
    elif _is_glob(src):
        kind = "glob"
        matches = sorted(m for m in globlib.glob(src, recursive=True) if Path(m).is_file())
        if not matches:
            raise UserError(f"{src}: the pattern matches no files")
        x, y, names = _read_shards([Path(m) for m in matches], src)
    else:
        raise UserError(f"{p}: no such file or folder")
    if labels is not None:
        y = read_labels_file(Path(labels), len(x))
    elif kind == "folder" and (p / LABELS_FILE).is_file():
        y = read_labels_file(p / LABELS_FILE, len(x))
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    lab = torch.from_numpy(y) if y is not None else None
    return SampleSet(images, lab, kind, names, content_sha256(images, lab), source=src)


def _read_shards(paths: list[Path], pattern: str) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    kinds = {q.suffix.lower() for q in paths}
    for q in paths:
        if q.suffix.lower() not in (".npz", ".npy"):
            raise UserError(f"{pattern}: matches {q}, not an .npz or .npy shard")
    if len(kinds) > 1:
        a = next(q for q in paths if q.suffix.lower() == ".npz")
        b = next(q for q in paths if q.suffix.lower() == ".npy")
        raise UserError(f"{pattern}: mixes .npz ({a}) and .npy ({b}) shards; use one kind")
    xs, ys = [], []
    for q in paths:
        x, y = _read_shard(q)
        if xs and x.shape[1:] != xs[0].shape[1:]:
            raise UserError(f"{pattern}: shards differ: {paths[0]} holds {_shape(xs[0].shape[1:])} images "
                            f"(HxWxC), {q} holds {_shape(x.shape[1:])}")
        if ys and (y is None) != (ys[0] is None):
            with_, without = (q, paths[0]) if y is not None else (paths[0], q)
            raise UserError(f"{pattern}: {with_} has labels (arr_1) but {without} has none")
        xs.append(x)
        ys.append(y)
    x = xs[0] if len(xs) == 1 else np.concatenate(xs)
    y = None if ys[0] is None else (ys[0] if len(ys) == 1 else np.concatenate(ys))
    return x, y, [str(q) for q in paths]


def check_compatible(s: SampleSet, shape: tuple[int, int, int], dataset: str) -> None:
    """UserError unless the set's images are [C, H, W] = `shape`, the reference dataset's."""
    want = tuple(int(v) for v in shape)
    if s.shape != want:
        raise UserError(f"samples {s.source or s.kind} are {_shape(s.shape)} (CxHxW) but dataset {dataset} "
                        f"images are {_shape(want)}; generate them at the dataset's size and channels")


# --------------------------------------------------------------------------- writing


def _is_npz_out(out: Path) -> bool:
    return out.name.lower().endswith(".npz")


def check_output(out: str | Path) -> Path:
    """`out` as a Path when a sample set can be written there; UserError otherwise. Nothing is made."""
    out = Path(out)
    if _is_npz_out(out):
        if out.is_dir():
            raise UserError(f"output {out}: is a folder, not a file; name a new .npz")
    elif out.suffix.lower() in (".npy", *IMAGE_SUFFIXES):
        raise UserError(f"output {out}: write an .npz (ADM layout) or a folder of PNGs, not a {out.suffix} file")
    elif out.exists():
        if not out.is_dir():
            raise UserError(f"output {out}: is a file; a folder of PNGs is written there (or name an .npz)")
        if any(out.iterdir()):
            raise UserError(f"output {out}: the folder exists and is not empty; name a new or empty folder")
    try:   # both kinds are written into the parent folder first (a temp file or folder), then renamed
        store.check_writable_dir(out.parent, "folder")
    except UserError as e:
        raise UserError(f"output {out}: cannot be written ({e})") from None
    return out


def _check_images_tensor(images: torch.Tensor, labels: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray | None]:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
            or images.shape[1] not in (1, 3):
        got = f"{images.dtype} {list(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"write_sample_set wants uint8 [N, C, H, W] with C 1 or 3, got {got}")
    if images.shape[0] == 0:
        raise UserError("no images to write (zero samples)")
    x = np.ascontiguousarray(images.detach().cpu().numpy().transpose(0, 2, 3, 1))
    y = None
    if labels is not None:
        y = labels.detach().cpu().numpy()
        y = check_labels(y, len(x), "labels to write")
    return x, y


def write_sample_set(images: torch.Tensor, out: str | Path, labels: torch.Tensor | None = None) -> Path:
    """Write uint8 [N, C, H, W] `images` (and int labels) to `out` and return it; complete or absent.

    `out` ending in .npz: the ADM layout (arr_0 uint8 NHWC, arr_1 int64 labels when given), through a
    temp file in the same folder and a rename (an existing file is replaced atomically). Otherwise a
    folder of one PNG per image, `{index:06d}.png` (wider when N > 10**6, so names sort in order; grey
    PNGs for C=1), plus `labels.txt` (one integer per line) when labels are given; it is written into a
    hidden temporary sibling folder and renamed into place at the end. An existing non-empty folder is
    refused."""
    out = check_output(out)
    x, y = _check_images_tensor(images, labels)
    if _is_npz_out(out):
        arrays = {"arr_0": x} if y is None else {"arr_0": x, "arr_1": y}
        store.atomic_write(out, lambda f: np.savez(f, **arrays))
        return out
    Image = _pil()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        width = max(6, len(str(len(x) - 1)))
        for i in range(len(x)):
            img = Image.fromarray(x[i, :, :, 0] if x.shape[-1] == 1 else x[i])   # 'L' or 'RGB' from uint8
            img.save(tmp / f"{i:0{width}d}.png")
        if y is not None:
            (tmp / LABELS_FILE).write_text("".join(f"{int(v)}\n" for v in y))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)   # mkdtemp makes 0700; give the folder the usual permissions
        try:
            os.replace(tmp, out)         # replaces an empty folder at `out`
        except OSError as e:
            raise UserError(f"output {out}: cannot move the finished folder into place ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
