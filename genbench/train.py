"""The one training loop, for every family.

Budget in kimg (thousands of training images seen), split over the family's phases by their share.
The family owns its optimisation step; the loop owns everything around it: batching, the training fast
path (TrainFastPath: bf16 autocast, channels_last, fused optimizers, torch.compile, logs moved to the host
every K steps, the training set held on the device), the EMA copy used for sampling, the stability log,
divergence detection, cheap evaluations for quality-vs-kimg curves, and atomic checkpoints that let an
interrupted run continue where it stopped.

On a CPU every part of the fast path is off by default and training is bit-identical to the loop before
it (tests/test_train_fast.py holds it to a copy of that loop, family by family).

Under torchrun at world N > 1 (genbench/distributed.py) the same loop runs on every rank: rank r takes
its slice of the global batch one process would take, gradients are averaged over the ranks inside each
backward pass, buffers are rank 0's after each step, torch's generator is seeded per step from (seed,
step, rank), the logs are averaged over the ranks at each flush (so every rank takes the same divergence
decision), and only rank 0 writes checkpoints. At world 1 none of this runs.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from genbench import distributed as gdist
from genbench.data import Data, to_model_range
from genbench.families.base import Batch, GenerativeModel
from genbench.fastpath import compile_networks, uncompile_networks, uses_cudagraphs
from genbench.store import CHECKPOINT_FILE, atomic_torch_save

# A loss this large is a blow-up even where no NaN appears (GAN losses are O(1..100)).
LOSS_EXPLOSION = 1e6
# Steps between host transfers of the logs on CUDA when TrainFastPath.log_every is None.
CUDA_LOG_EVERY = 25
# Optimizers whose CUDA step has a fused kernel (torch.optim's `fused=True`): Adam and AdamW (one
# kernel for every tensor instead of a multi-tensor loop), SGD.
_FUSABLE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


@dataclass(frozen=True)
class TrainFastPath:
    """How training runs fast, each part switchable. Every part but `compile` and an explicit `log_every`
    applies on CUDA only: on a CPU the defaults train exactly as the loop always did.

    bf16            autocast the training steps to bf16 (losses stay float32 in the families)
    channels_last   NHWC weights, activations and input batches for image models
    fused           fused optimizer steps (Adam, AdamW, SGD: `fused=True`, set by the loop on the optimizers
                    a family makes) and a multi-tensor EMA update (torch._foreach_lerp_)
    compile         torch.compile each network of the model for the training step, in this mode (opt-in;
                    "reduce-overhead"/"tuned" add CUDA graphs of the networks' forward and backward);
                    applies on any device when asked, and the compiled forward is undone after training
    log_every       move the step logs to the host every K steps (one transfer for K steps' values, no
                    host sync inside a step); None: 25 on CUDA, 1 elsewhere. The divergence record stays
                    exact: the first non-finite value's step is found within the K and the run's state is
                    rewound to it
    data_on_device  hold the training set on the device (moved once, indexed there) when it fits in
                    `data_budget_mb` and a quarter of the device's free memory
    """
    bf16: bool = True
    channels_last: bool = True
    fused: bool = True
    compile: str = "off"
    log_every: int | None = None
    data_on_device: bool = True
    data_budget_mb: float = 2048.0

    def __post_init__(self):
        if self.log_every is not None and int(self.log_every) < 1:
            raise ValueError(f"log_every must be at least 1, got {self.log_every}")

    @staticmethod
    def off() -> "TrainFastPath":
        """Every part off on every device: the loop as it was (fp32, a host sync per step)."""
        return TrainFastPath(bf16=False, channels_last=False, fused=False, compile="off", log_every=1,
                             data_on_device=False)

    def logs_every(self, device) -> int:
        if self.log_every is not None:
            return int(self.log_every)
        return CUDA_LOG_EVERY if torch.device(device).type == "cuda" else 1

    def describe(self, device) -> dict:
        """What this fast path does on `device` (before the data and optimizers are known; train()
        returns what it actually used in TrainResult.fast_path)."""
        on_cuda = torch.device(device).type == "cuda"
        return {"bf16": self.bf16 and on_cuda, "channels_last": self.channels_last and on_cuda,
                "fused": self.fused and on_cuda, "compile": self.compile,
                "log_every": self.logs_every(device), "data_on_device": self.data_on_device and on_cuda}


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
    # What the loop used (TrainFastPath.describe plus the facts found while training: whether the data
    # fitted on the device, which optimizers were fused, the first steps' seconds, compilation included).
    fast_path: dict = field(default_factory=dict)

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


def host_logs(rows: list[dict]) -> list[dict[str, float]]:
    """Step logs (floats or 0-d tensors) as Python floats, with one host transfer per device for all the
    rows: exactly float(v) of each value (float64 holds float32, bf16 and small integers exactly)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for logs in rows:
        for v in logs.values():
            if isinstance(v, torch.Tensor):
                by_device.setdefault(v.device, []).append(v.detach().reshape(()).to(torch.float64))
    values = {d: iter(torch.stack(ts).tolist()) for d, ts in by_device.items()}
    return [{k: next(values[v.device]) if isinstance(v, torch.Tensor) else float(v) for k, v in logs.items()}
            for logs in rows]


@dataclass
class _Pending:
    """One step's logs, not yet on the host, with where the run stood after that step."""
    step: int              # 0-based index of the step (as inject_nan_at_step counts)
    kimg: float
    phase_kimg: float
    phase: str
    logs: dict


class LogBuffer:
    """Step logs held as they come (floats or 0-d device tensors) and moved to the host every K steps.

    flush() checks the rows in order; at the first non-finite or exploded value it rewinds the state to
    that step (steps, kimg, phase kimg, the log ending with that row) and marks the run diverged, so the
    record is the one a per-step check would have written. Steps run after it are discarded."""

    def __init__(self, state: TrainState, every: int, inject_nan_at_step: int | None = None,
                 reduce: Callable[[list[dict]], list[dict]] | None = None):
        self.state, self.every, self.inject = state, max(1, int(every)), inject_nan_at_step
        self.reduce = reduce   # across ranks (distributed.mean_logs), after any injected NaN
        self.rows: list[_Pending] = []

    def add(self, phase: str, logs: dict) -> None:
        st = self.state
        self.rows.append(_Pending(st.steps - 1, st.kimg, st.phase_kimg, phase,
                                  {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in logs.items()}))

    @property
    def full(self) -> bool:
        return len(self.rows) >= self.every

    def flush(self) -> bool:
        """Logs to the host and into state.log; True when the run diverged (state rewound)."""
        rows, self.rows = self.rows, []
        if not rows:
            return False
        st = self.state
        values = host_logs([r.logs for r in rows])
        if self.inject is not None:
            values = [({k: math.nan for k in logs} or {"loss": math.nan}) if row.step == self.inject else logs
                      for row, logs in zip(rows, values)]
        if self.reduce is not None:
            values = self.reduce(values)
        for row, logs in zip(rows, values):
            st.log.append({"kimg": round(row.kimg, 4), "phase": row.phase, **logs})
            bad = _bad_log(logs)
            if bad is not None:
                st.steps, st.kimg, st.phase_kimg = row.step + 1, row.kimg, row.phase_kimg
                st.diverged_at_kimg, st.diverged_reason = round(row.kimg, 4), bad
                return True
        return False


def ema_decay_at(decay: float, step: int) -> float:
    """The decay used at optimizer step `step` (1-based): min(decay, (1 + step) / (10 + step)).

    Warm-up as in TensorFlow's ExponentialMovingAverage(num_updates): without it, a 0.9999 average
    still holds 0.9999^k of the random initial weights after k steps (97% after 300), and sampling
    from that mixture gives noise for any budget much shorter than 1 / (1 - decay) steps."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def _ema_update(ema: GenerativeModel, model: GenerativeModel, decay: float, foreach: bool = False) -> None:
    pe, pm = list(ema.parameters()), [p.detach() for p in model.parameters()]
    be, bm = list(ema.buffers()), list(model.buffers())
    if foreach:   # one multi-tensor kernel per dtype instead of one per tensor (CUDA)
        if pe:
            torch._foreach_lerp_(pe, pm, 1.0 - decay)
        if be:
            torch._foreach_copy_(be, bm)
        return
    for a, b in zip(pe, pm):
        a.lerp_(b, 1.0 - decay)
    for a, b in zip(be, bm):   # running stats, codebooks: copied as is
        a.copy_(b)


# --------------------------------------------------------------------------- the fast path's parts


def device_data(data: Data, device, fast: TrainFastPath) -> tuple[Data, bool]:
    """`data` with x (and y) on `device` when the fast path asks for it and they fit the budget; else
    `data` itself. The caller's Data is never changed. Returns (data, moved)."""
    device = torch.device(device)
    if device.type != "cuda" or not fast.data_on_device:
        return data, False
    nbytes = data.x.numel() * data.x.element_size() + (data.y.numel() * 8 if data.y is not None else 0)
    budget = fast.data_budget_mb * 2**20
    try:
        budget = min(budget, torch.cuda.mem_get_info(device)[0] / 4)
    except Exception:  # noqa: BLE001 - no query: the configured budget alone
        pass
    if nbytes > budget:
        return data, False
    return dataclasses.replace(data, x=data.x.to(device), y=data.y.to(device) if data.y is not None else None), True


def uses_channels_last(model: GenerativeModel, device, fast: TrainFastPath) -> bool:
    spec = getattr(model, "spec", None)
    return (fast.channels_last and torch.device(device).type == "cuda" and spec is not None
            and spec.is_image)


def can_fuse(opt: torch.optim.Optimizer, device_type: str = "cuda") -> bool:
    """Whether torch has a fused step for this optimizer with all its parameters on `device_type`:
    Adam, AdamW or SGD, floating-point parameters, not differentiable."""
    if not isinstance(opt, _FUSABLE) or "fused" not in opt.defaults:
        return False
    params = [p for g in opt.param_groups for p in g["params"]]
    return bool(params) and not any(g.get("differentiable") for g in opt.param_groups) and all(
        p.device.type == device_type and p.is_floating_point() for p in params)


def set_fused(opt: torch.optim.Optimizer) -> None:
    """Switch an existing optimizer (fresh or with loaded state) to its fused step: the `fused` flag its
    step() reads from each parameter group, and `step` counters moved onto the parameters' device in
    float32, as the fused kernel wants them (a non-fused state keeps them on the host)."""
    for g in opt.param_groups:
        g["fused"], g["foreach"] = True, None
        for p in g["params"]:
            st = opt.state.get(p)
            if st and isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
    opt.defaults["fused"], opt.defaults["foreach"] = True, None
    opt._step_supports_amp_scaling = True


def fuse_optimizers(opts: dict[str, torch.optim.Optimizer], device, fast: TrainFastPath) -> list[str]:
    """The families' optimizers switched to their fused CUDA step where torch has one. Families make
    their optimizers (configure_optimizers) without knowing the fast path; the loop sets the flag after
    any checkpoint state is loaded. Returns the names of those that run fused (a GAN's Adam is fused
    by the family already; it is listed too)."""
    if not fast.fused or torch.device(device).type != "cuda":
        return []
    fused = []
    for name, opt in opts.items():
        if can_fuse(opt, "cuda"):
            if not all(g.get("fused") for g in opt.param_groups):
                set_fused(opt)
            fused.append(name)
    return fused


def _ask_tensor_logs(model, on) -> object:
    """Tell a family that the loop takes its logs as 0-d device tensors (`model.tensor_logs`; a family
    that honours it skips its per-step host transfer, as gan.py does; the others may return tensors
    anyway, the loop takes both). Returns the previous setting, for restoring it."""
    prev = model.__dict__.get("tensor_logs", _UNSET)
    if on is _UNSET:
        model.__dict__.pop("tensor_logs", None)
    else:
        model.__dict__["tensor_logs"] = on
    return prev


_UNSET = object()


# --------------------------------------------------------------------------- checkpoints and batches


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


class Batcher:
    """Training batches in a seeded random order, reshuffled when fewer than batch_size rows remain (the
    loop's order since the first version, so runs and resumed runs see the same batches). `perm` stays
    on the host for checkpoints; the indices used live where the data lives (no host copy per step).

    `part=(r, n)`: rank r of n gets rows [r * b/n, (r + 1) * b/n) of each global batch of b (the order and
    the global batches are the same at every world size)."""

    def __init__(self, data: Data, batch_size: int, gen: torch.Generator, device, *, perm=None, pos: int = 0,
                 channels_last: bool = False, part: tuple[int, int] | None = None):
        self.data, self.batch_size, self.gen, self.device = data, batch_size, gen, torch.device(device)
        self.channels_last = channels_last
        if part is not None and batch_size % part[1]:
            raise ValueError(f"batch size {batch_size} does not divide over {part[1]} ranks")
        self.part = part
        self.perm = perm if perm is not None else torch.randperm(len(data), generator=gen)
        self.pos = pos
        self._at = self._where(self.perm)

    def _where(self, perm: torch.Tensor) -> torch.Tensor:
        # one small copy per epoch; non_blocking: a blocking host-to-device copy waits for the device
        return perm.to(self.data.x.device, non_blocking=True) if self.data.x.device != perm.device else perm

    def next(self) -> Batch:
        if self.pos + self.batch_size > len(self.data):
            self.perm, self.pos = torch.randperm(len(self.data), generator=self.gen), 0
            self._at = self._where(self.perm)
        idx = self._at[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        if self.part is not None:   # this rank's slice of the global batch
            r, n = self.part
            b = self.batch_size // n
            idx = idx[r * b:(r + 1) * b]
        d = self.data
        if d.x.device == self.device or not d.is_image:
            x = d.model_input(idx).to(self.device, non_blocking=True)
        else:   # images from the host: the uint8 rows cross (a quarter of the bytes), then scale there
            x = to_model_range(d.x[idx].to(self.device, non_blocking=True))
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        y = d.y[idx].to(self.device, non_blocking=True) if d.y is not None else None
        return Batch(x, y)


def train(model: GenerativeModel, data: Data, *, budget_kimg: float, batch_size: int, seed: int,
          run_dir: Path | None = None, ema_decay: float | None = None, checkpoint_every_s: float = 60.0,
          cheap_eval: Callable[[GenerativeModel, float], dict] | None = None,
          every_kimg: float | None = None, progress: bool = True, bf16: bool = True,
          fast: TrainFastPath | None = None, on_step: Callable[[TrainState], None] | None = None,
          inject_nan_at_step: int | None = None, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train `model` on `data` for `budget_kimg`; resume from run_dir/checkpoint.pt when present.

    `fast`: the training fast path (TrainFastPath; default: every part on where it applies, which on a
    CPU is none). `bf16=False` turns its bf16 autocast off too (the runner's --no-train-bf16).
    `on_step(state)`: called after every step (the bench's timer); None in runs.
    `inject_nan_at_step` replaces one step's logs with NaN: the divergence path, testable on CPU.
    A checkpoint that does not load (truncated, garbage, from another model) is set aside with a line
    through `log` and training starts over, instead of failing the same way on every rerun.
    Returns the sampling weights, the state, and in `fast_path` what the fast path did.
    """
    fast = fast if fast is not None else TrainFastPath()
    device = model.device
    on_cuda = device.type == "cuda"
    use_bf16 = bf16 and fast.bf16 and on_cuda
    dist = gdist.current()   # None: one process, the loop as it always was
    n_ranks = dist.world if dist is not None else 1
    writes = dist is None or dist.main   # only rank 0 writes checkpoints
    if batch_size % n_ranks:
        raise ValueError(f"batch size {batch_size} does not divide over {n_ranks} ranks")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(model).requires_grad_(False) if ema_decay else None
    state = TrainState()
    phases = model.phases()
    ckpt_path = Path(run_dir) / CHECKPOINT_FILE if run_dir else None
    if dist is None:
        ckpt = _load_checkpoint(ckpt_path, model, ema, device, log) if ckpt_path is not None else None
    else:
        # Rank 0 reads the checkpoint (to the host: it travels by pickle) and hands it to every rank;
        # every rank loads it before its gradients are hooked up, then takes rank 0's weights (as DDP).
        ckpt = _load_checkpoint(ckpt_path, model, ema, "cpu", log) if ckpt_path is not None and writes else None
        ckpt = gdist.broadcast_object(ckpt)
        if ckpt is not None and not writes:
            model.load_state_dict(ckpt["model"])
            if ema is not None and ckpt.get("ema") is not None:
                ema.load_state_dict(ckpt["ema"])
        gdist.broadcast_module_(model)
        if ema is not None:
            gdist.broadcast_module_(ema)
    if ckpt is not None:
        # The checkpoint was loaded onto the model's device; the generators' states and the batch order
        # live on the host (a CUDA resume handed them over as CUDA tensors, which set_state refuses).
        state = TrainState(**ckpt["state"])
        gen.set_state(ckpt["batch_rng"].cpu())
        torch.set_rng_state(ckpt["torch_rng"].cpu())
        ckpt["perm"] = ckpt["perm"].cpu()

    channels_last = uses_channels_last(model, device, fast)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        if ema is not None:
            ema.to(memory_format=torch.channels_last)
    compiled = compile_networks(model, fast.compile)
    mark_step = uses_cudagraphs(fast.compile) and on_cuda
    foreach_ema = fast.fused and on_cuda
    data, data_moved = device_data(data, device, fast)
    logbuf = LogBuffer(state, fast.logs_every(device), inject_nan_at_step,
                       reduce=gdist.mean_logs if dist is not None else None)
    tensor_logs = _ask_tensor_logs(model, logbuf.every > 1)
    used = {**fast.describe(device), "bf16": use_bf16, "channels_last": channels_last, "compiled": compiled,
            "data_on_device": data_moved, "fused_optimizers": [], "first_step_s": []}

    bar = tqdm(total=round(budget_kimg, 3), initial=round(state.kimg, 3), unit="kimg", disable=not progress,
               desc="train", bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} kimg [{elapsed}<{remaining}{postfix}]")
    t_start = time.time() - state.wall_s
    t_ckpt = time.time()
    next_eval = (math.floor(state.kimg / every_kimg) + 1) * every_kimg if every_kimg else math.inf
    part = (dist.rank, dist.world) if dist is not None else None
    batches = (Batcher(data, batch_size, gen, device, perm=ckpt["perm"], pos=ckpt["pos"], channels_last=channels_last,
                       part=part)
               if ckpt is not None else Batcher(data, batch_size, gen, device, channels_last=channels_last, part=part))
    averager = None
    try:
        while state.phase_index < len(phases) and state.diverged_at_kimg is None:
            phase = phases[state.phase_index]
            phase_budget = budget_kimg * phase.share
            model.start_phase(phase)
            if dist is not None:
                # a phase may build or unfreeze networks: rank 0's weights, then its trainable set hooked
                gdist.broadcast_module_(model)
                if averager is not None:
                    averager.remove()
                averager = gdist.GradAverager(model.parameters())
            opts = model.configure_optimizers(phase)
            if ckpt is not None and ckpt["optimizers"] and set(ckpt["optimizers"]) == set(opts):
                for k, o in opts.items():
                    o.load_state_dict(ckpt["optimizers"][k])
            ckpt = None
            used["fused_optimizers"] += [f"{phase.name}/{k}" for k in fuse_optimizers(opts, device, fast)]
            model.train()
            first = compiled and state.phase_kimg < phase_budget - 1e-9
            t_first = time.perf_counter()
            while state.phase_kimg < phase_budget - 1e-9:
                batch = batches.next()
                if mark_step:
                    torch.compiler.cudagraph_mark_step_begin()
                if dist is not None:   # the families' noise: from (seed, step, rank), nothing to checkpoint
                    torch.manual_seed(gdist.step_seed(seed, state.steps, dist.rank))
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                    logs = model.train_step(batch, phase, opts)
                if dist is not None:   # batch-norm statistics, codebooks, counters: rank 0's
                    gdist.broadcast_module_(model, buffers_only=True)
                state.steps += 1
                done = batch.x.shape[0] * n_ranks / 1000.0
                state.phase_kimg += done
                state.kimg += done
                # whole batches overshoot the budget by up to one batch: the bar stops at its total
                bar.update(max(0.0, min(done, bar.total - bar.n)))
                logbuf.add(phase.name, logs)
                want_eval = state.kimg >= next_eval - 1e-9 and cheap_eval is not None
                want_ckpt = writes and ckpt_path is not None and time.time() - t_ckpt > checkpoint_every_s
                if dist is not None:
                    # a flush is a collective, so every rank must flush at the same steps: rank 0 saves at
                    # the first flush after its interval (every step on a CPU, every log_every on CUDA)
                    want_ckpt = want_ckpt and (logbuf.full or want_eval)
                # Logs reach the host every K steps, and always before anything that must not see a
                # diverged model: an evaluation point, a checkpoint, the next phase.
                if (logbuf.full or want_eval or want_ckpt) and logbuf.flush():
                    break
                if ema is not None:
                    _ema_update(ema, model, ema_decay_at(ema_decay, state.steps), foreach=foreach_ema)
                if first:
                    if on_cuda:
                        torch.cuda.synchronize(device)
                    used["first_step_s"].append(round(time.perf_counter() - t_first, 3))
                    first = False
                if on_step is not None:
                    on_step(state)
                if want_eval:
                    sampler_model = ema if ema is not None else model
                    state.curves.append({"kimg": round(state.kimg, 3), **cheap_eval(sampler_model, state.kimg)})
                    model.train()
                    next_eval += every_kimg
                if want_ckpt:
                    state.wall_s = time.time() - t_start
                    _save_checkpoint(ckpt_path, model, ema, opts, state, gen, batches.perm, batches.pos)
                    t_ckpt = time.time()
            else:
                if logbuf.flush():
                    break
                state.phase_index += 1
                state.phase_kimg = 0.0
    finally:
        if averager is not None:
            averager.remove()
        uncompile_networks(model, compiled)
        _ask_tensor_logs(model, tensor_logs)
    logbuf.flush()   # nothing is left unless a phase loop broke off (then the run has diverged already)
    bar.close()
    state.wall_s = time.time() - t_start
    final = ema if ema is not None else model
    final.eval()
    return TrainResult(final, state, used)
