"""The Inception's input resize alone (32x32 uint8 -> 299x299, scaled to [-1, 1)): torch-fidelity's
TF1.x bilinear interpolation against genbench's two matmuls (`genbench.evaluators.inception`), on the
same images and batches, each after one warm-up batch; prints the seconds of each and their ratio.

    python bench/inception_resize.py                       # 100 images, batch 50, on the CPU
    python bench/inception_resize.py --device cuda --n 5000 --batch 500
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the resize runs")
    ap.add_argument("--n", type=int, default=100, help="images resized (random uint8 at 32x32)")
    ap.add_argument("--batch", type=int, default=50, help="images per call")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but no CUDA device is available (use --device cpu)", file=sys.stderr)
        return 2
    if a.n < 1 or a.batch < 1:
        print("error: --n and --batch must be at least 1", file=sys.stderr)
        return 2
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    from genbench.evaluators.inception import resize_to_inception
    from genbench.timing import sync

    dev = torch.device(a.device)
    x = torch.randint(0, 256, (a.n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = x.to(dev)
    forms = {   # torch-fidelity's forward: resize the float batch, then (x - 128) / 128
        "torch-fidelity": lambda b: (interpolate_bilinear_2d_like_tensorflow1x(
            b.float(), size=(299, 299), align_corners=False) - 128) / 128,
        "genbench": lambda b: resize_to_inception(b, 299),
    }
    seconds = {}
    for name, resize in forms.items():
        resize(x[:a.batch])   # warm-up
        sync(dev)
        t = time.perf_counter()
        for i in range(0, a.n, a.batch):
            resize(x[i:i + a.batch])
        sync(dev)
        seconds[name] = time.perf_counter() - t
        print(f"{name}: {seconds[name]:.3f} s for {a.n} images, batch {a.batch}", flush=True)
    print(f"genbench's resize {seconds['torch-fidelity'] / seconds['genbench']:.1f}x torch-fidelity's ({a.device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
