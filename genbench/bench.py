"""`genbench bench`: the sampling cost (default) or the training-step cost (`--train`) of every card in a
suite, independent of a run.

Neither cost depends on the weights or the pixels, so cards are built untrained at the suite's
configuration and timed with warm-up and device sync. Compilation time is measured apart from
throughput (the first, compiling calls are the warm-up).

Training (bench_training): each phase of each card is timed over `steps` training steps after
`warmup` steps, exactly as genbench.train runs them (the same batches, bf16 autocast, channels_last,
fused optimizers, compiled networks, log buffer and EMA update), on seeded synthetic data of the
dataset's shape. FLOPs per step come from torch's FlopCounterMode over one eager step (forward and
backward: the matmuls and convolutions it counts, 2 FLOP per multiply-add; optimizer and element-wise
work are not counted, as MFU usually is), and MFU = achieved FLOP/s / the device's peak FLOP/s
(PEAK_TFLOPS, or peak_tflops given; None on a CPU unless given).
"""
from __future__ import annotations

import copy
import time

import torch

from genbench import data as gdata
from genbench.config import Suite, suite_cards
from genbench.errors import DataNotFound, UserError
from genbench.scoring import balanced_labels
from genbench.families import get_family
from genbench.families.base import DataSpec
from genbench.fastpath import FastPath, autocast, prepare
from genbench.rng import SeedRNG
from genbench.timing import SamplingTimer, peak_memory_mb, reset_peak_memory, sync


# Shapes of datasets whose files a bench can do without ([C, side, side] at the native side, classes):
# neither cost depends on the pixels, so `genbench bench --suite cifar10` runs on a machine without them.
KNOWN_SPECS = {"cifar10": (3, 32, 10)}


def data_spec(name: str, image_size: int | None, data_root=None) -> DataSpec:
    """The shape a card is built for, without loading a whole dataset where it can be avoided (and
    without its files at all for KNOWN_SPECS)."""
    try:
        d = gdata.load(name, "test", root=data_root, image_size=image_size, size=16)
    except DataNotFound:
        if name not in KNOWN_SPECS:
            raise
        c, side, classes = KNOWN_SPECS[name]
        return DataSpec((c, image_size or side, image_size or side), classes)
    return d.spec


def card_sampler(card, model, override: dict | None) -> dict:
    """The card's sampler with the user's override (e.g. --steps) for the options its family has; a
    value the family refuses (steps beyond T) is the user's mistake: one clear line, before any timing."""
    sampler = {**card.sampler, **{k: v for k, v in (override or {}).items() if k in model.sampler_options}}
    try:
        model.nfe(**sampler)   # validates the sampler options (diffusion: steps within [1, T])
    except ValueError as e:
        raise UserError(f"card {card.name!r}: {e}") from None
    return sampler


