"""Per-image random streams: one seed per image, the same numbers on any batch size or device.

Sampling draws noise through `SeedRNG` instead of torch's global generator. Every number is a pure
function of (image seed, call counter, element index), hashed with splitmix64 in int64 tensor
arithmetic, so
  * image i gets the same noise whether it is sampled in a batch of 1 or of 1024,
  * CPU and CUDA give bit-identical uniforms (integer math), and
  * there is no per-image generator object or per-image kernel launch: one vectorised op per call.
Training keeps torch's ordinary generator; only sampling needs this guarantee.
"""
from __future__ import annotations

import math

import torch


def _u64(c: int) -> int:
    """A 64-bit constant as the signed int64 torch stores."""
    return c - (1 << 64) if c >= (1 << 63) else c


_GOLDEN = _u64(0x9E3779B97F4A7C15)
_M1 = _u64(0xBF58476D1CE4E5B9)
_M2 = _u64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    # torch's >> is arithmetic on int64; mask off the copied sign bits for a logical shift.
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser; int64 multiplication wraps modulo 2**64 as in C."""
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


class SeedRNG:
    """Independent random streams for a batch of images, each keyed by its own seed.

    `rng[i:j]` gives the streams of images i..j-1 at the same position, which is how the harness
    splits a run into batches without changing any image.
    """

    def __init__(self, seeds, device: torch.device | str = "cpu", counter: int = 0):
        self.seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1).to(device)
        self.device = torch.device(device)
        self.counter = counter

    @classmethod
    def for_run(cls, seed: int, n: int, device="cpu", offset: int = 0) -> "SeedRNG":
        """Image k of a run with base seed s gets seed hash(s, k): disjoint streams across runs."""
        idx = torch.arange(offset, offset + n, dtype=torch.int64)
        base = _mix(torch.tensor(seed, dtype=torch.int64) * _GOLDEN + 0x5EED)
        return cls(_mix(base ^ (idx * _GOLDEN)), device)

    @property
    def n(self) -> int:
        return self.seeds.numel()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, sl: slice) -> "SeedRNG":
        return SeedRNG(self.seeds[sl], self.device, self.counter)

    def to(self, device) -> "SeedRNG":
        return SeedRNG(self.seeds, device, self.counter)

    def _bits(self, shape: tuple[int, ...]) -> torch.Tensor:
        """[n, *shape] int64 of 64 random bits each; advances the counter by one call."""
        self.counter += 1
        per_image = math.prod(shape)
        key = _mix(self.seeds ^ _mix(torch.tensor(_u64((self.counter * _GOLDEN) % (1 << 64)), dtype=torch.int64,
                                                  device=self.device)))          # [n]
        elem = torch.arange(per_image, dtype=torch.int64, device=self.device) * _GOLDEN
        return _mix(key[:, None] + elem[None, :]).reshape(self.n, *shape)        # [n, *shape]

    @staticmethod
    def _unit(bits: torch.Tensor) -> torch.Tensor:
        # 23-bit values: (b + 0.5) / 2**23 stays strictly inside (0, 1) in float32 (24 bits round
        # the top value to exactly 1.0, and Gumbel / log then give inf).
        return (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 23))

    def rand(self, *shape: int) -> torch.Tensor:
        """Uniform in (0, 1), shape [n, *shape], float32."""
        return self._unit(_shr(self._bits(shape), 41))

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard normal, shape [n, *shape], float32 (Box-Muller on two 23-bit parts)."""
        bits = self._bits(shape)
        u1 = self._unit(_shr(bits, 41))
        u2 = self._unit(_shr(bits, 18) & 0x7FFFFF)
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        """Integers in [0, high), shape [n, *shape]."""
        return torch.clamp((self.rand(*shape) * high).long(), max=high - 1)

    def categorical(self, logits: torch.Tensor) -> torch.Tensor:
        """One draw per row from softmax(logits) over the last dim; logits [n, ..., K] -> [n, ...].

        Gumbel-max with this image's uniforms, so autoregressive priors stay batch-invariant.
        """
        u = self.rand(*logits.shape[1:])
        gumbel = -torch.log(-torch.log(u))
        return torch.argmax(logits.float() + gumbel, dim=-1)
