"""Does bf16 sampling change sample quality? FD/FID of bf16 against fp32 sampling, same weights,
same seeds, beside the seed-to-seed spread of fp32 itself.

Takes one finished genbench run (its config.json and model.pt), samples `--n` images for each of
`--seeds` sample seeds twice, in fp32 and under bf16 autocast (on CUDA, or on the CPU with
FastPath.bf16_cpu), and scores both with the run's own extractor against its reference split.
bf16 is "within the spread" when the mean |FD_bf16 - FD_fp32| over seeds is below the standard
deviation of FD_fp32 across seeds. Also reports how far the uint8 samples themselves move.

    python bench/bf16_vs_fp32_quality.py --run results/smoke/digits/ddpm/seed0 --seeds 3

Writes a JSON (default bench/results/<device>-bf16-quality.json) and prints a short table last.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from genbench import data as gdata
from genbench.config import card_from_dict
from genbench.errors import UserError
from genbench.evaluation import PointSettings, evaluate_point
from genbench.scoring import build_extractor, reference_features
from genbench.families import DataSpec, get_family
from genbench.fastpath import FastPath
from genbench.runner import resolve_device


def main(argv=None) -> int:
    try:
        return check(argv)
    except UserError as e:   # missing data or extractor weights: one line, as the CLI does
        print(f"error: {e}", file=sys.stderr)
        return 2


def check(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="A finished run folder (config.json, model.pt).")
    ap.add_argument("--seeds", type=int, default=3, help="Sample seeds (each scored in fp32 and bf16).")
    ap.add_argument("--n", type=int, default=None, help="Samples per point (default: the suite's n_fake).")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda.")
    ap.add_argument("--inception-weights", default=None, help="For suites scored with Inception.")
    ap.add_argument("--data-root", type=Path, default=None,
                    help="Folder holding the run's dataset files (default: the loader's usual places).")
    ap.add_argument("--out", type=Path, default=None, help="JSON output path.")
    ap.add_argument("--bf16-head", action="store_true",
                    help="Also score bf16 with the UNet's output block in bf16 too (genbench keeps it in fp32).")
    a = ap.parse_args(argv)
    if a.seeds < 2:
        print("error: --seeds must be at least 2 (the check compares against the seed-to-seed spread)",
              file=sys.stderr)
        return 2

    cfg_path, weights = a.run / "config.json", a.run / "model.pt"
    if not cfg_path.is_file() or not weights.is_file():
        print(f"error: {a.run} is not a finished run folder (needs config.json and model.pt)", file=sys.stderr)
        return 2
    cfg = json.loads(cfg_path.read_text())
    device = resolve_device(a.device)
    card = card_from_dict(cfg["card"], str(cfg_path))
    ev, ds = cfg["suite"]["eval"], cfg["dataset"]
    ref = gdata.load(ds["name"], ev["ref_split"], image_size=ds.get("image_size"), size=ds.get("size"),
                     root=a.data_root)
    if not ref.is_image or not cfg.get("extractor"):
        print("error: this check scores images with a feature extractor; the run has none", file=sys.stderr)
        return 2
    model = get_family(card.family)(DataSpec(tuple(ref.x.shape[1:]), ref.num_classes), **card.params)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model = model.to(device).eval()
    extractor = build_extractor(cfg["extractor"], device, inception_weights=a.inception_weights)
    real = reference_features(extractor, ref, ev.get("n_real"), None, batch_size=ev["batch_size"])
    n = a.n or ev["n_fake"]
    modes = {"fp32": FastPath(bf16=False), "bf16": FastPath(bf16=True, bf16_cpu=True)}
    net = getattr(model, "net", None)
    if a.bf16_head:   # what keeping the UNet's output block in fp32 buys (see genbench/families/unet.py)
        if not hasattr(net, "out_fp32"):
            print("error: --bf16-head needs a diffusion UNet (a network with out_fp32)", file=sys.stderr)
            return 2
        modes["bf16_head"] = modes["bf16"]

    rows = []
    for s in range(a.seeds):
        seed = 1000 + s    # not the run's own evaluation seed
        row, kept = {"seed": seed}, {}
        for name, fp in modes.items():
            if a.bf16_head:
                net.out_fp32 = name != "bf16_head"
            t0 = time.time()
            m, _, kept[name] = evaluate_point(model, card.sampler, seed, PointSettings(n, ev["batch_size"], ("fid",)),
                                              ref, extractor, real, fast=fp, keep=n, timed=False)
            row[f"fd_{name}"], row[f"seconds_{name}"] = m["fid"], round(time.time() - t0, 2)
        # The same images in both precisions (uint8): how many values move, and by how much.
        x32, x16 = kept["fp32"].int(), kept["bf16"].int()
        row["pixels_changed"] = float((x32 != x16).float().mean())
        row["mean_abs_levels"] = float((x32 - x16).abs().float().mean())
        row["fd_diff"] = row["fd_bf16"] - row["fd_fp32"]
        if a.bf16_head:
            row["fd_diff_bf16_head"] = row["fd_bf16_head"] - row["fd_fp32"]
            row["pixels_changed_bf16_head"] = float((x32 != kept["bf16_head"].int()).float().mean())
        rows.append(row)
        print(f"seed {seed}: FD fp32 {row['fd_fp32']:.3f}  bf16 {row['fd_bf16']:.3f}  "
              f"diff {row['fd_diff']:+.3f}" + (f"  bf16 head too {row['fd_bf16_head']:.3f} "
                                               f"diff {row['fd_diff_bf16_head']:+.3f}" if a.bf16_head else ""),
              file=sys.stderr)

    fp32 = [r["fd_fp32"] for r in rows]
    spread = statistics.stdev(fp32)
    mean_abs = statistics.fmean(abs(r["fd_diff"]) for r in rows)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    summary = {"run": str(a.run), "card": card.name, "family": card.family, "sampler": card.sampler,
               "extractor": cfg["extractor"], "n": n, "device": dev_name, "torch": torch.__version__,
               "rows": rows, "fd_fp32_seed_std": spread, "mean_abs_fd_diff": mean_abs,
               "within_seed_spread": bool(mean_abs < spread)}
    if a.bf16_head:
        summary["mean_abs_fd_diff_bf16_head"] = statistics.fmean(abs(r["fd_diff_bf16_head"]) for r in rows)
        summary["bf16_head_within_seed_spread"] = bool(summary["mean_abs_fd_diff_bf16_head"] < spread)
    out = a.out or Path("bench/results") / f"{device.type}-bf16-quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")

    print(f"\n{card.name} on {cfg['dataset']['name']} ({dev_name}), {n} samples per point, FD in "
          f"{cfg['extractor']} features")
    print(f"{'seed':>6} {'fp32':>9} {'bf16':>9} {'diff':>8} {'px moved':>9}")
    for r in rows:
        print(f"{r['seed']:>6} {r['fd_fp32']:>9.3f} {r['fd_bf16']:>9.3f} {r['fd_diff']:>+8.3f} "
              f"{r['pixels_changed']:>9.1%}")
    print(f"mean |diff| {mean_abs:.3f} vs fp32 seed-to-seed std {spread:.3f}: "
          f"{'within' if mean_abs < spread else 'NOT within'} the seed spread  -> {out}")
    if a.bf16_head:
        m = summary["mean_abs_fd_diff_bf16_head"]
        print(f"bf16 with the output block in bf16 too: mean |diff| {m:.3f}: "
              f"{'within' if m < spread else 'NOT within'} the seed spread")
    return 0


if __name__ == "__main__":
    sys.exit(main())
