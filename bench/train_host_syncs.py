"""Host syncs per training step, card by card: genbench.train under torch.cuda.set_sync_debug_mode("warn"),
which warns at every synchronising CUDA call (.item(), float(tensor), a host copy, a nonzero...).

The loop itself syncs once per K steps (TrainFastPath.log_every, 25 on CUDA) and at each phase's first
step when compiling; anything else comes from a family's train_step (the .item() of its logs, a host
read of a step counter). Each card is run with the loop as it was (log_every 1, every part off) and with
the default fast path, so the table shows what the loop removed and what the families still do.

    python bench/train_host_syncs.py --suite smoke --steps 30 --out results/train-host-syncs.json
    python bench/train_host_syncs.py --device cpu --steps 3      # wiring check: a CPU counts nothing
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

from genbench.bench import data_spec, synthetic_data
from genbench.config import load_suite, suite_cards
from genbench.families import get_family
from genbench.train import TrainFastPath, train


def count_syncs(card, spec, device, steps: int, fast: TrainFastPath, batch_size: int) -> dict:
    torch.manual_seed(0)
    model = get_family(card.family)(spec, **card.params).to(device)
    data = synthetic_data(spec, 4 * batch_size)
    on_cuda = device.type == "cuda"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if on_cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            res = train(model, data, budget_kimg=steps * batch_size / 1000, batch_size=batch_size, seed=0,
                        ema_decay=card.ema, progress=False, fast=fast)
        finally:
            if on_cuda:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where: dict[str, int] = {}
    for w in syncs:
        key = f"{Path(w.filename).name}:{w.lineno}"
        where[key] = where.get(key, 0) + 1
    n = res.state.steps
    return {"card": card.name, "steps": n, "syncs": len(syncs) if on_cuda else None,
            "syncs_per_step": len(syncs) / n if on_cuda and n else None,
            "where": dict(sorted(where.items(), key=lambda kv: -kv[1])[:8]), "fast_path": res.fast_path}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="smoke")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=None, help="default: each card's batch size")
    ap.add_argument("--only", default=None, help="comma-separated card names")
    ap.add_argument("--out", type=Path, default=Path("results/train-host-syncs.json"))
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device here", file=sys.stderr)
        return 2
    suite = load_suite(a.suite)
    only = tuple(c for c in (a.only or "").split(",") if c)
    rows = []
    for ds in suite.datasets:
        spec = data_spec(ds.name, ds.image_size)
        for card in suite_cards(suite, only):
            for label, fast in (("loop as before", TrainFastPath.off()), ("fast path", TrainFastPath())):
                r = count_syncs(card, spec, dev, a.steps, fast, a.batch or card.batch_size)
                r.update(dataset=ds.name, config=label)
                rows.append(r)
                per = "n/a (CUDA only)" if r["syncs_per_step"] is None else f"{r['syncs_per_step']:.2f}"
                print(f"{ds.name}/{card.name} [{label}]: {r['steps']} steps, host syncs per step {per}; "
                      f"top sites {r['where']}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"device": str(dev), "torch": torch.__version__, "rows": rows}, indent=2, default=str))
    print(f"raw: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
