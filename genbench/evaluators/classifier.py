"""Small domain classifiers that score digits / Fashion-MNIST samples, and count their modes.

Inception features mean little on 16x16 grey digits, so the small datasets are scored in the feature
space of a classifier genbench trains itself (`genbench evaluator train --dataset NAME`) and ships in
genbench/evaluators/weights/. They are registered with torch-fidelity as feature extractors, so
`torch_fidelity.calculate_metrics(feature_extractor="genbench-fashion", ...)` works too.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# dataset -> native input size; the classifier resizes other sizes to this one.
NATIVE_SIZE = {"digits": 16, "fashion": 32}
NUM_CLASSES = 10
FEATURE_DIM = 128


class SmallCNN(nn.Module):
    """~140 k parameters: three conv stages, global average pool -> 128-d features -> 10 logits."""

    def __init__(self, in_ch: int = 1, width: int = 32):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        self.body = nn.Sequential(
            block(in_ch, width), block(width, width), nn.MaxPool2d(2),               # H/2
            block(width, 2 * width), block(2 * width, 2 * width), nn.MaxPool2d(2),   # H/4
            block(2 * width, FEATURE_DIM), nn.AdaptiveAvgPool2d(1), nn.Flatten(),    # [B, 128]
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.body(x)
        return feats, self.head(self.dropout(feats))


def weights_path(dataset: str) -> Path:
    return WEIGHTS_DIR / f"{dataset}.pt"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare(x_uint8: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float [B, 1, size, size] in [-1, 1] (grey: channel mean)."""
    x = x_uint8.float() / 127.5 - 1.0
    if x.shape[1] != 1:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def load_classifier(dataset: str) -> SmallCNN:
    path = weights_path(dataset)
    if not path.is_file():
        from genbench.errors import WeightsNotFound

        raise WeightsNotFound(f"no {dataset} classifier weights at {path}; "
                              f"train them with `genbench evaluator train --dataset {dataset}`")
    net = SmallCNN()
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return net.eval()


class ClassifierExtractor(FeatureExtractorBase):
    """torch-fidelity extractor: 'features' (128-d, for FID/KID/PRC) and 'logits' (for IS and modes)."""
    dataset = ""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        self.net = load_classifier(self.dataset)
        self.size = NATIVE_SIZE[self.dataset]

    @staticmethod
    def get_provided_features_list():
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits"}.get(metric, "features")

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 32, 32, dtype=torch.uint8)

    def forward(self, x):
        feats, logits = self.net(prepare(x, self.size))
        out = {"features": feats, "logits": logits}
        return tuple(out[f] for f in self.features_list)


class DigitsExtractor(ClassifierExtractor):
    dataset = "digits"


class FashionExtractor(ClassifierExtractor):
    dataset = "fashion"


class FashionStackedExtractor(ClassifierExtractor):
    """Stacked Fashion-MNIST: the fashion classifier on each channel. Features are the three 128-d
    vectors side by side; logits are the joint log-probabilities of the 10**3 = 1000 modes, ordered
    as data.py numbers them (100*c0 + 10*c1 + c2)."""
    dataset = "fashion"

    def forward(self, x):
        feats, logps = [], []
        for c in range(3):
            f, lg = self.net(prepare(x[:, c:c + 1], self.size))
            feats.append(f)
            logps.append(F.log_softmax(lg.float(), dim=1))
        joint = logps[0][:, :, None, None] + logps[1][:, None, :, None] + logps[2][:, None, None, :]
        out = {"features": torch.cat(feats, dim=1), "logits": joint.reshape(x.shape[0], 1000)}
        return tuple(out[f] for f in self.features_list)


# --------------------------------------------------------------------------- training


def train_classifier(dataset: str, *, epochs: int = 8, seed: int = 0, out: Path | None = None,
                     data_root=None, progress: bool = True) -> dict:
    """Train the domain classifier, write fp16 weights atomically, return {test_accuracy, ...}."""
    from tqdm import tqdm

    from genbench import data as gdata
    from genbench.store import atomic_torch_save

    torch.manual_seed(seed)
    size = NATIVE_SIZE[dataset]
    train = gdata.load(dataset, "train", root=data_root, image_size=size)
    test = gdata.load(dataset, "test", root=data_root, image_size=size)
    net = SmallCNN()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=5e-4)
    bs = 128
    steps = epochs * ((len(train) + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    bar = tqdm(total=steps, desc=f"classifier[{dataset}]", disable=not progress, unit="step")
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(train), generator=g)
        for i in range(0, len(train), bs):
            idx = perm[i:i + bs]
            x = prepare(train.x[idx], size)
            # Random shifts of up to 2 px: cheap augmentation that matters for 1437 digits.
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(net(x)[1], train.y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    acc = accuracy(net, test.x, test.y, size)
    state = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    path = out or weights_path(dataset)
    atomic_torch_save(path, state)
    return {"dataset": dataset, "test_accuracy": acc, "epochs": epochs, "seed": seed,
            "train_seconds": time.time() - t0, "weights": str(path), "sha256": file_sha256(path)}


@torch.no_grad()
def accuracy(net: SmallCNN, x: torch.Tensor, y: torch.Tensor, size: int) -> float:
    net.eval()
    preds = torch.cat([net(prepare(x[i:i + 1000], size))[1].argmax(1) for i in range(0, len(x), 1000)])
    return (preds == y).float().mean().item()
