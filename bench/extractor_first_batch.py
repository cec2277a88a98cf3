"""What a cold evaluation's first batch costs: genbench's Inception extractor, freshly built in a new
process, with cuDNN's autotuner (`cudnn.benchmark`) on and off.

A cold evaluation extracts its reference features first, and in the eval bench on an H200 that stage
took 14.7 s against 8.3 s for the same number of generated images right after it
(bench/results/h200-eval-run3.json, autotuner on): the difference is paid once per process, on the
first batch. cuDNN's autotuner, which times every convolution's algorithms on each new shape, is a
candidate; so are CUDA's lazy kernel loading and the allocator's first growth, which both settings share. Each setting runs in its own new process (the
autotuner's choices live for a process), after a torch-fidelity forward on the device as in the eval
bench (CUDA and cuDNN initialised, autotuner off as torch-fidelity leaves it); then the first batch is
timed, then `--batches` more for the steady speed, and the first image's first 8 features are compared
across settings.

    python bench/extractor_first_batch.py --out results/first-batch.json
    python bench/extractor_first_batch.py --device cpu --batch 8 --batches 2   # wiring check
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SETTINGS = ("off", "on")


def child(a) -> dict:
    from eval_vs_torch_fidelity import clock, images, random_inception_weights   # bench/ is on sys.path

    from genbench.scoring import build_extractor

    dev = torch.device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "inception.pth"
        random_inception_weights(weights, dev)   # runs torch-fidelity's own forward on the device
        ext = build_extractor("inception-v3-compat", dev, inception_weights=weights)
    ext.cudnn_autotune = a.child == "on"
    x = images(a.batch * (a.batches + 1), 7, 1)
    t0 = clock(dev)
    first = ext(x[:a.batch])["2048"]
    t1 = clock(dev)
    for i in range(1, a.batches + 1):
        ext(x[i * a.batch:(i + 1) * a.batch])
    t2 = clock(dev)
    return {"first_batch_s": t1 - t0, "steady_img_per_s": a.batch * a.batches / (t2 - t1),
            "first_feature_row": first[0, :8].tolist(), "feature_scale": first.abs().max().item()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cpu", "cuda"), help="where the extractor runs")
    ap.add_argument("--batch", type=int, default=500, help="images per batch (the eval bench's default)")
    ap.add_argument("--batches", type=int, default=10, help="batches timed after the first, for the steady speed")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    ap.add_argument("--child", choices=SETTINGS, default=None, help=argparse.SUPPRESS)   # one setting, this process
    a = ap.parse_args()
    problem = None
    if a.device == "cuda" and not torch.cuda.is_available():
        problem = "--device cuda, but no CUDA device is available (use --device cpu)"
    elif a.batch < 1 or a.batches < 1:
        problem = "--batch and --batches must be at least 1"
    elif a.out and (a.out.is_dir() or (a.out.parent.exists() and not a.out.parent.is_dir())):
        problem = f"--out {a.out}: not a file path it can write"
    if problem:   # before any work: a user mistake costs no minutes of device time
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if a.child:
        print(json.dumps(child(a)))
        return 0
    rows = {}
    for setting in SETTINGS:   # a new process each: the autotuner's choices last for a process
        cmd = [sys.executable, __file__, "--device", a.device, "--batch", str(a.batch), "--batches", str(a.batches),
               "--child", setting]
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"error: the cudnn autotune {setting} process failed:\n{p.stderr[-2000:]}")
        rows[f"cudnn_autotune_{setting}"] = {**json.loads(p.stdout.strip().splitlines()[-1]),
                                             "process_s": time.perf_counter() - t}
    off, on = rows["cudnn_autotune_off"], rows["cudnn_autotune_on"]
    # the first image's first 8 features, against the feature scale
    diff = max(abs(u - v) for u, v in zip(off["first_feature_row"], on["first_feature_row"])) / off["feature_scale"]
    dev_name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    result = {"meta": {"device": dev_name, "batch": a.batch, "batches": a.batches, "torch": torch.__version__},
              "rows": rows, "feature_diff_off_vs_on": diff}
    if a.out:
        from genbench.store import atomic_write_bytes

        a.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(a.out, json.dumps(result, indent=2).encode())
    print(f"\n{dev_name}, genbench's Inception extractor, batch {a.batch}, a new process per setting")
    print("| cuDNN autotune | first batch s | steady img/s |")
    print("|---|---:|---:|")
    for k, r in rows.items():
        print(f"| {k.rsplit('_', 1)[1]} | {r['first_batch_s']:.2f} | {r['steady_img_per_s']:.0f} |")
    print(f"first image's first 8 features, off vs on: largest difference {diff:.1e} of the feature scale")
    return 0


if __name__ == "__main__":
    sys.exit(main())
