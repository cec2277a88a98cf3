"""Sampling speed: genbench's `ddpm` card beside diffusers' UNet2DModel + DDPMScheduler loop, same GPU,
same batch, same network size (the DDPM CIFAR-10 UNet, 35.7 M parameters).

Every configuration runs the same ancestral DDPM update; a 1000-step loop repeats an identical step,
so each configuration is timed over --steps steps after a warm-up and reported as img/s at 1000 steps
(batch / (1000 x seconds per step)). Compile time is reported apart. Achieved FLOP/s come from
torch's FlopCounterMode on one forward (2 FLOP per multiply-add), compared with --peak-tflops.

    python bench/sampling_vs_diffusers.py --batch 1024 --steps 20 --out results/bench_sampling.json
    python bench/sampling_vs_diffusers.py --device cpu --tiny     # wiring check on a CPU
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from genbench.config import load_card
from genbench.families import get_family
from genbench.families.base import DataSpec
from genbench.fastpath import FastPath, autocast, prepare
from genbench.rng import SeedRNG


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev, repeats=1):
    sync(dev)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(dev)
    return (time.perf_counter() - t) / repeats


def diffusers_unet(tiny: bool):
    from diffusers import UNet2DModel

    if tiny:
        return UNet2DModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    # google/ddpm-cifar10-32's configuration: the DDPM paper's CIFAR-10 network.
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(128, 256, 256, 256),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       dropout=0.1, norm_num_groups=32, attention_head_dim=None)


def bench_diffusers(dev, batch, steps, size, tiny, bf16=False, compile_mode=None):
    """diffusers' DDPMPipeline loop, written out: unet(x, t).sample then scheduler.step."""
    from diffusers import DDPMScheduler

    unet = diffusers_unet(tiny).to(dev).eval()
    if compile_mode:
        unet = torch.compile(unet, mode=compile_mode)
    sched = DDPMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(1000)
    g = torch.Generator(device=dev).manual_seed(0)
    x0 = torch.randn(batch, 3, size, size, generator=g, device=dev)
    ts = sched.timesteps[: steps + 2]

    def loop(tlist):
        x = x0
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            for t in tlist:
                eps = unet(x, t).sample
                x = sched.step(eps, t, x, generator=g).prev_sample
        return x

    warm = timed(lambda: loop(ts[:2]), dev)                       # warm-up / compile
    per_step = timed(lambda: loop(ts[2:]), dev) / steps
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    return {"per_step_s": per_step, "warmup_s": warm, "params_m": params}, unet


# genbench config suffix -> FastPath compile mode ("cdtune" is the name the tuned mode was first measured under)
GENBENCH_COMPILE = {"compile": "default", "cudagraphs": "reduce-overhead", "tuned": "tuned", "cdtune": "tuned",
                    "autotune": "max-autotune"}


def genbench_model(dev, tiny):
    card = load_card("ddpm")
    params = dict(card.params)
    if tiny:
        params.update(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8])
    size = 16 if tiny else 32
    return get_family("diffusion")(DataSpec((3, size, size), 10), **params).to(dev).eval(), size


def bench_genbench(dev, batch, steps, tiny, fast: FastPath):
    import torch._dynamo

    torch._dynamo.reset()          # each config compiles afresh (else dynamo's cache limit can fall back to eager)
    torch._dynamo.utils.counters.clear()
    model, size = genbench_model(dev, tiny)
    prepare(model, dev, fast)
    rng = SeedRNG.for_run(0, batch, device=dev)

    def run(k):
        with torch.no_grad(), autocast(dev, fast):
            return model.sample(rng, steps=k, sampler="ancestral", variance="large")

    warm = timed(lambda: run(2), dev) + timed(lambda: run(steps), dev)   # compile + shape warm-up
    per_step = timed(lambda: run(steps), dev) / steps
    params = sum(p.numel() for p in model.parameters()) / 1e6
    graphs = torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)   # 0: nothing was compiled
    return {"per_step_s": per_step, "warmup_s": warm, "params_m": params, "graphs_compiled": graphs}, model, run


