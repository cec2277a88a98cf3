"""The one interface every family implements, and the registry the harness looks families up in.

The harness (train.py, scoring/, timing.py) only ever talks to a `GenerativeModel`; a family knows
nothing of suites or stores. It declares the extra metrics it reports (`declared_metrics`), which the
metric registry then knows by key, direction and label.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from genbench.rng import SeedRNG


@dataclass(frozen=True)
class Phase:
    """One stage of training. `share` is its fraction of the run's kimg budget."""
    name: str = "main"
    share: float = 1.0


@dataclass(frozen=True)
class DataSpec:
    """What a family is built for: image [C, H, W] or 2-D points [2], and the number of classes."""
    shape: tuple[int, ...]
    num_classes: int = 0

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3


@dataclass
class Batch:
    """x in [-1, 1] (images [B, C, H, W], points [B, 2] unscaled); y class labels or None.

    `rng`: per-image random streams, one per row, set by the harness for held-out evaluation
    (nll_bpd, extra_metrics), so an estimate that draws timesteps or noise gives each image the same
    draws whatever batch it is in. None in training batches."""
    x: torch.Tensor
    y: torch.Tensor | None = None
    rng: SeedRNG | None = None


def held_out_streams(batch: "Batch", n: int, device) -> SeedRNG:
    """The per-image streams of a held-out batch, as a copy on `device` (so an estimate leaves
    batch.rng as it found it, and the same batch gives the same draws); without streams (a direct
    call) those of SeedRNG.for_run(0, n), so the number is still deterministic."""
    if batch.rng is None:
        return SeedRNG.for_run(0, n, device=device)
    if batch.rng.n != n:
        raise ValueError(f"batch.rng has {batch.rng.n} streams for {n} images")
    return batch.rng.to(device)


class GenerativeModel(nn.Module, ABC):
    """A generative model of one family.

    Constructed as `Family(spec, **card_params)`. The training loop calls, per phase:
    `start_phase(phase)` once, `configure_optimizers(phase)` once, then `train_step(batch, phase,
    optimizers)` per step; the family owns its backward passes and optimizer steps (a GAN steps D and
    G) and returns scalar logs. Logs named `grad_norm_*` feed the stability log.
    """

    family: ClassVar[str] = ""
    # True when the model takes class labels; the harness then passes balanced labels to sample().
    conditional: bool = False
    # Sampler keyword arguments the family accepts (validated before a long run starts).
    sampler_options: ClassVar[tuple[str, ...]] = ()
    # The metrics extra_metrics() returns, as genbench.metrics.Metric (group "family", source
    # "held-out"): registered with the family, so reports and the gate know their direction and label.
    declared_metrics: ClassVar[tuple] = ()

    def __init__(self, spec: DataSpec):
        super().__init__()
        self.spec = spec

    def phases(self) -> list[Phase]:
        return [Phase()]

    def start_phase(self, phase: Phase) -> None:
        """Hook before a phase's first step (freeze an encoder, build a prior, ...)."""

    @abstractmethod
    def configure_optimizers(self, phase: Phase) -> dict[str, torch.optim.Optimizer]:
        ...

    @abstractmethod
    def train_step(self, batch: Batch, phase: Phase,
                   optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        ...

    @abstractmethod
    def sample(self, rng: SeedRNG, labels: torch.Tensor | None = None, **sampler) -> torch.Tensor:
        """rng.n samples, [n, *spec.shape]; images in [-1, 1]. All randomness comes from `rng`,
        so image i depends only on its seed, never on the batch it was drawn in."""

    def step_logs(self, **values) -> dict[str, float | torch.Tensor]:
        """A train_step's logs from tensors (or floats): 0-d detached tensors when the training loop moves
        logs to the host itself every K steps (it sets `tensor_logs`: then a step makes no host sync),
        else floats, read from the device in one transfer."""
        tensors = {k: v for k, v in values.items() if torch.is_tensor(v)}
        if getattr(self, "tensor_logs", False):
            return {k: (v.detach().reshape(()) if torch.is_tensor(v) else float(v)) for k, v in values.items()}
        host = dict(zip(tensors, torch.stack([t.detach().reshape(()).double() for t in tensors.values()]).tolist())) \
            if tensors else {}
        return {k: host[k] if k in host else float(v) for k, v in values.items()}

    def nfe(self, **sampler) -> int:
        """Network evaluations per sample (GAN 1, DDPM 1000, DDIM-50 50, PixelCNN one per code)."""
        return 1

    def nll_bpd(self, batch: Batch) -> float | torch.Tensor | None:
        """Bits per dimension (or its bound) on a batch of 8-bit data: the batch mean, or one value per
        image [B]; None without a likelihood. Random draws come from `batch.rng` when set."""
        return None

    def extra_metrics(self, batch: Batch) -> dict[str, float]:
        """Family-specific numbers on held-out data (reconstruction error, codebook usage, ...): batch
        means, keys among `declared_metrics`. Random draws come from `batch.rng` when set."""
        return {}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


FAMILIES: dict[str, type[GenerativeModel]] = {}


def register_family(name: str) -> Callable[[type[GenerativeModel]], type[GenerativeModel]]:
    """Class decorator: `@register_family("gan")`. Names are unique; classes must subclass the API."""
    def deco(cls: type[GenerativeModel]) -> type[GenerativeModel]:
        if not (isinstance(cls, type) and issubclass(cls, GenerativeModel)):
            raise TypeError(f"{cls!r} is not a GenerativeModel")
        if name in FAMILIES and FAMILIES[name] is not cls:
            raise ValueError(f"family {name!r} is already registered")
        cls.family = name
        FAMILIES[name] = cls
        register_declared_metrics(cls)
        return cls
    return deco


def register_declared_metrics(cls: type[GenerativeModel]) -> None:
    """Put a family's declared metrics into the metric registry (idempotent)."""
    from genbench import metrics

    for m in cls.declared_metrics:
        if m.key not in metrics.METRICS:
            metrics.register_metric(m)
