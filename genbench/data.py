"""The one dataset loader: every dataset comes back as uint8 NCHW images (or float 2-D points),
with class labels and, where the dataset has them, mode labels for mode counting.

Nothing here downloads unless `download=True`; a missing dataset is one clear error saying where
genbench looked and how to supply the files.
"""
from __future__ import annotations

import gzip
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from genbench.errors import DataNotFound, UserError
from genbench.families.base import DataSpec

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
SPLITS = ("train", "test")


@dataclass
class Data:
    name: str
    split: str
    x: torch.Tensor                 # uint8 [N, C, H, W], or float32 [N, 2] for point sets
    y: torch.Tensor | None          # int64 [N] class labels
    num_classes: int
    modes: torch.Tensor | None = None         # int64 [N] mode id (class, stacked triple, mixture component)
    num_modes: int | None = None
    mode_centers: torch.Tensor | None = None  # [num_modes, 2] for mixtures
    mode_std: float | None = None

    @property
    def is_image(self) -> bool:
        return self.x.dim() == 4

    @property
    def spec(self) -> DataSpec:
        return DataSpec(tuple(self.x.shape[1:]), self.num_classes)

    def __len__(self) -> int:
        return self.x.shape[0]

    def model_input(self, idx: torch.Tensor | slice) -> torch.Tensor:
        """Rows as the model sees them: images scaled to [-1, 1], points unchanged."""
        x = self.x[idx]
        return to_model_range(x) if self.is_image else x


