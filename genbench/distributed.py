"""Data-parallel runs under torchrun: one process (rank) per device, NCCL between GPUs, gloo between CPUs.

`torchrun --nproc_per_node=N -m genbench run ...` (or `genbench run --nproc N`, which starts the same)
runs every run of a suite on all N ranks together. Nothing here is a process protocol of genbench's own:
ranks find each other through torch.distributed's env:// rendezvous (torchrun's store), and talk only
through its collectives and that store.

With WORLD_SIZE unset or 1 nothing in this module is used: no process group, and every code path of
train.py, evaluation.py and the runner is the one-process path it always was.

The rules, at world N > 1:

Sharding of sampling and feature extraction
    The n images of an evaluation point form ceil(n / b) batches of the evaluation batch size b, exactly
    the batches one process draws; rank r takes the contiguous block of batches
    [ceil(r * B / N), ceil((r + 1) * B / N)) (`shard`). Every image is therefore drawn with its own seed
    (SeedRNG, image index k) in the same batch as in one process, and reaches the extractor in that
    batch: its pixels and features are bit-identical to world 1 whatever the kernels' batch dependence.
    The block bounds are rounded up, so rank 0 always has the first batch; a later rank may get no
    batch at all (fewer than N batches); nothing is ever padded with duplicates.
Gathering
    Features (and 2-D points, and the images kept for samples.png) are gathered in rank order, which
    is image order (`gather_rows`: all_gather with padding and lengths). Rank 0 scores the gathered
    features with the one-process code, so FID, IS, KID subsets, precision/recall and mode counts see
    exactly the features world 1 sees, and broadcasts the metrics.
Training
    The card's batch size is the global batch: rank r takes rows [r * b/N, (r + 1) * b/N) of the same
    global batch one process takes (`train.Batcher`, same seeded order); b not divisible by N is a
    UserError. Gradients are averaged over the ranks inside each backward pass (`GradAverager`), before
    any family code reads them (gradient clipping, grad-norm logs, the optimizer step); buffers (batch-norm
    statistics, codebooks, counters) are rank 0's after every step, as DDP's broadcast_buffers. Torch's
    generator, which the families draw their training noise from, is seeded per step from
    (seed, step, rank) (`step_seed`), so a resumed run needs no per-rank random state.
Writing
    Only rank 0 writes anything: leases, config, records, logs, curves, checkpoints, model.pt,
    samples.png, the reference-feature cache. What rank 0 reads from the results folder (a checkpoint,
    the cache, a finished record) it broadcasts, so the other ranks never need that folder.
Failures
    A rank that fails publishes one line in torchrun's store and aborts its process group, which
    ends every collective the others wait in; rank 0 then writes one `failed` record with the first
    failure's line and the job stops (`JobAborted`), instead of hanging. Collectives also time out
    after $GENBENCH_DIST_TIMEOUT_S (default 1800 s). NaN/inf and loss blow-ups are agreed through the
    rank-averaged logs of every log flush (a NaN on one rank makes the average NaN on all).
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from genbench.errors import UserError

TIMEOUT_ENV = "GENBENCH_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0
_FAIL_PREFIX = "genbench/failure/"


class JobAborted(RuntimeError):
    """A rank failed during a run: the run is recorded as failed (by rank 0) and the distributed job
    stops on every rank. The message is the line to print."""


# --------------------------------------------------------------------------- the launch environment


def env_world() -> int:
    """WORLD_SIZE as torchrun sets it; 1 when unset."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE") or 1))
    except ValueError:
        raise UserError(f"$WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not a whole number") from None


def env_rank() -> int:
    return int(os.environ.get("RANK") or 0)


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK") or 0)


def launched() -> bool:
    """Whether this process is one of several ranks (WORLD_SIZE > 1)."""
    return env_world() > 1


def place(device: torch.device) -> torch.device:
    """This rank's device: at world > 1 a CUDA device is the rank's local GPU, cuda:LOCAL_RANK (a fixed
    cuda:N would put every rank on one GPU and is refused); the CPU stays the CPU."""
    device = torch.device(device)
    if not launched() or device.type != "cuda":
        return device
    if device.index is not None:
        raise UserError(f"--device {device}: under torchrun each rank takes its own GPU (cuda:LOCAL_RANK); "
                        f"use --device cuda or auto")
    local = env_local_rank()
    if local >= torch.cuda.device_count():
        raise UserError(f"rank with LOCAL_RANK {local} has no GPU: this node has {torch.cuda.device_count()} CUDA "
                        f"device(s); start at most that many processes per node (--nproc_per_node)")
    return torch.device("cuda", local)


