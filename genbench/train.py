"""The one training loop, for every family.

Budget in kimg (thousands of training images seen), split over the family's phases by their share.
The family owns its optimisation step; the loop owns everything around it: batching, bf16 autocast on
CUDA, the EMA copy used for sampling, the stability log, divergence detection, cheap evaluations for
quality-vs-kimg curves, and atomic checkpoints that let an interrupted run continue where it stopped.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from genbench.data import Data
from genbench.families.base import Batch, GenerativeModel
from genbench.store import CHECKPOINT_FILE, atomic_torch_save

# A loss this large is a blow-up even where no NaN appears (GAN losses are O(1..100)).
LOSS_EXPLOSION = 1e6


@dataclass
class TrainState:
    phase_index: int = 0
    phase_kimg: float = 0.0          # kimg done inside the current phase
    kimg: float = 0.0                # kimg done over all phases
    steps: int = 0
    wall_s: float = 0.0
    diverged_at_kimg: float | None = None
    diverged_reason: str | None = None
    log: list[dict] = field(default_factory=list)      # stability log rows
    curves: list[dict] = field(default_factory=list)   # cheap evaluation rows

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TrainResult:
    model: GenerativeModel            # the weights to sample from (the EMA copy when enabled)
    state: TrainState

    @property
    def diverged(self) -> bool:
        return self.state.diverged_at_kimg is not None


def _bad_log(logs: dict[str, float]) -> str | None:
    for k, v in logs.items():
        if not math.isfinite(v):
            return f"{k} is {v}"
        if k.startswith("loss") and abs(v) > LOSS_EXPLOSION:
            return f"{k} exploded to {v:.3g}"
    return None


def ema_decay_at(decay: float, step: int) -> float:
    """The decay used at optimizer step `step` (1-based): min(decay, (1 + step) / (10 + step)).

    Warm-up as in TensorFlow's ExponentialMovingAverage(num_updates): without it, a 0.9999 average
    still holds 0.9999^k of the random initial weights after k steps (97% after 300), and sampling
    from that mixture gives noise for any budget much shorter than 1 / (1 - decay) steps."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def _ema_update(ema: GenerativeModel, model: GenerativeModel, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):   # running stats, codebooks: copied as is
        be.copy_(bm)


def _save_checkpoint(path: Path, model, ema, opts, state: TrainState, gen: torch.Generator,
                     perm: torch.Tensor, pos: int) -> None:
    # Everything the next step depends on, so a resumed run matches an uninterrupted one.
    atomic_torch_save(path, {"model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                             "optimizers": {k: o.state_dict() for k, o in opts.items()},
                             "state": state.to_dict(), "batch_rng": gen.get_state(),
                             "torch_rng": torch.get_rng_state(), "perm": perm, "pos": pos})