def profile_steps(run, dev, steps=2, rows=15) -> None:
    """Print the kernels that take the device's time in `run(steps)` (where to work next)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    try:
        with profile(activities=acts) as prof:
            run(steps)
            sync(dev)
        key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60), flush=True)
    except Exception as e:   # a profiler failure must not cost the timings already taken
        print(f"profile failed: {type(e).__name__}: {e}", flush=True)


def flops_per_image(net_call, dev) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net_call()
    return fc.get_total_flops()


def summarise(rows: list[dict], flops: float | None, dev, a) -> dict:
    """Fill in each row's ratio to diffusers and share of peak; write the JSON; return its meta."""
    base = next((r["img_per_s_1000_steps"] for r in rows if r["config"] == "diffusers-fp32"), None)
    for r in rows:
        r["speedup_vs_diffusers_fp32"] = r["img_per_s_1000_steps"] / base if base else None
        r["tflops"] = r["img_per_s_1000_steps"] * 1000 * flops / 1e12 if flops else None
        r["share_of_peak"] = r["tflops"] / a.peak_tflops if flops else None
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "batch": a.batch, "timed_steps": a.steps,
            "gflop_per_forward": flops / 1e9 if flops else None, "peak_tflops": a.peak_tflops}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return meta


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    ap.add_argument("--peak-tflops", type=float, default=790.0,
                    help="bf16 dense peak to compare with (H100/H200: ~790 measured on 8192^3 matmuls)")
    ap.add_argument("--configs", default="diffusers-fp32,genbench-fp32,genbench-bf16,genbench-bf16-compile,"
                                          "genbench-bf16-cudagraphs,diffusers-bf16-compile",
                    help="comma-separated; also known: genbench-bf16-tuned (genbench's --compile tuned: CUDA graphs "
                         "+ inductor's coordinate-descent tuning; also as -cdtune), genbench-bf16-autotune (max-autotune)")
    ap.add_argument("--tiny", action="store_true", help="small networks: a wiring check on CPU")
    ap.add_argument("--profile", default=None, metavar="CONFIG",
                    help="after timing this genbench config, print its top kernels over two steps")
    ap.add_argument("--out", type=Path, default=Path("results/bench_sampling.json"))
    a = ap.parse_args()
    configs = a.configs.split(",")
    known = {"diffusers-fp32", "diffusers-bf16", "diffusers-bf16-compile", "genbench-fp32", "genbench-bf16",
             *(f"genbench-bf16-{k}" for k in GENBENCH_COMPILE)}
    unknown = [c for c in configs if c not in known]
    if unknown:   # a typo must not quietly time an uncompiled model under a compiled config's name
        print(f"error: unknown config(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}", file=sys.stderr)
        return 2
    if a.profile is not None and (a.profile not in configs or not a.profile.startswith("genbench")):
        print(f"error: --profile {a.profile} must be one of the genbench configs in --configs", file=sys.stderr)
        return 2
    dev = torch.device(a.device)
    torch.backends.cudnn.benchmark = True
    size = 16 if a.tiny else 32
    rows = []
    flops = None
    for cfg in configs:
        t0 = time.time()
        if cfg.startswith("diffusers"):
            bf16 = "bf16" in cfg
            r, unet = bench_diffusers(dev, a.batch, a.steps, size, a.tiny, bf16=bf16,
                                      compile_mode="default" if "compile" in cfg else None)
        else:
            fast = FastPath(bf16="bf16" in cfg, channels_last="bf16" in cfg, compile=GENBENCH_COMPILE.get(
                cfg.rsplit("-", 1)[-1], "off"))
            r, model, run = bench_genbench(dev, a.batch, a.steps, a.tiny, fast)
            if cfg == a.profile:
                profile_steps(run, dev)
            if flops is None:
                x = torch.zeros(1, 3, size, size, device=dev)
                t = torch.zeros(1, dtype=torch.long, device=dev)
                flops = flops_per_image(lambda: model.net(x, t), dev)
        img_s = a.batch / (1000 * r["per_step_s"])
        rows.append({"config": cfg, "img_per_s_1000_steps": img_s, **r, "wall_s": time.time() - t0})
        print(f"{cfg}: {img_s:.2f} img/s at 1000 steps (step {1000 * r['per_step_s']:.1f} ms, "
              f"warm-up {r['warmup_s']:.1f} s, graphs compiled {r.get('graphs_compiled', '-')})", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        meta = summarise(rows, flops, dev, a)    # after every config: a run killed at its limit keeps the rest
    print(f"\n{meta['device']}, batch {a.batch}, {meta['gflop_per_forward']:.2f} GFLOP/forward, torch {torch.__version__}")
    print("| config | img/s @1000 steps | x diffusers fp32 | TFLOP/s | share of peak | warm-up s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        sp = f"{r['speedup_vs_diffusers_fp32']:.2f}" if r["speedup_vs_diffusers_fp32"] else "-"
        print(f"| {r['config']} | {r['img_per_s_1000_steps']:.2f} | {sp} | {r['tflops']:.1f} | "
              f"{100 * r['share_of_peak']:.1f}% | {r['warmup_s']:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
