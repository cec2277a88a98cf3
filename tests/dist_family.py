"""Two small families for the distributed tests (tests/test_distributed.py), by import path
(`dist_family:PlainAutoencoder`), with tests/ on the path.

PlainAutoencoder draws no random number in its training step, so at the same global batch its
training at world 2 can be held to world 1's (the shipped families draw their training noise from
torch's generator, seeded per rank at world > 1). Its gradient clip is small enough to be active, so
the test also shows that clipping sees the rank-averaged gradient.

Replay samples training images picked by each image's own seed, plus a little noise: real-looking
samples for the scoring tests (modes are covered, precision and recall are not 0), one seed per image.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from genbench.families.base import GenerativeModel


class PlainAutoencoder(GenerativeModel):
    def __init__(self, spec, hidden: int = 16, lr: float = 3e-3, grad_clip: float = 0.05):
        super().__init__(spec)
        d = math.prod(spec.shape)
        self.enc, self.dec = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.lr, self.grad_clip = float(lr), float(grad_clip)

    def configure_optimizers(self, phase):
        return {"ae": torch.optim.Adam(self.parameters(), lr=self.lr)}

    def train_step(self, batch, phase, optimizers):
        opt = optimizers["ae"]
        opt.zero_grad(set_to_none=True)
        x = batch.x.flatten(1).float()
        rec = torch.tanh(self.dec(torch.tanh(self.enc(x))))
        loss = F.mse_loss(rec, x)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.parameters(), self.grad_clip)
        opt.step()
        return {"loss": loss.item(), "grad_norm_ae": gn.item()}

    def sample(self, rng, labels=None, **sampler):
        z = rng.randn(self.enc.out_features).to(self.device)
        return torch.tanh(self.dec(z)).view(rng.n, *self.spec.shape)


class Replay(GenerativeModel):
    """Samples: training image k of `x` for a k drawn from the image's seed, plus 0.05 N(0, 1) noise."""

    def __init__(self, spec, x: torch.Tensor | None = None):
        super().__init__(spec)
        self.register_buffer("x", x if x is not None else torch.zeros(1, *spec.shape))
        self.scale = nn.Parameter(torch.ones(()))

    def configure_optimizers(self, phase):
        return {"x": torch.optim.SGD([self.scale], lr=0.0)}

    def train_step(self, batch, phase, optimizers):
        return {"loss": 0.0}

    def sample(self, rng, labels=None, **sampler):
        k = rng.randint(len(self.x)).view(-1)
        x = self.x[k.to(self.x.device)] * self.scale + 0.05 * rng.randn(*self.spec.shape).to(self.device)
        return x.clamp(-1, 1) if self.spec.is_image else x