def _load_checkpoint(path: Path, model, ema, device, log) -> dict | None:
    """The checkpoint's contents loaded into model (and ema); None when there is none. A checkpoint that
    cannot be used is renamed aside (checkpoint.pt.corrupt-N) and training starts from scratch."""
    if not path.is_file():
        return None
    init = copy.deepcopy(model.state_dict())
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(ckpt, dict) or not {"model", "state", "batch_rng", "torch_rng", "perm", "pos"} <= set(ckpt):
            raise ValueError("not a genbench checkpoint")
        model.load_state_dict(ckpt["model"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        TrainState(**ckpt["state"])
        return ckpt
    except Exception as e:  # noqa: BLE001 - any failure to use it means: set it aside, start over
        model.load_state_dict(init)
        if ema is not None:
            ema.load_state_dict(init)
        from genbench.store import set_aside

        moved = set_aside(path)
        if log is not None:
            log(f"checkpoint {path} could not be used ({type(e).__name__}: {str(e)[:200]}); "
                f"moved to {moved.name}, training starts over")
        return None


def train(model: GenerativeModel, data: Data, *, budget_kimg: float, batch_size: int, seed: int,
          run_dir: Path | None = None, ema_decay: float | None = None, checkpoint_every_s: float = 60.0,
          cheap_eval: Callable[[GenerativeModel, float], dict] | None = None,
          every_kimg: float | None = None, progress: bool = True, bf16: bool = True,
          inject_nan_at_step: int | None = None, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train `model` on `data` for `budget_kimg`; resume from run_dir/checkpoint.pt when present.

    `bf16`: autocast the training steps to bf16 on CUDA (never on a CPU, where it is slow).
    `inject_nan_at_step` replaces one step's logs with NaN: the divergence path, testable on CPU.
    A checkpoint that does not load (truncated, garbage, from another model) is set aside with a line
    through `log` and training starts over, instead of failing the same way on every rerun.
    """
    device = model.device
    use_bf16 = bf16 and device.type == "cuda"
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(model).requires_grad_(False) if ema_decay else None
    state = TrainState()
    phases = model.phases()
    ckpt_path = Path(run_dir) / CHECKPOINT_FILE if run_dir else None
    ckpt = _load_checkpoint(ckpt_path, model, ema, device, log) if ckpt_path is not None else None
    if ckpt is not None:
        state = TrainState(**ckpt["state"])
        gen.set_state(ckpt["batch_rng"])
        torch.set_rng_state(ckpt["torch_rng"])

    bar = tqdm(total=round(budget_kimg, 3), initial=round(state.kimg, 3), unit="kimg", disable=not progress,
               desc="train", bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} kimg [{elapsed}<{remaining}{postfix}]")
    t_start = time.time() - state.wall_s
    t_ckpt = time.time()
    next_eval = (math.floor(state.kimg / every_kimg) + 1) * every_kimg if every_kimg else math.inf
    n = len(data)
    perm, pos = (ckpt["perm"], ckpt["pos"]) if ckpt is not None else (torch.randperm(n, generator=gen), 0)
    while state.phase_index < len(phases) and state.diverged_at_kimg is None:
        phase = phases[state.phase_index]
        phase_budget = budget_kimg * phase.share
        model.start_phase(phase)
        opts = model.configure_optimizers(phase)
        if ckpt is not None and ckpt["optimizers"] and set(ckpt["optimizers"]) == set(opts):
            for k, o in opts.items():
                o.load_state_dict(ckpt["optimizers"][k])
        ckpt = None
        model.train()
        while state.phase_kimg < phase_budget - 1e-9:
            if pos + batch_size > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos:pos + batch_size]
            pos += batch_size
            x = data.model_input(idx).to(device, non_blocking=True)
            y = data.y[idx].to(device) if data.y is not None else None
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                logs = model.train_step(Batch(x, y), phase, opts)
            logs = {k: float(v) for k, v in logs.items()}
            if inject_nan_at_step is not None and state.steps == inject_nan_at_step:
                logs = {k: math.nan for k in logs} or {"loss": math.nan}
            state.steps += 1
            done = len(idx) / 1000.0
            state.phase_kimg += done
            state.kimg += done
            # whole batches overshoot the budget by up to one batch: the bar stops at its total
            bar.update(max(0.0, min(done, bar.total - bar.n)))
            state.log.append({"kimg": round(state.kimg, 4), "phase": phase.name, **logs})
            bad = _bad_log(logs)
            if bad is not None:
                state.diverged_at_kimg, state.diverged_reason = round(state.kimg, 4), bad
                break
            if ema is not None:
                _ema_update(ema, model, ema_decay_at(ema_decay, state.steps))
            if state.kimg >= next_eval - 1e-9 and cheap_eval is not None:
                sampler_model = ema if ema is not None else model
                state.curves.append({"kimg": round(state.kimg, 3), **cheap_eval(sampler_model, state.kimg)})
                model.train()
                next_eval += every_kimg
            if ckpt_path is not None and time.time() - t_ckpt > checkpoint_every_s:
                state.wall_s = time.time() - t_start
                _save_checkpoint(ckpt_path, model, ema, opts, state, gen, perm, pos)
                t_ckpt = time.time()
        else:
            state.phase_index += 1
            state.phase_kimg = 0.0
    bar.close()
    state.wall_s = time.time() - t_start
    final = ema if ema is not None else model
    final.eval()
    return TrainResult(final, state)