def to_model_range(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 with round-to-nearest, the way every metric wants them."""
    return ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def resize_uint8(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or x.shape[-1] == size:
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y.round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------- image datasets


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")


def _digits(split: str, image_size: int | None, **_) -> Data:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8))[:, None]  # [1797,1,8,8]
    y = torch.from_numpy(d.target.astype(np.int64))
    test = torch.arange(len(y)) % 5 == 0  # a fixed fifth held out (360 test, 1437 train)
    keep = test if split == "test" else ~test
    x = resize_uint8(x[keep], image_size or 16)
    return Data("digits", split, x, y[keep], 10, modes=y[keep], num_modes=10)


def _read_idx(path: Path) -> np.ndarray:
    """The MNIST idx format (big-endian header), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                return d / name
    return None


def _mnist_like(name: str, torchvision_cls: str, system_dir: Path | None) -> Callable[..., Data]:
    def load(split: str, image_size: int | None, root: Path | None, download: bool, **_) -> Data:
        prefix = "train" if split == "train" else "t10k"
        dirs = []
        if root is not None:
            dirs += [root, root / name, root / torchvision_cls / "raw"]
        if system_dir is not None:
            dirs.append(system_dir)
        img = _find_idx(dirs, f"{prefix}-images-idx3-ubyte")
        lab = _find_idx(dirs, f"{prefix}-labels-idx1-ubyte")
        if (img is None or lab is None) and download:
            import torchvision

            target = root or Path("data")
            getattr(torchvision.datasets, torchvision_cls)(str(target), train=split == "train", download=True)
            dirs.append(target / torchvision_cls / "raw")
            img = _find_idx(dirs, f"{prefix}-images-idx3-ubyte")
            lab = _find_idx(dirs, f"{prefix}-labels-idx1-ubyte")
        if img is None or lab is None:
            looked = ", ".join(str(d) for d in dirs) or "(no --data-root given)"
            hint = " or `apt-get install dataset-fashion-mnist`" if name == "fashion" else ""
            raise DataNotFound(f"{name}: no {prefix}-images-idx3-ubyte[.gz] found in {looked}; "
                               f"pass --data-root DIR{hint}, or --download when online")
        x = torch.from_numpy(_read_idx(img).copy())[:, None]                  # [N, 1, 28, 28]
        x = F.pad(x, (2, 2, 2, 2))                                            # [N, 1, 32, 32]
        y = torch.from_numpy(_read_idx(lab).astype(np.int64))
        return Data(name, split, resize_uint8(x, image_size), y, 10, modes=y, num_modes=10)
    return load


CIFAR10_DIR = "cifar-10-batches-py"


def _numpy_reconstruct():
    core = getattr(np, "_core", None)          # numpy 2; numpy 1 has only numpy.core
    if core is None:
        core = np.core
    return core.multiarray._reconstruct


# What the CIFAR-10 batch pickles may reference, and nothing else: numpy's array reconstruction
# (numpy.core.* in the official Python 2 files, numpy._core.* when numpy 2 wrote them), and
# _codecs.encode, which Python 3 emits for bytes at protocol <= 2 (numpy arrays' raw data).
_CIFAR_GLOBALS: dict[tuple[str, str], Callable[[], object]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: __import__("_codecs").encode,
}


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only numpy arrays and plain containers: a batch file that asks for any other global
    (os.system, builtins.exec, ...) is refused before that global is even looked up."""

    def find_class(self, module: str, name: str):
        make = _CIFAR_GLOBALS.get((module, name))
        if make is None:
            raise _RefusedGlobal(module, name)
        return make()


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, 3, 32, 32], int64 [N]) from one CIFAR-10 batch file, unpickled with `_CifarUnpickler`."""
    try:
        with open(path, "rb") as fh:
            # The official files are Python 2 pickles: latin1 turns their keys into str.
            entry = _CifarUnpickler(fh, encoding="latin1").load()
    except _RefusedGlobal as e:
        raise UserError(f"{path}: refused to unpickle: the file asks for {e.qualname}, which a CIFAR-10 batch "
                        "never needs (a tampered or foreign file)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 -- truncated or not a pickle at all
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a CIFAR-10 batch file ({msg})") from None
    if not isinstance(entry, dict):
        raise UserError(f"{path}: not a CIFAR-10 batch file (holds a {type(entry).__name__}, not a dict)")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data, labels = entry.get("data"), entry.get("labels", entry.get("fine_labels"))
    if data is None or labels is None:
        raise UserError(f"{path}: not a CIFAR-10 batch file (no 'data' and 'labels')")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{path}: 'data' is {data.dtype} {list(data.shape)}, not uint8 [N, 3072]")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{path}: 'labels' are not integers") from None
    if y.shape != (len(data),):
        raise UserError(f"{path}: {y.size} labels for {len(data)} images")
    return data.reshape(-1, 3, 32, 32), y


def _cifar10(split: str, image_size: int | None, root: Path | None, download: bool, **_) -> Data:
    base = (root or Path("data")) / CIFAR10_DIR
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if not all((base / f).is_file() for f in files) and download:
        import torchvision

        torchvision.datasets.CIFAR10(str(root or Path("data")), train=split == "train", download=True)
    missing = [f for f in files if not (base / f).is_file()]
    if missing:
        raise DataNotFound(f"cifar10: {base / missing[0]} not found; pass --data-root DIR holding "
                           f"{CIFAR10_DIR}/ (torchvision's layout), or --download when online")
    xs, ys = [], []
    for f in files:
        x_f, y_f = _load_cifar_batch(base / f)
        xs.append(x_f)
        ys.append(y_f)
    x = torch.from_numpy(np.concatenate(xs))
    y = torch.from_numpy(np.concatenate(ys))
    return Data("cifar10", split, resize_uint8(x, image_size), y, 10, modes=y, num_modes=10)


FOLDER_DATASET_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _npz_dataset(path: Path) -> tuple[torch.Tensor, np.ndarray | None]:
    """uint8 NCHW images and optional labels from a dataset .npz (`x` NHWC, NCHW or NHW; `y`)."""
    from genbench import sample_sets as ss

    x, y = ss.read_npz(path, "x", "y", hint="a dataset .npz holds 'x', uint8 NHWC or NCHW, and optional 'y'")
    ss.check_uint8(x, f"{path} (x)")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise UserError(f"{path}: 'x' has shape {list(x.shape)}; want [N, H, W, C], [N, C, H, W] or [N, H, W]")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif x.shape[1] not in (1, 3):
        raise UserError(f"{path}: 'x' has shape {list(x.shape)}: neither axis 1 nor the last holds 1 or 3 "
                        "channels")
    if x.shape[0] == 0:
        raise UserError(f"{path}: 'x' holds zero images")
    if y is not None:
        y = ss.check_labels(y, len(x), f"{path} (y)")
    return torch.from_numpy(np.ascontiguousarray(x)), y


def _folder_dataset(path: Path) -> tuple[torch.Tensor, np.ndarray | None]:
    """RGB uint8 NCHW images (grey ones repeated to three channels) and, when the images sit in
    subfolders, their class = subfolder name. Files other than images are left out; an image that
    cannot be read, has alpha or is not 8-bit is refused, naming it."""
    from genbench import sample_sets as ss

    files = ss.image_files(path, FOLDER_DATASET_SUFFIXES, strict=False)
    if not files:
        raise DataNotFound(f"{path}: no .png/.jpg/.bmp/.webp images found")
    classes = sorted({p.parent.name for p in files}) if any(p.parent != path for p in files) else []
    x = None
    for i, p in enumerate(files):
        a = ss.decode_image(p)
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        if x is None:
            x = np.empty((len(files), *a.shape), dtype=np.uint8)
        elif a.shape != x.shape[1:]:
            raise UserError(f"{path}: images differ in size: {files[0]} is {x.shape[1]}x{x.shape[2]}, {p} is "
                            f"{a.shape[0]}x{a.shape[1]}; resize them to one size first")
        x[i] = a
    y = np.array([classes.index(p.parent.name) for p in files]) if classes else None
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), y