def timeout_s() -> float:
    env = os.environ.get(TIMEOUT_ENV)
    if not env:
        return DEFAULT_TIMEOUT_S
    try:
        v = float(env)
    except ValueError:
        raise UserError(f"${TIMEOUT_ENV}={env!r} is not a number of seconds") from None
    if not v > 0:
        raise UserError(f"${TIMEOUT_ENV} must be positive, got {env!r}")
    return v


# --------------------------------------------------------------------------- the process group


@dataclass
class Dist:
    """This rank in the job: its rank, the world size, the backend, its device and the device its
    collectives run on (the GPU for NCCL, the CPU for gloo), and torchrun's store."""
    rank: int
    world: int
    local_rank: int
    backend: str
    device: torch.device
    comm_device: torch.device
    store: object = field(repr=False)
    ranks: list = field(default_factory=list)   # [{"host", "device"}] of every rank, by rank
    failed: bool = field(default=False, repr=False)
    aborted: bool = field(default=False, repr=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def provenance(self) -> dict:
        """What a record says about the job: world size, backend and each rank's host and device."""
        return {"world_size": self.world, "backend": self.backend,
                "rank_devices": {str(i): f"{r['host']} {r['device']}" for i, r in enumerate(self.ranks)}}


_STATE: Dist | None = None


def current() -> Dist | None:
    """The job this process is a rank of, once `init` ran at world > 1; None in a one-process run."""
    return _STATE


def world() -> int:
    return _STATE.world if _STATE is not None else 1


def rank() -> int:
    return _STATE.rank if _STATE is not None else 0


def is_main() -> bool:
    return rank() == 0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def init(device: torch.device) -> Dist | None:
    """Join the job torchrun started (env:// rendezvous): NCCL when this rank's device is a GPU, gloo on
    the CPU, collectives timing out after $GENBENCH_DIST_TIMEOUT_S. None (and nothing done) at world 1."""
    global _STATE
    if not launched():
        return None
    if _STATE is not None:
        return _STATE
    import torch.distributed as dist

    device = torch.device(device)
    timeout = datetime.timedelta(seconds=timeout_s())
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store, r, n = next(dist.rendezvous("env://", timeout=timeout))
    dist.init_process_group(backend, store=store, rank=r, world_size=n, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    comm = device if backend == "nccl" else torch.device("cpu")
    d = Dist(r, n, env_local_rank(), backend, device, comm, store)
    _STATE = d
    d.ranks = all_gather_object({"host": socket.gethostname(), "device": _device_name(device)})
    _start_failure_watch(d)
    return d


def shutdown() -> None:
    """Leave the job at the end of a command: wait for every rank, then destroy the process group."""
    global _STATE
    d = _STATE
    if d is None:
        return
    import torch.distributed as dist

    try:
        if not d.aborted:
            dist.barrier()
            dist.destroy_process_group()
    finally:
        _STATE = None


# --------------------------------------------------------------------------- collectives


def _need() -> Dist:
    if _STATE is None:
        raise RuntimeError("genbench.distributed: no process group (not launched by torchrun, or not initialised)")
    return _STATE


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s object (pickled) on every rank."""
    import torch.distributed as dist

    d = _need()
    box = [obj if d.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=d.comm_device)
    return box[0]


def all_gather_object(obj) -> list:
    import torch.distributed as dist

    _need()
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def shard(n: int, batch_size: int, r: int | None = None, n_ranks: int | None = None) -> tuple[int, int]:
    """Images [lo, hi) of n that rank r draws: its contiguous block of whole batches of `batch_size`
    (the batches one process draws, so each image is made in the same batch as at world 1)."""
    r = rank() if r is None else r
    n_ranks = world() if n_ranks is None else n_ranks
    b = max(1, int(batch_size))
    nb = -(-n // b)
    return min(n, -(-r * nb // n_ranks) * b), min(n, -(-(r + 1) * nb // n_ranks) * b)


def gather_rows(t: torch.Tensor | None, device=None) -> torch.Tensor | None:
    """Every rank's rows [n_r, ...] concatenated in rank order, on every rank (all_gather padded to the
    longest share, then trimmed by the lengths). A rank with no rows passes None or an empty tensor;
    None comes back when no rank has any. The result lies on `device`, else `t`'s, else the CPU."""
    import torch.distributed as dist

    d = _need()
    meta = (0, None, None) if t is None else (int(t.shape[0]), tuple(t.shape[1:]), t.dtype)
    metas = all_gather_object(meta)
    full = [m for m in metas if m[0] > 0]
    if not full:
        return t
    _, trailing, dtype = full[0]
    longest = max(m[0] for m in metas)
    buf = torch.zeros((longest, *trailing), dtype=dtype, device=d.comm_device)
    if t is not None and len(t):
        buf[:len(t)] = t.to(d.comm_device)
    parts = [torch.empty_like(buf) for _ in range(d.world)]
    dist.all_gather(parts, buf)
    out = torch.cat([p[:m[0]] for p, m in zip(parts, metas)])
    return out.to(device if device is not None else t.device if t is not None else "cpu")


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """In place: the mean of `t` over the ranks (sum, then divided by the world size)."""
    import torch.distributed as dist

    d = _need()
    buf = t.to(d.comm_device)
    dist.all_reduce(buf)
    buf.div_(d.world)
    if buf is not t:
        t.copy_(buf)
    return t


def mean_logs(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    """Step logs (Python floats) averaged over the ranks, row by row and key by key, in one all_reduce:
    every rank then holds the same numbers, and takes the same divergence decision from them."""
    if not rows:
        return rows
    flat = torch.tensor([v for r in rows for v in r.values()], dtype=torch.float64)
    all_reduce_mean_(flat)
    values = iter(flat.tolist())
    return [{k: next(values) for k in r} for r in rows]


def _coalesced(tensors: list[torch.Tensor]):
    """(device, dtype) groups of tensors, each group in the given order."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups.values()


def broadcast_tensors_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Rank `src`'s values into `tensors` on every rank, one broadcast per device and dtype."""
    import torch.distributed as dist

    d = _need()
    for group in _coalesced([t for t in tensors if t.numel()]):
        wire_dtype = torch.uint8 if group[0].dtype == torch.bool else group[0].dtype
        flat = torch.cat([t.detach().reshape(-1).to(wire_dtype) for t in group]).to(d.comm_device)
        dist.broadcast(flat, src=src)
        if d.rank != src:
            for t, part in zip(group, flat.split([t.numel() for t in group])):
                with torch.no_grad():
                    t.copy_(part.view(t.shape).to(t.dtype))


def broadcast_module_(module: torch.nn.Module, buffers_only: bool = False) -> None:
    """Rank 0's parameters and buffers (or buffers only) into `module` on every rank."""
    ts = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    broadcast_tensors_(ts)


class GradAverager:
    """Averages the gradients of `params` over the ranks inside every backward pass, as DDP's reducer does:
    each parameter whose gradient is accumulated in a backward pass is marked (a post-accumulate-grad
    hook), and at the end of that pass (an autograd engine callback) the marked gradients are summed
    over the ranks in one all_reduce per device and dtype, in the parameters' fixed order, and divided
    by the world size. Family code after backward() (gradient clipping, grad-norm logs, the optimizer
    step) sees the global gradient.

    Why not DistributedDataParallel itself: its reducer needs every forward to go through its wrapper and
    every backward to reach the wrapped parameters. The families call their networks from inside
    train_step, a GAN's generator step backpropagates through D into G only (`inputs=`), and WGAN-GP's
    gradient penalty is a double backward, which DDP documents as unsupported. The all_reduce is the same
    (average of the ranks' gradients of the same parameters); communication is not overlapped with the
    backward pass.

    Every rank must backpropagate through the same parameters (the same graph), as with DDP's default."""

    def __init__(self, params):
        import torch.distributed as dist  # noqa: F401 - fail here, not inside a backward pass

        self.d = _need()
        seen, self.params = set(), []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._ready: list[torch.Tensor] = []
        self._queued = False
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def _on_grad(self, p: torch.Tensor) -> None:
        self._ready.append(p)
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._reduce)

    def _reduce(self) -> None:
        import torch.distributed as dist

        ready = sorted({id(p): p for p in self._ready}.values(), key=lambda p: self._index[id(p)])
        self._ready, self._queued = [], False
        work = []
        for group in _coalesced([p.grad for p in ready]):
            flat = torch.cat([g.reshape(-1) for g in group]).to(self.d.comm_device)
            work.append((group, flat, dist.all_reduce(flat, async_op=True)))
        for group, flat, handle in work:
            handle.wait()
            flat.div_(self.d.world)
            for g, part in zip(group, flat.split([g.numel() for g in group])):
                g.copy_(part.view(g.shape))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def step_seed(seed: int, step: int, r: int) -> int:
    """The seed of torch's generator for training step `step` (0-based) of run seed `seed` on rank r: a
    splitmix64 hash of the three, 63 bits (what torch.manual_seed takes)."""
    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z = (z + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    return mix(mix(mix(int(seed) & mask) ^ (int(step) & mask)) ^ (int(r) & mask)) >> 1


# --------------------------------------------------------------------------- failures


_ABORT_LOCK = threading.Lock()


def _abort_group(d: Dist) -> None:
    import torch.distributed as dist

    with _ABORT_LOCK:
        if d.aborted:
            return
        d.aborted = True
    try:
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort is not None:
            abort()
        else:
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the group is being given up either way
        pass


def fail(exc: BaseException) -> str:
    """This rank cannot go on with the run: publish one line about `exc` in torchrun's store (numbered,
    so the first failure of the job is known), abort this rank's process group (every collective another
    rank waits in then fails at once instead of hanging) and return the first failure's line (another
    rank's, when this rank only saw the group break)."""
    d = _need()
    text = f"rank {d.rank}: {type(exc).__name__}: {exc}".strip()
    if len(text) > 2000:
        text = text[:2000] + " ..."
    if not d.failed:
        d.failed = True
        try:
            k = d.store.add(_FAIL_PREFIX + "count", 1)
            d.store.set(f"{_FAIL_PREFIX}{k}", text)
        except Exception:  # noqa: BLE001 - the store is gone: the line stays local
            pass
    _abort_group(d)
    try:
        d.store.wait([_FAIL_PREFIX + "1"], datetime.timedelta(seconds=10))
        return d.store.get(_FAIL_PREFIX + "1").decode()
    except Exception:  # noqa: BLE001
        return text


def recorded() -> None:
    """Rank 0: the failure's record is written (the other ranks may exit now)."""
    d = _need()
    try:
        d.store.set(_FAIL_PREFIX + "recorded", "1")
    except Exception:  # noqa: BLE001
        pass


def wait_recorded(timeout_s: float = 60.0) -> None:
    """A rank other than 0: wait until rank 0 wrote the failure's record before this process exits (torchrun
    stops every rank once one has exited with an error)."""
    d = _need()
    try:
        d.store.wait([_FAIL_PREFIX + "recorded"], datetime.timedelta(seconds=timeout_s))
    except Exception:  # noqa: BLE001
        pass


def _start_failure_watch(d: Dist) -> None:
    """A thread that looks for the first failure's line in the store and then aborts this rank's process
    group. Needed for NCCL, where a rank waiting for a failed peer blocks in a CUDA kernel until the
    timeout and only aborting its communicators ends that wait; with gloo the peer's closed sockets end
    it already, and the thread runs too (one code path, the one the CPU tests exercise)."""
    def watch():
        # check() answers at once (a blocking wait would hold the store client's lock, which NCCL's own
        # store traffic needs); once a second is plenty for a failure
        while _STATE is d and not d.aborted:
            try:
                failed = d.store.check([_FAIL_PREFIX + "1"])
            except Exception:  # noqa: BLE001 - the store is gone: the job is over
                return
            if not failed:
                time.sleep(1.0)
                continue
            if not d.failed:
                print(f"genbench: rank {d.rank}: another rank failed; aborting this rank's collectives",
                      file=sys.stderr)
                _abort_group(d)
            return

    threading.Thread(target=watch, name="genbench failure watch", daemon=True).start()