def bench_card(card, spec: DataSpec, device: torch.device, batch_size: int, n_batches: int,
               fast: FastPath, sampler: dict | None = None, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = get_family(card.family)(spec, **card.params).to(device).eval()
    sampler = card_sampler(card, model, sampler)
    prepare(model, device, fast)
    labels = balanced_labels(batch_size, spec.num_classes).to(device) if model.conditional else None
    rng = SeedRNG.for_run(seed, batch_size * (n_batches + 1), device=device)

    def one(b: int):
        with torch.no_grad(), autocast(device, fast):
            return model.sample(rng[b * batch_size:(b + 1) * batch_size], labels=labels, **sampler)

    sync(device)
    t0 = time.perf_counter()
    one(0)                                   # warm-up (and compilation when enabled)
    sync(device)
    warmup_s = time.perf_counter() - t0
    timer = SamplingTimer(device)
    timer.times.append((batch_size, warmup_s))   # summary() drops the first batch: the warm-up
    for b in range(1, n_batches + 1):
        with timer.batch(batch_size):
            one(b)
    out = timer.summary(model.nfe(**sampler), batch_size)
    out.update({"card": card.name, "family": card.family, "sampler": sampler,
                "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                "warmup_s": warmup_s, "fast_path": fast.describe(device)})
    return out


def bench_suite(suite: Suite, device: torch.device, batch_sizes: list[int], n_batches: int, fast: FastPath,
                only: tuple[str, ...] = (), sampler: dict | None = None, data_root=None, log=print) -> list[dict]:
    specs = {ds.name: data_spec(ds.name, ds.image_size, data_root) for ds in suite.datasets}
    for ds in suite.datasets:   # every card's sampler checked before the first one is timed
        for card in suite_cards(suite, only):
            card_sampler(card, get_family(card.family)(specs[ds.name], **card.params), sampler)
    rows = []
    for ds in suite.datasets:
        spec = specs[ds.name]
        for card in suite_cards(suite, only):
            for bs in batch_sizes:
                r = bench_card(card, spec, device, bs, n_batches, fast, sampler)
                r["dataset"] = ds.name
                rows.append(r)
                log(f"{ds.name}/{card.name} batch {bs}: {r['img_per_s']:.1f} img/s, nfe {r['nfe']}")
    return rows


def sampling_table(rows: list[dict]) -> str:
    head = "| dataset | card | batch | img/s | ms/img | NFE | peak MB | warm-up s | device |\n|---|---|---:|---:|---:|---:|---:|---:|---|"
    lines = [f"| {r['dataset']} | {r['card']} | {r['batch_size']} | {r['img_per_s']:.2f} | {r['ms_per_img']:.2f} | "
             f"{r['nfe']} | {r['peak_mem_mb']:.0f} | {r['warmup_s']:.2f} | {r['device']} |" for r in rows]
    return "\n".join([head, *lines])


def table(rows: list[dict]) -> str:
    """The Markdown table of bench_suite's rows (sampling) or bench_training's rows (training)."""
    if rows and rows[0].get("mode") == "train":
        return training_table(rows)
    return sampling_table(rows)


# --------------------------------------------------------------------------- training


# bf16 dense tensor-core peaks in TFLOP/s, matched against torch.cuda.get_device_name (first match wins).
# NVIDIA's datasheets give the figures with 2:4 sparsity; dense is half of them:
#   H100 SXM / H200: "BF16 Tensor Core 1,979 teraFLOPS*" (* with sparsity) -> 989.4
#     (NVIDIA H100 Tensor Core GPU datasheet; NVIDIA H200 Tensor Core GPU datasheet / product brief)
#   H100 NVL: 1,671 -> 835.5;  H100 PCIe: 1,513 -> 756.5 (same H100 datasheet)
#   A100: "BF16 Tensor Core 312 TFLOPS | 624 TFLOPS*" -> 312 (NVIDIA A100 datasheet)
# The datasheet peak, not a measured one: the sampling bench's 790 TFLOP/s was an 8192^3 bf16 matmul
# measured on an H100/H200, about 80% of it. A device not listed gets MFU None unless --peak-tflops.
PEAK_TFLOPS = (
    ("H200", 989.4, "NVIDIA H200 datasheet: bf16 dense 989.4 TFLOP/s (1,979 with sparsity)"),
    ("H100 NVL", 835.5, "NVIDIA H100 datasheet: H100 NVL bf16 dense 835.5 TFLOP/s (1,671 with sparsity)"),
    ("H100 PCIe", 756.5, "NVIDIA H100 datasheet: H100 PCIe bf16 dense 756.5 TFLOP/s (1,513 with sparsity)"),
    ("H100", 989.4, "NVIDIA H100 datasheet: H100 SXM bf16 dense 989.4 TFLOP/s (1,979 with sparsity)"),
    ("A100", 312.0, "NVIDIA A100 datasheet: bf16 dense 312 TFLOP/s (624 with sparsity)"),
)


def device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_tflops_for(device, override: float | None = None) -> tuple[float | None, str | None]:
    """(peak TFLOP/s, where it comes from) for MFU: the override when given, else PEAK_TFLOPS by the CUDA
    device's name; (None, None) on a CPU or an unlisted device. Every row of a bench uses the bf16 dense
    peak, fp32 rows too, so their MFUs compare on one scale."""
    if override is not None:
        if override <= 0:
            raise UserError(f"--peak-tflops must be positive, got {override}")
        return float(override), "given (--peak-tflops)"
    name = device_name(device)
    if torch.device(device).type == "cuda":
        for key, tflops, source in PEAK_TFLOPS:
            if key.lower() in name.lower():
                return tflops, source
    return None, None


def mfu(flop_per_step: float | None, step_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s over the peak; None without a FLOP count or a peak."""
    if not flop_per_step or not peak_tflops or step_s <= 0:
        return None
    return flop_per_step / step_s / (peak_tflops * 1e12)


def synthetic_data(spec: DataSpec, n: int, seed: int = 0) -> gdata.Data:
    """Seeded stand-in training data of `spec`'s shape: uint8 images (or float points) and labels."""
    g = torch.Generator().manual_seed(seed)
    if spec.is_image:
        x = torch.randint(0, 256, (n, *spec.shape), generator=g, dtype=torch.uint8)
    else:
        x = torch.randn(n, *spec.shape, generator=g)
    y = torch.randint(0, spec.num_classes, (n,), generator=g) if spec.num_classes else None
    return gdata.Data("synthetic", "train", x, y, spec.num_classes)


def train_step_flops(model, data: gdata.Data, phase, batch_size: int, steps: int = 1, seed: int = 0) -> float:
    """FLOPs of one training step of `phase` (forward and backward; the mean over `steps` steps), counted
    by FlopCounterMode on an eager copy of `model` (the model itself is left as it was)."""
    from torch.utils.flop_counter import FlopCounterMode

    from genbench.train import Batcher

    m = copy.deepcopy(model)
    m.start_phase(phase)
    opts = m.configure_optimizers(phase)
    m.train()
    batches = Batcher(data, batch_size, torch.Generator().manual_seed(seed), m.device)
    with FlopCounterMode(display=False) as fc:
        for _ in range(steps):
            m.train_step(batches.next(), phase, opts)
    return fc.get_total_flops() / steps


def bench_train_card(card, spec: DataSpec, device, batch_size: int, steps: int, fast=None, *, warmup: int = 3,
                     peak_tflops: float | None = None, count_flops: bool = True, seed: int = 0,
                     data: gdata.Data | None = None) -> list[dict]:
    """Training-step cost of `card`, one row per phase of its family: img/s, ms per step, peak memory,
    FLOPs per step and MFU, warm-up (compilation included) timed apart. The steps are genbench.train's:
    its batches, autocast, fast path, log buffer and EMA."""
    from genbench.train import (Batcher, LogBuffer, TrainFastPath, TrainState, _ask_tensor_logs, _ema_update,
                                device_data, ema_decay_at, fuse_optimizers, uses_channels_last)
    from genbench.fastpath import compile_networks, uncompile_networks, uses_cudagraphs

    if steps < 1 or warmup < 0 or batch_size < 1:
        raise UserError("training bench: steps and the batch size must be at least 1, warm-up at least 0")
    fast = fast if fast is not None else TrainFastPath()
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    peak, peak_source = peak_tflops_for(device, peak_tflops)
    torch.manual_seed(seed)
    model = get_family(card.family)(spec, **card.params).to(device)
    data = data if data is not None else synthetic_data(spec, max(4 * batch_size, 256), seed)
    phases = model.phases()
    flops = {}
    if count_flops:   # before the fast path touches the model: eager, its own copy
        n_critic = int(getattr(model, "n_critic", 1) or 1)   # a GAN's step varies over its D:G cycle
        for ph in phases:
            flops[ph.name] = train_step_flops(model, data, ph, batch_size, steps=n_critic, seed=seed)
    ema = copy.deepcopy(model).requires_grad_(False) if card.ema else None
    use_bf16 = fast.bf16 and on_cuda
    channels_last = uses_channels_last(model, device, fast)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        if ema is not None:
            ema.to(memory_format=torch.channels_last)
    data, moved = device_data(data, device, fast)
    compiled = compile_networks(model, fast.compile)
    mark_step = uses_cudagraphs(fast.compile) and on_cuda
    tensor_logs = _ask_tensor_logs(model, fast.logs_every(device) > 1)
    rows = []
    try:
        for ph in phases:
            model.start_phase(ph)
            opts = model.configure_optimizers(ph)
            fused = fuse_optimizers(opts, device, fast)
            model.train()
            state = TrainState()
            logbuf = LogBuffer(state, fast.logs_every(device))
            batches = Batcher(data, batch_size, torch.Generator().manual_seed(seed), device,
                              channels_last=channels_last)

            def step():
                b = batches.next()
                if mark_step:
                    torch.compiler.cudagraph_mark_step_begin()
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                    logs = model.train_step(b, ph, opts)
                state.steps += 1
                state.kimg += b.x.shape[0] / 1000.0
                logbuf.add(ph.name, logs)
                if logbuf.full:
                    logbuf.flush()
                if ema is not None:
                    _ema_update(ema, model, ema_decay_at(card.ema, state.steps), foreach=fast.fused and on_cuda)

            sync(device)
            t0 = time.perf_counter()
            for _ in range(warmup):
                step()
            logbuf.flush()
            sync(device)
            warmup_s = time.perf_counter() - t0
            reset_peak_memory(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            logbuf.flush()
            sync(device)
            step_s = (time.perf_counter() - t0) / steps
            f = flops.get(ph.name)
            rows.append({
                "mode": "train", "card": card.name, "family": card.family, "phase": ph.name,
                "batch_size": batch_size, "steps": steps, "warmup_steps": warmup,
                "img_per_s": batch_size / step_s, "ms_per_step": 1000 * step_s,
                "peak_mem_mb": peak_memory_mb(device), "warmup_s": warmup_s,
                "gflop_per_step": f / 1e9 if f else None, "tflops": f / step_s / 1e12 if f else None,
                "peak_tflops": peak, "peak_source": peak_source, "mfu": mfu(f, step_s, peak),
                "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                "device": str(device), "device_name": device_name(device),
                "diverged": state.diverged_at_kimg is not None,
                "fast_path": {**fast.describe(device), "bf16": use_bf16, "channels_last": channels_last,
                              "compiled": compiled, "data_on_device": moved, "fused_optimizers": fused},
            })
    finally:
        uncompile_networks(model, compiled)
        _ask_tensor_logs(model, tensor_logs)
    return rows


def bench_training(suite: Suite, device, batch_sizes: list[int] | None = None, steps: int = 5, fast=None,
                   only: tuple[str, ...] = (), *, warmup: int = 3, peak_tflops: float | None = None,
                   count_flops: bool = True, data_root=None, seed: int = 0, log=print) -> list[dict]:
    """`genbench bench --train`: the training-step cost of every card of `suite` (one row per dataset,
    card, phase and batch size; batch_sizes None: each card's own batch size)."""
    peak_tflops_for(device, peak_tflops)   # a bad --peak-tflops fails before any timing
    specs = {ds.name: data_spec(ds.name, ds.image_size, data_root) for ds in suite.datasets}
    cards = suite_cards(suite, only)
    rows = []
    for ds in suite.datasets:
        for card in cards:
            for bs in (batch_sizes or [card.batch_size]):
                for r in bench_train_card(card, specs[ds.name], device, bs, steps, fast, warmup=warmup,
                                          peak_tflops=peak_tflops, count_flops=count_flops, seed=seed):
                    r["dataset"] = ds.name
                    rows.append(r)
                    m = f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
                    log(f"{ds.name}/{card.name} {r['phase']} batch {bs}: {r['img_per_s']:.1f} img/s, "
                        f"{r['ms_per_step']:.2f} ms/step{m}")
    return rows


def _num(v, fmt: str, scale: float = 1.0) -> str:
    return "–" if v is None else format(v * scale, fmt)


def training_table(rows: list[dict]) -> str:
    head = ("| dataset | card | phase | batch | img/s | ms/step | GFLOP/step | TFLOP/s | MFU | peak MB | warm-up s "
            "| device |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    lines = [f"| {r.get('dataset', '')} | {r['card']} | {r['phase']} | {r['batch_size']} | {r['img_per_s']:.1f} | "
             f"{r['ms_per_step']:.2f} | {_num(r['gflop_per_step'], '.3f')} | {_num(r['tflops'], '.3f')} | "
             f"{_num(r['mfu'], '.1f', 100)}{'%' if r['mfu'] is not None else ''} | {r['peak_mem_mb']:.0f} | "
             f"{r['warmup_s']:.2f} | {r['device_name']} |" for r in rows]
    return "\n".join([head, *lines])
