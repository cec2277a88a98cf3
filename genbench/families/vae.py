"""Variational autoencoder (Kingma & Welling 2014) with a discretized likelihood for 8-bit images.

Images: a convolutional encoder halves the resolution down to 4x4 (16x16 .. 64x64, any channel
count), a linear head gives a diagonal Gaussian posterior q(z|x), and a mirror-image decoder gives
per-pixel parameters of p(x|z). The loss is the beta-weighted negative ELBO,
    -E_q[log p(x|z)] + beta * KL(q(z|x) || N(0, I)),
and `nll_bpd` reports the true (beta = 1) negative ELBO in bits per dimension.

The likelihood is discrete because the data are: x comes from uint8 via x/127.5 - 1, so each pixel
is one of 256 bin centres spaced 2/255 apart, and p(x|z) is the mass of its bin (the edge bins
reach to -inf / +inf so the 256 masses sum to one). Choices: "logistic" (PixelCNN++ style, one
component), "gaussian", or "categorical" (a 256-way softmax per sub-pixel; heavier, but exact).

2-D points (spec.shape == (2,)) get an MLP encoder/decoder with a Gaussian decoder; there is no
8-bit discretization there, so nll_bpd is None.

Samples (sampler option `decoder`): "mean" returns the decoder's mean at z ~ N(0, I), the usual
VAE image samples (per-pixel noise on top is independent salt that papers never show); "sample"
draws x ~ p(x|z), the model's actual distribution. The default is "mean" for images and "sample"
for points: on 2-D data the decoder variance is the model's spread, and a collapsed posterior
(KL = 0) would otherwise put every sample on one point and read as a perfect single mode.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from genbench.families.base import Batch, DataSpec, GenerativeModel, Phase, held_out_streams, register_family
from genbench.metrics import HELD_OUT, Metric
from genbench.rng import SeedRNG

LIKELIHOODS = ("logistic", "gaussian", "categorical")
HALF_BIN = 1.0 / 255.0          # half the spacing of 8-bit values on [-1, 1]
POINT_MIN_LOGVAR = -14.0        # floor on the 2-D decoder's log-variance (likelihood and draws alike)


# --------------------------------------------------------------------------- likelihoods

def _log_sub_exp(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """log(exp(log_a) - exp(log_b)) for log_a >= log_b, without cancellation for close values."""
    return log_a + torch.log(-torch.expm1((log_b - log_a).clamp(max=-1e-12)))


def discretized_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                         kind: str) -> torch.Tensor:
    """Elementwise log P(x) of an 8-bit value x in [-1, 1] under a logistic or Gaussian with
    location `mean` and scale exp(log_scale), discretized into the 256 bins of width 2/255.

    All in float32: bf16 cannot resolve a bin of width 2/255 near |x| = 1.
    """
    x, mean, log_scale = x.float(), mean.float(), log_scale.float()
    inv_s = torch.exp(-log_scale)
    hi = (x - mean + HALF_BIN) * inv_s      # standardized upper bin edge
    lo = (x - mean - HALF_BIN) * inv_s      # standardized lower bin edge
    bottom = x < -1.0 + HALF_BIN            # value 0: the bin reaches down to -inf
    top = x > 1.0 - HALF_BIN                # value 255: the bin reaches up to +inf
    if kind == "logistic":
        # sigmoid(hi) - sigmoid(lo) = sigmoid(hi) * sigmoid(-lo) * (1 - exp(lo - hi)), exactly.
        middle = F.logsigmoid(hi) + F.logsigmoid(-lo) + torch.log(-torch.expm1(lo - hi))
        log_cdf_hi, log_sf_lo = F.logsigmoid(hi), F.logsigmoid(-lo)
    elif kind == "gaussian":
        # Phi(hi) - Phi(lo); in the upper tail use the mirror Phi(-lo) - Phi(-hi) to keep precision.
        upper = lo > 0
        a = torch.where(upper, -lo, hi)
        b = torch.where(upper, -hi, lo)
        middle = _log_sub_exp(torch.special.log_ndtr(a), torch.special.log_ndtr(b))
        log_cdf_hi, log_sf_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(-lo)
    else:
        raise ValueError(f"unknown discretized likelihood {kind!r}")
    return torch.where(bottom, log_cdf_hi, torch.where(top, log_sf_lo, middle))


def to_bin_index(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats from uint8 (x/127.5 - 1) -> the uint8 value as int64."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).long()


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the latent dim: [B, Z] -> [B]."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


# --------------------------------------------------------------------------- networks

def _halvings(h: int, w: int) -> int:
    """How many stride-2 stages take (h, w) down to about 4x4 (both sides even at every stage)."""
    n = 0
    while h > 4 and w > 4 and h % 2 == 0 and w % 2 == 0:
        h, w, n = h // 2, w // 2, n + 1
    return n


class ConvEncoder(nn.Module):
    def __init__(self, in_ch: int, hw: tuple[int, int], ch: int, max_ch: int, z_dim: int):
        super().__init__()
        levels = _halvings(*hw)
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ch, 3, padding=1), nn.SiLU()]
        c = ch
        for _ in range(levels):                    # each stage: [c, s, s] -> [c', s/2, s/2]
            c2 = min(2 * c, max_ch)
            layers += [nn.Conv2d(c, c2, 4, stride=2, padding=1), nn.SiLU(),
                       nn.Conv2d(c2, c2, 3, padding=1), nn.SiLU()]
            c = c2
        self.net = nn.Sequential(*layers)
        self.bottom = (c, hw[0] >> levels, hw[1] >> levels)
        self.head = nn.Linear(math.prod(self.bottom), 2 * z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(x).flatten(1)                 # [B, C, H, W] -> [B, c*h*w]
        mu, logvar = self.head(h).float().chunk(2, dim=1)   # [B, Z] each
        return mu, logvar.clamp(-12.0, 8.0)        # clamp: exp(logvar) must not under/overflow


class ConvDecoder(nn.Module):
    def __init__(self, out_ch: int, bottom: tuple[int, int, int], levels: int, max_ch: int, ch: int,
                 z_dim: int):
        super().__init__()
        self.bottom = bottom
        self.fc = nn.Linear(z_dim, math.prod(bottom))
        layers: list[nn.Module] = [nn.SiLU()]
        c = bottom[0]
        for i in range(levels):                    # each stage: [c, s, s] -> [c', 2s, 2s]
            c2 = max(ch, min(max_ch, ch * 2 ** (levels - 1 - i)))
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c2, 3, padding=1), nn.SiLU(),
                       nn.Conv2d(c2, c2, 3, padding=1), nn.SiLU()]
            c = c2
        layers.append(nn.Conv2d(c, out_ch, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(-1, *self.bottom)      # [B, Z] -> [B, c, h, w]
        return self.net(h)                         # [B, out_ch, H, W]


def _mlp(i: int, hidden: int, o: int, depth: int) -> nn.Sequential:
    dims = [i] + [hidden] * depth
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    return nn.Sequential(*layers, nn.Linear(dims[-1], o))


# --------------------------------------------------------------------------- the family

@register_family("vae")
class VAE(GenerativeModel):
    """params: z_dim, channels (first conv width, doubled per stage up to max_channels), beta,
    likelihood (logistic | gaussian | categorical), min_log_scale, lr, grad_clip,
    hidden / depth (the MLP used for 2-D points)."""

    sampler_options = ("temperature", "decoder")
    # genbench check-family: a tiny configuration and the values each sampler option is tried at
    conformance_params = {"z_dim": 4, "channels": 8, "max_channels": 16, "hidden": 16, "depth": 2}
    sampler_examples = {"temperature": [0.0, 0.7], "decoder": ["mean", "sample"]}
    declared_metrics = (
        Metric("recon_mse", "family", False, "recon MSE", HELD_OUT,
               "squared reconstruction error of held-out images, in [-1, 1] units"),
        Metric("kl_nats", "family", None, "KL nats", HELD_OUT, "mean KL(q(z|x) || p(z)) per held-out image"),
    )

    def __init__(self, spec: DataSpec, z_dim: int = 16, channels: int = 32, max_channels: int = 128,
                 beta: float = 1.0, likelihood: str = "logistic", min_log_scale: float = -6.0,
                 lr: float = 1e-3, grad_clip: float | None = 100.0, hidden: int = 128, depth: int = 3):
        super().__init__(spec)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"vae: likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if beta < 0 or z_dim < 1:
            raise ValueError("vae: need beta >= 0 and z_dim >= 1")
        self.z_dim, self.beta, self.likelihood = z_dim, float(beta), likelihood
        self.min_log_scale, self.lr, self.grad_clip = float(min_log_scale), lr, grad_clip
        if spec.is_image:
            c, h, w = spec.shape
            self.encoder = ConvEncoder(c, (h, w), channels, max_channels, z_dim)
            out_ch = c * 256 if likelihood == "categorical" else 2 * c   # logits, or (mean, log_scale)
            self.decoder = ConvDecoder(out_ch, self.encoder.bottom, _halvings(h, w), max_channels,
                                       channels, z_dim)
        elif spec.shape == (2,):
            self.encoder = _mlp(2, hidden, 2 * z_dim, depth)
            self.decoder = _mlp(z_dim, hidden, 4, depth)      # mean [2] and log-variance [2]
        else:
            raise ValueError(f"vae: unsupported data shape {spec.shape}; want (C, H, W) or (2,)")

    # ---- pieces

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spec.is_image:
            return self.encoder(x)
        mu, logvar = self.encoder(x).float().chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def _log_px(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over all dimensions: [B] (nats)."""
        if not self.spec.is_image:
            mean, logvar = out.float().chunk(2, dim=1)
            logvar = logvar.clamp(min=POINT_MIN_LOGVAR)
            lp = -0.5 * ((x.float() - mean) ** 2 * torch.exp(-logvar) + logvar + math.log(2 * math.pi))
            return lp.sum(dim=1)
        if self.likelihood == "categorical":
            logp = F.log_softmax(self._categorical_logits(out), dim=2)          # [B, C, 256, H, W]
            lp = logp.gather(2, to_bin_index(x).unsqueeze(2)).squeeze(2)
        else:
            mean, log_scale = out.float().chunk(2, dim=1)              # [B, C, H, W] each
            lp = discretized_log_prob(x, mean, log_scale.clamp(min=self.min_log_scale), self.likelihood)
        return lp.flatten(1).sum(dim=1)

    def _categorical_logits(self, out: torch.Tensor) -> torch.Tensor:
        """[B, C*256, H, W] -> [B, C, 256, H, W], float32."""
        return out.float().view(out.shape[0], self.spec.shape[0], 256, *out.shape[2:])

    def _decoder_mean(self, out: torch.Tensor) -> torch.Tensor:
        """What sample() returns: the decoder's mean, with no pixel noise on top (the usual VAE
        samples). Logistic/Gaussian: the location parameter (the mean before discretization),
        clamped to [-1, 1]; categorical: the expected 8-bit value; points: the Gaussian mean."""
        if not self.spec.is_image:
            return out.float()[:, :2]
        if self.likelihood == "categorical":
            p = F.softmax(self._categorical_logits(out), dim=2)
            values = torch.linspace(-1.0, 1.0, 256, device=out.device).view(1, 1, 256, 1, 1)
            return (p * values).sum(dim=2)                             # [B, C, H, W]
        return out.float()[:, : self.spec.shape[0]].clamp(-1.0, 1.0)

    def neg_elbo(self, x: torch.Tensor, generator: torch.Generator | None = None,
                 eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-example (-log p(x|z), KL, decoder output) with one reparameterized z ~ q(z|x):
        z = mu + sigma * eps, eps [B, Z] given or drawn (from `generator` if set)."""
        mu, logvar = self.encode(x)                                    # [B, Z] each
        if eps is None:
            eps = torch.randn(mu.shape, device=mu.device, generator=generator)
        eps = eps.to(device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps                         # [B, Z]
        out = self.decoder(z)
        return -self._log_px(x, out), gaussian_kl(mu, logvar), out

    # ---- training

    def configure_optimizers(self, phase: Phase) -> dict[str, torch.optim.Optimizer]:
        return {"vae": torch.optim.Adam(self.parameters(), lr=self.lr)}

    def train_step(self, batch: Batch, phase: Phase,
                   optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float | torch.Tensor]:
        opt = optimizers["vae"]
        opt.zero_grad(set_to_none=True)
        rec, kl, _ = self.neg_elbo(batch.x)
        loss = (rec + self.beta * kl).mean()
        loss.backward()
        # clip_grad_norm_ with max_norm=inf only measures; a finite clip tames rare spikes from
        # very sharp logistic scales early in training.
        gn = torch.nn.utils.clip_grad_norm_(self.parameters(), self.grad_clip or float("inf"))
        opt.step()
        logs = {"loss": loss, "recon_nats": rec.mean(), "kl_nats": kl.mean(), "grad_norm_vae": gn}
        if self.spec.is_image:
            logs["elbo_bpd"] = (rec + kl).mean() / (math.prod(self.spec.shape) * math.log(2))
        return self.step_logs(**logs)

    # ---- sampling and evaluation

    def _check_sampler(self, sampler: dict) -> tuple[float, str]:
        unknown = sorted(set(sampler) - set(self.sampler_options))
        if unknown:
            raise ValueError(f"vae: unknown sampler option {unknown[0]!r}; accepted: {', '.join(self.sampler_options)}")
        t = float(sampler.get("temperature", 1.0))
        if not t >= 0:
            raise ValueError(f"vae: temperature must be >= 0, got {t}")
        decoder = sampler.get("decoder") or ("mean" if self.spec.is_image else "sample")
        if decoder not in ("mean", "sample"):
            raise ValueError(f"vae: decoder must be 'mean' or 'sample', got {decoder!r}")
        return t, decoder

    def sample(self, rng: SeedRNG, labels: torch.Tensor | None = None, **sampler) -> torch.Tensor:
        t, decoder = self._check_sampler(sampler)
        z = rng.randn(self.z_dim).to(self.device) * t                  # [n, Z], one stream per image
        out = self.decoder(z)
        if decoder == "mean":
            return self._decoder_mean(out)                             # [n, *shape]
        return self._decoder_draw(out, rng)

    def _decoder_draw(self, out: torch.Tensor, rng: SeedRNG) -> torch.Tensor:
        """x ~ p(x|z) with this image's own stream (drawn after z, so batch splits do not matter).
        Images land on the 8-bit grid; the edge bins take the tails, as in the likelihood."""
        if not self.spec.is_image:
            mean, logvar = out.float().chunk(2, dim=1)
            return mean + torch.exp(0.5 * logvar.clamp(min=POINT_MIN_LOGVAR)) * rng.randn(2).to(out.device)
        if self.likelihood == "categorical":
            return rng.categorical(self._categorical_logits(out).movedim(2, -1)).float() / 127.5 - 1.0
        mean, log_scale = out.float().chunk(2, dim=1)
        scale = torch.exp(log_scale.clamp(min=self.min_log_scale))
        if self.likelihood == "logistic":
            u = rng.rand(*self.spec.shape).to(out.device)
            noise = torch.log(u) - torch.log1p(-u)                     # standard logistic
        else:
            noise = rng.randn(*self.spec.shape).to(out.device)
        return to_bin_index(mean + scale * noise).float() / 127.5 - 1.0      # snap onto the 8-bit grid

    def nfe(self, **sampler) -> int:
        self._check_sampler(sampler)
        return 1

    @torch.no_grad()
    def nll_bpd(self, batch: Batch) -> torch.Tensor | None:
        """Negative ELBO (beta = 1) in bits/dim, one value per image [B]: an upper bound on the
        true NLL, estimated with one z ~ q(z|x) per image drawn from that image's stream in
        `batch.rng` (a copy: batch.rng is not advanced), so an image gets the same number in any
        batch; without streams (a direct call) those of SeedRNG.for_run(0, B), so it is still
        deterministic."""
        if not self.spec.is_image:
            return None
        x = batch.x.to(self.device)
        rng = held_out_streams(batch, x.shape[0], self.device)
        rec, kl, _ = self.neg_elbo(x, eps=rng.randn(self.z_dim))
        return (rec.double() + kl.double()) / (math.prod(self.spec.shape) * math.log(2))

    @torch.no_grad()
    def extra_metrics(self, batch: Batch) -> dict[str, float]:
        """recon_mse: squared error of the decoder mean at the posterior mean, in [-1, 1] units
        (data units for points); kl_nats: mean KL per example. No random draws: both are plain
        means over the images given (the harness passes the whole held-out set)."""
        x = batch.x.to(self.device)
        mu, logvar = self.encode(x)
        recon = self._decoder_mean(self.decoder(mu))
        return {"recon_mse": (recon - x.float()).pow(2).mean().item(),
                "kl_nats": gaussian_kl(mu, logvar).mean().item()}
