"""Calibration of the image mode statistics (genbench/modes.py): old rule vs the k-NN manifold rule.

The old rule counted every sample's arg-max class and called a sample high quality when the classifier's
top probability was >= 0.5; the classifiers are that sure of uniform noise too. The new rule (what
`modes_group` computes) also asks the sample's features to lie inside some reference image's k-NN ball
(k = 3, improved precision's test per sample), and counts modes from those samples only.

Image sets, all scored against the reference a suite uses (held-out sets never overlap it):
  noise     uniform uint8 noise of the data's shape
  blur S    held-out real images, Gaussian blur with std S pixels (reflect padding)
  held-out  real held-out images
  2-class   held-out real images of two classes only (a collapsed generator); stacked: the triples
            (a, a, a) and (b, b, b) of those two classes, i.e. two of the 1000 modes
  1 noise ch (stacked only) held-out triples with the third channel replaced by uniform noise

    .venv/bin/python bench/mode_robustness.py                       # digits and fashion (about a minute)
    .venv/bin/python bench/mode_robustness.py --datasets stacked-fashion   # 10,000 + 10,000 stacked: slow on a CPU
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genbench import data  # noqa: E402
from genbench.device_metrics import precision_recall  # noqa: E402
from genbench.modes import (CLASSIFIER_MIN_SHARE, _kl_to_uniform, classifier_mode_stats,  # noqa: E402
                           manifold_membership)
from genbench.scoring.extractor import build_extractor, extract  # noqa: E402

EXTRACTOR = {"digits": "digits", "fashion": "fashion", "stacked-fashion": "fashion-stacked"}
# Two classes the classifiers keep apart: T-shirt (0) and trouser (1) would leak T-shirts into
# 'shirt' (the fashion classifier's worst confusion, 10 %), which no rule about the manifold removes.
TWO_CLASSES = {"digits": (0, 1), "fashion": (5, 8), "stacked-fashion": (5, 8)}


def old_stats(probs: torch.Tensor, confidence: float = 0.5) -> dict:
    """The rule before the manifold filter: every sample's arg-max counted."""
    n, k = probs.shape
    top, pred = probs.max(1)
    counts = torch.bincount(pred, minlength=k)
    return {"modes_covered": int((counts >= max(1, math.ceil(CLASSIFIER_MIN_SHARE * n / k))).sum()),
            "high_quality_frac": float((top >= confidence).double().mean()), "mode_kl": _kl_to_uniform(counts)}


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """uint8 [N, C, H, W] -> the same, blurred with a separable Gaussian of std `sigma` pixels."""
    r = int(math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    c = x.shape[1]
    y = F.conv2d(F.pad(x.float(), (r, r, 0, 0), mode="reflect"), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return y.round().clamp(0, 255).to(torch.uint8)


def image_sets(name: str, n_ref: int | None, n_fake: int, sigmas, seed: int):
    """(reference images, {set name: images}) for one dataset."""
    g = torch.Generator().manual_seed(seed)
    a, b = TWO_CLASSES[name]
    if name == "digits":   # the suites' reference: the train split (1437); held out: the test split (360)
        ref, ho = data.load("digits", "train"), data.load("digits", "test")
        ref_x, ho_x, two = ref.x[:n_ref], ho.x[:n_fake], ho.x[(ho.y == a) | (ho.y == b)]
    elif name == "fashion":   # reference: the 10,000 test images; held out: a random part of train
        ref, ho = data.load("fashion", "test"), data.load("fashion", "train")
        ref_x = ref.x[:n_ref]
        idx = torch.randperm(len(ho), generator=g)[:n_fake]
        ho_x, y = ho.x[idx], ho.y[idx]
        two = ho_x[(y == a) | (y == b)]
    elif name == "stacked-fashion":   # reference: stacked test triples; held out: triples of train images
        ref_x = data.load("stacked-fashion", "test", size=n_ref or 10_000, seed=seed).x
        ho_x = data.load("stacked-fashion", "train", size=n_fake, seed=seed).x
        src = data.load("fashion", "train")
        parts = []
        for c in (a, b):
            xc = src.x[src.y == c][: n_fake // 2]
            parts.append(torch.cat([xc, xc.roll(1, 0), xc.roll(2, 0)], dim=1))   # mode 111*c
        two = torch.cat(parts)
    else:
        raise SystemExit(f"unknown dataset {name!r}")
    sets = {"noise": torch.randint(0, 256, ho_x.shape, generator=g, dtype=torch.uint8)}
    sets.update({f"blur {s:g}": gaussian_blur(ho_x, s) for s in sigmas})
    sets["held-out"] = ho_x
    sets["2-class"] = two
    if name == "stacked-fashion":
        x = ho_x.clone()
        x[:, 2] = torch.randint(0, 256, x[:, 2].shape, generator=g, dtype=torch.uint8)
        sets["1 noise ch"] = x
    return ref_x, sets


def features(ext, x: torch.Tensor, batch: int = 1000) -> dict[str, torch.Tensor]:
    return extract(ext, (x[i:i + batch] for i in range(0, len(x), batch)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["digits", "fashion"], choices=sorted(EXTRACTOR))
    ap.add_argument("--n-ref", type=int, default=None, help="reference images (default: the whole split; "
                    "stacked: 10,000)")
    ap.add_argument("--n-fake", type=int, default=None, help="held-out images per set (default: digits 360, "
                    "fashion 2,000, stacked 10,000)")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args(argv)
    rows = []
    for name in args.datasets:
        t0 = time.time()
        n_fake = args.n_fake or {"digits": 360, "fashion": 2000, "stacked-fashion": 10_000}[name]
        ref_x, sets = image_sets(name, args.n_ref, n_fake, args.sigmas, args.seed)
        ext = build_extractor(EXTRACTOR[name], torch.device("cpu"))
        ref_f = features(ext, ref_x)["features"]
        for set_name, x in sets.items():
            f = features(ext, x)
            probs = F.softmax(f["logits"].double(), dim=1)
            member = manifold_membership(f["features"], ref_f)
            new = classifier_mode_stats(probs, on_manifold=member)
            p, r = precision_recall(f["features"], ref_f)
            rows.append({"dataset": name, "set": set_name, "n": len(x), "n_ref": len(ref_x),
                         "old": old_stats(probs), "new": {k: new[k] for k in ("modes_covered", "high_quality_frac",
                                                                              "mode_kl")},
                         "on_manifold": float(member.float().mean()), "precision": p, "recall": r})
        print(f"# {name}: {len(ref_x)} reference images, {time.time() - t0:.0f} s", file=sys.stderr)
    print("| dataset | set | n | modes old | modes new | high-quality old | high-quality new | mode KL old "
          "| mode KL new | on-manifold | precision | recall |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, w = r["old"], r["new"]
        print(f"| {r['dataset']} | {r['set']} | {r['n']} | {o['modes_covered']} | {w['modes_covered']} | "
              f"{o['high_quality_frac']:.3f} | {w['high_quality_frac']:.3f} | {o['mode_kl']:.3f} | "
              f"{w['mode_kl']:.3f} | {r['on_manifold']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
