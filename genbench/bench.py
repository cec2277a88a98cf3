"""`genbench bench`: the sampling cost of every card in a suite, independent of training.

Sampling cost does not depend on the weights, so cards are built untrained at the suite's
configuration and timed with warm-up and device sync. Compilation time is measured apart from
throughput (the first, compiling call is the warm-up).
"""
from __future__ import annotations

import time

import torch

from genbench import data as gdata
from genbench.config import Suite, suite_cards
from genbench.errors import UserError
from genbench.scoring import balanced_labels
from genbench.families import get_family
from genbench.families.base import DataSpec
from genbench.fastpath import FastPath, autocast, prepare
from genbench.rng import SeedRNG
from genbench.timing import SamplingTimer, sync


def data_spec(name: str, image_size: int | None, data_root=None) -> DataSpec:
    """The shape a card is built for, without loading a whole dataset where it can be avoided."""
    d = gdata.load(name, "test", root=data_root, image_size=image_size, size=16)
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


def table(rows: list[dict]) -> str:
    head = "| dataset | card | batch | img/s | ms/img | NFE | peak MB | warm-up s | device |\n|---|---|---:|---:|---:|---:|---:|---:|---|"
    lines = [f"| {r['dataset']} | {r['card']} | {r['batch_size']} | {r['img_per_s']:.2f} | {r['ms_per_img']:.2f} | "
             f"{r['nfe']} | {r['peak_mem_mb']:.0f} | {r['warmup_s']:.2f} | {r['device']} |" for r in rows]
    return "\n".join([head, *lines])
