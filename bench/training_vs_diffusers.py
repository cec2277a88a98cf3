"""Training speed: genbench's `ddpm` card beside the training loop of diffusers' `train_unconditional`
example, same device, same batch, one process, the DDPM CIFAR-10 UNet on both sides.

diffusers' side is the example's loop written out (examples/unconditional_image_generation/
train_unconditional.py, read at huggingface/diffusers 58eb52c, 2026-08-23), with the network the DDPM
paper trained on CIFAR-10 (google/ddpm-cifar10-32's UNet2DModel configuration: block_out_channels
(128, 256, 256, 256), layers_per_block 2, attention at 16x16, dropout 0.1; the example's own default
is a 6-level 64x64 network): per step, noise and timesteps drawn on the device,
DDPMScheduler.add_noise, the UNet's forward, MSE on the noise, backward, clip_grad_norm_(1.0), AdamW
(lr 1e-4, betas (0.95, 0.999), weight decay 1e-6, eps 1e-8), the cosine LR schedule with 500 warm-up
steps, EMAModel.step (max decay 0.9999, warm-up with inv_gamma 1, power 3/4, as --use_ema) and the
loss moved to the host for the progress bar (loss.detach().item(), every step). Precision is the
example's default, fp32 (`--mixed_precision no`); `diffusers-bf16` is its `--mixed_precision bf16`
(inputs in bf16, the forward under bf16 autocast as accelerate does it). Not modelled, on either
side: the data loader (both sides index batches already in device memory; the example decodes and
augments images in DataLoader workers), accelerate's wrapping, checkpoints and sample images.

genbench's side is `genbench.bench.bench_train_card` on the `ddpm` card: the steps genbench.train runs
(its batches, the family's train_step, the fast path, the log buffer, the EMA), on seeded synthetic
uint8 images. Both are timed over --steps steps after --warmup steps (compilation included there and
reported apart), with device synchronisation; FLOPs per step by FlopCounterMode over one eager step
(forward and backward), MFU against the bf16 dense peak of the device (genbench.bench.PEAK_TFLOPS:
H100 SXM / H200 989.4 TFLOP/s) or --peak-tflops, for every row (fp32 rows too, so they compare).

    python bench/training_vs_diffusers.py --batch 128 --steps 20 --out results/bench_training.json
    python bench/training_vs_diffusers.py --device cpu --tiny --threads 1   # wiring check: tiny nets, batch 4, 2 steps
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from genbench.bench import bench_train_card, device_name, mfu, peak_tflops_for, synthetic_data  # noqa: E402
from genbench.config import load_card  # noqa: E402
from genbench.families.base import DataSpec  # noqa: E402
from genbench.timing import peak_memory_mb, reset_peak_memory, sync  # noqa: E402
from genbench.train import TrainFastPath  # noqa: E402
from sampling_vs_diffusers import GENBENCH_COMPILE, diffusers_unet  # noqa: E402

# genbench configurations: the fast path of each (compile suffixes as in sampling_vs_diffusers)
GENBENCH = {
    "genbench-plain": TrainFastPath.off(),                       # the loop as it was: fp32, a host sync per step
    "genbench-fp32": TrainFastPath(bf16=False),                  # every part of the fast path but bf16
    "genbench-bf16": TrainFastPath(),                            # genbench's default on CUDA
    **{f"genbench-bf16-{k}": TrainFastPath(compile=v) for k, v in GENBENCH_COMPILE.items() if k != "cdtune"},
}
DIFFUSERS = ("diffusers-fp32", "diffusers-bf16", "diffusers-bf16-compile")
CIFAR10_TRAIN = 50_000
EXAMPLE_EPOCHS = 100     # --num_epochs default: the cosine schedule's length


def ddpm_card(tiny: bool):
    overrides = {"params": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8]}} if tiny else None
    return load_card("ddpm", overrides)


def flops_of(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def bench_diffusers(dev, batch: int, steps: int, warmup: int, size: int, tiny: bool, bf16: bool,
                    compile_mode: str | None, seed: int = 0) -> dict:
    """The example's training step, timed; returns per-step seconds, warm-up seconds, FLOPs, memory."""
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    model = diffusers_unet(tiny).to(dev).train()
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                   model_cls=UNet2DModel, model_config=model.config)
    ema.to(dev)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=500,
                             num_training_steps=math.ceil(CIFAR10_TRAIN / batch) * EXAMPLE_EPOCHS)
    weight_dtype = torch.bfloat16 if bf16 else torch.float32
    data = synthetic_data(DataSpec((3, size, size)), 4 * batch, seed)
    pool = (data.x.to(dev).float() / 127.5 - 1.0).view(4, batch, 3, size, size)   # ToTensor + Normalize(0.5, 0.5)
    fwd = torch.compile(model, mode=compile_mode) if compile_mode else model
    logs = {}

    def step(i: int, unet=fwd):
        clean = pool[i % 4].to(weight_dtype)
        noise = torch.randn(clean.shape, dtype=weight_dtype, device=clean.device)
        t = torch.randint(0, sched.config.num_train_timesteps, (clean.shape[0],), device=clean.device).long()
        noisy = sched.add_noise(clean, noise, t)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            out = unet(noisy, t).sample
        loss = F.mse_loss(out.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        opt.zero_grad()
        ema.step(model.parameters())
        logs.update(loss=loss.detach().item(), lr=lr_sched.get_last_lr()[0], step=i, ema_decay=ema.cur_decay_value)

    flop = flops_of(lambda: step(0, unet=model))       # eager, before any compilation
    sync(dev)
    t0 = time.perf_counter()
    for i in range(warmup):
        step(1 + i)
    sync(dev)
    warm = time.perf_counter() - t0
    reset_peak_memory(dev)
    t0 = time.perf_counter()
    for i in range(steps):
        step(1 + warmup + i)
    sync(dev)
    per_step = (time.perf_counter() - t0) / steps
    return {"per_step_s": per_step, "warmup_s": warm, "flop_per_step": flop, "peak_mem_mb": peak_memory_mb(dev),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "last_loss": logs.get("loss"),
            "finite": math.isfinite(logs.get("loss", math.nan))}


def bench_genbench(dev, batch: int, steps: int, warmup: int, size: int, tiny: bool, fast: TrainFastPath,
                   seed: int = 0) -> dict:
    import torch._dynamo

    torch._dynamo.reset()      # each configuration compiles afresh
    card = ddpm_card(tiny)
    (row,) = bench_train_card(card, DataSpec((3, size, size)), dev, batch, steps, fast, warmup=warmup,
                              peak_tflops=None, seed=seed)
    return {"per_step_s": row["ms_per_step"] / 1000, "warmup_s": row["warmup_s"],
            "flop_per_step": row["gflop_per_step"] * 1e9 if row["gflop_per_step"] else None,
            "peak_mem_mb": row["peak_mem_mb"], "params_m": row["params_m"], "finite": not row["diverged"],
            "fast_path": row["fast_path"]}


def summarise(rows: list[dict], peak: float | None, peak_source: str | None, dev, a) -> dict:
    """Fill in ratios and MFU; write the JSON (after every configuration: a run cut short keeps the rest)."""
    base = {r["config"]: r["img_per_s"] for r in rows if r["config"].startswith("diffusers")}
    for r in rows:
        prec = "bf16" if "bf16" in r["config"] else "fp32"
        r["x_diffusers_fp32"] = r["img_per_s"] / base["diffusers-fp32"] if "diffusers-fp32" in base else None
        same = base.get(f"diffusers-{prec}")
        r["x_diffusers_same_precision"] = r["img_per_s"] / same if same else None
        r["tflops"] = r["flop_per_step"] / r["per_step_s"] / 1e12 if r["flop_per_step"] else None
        r["mfu"] = mfu(r["flop_per_step"], r["per_step_s"], peak)
    meta = {"device": device_name(dev), "torch": torch.__version__, "batch": a.batch, "timed_steps": a.steps,
            "warmup_steps": a.warmup, "tiny": a.tiny, "threads": torch.get_num_threads(), "peak_tflops": peak, "peak_source": peak_source,
            "diffusers": _version("diffusers")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(a.out.suffix + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    tmp.replace(a.out)
    return meta


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # noqa: BLE001
        return None


def _f(v, fmt, scale=1.0, suffix=""):
    return "–" if v is None else format(v * scale, fmt) + suffix


def table(rows: list[dict]) -> str:
    out = ["| config | img/s | ms/step | × diffusers fp32 | × diffusers same precision | GFLOP/step | TFLOP/s | MFU "
           "| peak MB | warm-up s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['config']} | {r['img_per_s']:.2f} | {1000 * r['per_step_s']:.1f} | "
                   f"{_f(r['x_diffusers_fp32'], '.2f')} | {_f(r['x_diffusers_same_precision'], '.2f')} | "
                   f"{_f(r['flop_per_step'], '.2f', 1e-9)} | {_f(r['tflops'], '.3f')} | "
                   f"{_f(r['mfu'], '.1f', 100, '%')} | {r['peak_mem_mb']:.0f} | {r['warmup_s']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=128, help="images per step on both sides (the ddpm card's 128)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=3, help="steps before timing (compilation, CUDA graph capture)")
    ap.add_argument("--configs", default="diffusers-fp32,diffusers-bf16,genbench-fp32,genbench-bf16",
                    help="comma-separated; known: " + ", ".join([*DIFFUSERS, *GENBENCH]))
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak FLOP/s for MFU (default: the device's bf16 dense peak from genbench.bench.PEAK_TFLOPS; "
                         "none on a CPU)")
    ap.add_argument("--tiny", action="store_true", help="small networks at 16x16: a wiring check on a CPU")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: torch's); 1 on a shared CPU, where two threads per process "
                         "can make a step many times slower")
    ap.add_argument("--out", type=Path, default=Path("results/bench_training.json"))
    a = ap.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(max(1, a.threads))
    if a.tiny and "--batch" not in (argv if argv is not None else sys.argv[1:]):
        a.batch = 4
    if a.tiny and "--steps" not in (argv if argv is not None else sys.argv[1:]):
        a.steps, a.warmup = 2, 1
    configs = [c for c in a.configs.split(",") if c]
    unknown = [c for c in configs if c not in DIFFUSERS and c not in GENBENCH]
    if unknown:
        print(f"error: unknown config(s) {', '.join(unknown)}; known: {', '.join([*DIFFUSERS, *GENBENCH])}",
              file=sys.stderr)
        return 2
    if a.batch < 1 or a.steps < 1 or a.warmup < 0:
        print("error: --batch and --steps must be at least 1, --warmup at least 0", file=sys.stderr)
        return 2
    try:
        dev = torch.device(a.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("no CUDA device here")
        peak, peak_source = peak_tflops_for(dev, a.peak_tflops)
    except Exception as e:  # noqa: BLE001 - one line, exit 2, before any work
        print(f"error: {e}", file=sys.stderr)
        return 2
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    size = 16 if a.tiny else 32
    rows = []
    for cfg in configs:
        t0 = time.time()
        if cfg.startswith("diffusers"):
            r = bench_diffusers(dev, a.batch, a.steps, a.warmup, size, a.tiny, bf16="bf16" in cfg,
                                compile_mode="default" if cfg.endswith("compile") else None)
        else:
            fast = GENBENCH[cfg]
            r = bench_genbench(dev, a.batch, a.steps, a.warmup, size, a.tiny, fast)
            r["train_fast_path"] = dataclasses.asdict(fast)
        r.update(config=cfg, img_per_s=a.batch / r["per_step_s"], wall_s=time.time() - t0)
        rows.append(r)
        print(f"{cfg}: {r['img_per_s']:.2f} img/s ({1000 * r['per_step_s']:.1f} ms/step, warm-up {r['warmup_s']:.2f} s, "
              f"{r['flop_per_step'] / 1e9 if r['flop_per_step'] else float('nan'):.2f} GFLOP/step)", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        meta = summarise(rows, peak, peak_source, dev, a)
    print(f"\n{meta['device']}, batch {a.batch}, {a.steps} timed steps after {a.warmup}, torch {torch.__version__}, "
          f"diffusers {meta['diffusers']}, peak {peak} TFLOP/s ({peak_source})")
    print(table(rows))
    print(f"raw: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
