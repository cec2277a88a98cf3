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
        with open(base / f, "rb") as fh:
            # The official files are Python 2 pickles: latin1 turns their keys into str.
            entry = pickle.load(fh, encoding="latin1")
        entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
        xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs))
    y = torch.from_numpy(np.concatenate(ys))
    return Data("cifar10", split, resize_uint8(x, image_size), y, 10, modes=y, num_modes=10)


def _from_path(path: Path, split: str, image_size: int | None) -> Data:
    """An `.npz` (arrays `x` uint8 NHWC or NCHW, optional `y`) or a folder of images
    (class = subfolder name when there are subfolders)."""
    if not path.exists():
        raise DataNotFound(f"{path}: no such file or folder")
    if path.suffix == ".npz":
        with np.load(path) as z:
            if "x" not in z:
                raise UserError(f"{path}: an .npz dataset needs an array named 'x'")
            x, y = z["x"], (z["y"] if "y" in z else None)
        if x.ndim == 3:
            x = x[:, None]
        if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.transpose(0, 3, 1, 2)
        x = torch.from_numpy(np.ascontiguousarray(x.astype(np.uint8)))
    else:
        from PIL import Image

        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"})
        if not files:
            raise DataNotFound(f"{path}: no .png/.jpg images found")
        classes = sorted({p.parent.name for p in files}) if any(p.parent != path for p in files) else []
        imgs = [np.asarray(Image.open(p).convert("RGB")) for p in files]
        if len({im.shape for im in imgs}) != 1:
            raise UserError(f"{path}: images differ in size; resize them to one size first")
        x = torch.from_numpy(np.stack(imgs).transpose(0, 3, 1, 2).copy())
        y = np.array([classes.index(p.parent.name) for p in files]) if classes else None
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
