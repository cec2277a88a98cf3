"""PixelGMM: a mixture of K Gaussians with diagonal covariance over the pixels (or 2-D points), trained
by gradient descent on its exact negative log-likelihood.

    p(x) = sum_k pi_k prod_d N_disc(x_d; mu_kd, sigma_kd)

For images each pixel's Gaussian is discretized on the 8-bit grid (bins 2/255 wide, edge bins taking
the tails), so the training loss is the bits/dim genbench reports (in float32 while training, exact
in float64 by genbench's `discretized_gaussian_log_likelihood` for nll_bpd); for points the density
is continuous. The means start from the first training
batch (k-means' usual initialisation from data: a component starts on a real image), the mixing
weights uniform, the scales at 0.5; Adam then fits all three. sigma has a soft floor (min_log_std) so
a component cannot collapse onto one image.

Sampling draws the component from the image's own stream (Gumbel-max over the mixing logits, or
uniformly with `weights: uniform`), then the pixels: x = mu_k + temperature * sigma_k * eps, clipped
to [-1, 1] for images. Every draw comes from `rng`, so image i depends on its seed only.

What it is for: an honest, cheap baseline that genbench can train, sample, score and report beside
its own families in seconds; and the worked example of a plug-in (README, "Bring your own model").
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from genbench.families.base import Batch, DataSpec, GenerativeModel, Phase
from genbench.families.diffusion import discretized_gaussian_log_likelihood
from genbench.metrics import HELD_OUT, Metric
from genbench.rng import SeedRNG

LN2 = math.log(2.0)
WEIGHTS = ("learned", "uniform")


class PixelGMM(GenerativeModel):
    # Records, reports and claims see this family string (claims treat it as "another family").
    family = "mixture"
    sampler_options = ("temperature", "weights")
    declared_metrics = (
        Metric("components_used", "family", True, "components used", HELD_OUT,
               "share of mixture components that are the most likely one for at least one held-out image"),
    )
    # genbench's conformance hooks (genbench check-family pixel-gmm): a small mixture, and the values
    # every sampler option is tried at.
    conformance_params = {"components": 4}
    conformance_sampler = {}
    sampler_examples = {"temperature": [0.0, 0.5, 1.0], "weights": ["learned", "uniform"]}

    def __init__(self, spec: DataSpec, components: int = 32, lr: float = 0.03, min_log_std: float = -3.0,
                 init_std: float = 0.5):
        super().__init__(spec)
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise ValueError(f"pixel-gmm: components must be a positive whole number, got {components!r}")
        if not lr > 0:
            raise ValueError(f"pixel-gmm: lr must be positive, got {lr}")
        if not init_std > 0 or not math.log(init_std) > min_log_std:
            raise ValueError(f"pixel-gmm: init_std must be positive and above exp(min_log_std), got {init_std}")
        self.K, self.D = components, math.prod(spec.shape)
        self.lr, self.min_log_std = float(lr), float(min_log_std)
        self.means = nn.Parameter(torch.zeros(self.K, self.D))                       # [K, D]
        # log sigma = min_log_std + softplus(raw): raw chosen so sigma starts at init_std
        start = math.log(math.expm1(math.log(init_std) - self.min_log_std))
        self.raw_log_std = nn.Parameter(torch.full((self.K, self.D), start))          # [K, D]
        self.logits = nn.Parameter(torch.zeros(self.K))                               # [K]
        # Set once the means have been placed on training images; in the state_dict, so a resumed or
        # reloaded model does not place them again.
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    # ------------------------------------------------------------------ the density

    def log_std(self) -> torch.Tensor:
        return self.min_log_std + F.softplus(self.raw_log_std)                       # [K, D]

    def component_log_likelihood(self, x: torch.Tensor, exact: bool = True) -> torch.Tensor:
        """log p(x | k) in nats, [B, K], for x [B, *shape].

        exact: genbench's float64 log-space discretized Gaussian (the reported bits/dim). Otherwise a
        float32 difference of CDFs with the bin's probability floored at 1e-12 (iDDPM's form): a few
        times cheaper with its backward, equal to float32 precision wherever a bin holds more than
        the floor, which is what training needs."""
        x = x.reshape(x.shape[0], 1, self.D).float()                                  # [B, 1, D]
        mean, log_std = self.means[None], self.log_std()[None]                         # [1, K, D]
        if not self.spec.is_image:
            ll = -0.5 * (math.log(2 * math.pi) + 2 * log_std + (x - mean) ** 2 * torch.exp(-2 * log_std))
        elif exact:
            ll = discretized_gaussian_log_likelihood(x, mean, log_std)                # [B, K, D]
        else:
            inv = torch.exp(-log_std)
            hi = torch.special.ndtr((x - mean + 1 / 255) * inv)
            lo = torch.special.ndtr((x - mean - 1 / 255) * inv)
            p = torch.where(x < -0.999, hi, torch.where(x > 0.999, 1 - lo, hi - lo))
            ll = torch.log(p.clamp(min=1e-12))
        return ll.sum(-1)                                                              # [B, K]

    def log_likelihood(self, x: torch.Tensor, exact: bool = True) -> torch.Tensor:
        """log p(x) in nats, [B]."""
        return torch.logsumexp(F.log_softmax(self.logits, 0) + self.component_log_likelihood(x, exact), dim=1)

    # ------------------------------------------------------------------ training

    def phases(self) -> list[Phase]:
        return [Phase("fit", 1.0)]

    def configure_optimizers(self, phase: Phase) -> dict[str, torch.optim.Optimizer]:
        return {"gmm": torch.optim.Adam(self.parameters(), lr=self.lr)}

    @torch.no_grad()
    def _initialise(self, x: torch.Tensor) -> None:
        """Means on K training images (cycling through the batch when it is smaller than K, with a little
        noise so repeated images give distinct components)."""
        flat = x.reshape(x.shape[0], self.D).float()
        idx = torch.arange(self.K, device=flat.device) % flat.shape[0]
        jitter = 0.05 * torch.randn(self.K, self.D, device=flat.device)
        jitter[: flat.shape[0]] = 0                                    # the first B components: images as they are
        self.means.copy_(flat[idx] + jitter)
        self.initialised.fill_(True)

    def train_step(self, batch: Batch, phase: Phase, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        x = batch.x.to(self.device)
        if not bool(self.initialised):
            self._initialise(x)
        opt = optimizers["gmm"]
        nats_per_dim = -self.log_likelihood(x, exact=False).mean() / self.D
        opt.zero_grad(set_to_none=True)
        nats_per_dim.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.parameters(), float("inf"))
        opt.step()
        logs = {"loss": nats_per_dim.item(), "grad_norm_gmm": gn.item()}
        if self.spec.is_image:
            logs["bpd"] = logs["loss"] / LN2
        return logs

    # ------------------------------------------------------------------ sampling

    def _options(self, temperature: float = 1.0, weights: str = "learned", **unknown) -> tuple[float, str]:
        if unknown:
            raise ValueError(f"pixel-gmm: unknown sampler option {sorted(unknown)[0]!r}; "
                             f"accepted: {', '.join(self.sampler_options)}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"pixel-gmm: temperature must be a number >= 0, got {temperature!r}")
        if weights not in WEIGHTS:
            raise ValueError(f"pixel-gmm: weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
        return float(temperature), weights

    def nfe(self, **sampler) -> int:
        self._options(**sampler)
        return 1

    def sample(self, rng: SeedRNG, labels: torch.Tensor | None = None, **sampler) -> torch.Tensor:
        temperature, weights = self._options(**sampler)
        logits = self.logits.float() if weights == "learned" else torch.zeros_like(self.logits, dtype=torch.float32)
        k = rng.categorical(logits.expand(rng.n, self.K).to(rng.device)).to(self.device)    # [n]
        eps = rng.randn(self.D).to(self.device)                                             # [n, D]
        x = self.means[k].float() + temperature * torch.exp(self.log_std()[k].float()) * eps
        x = x.reshape(rng.n, *self.spec.shape)
        return x.clamp(-1, 1) if self.spec.is_image else x

    # ------------------------------------------------------------------ held-out numbers

    @torch.no_grad()
    def nll_bpd(self, batch: Batch) -> torch.Tensor | None:
        """Exact -log2 p(x) per dimension on 8-bit images, one per image; None for points (a density,
        not bits)."""
        if not self.spec.is_image:
            return None
        x = torch.round((batch.x.to(self.device).float() + 1) * 127.5).clamp(0, 255) / 127.5 - 1
        return (-self.log_likelihood(x).double() / (self.D * LN2))

    @torch.no_grad()
    def extra_metrics(self, batch: Batch) -> dict[str, float]:
        x = batch.x.to(self.device)
        used = set()
        for i in range(0, x.shape[0], 256):
            resp = F.log_softmax(self.logits, 0) + self.component_log_likelihood(x[i:i + 256], exact=False)
            used.update(resp.argmax(1).tolist())
        return {"components_used": len(used) / self.K}