def _from_path(path: Path, split: str, image_size: int | None) -> Data:
    """An `.npz` (arrays `x` uint8 NHWC or NCHW, optional `y`) or a folder of images
    (class = subfolder name when there are subfolders). Arrays are never cast or unpickled: a float or
    other non-uint8 `x` is refused, as is an image file that cannot be read."""
    if not path.exists():
        raise DataNotFound(f"{path}: no such file or folder")
    if path.suffix == ".npz":
        x, y = _npz_dataset(path)
    elif path.is_dir():
        x, y = _folder_dataset(path)
    else:
        raise UserError(f"{path}: a path dataset is an .npz or a folder of images")
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64)) if y is not None else None
    n_cls = int(labels.max()) + 1 if labels is not None else 0
    return Data(path.name, split, resize_uint8(x, image_size), labels, n_cls,
                modes=labels, num_modes=n_cls or None)


def _stacked(base: str) -> Callable[..., Data]:
    """Three images of `base` in the three channels: 10**3 = 1000 modes (VEEGAN/PacGAN's Stacked MNIST)."""
    def load(split: str, image_size: int | None, seed: int = 0, size: int | None = None, **kw) -> Data:
        src = IMAGE_DATASETS[base](split=split, image_size=image_size, **kw)
        n = size or len(src)
        g = torch.Generator().manual_seed(seed + (0 if split == "train" else 1))
        idx = torch.randint(len(src), (3, n), generator=g)                    # [3, N]
        x = torch.cat([src.x[idx[c], :1] for c in range(3)], dim=1)           # [N, 3, H, W]
        mode = src.y[idx[0]] * 100 + src.y[idx[1]] * 10 + src.y[idx[2]]
        return Data(f"stacked-{base}", split, x, mode, 1000, modes=mode, num_modes=1000)
    return load


IMAGE_DATASETS: dict[str, Callable[..., Data]] = {
    "digits": _digits,
    "fashion": _mnist_like("fashion", "FashionMNIST", FASHION_SYSTEM_DIR),
    "mnist": _mnist_like("mnist", "MNIST", None),
    "cifar10": _cifar10,
}
IMAGE_DATASETS.update({f"stacked-{b}": _stacked(b) for b in ("digits", "fashion", "mnist")})


# --------------------------------------------------------------------------- 2-D mixtures


def mixture_centers(name: str) -> tuple[torch.Tensor, float]:
    """Mode centres and std of the classic toy mixtures, as set in PacGAN (Lin et al. 2018):
    ring-8 on the unit circle with std 0.01; grid-25 at {-4,-2,0,2,4}^2 with std 0.05."""
    if name == "ring8":
        a = torch.arange(8, dtype=torch.float32) * (2 * math.pi / 8)
        return torch.stack([torch.cos(a), torch.sin(a)], dim=1), 0.01
    if name == "grid25":
        v = torch.arange(-4, 5, 2, dtype=torch.float32)
        return torch.cartesian_prod(v, v), 0.05
    raise UserError(f"unknown mixture {name!r}")


def _mixture(name: str) -> Callable[..., Data]:
    def load(split: str, seed: int = 0, size: int | None = None, **_) -> Data:
        centers, std = mixture_centers(name)
        n = size or (50_000 if split == "train" else 10_000)
        g = torch.Generator().manual_seed(seed * 2 + (0 if split == "train" else 1))
        comp = torch.randint(len(centers), (n,), generator=g)
        x = centers[comp] + std * torch.randn(n, 2, generator=g)
        return Data(name, split, x, comp, len(centers), modes=comp, num_modes=len(centers),
                    mode_centers=centers, mode_std=std)
    return load


POINT_DATASETS: dict[str, Callable[..., Data]] = {m: _mixture(m) for m in ("ring8", "grid25")}


def dataset_names() -> list[str]:
    return sorted(IMAGE_DATASETS) + sorted(POINT_DATASETS) + ["folder:PATH", "PATH.npz"]


def check_name(name: str) -> None:
    if name in POINT_DATASETS or name in IMAGE_DATASETS or name.startswith("folder:") or name.endswith(".npz"):
        return
    raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(dataset_names())}")


def load(name: str, split: str = "train", *, root: str | Path | None = None, download: bool = False,
         image_size: int | None = None, seed: int = 0, size: int | None = None) -> Data:
    """Load `name` ('digits', 'fashion', 'cifar10', 'mnist', 'stacked-fashion', 'ring8', 'grid25',
    'folder:PATH' or a path to an .npz) for `split` ('train' or 'test')."""
    _check_split(split)
    root = Path(root) if root is not None else None
    if name in POINT_DATASETS:
        return POINT_DATASETS[name](split=split, seed=seed, size=size)
    if name in IMAGE_DATASETS:
        kw = dict(split=split, image_size=image_size, root=root, download=download)
        if name.startswith("stacked-"):
            kw.update(seed=seed, size=size)
        return IMAGE_DATASETS[name](**kw)
    if name.startswith("folder:") or name.endswith(".npz"):
        return _from_path(Path(name.removeprefix("folder:")), split, image_size)
    check_name(name)
    raise AssertionError("unreachable")
