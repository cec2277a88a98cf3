"""VQ-VAE (van den Oord et al. 2017) with a gated PixelCNN prior (van den Oord et al. 2016).

Two phases. "autoencoder": a conv encoder maps an image to a grid of code_dim vectors, each snapped to
its nearest codebook entry; the decoder reconstructs from the snapped grid (MSE), gradients cross the
non-differentiable snap with the straight-through estimator, and a commitment term keeps the encoder
near its codes. The codebook is not trained by gradient: each entry is an exponential moving average
of the encoder vectors assigned to it (the paper's appendix), and entries nobody uses ("dead codes")
are restarted at random encoder outputs of the current batch. "prior": the autoencoder is frozen and
a gated PixelCNN learns p(codes) autoregressively over the code grid in raster order, optionally
conditioned on the class.

Sampling draws the grid one position at a time from the prior with the image's own random stream
(rng.categorical), then decodes it. `codes: uniform` skips the prior and draws every code uniformly,
which shows what the prior buys. There is no proper image likelihood (the decoder is an MSE
regressor), so nll_bpd is None; prior_bits_per_code measures the prior instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from genbench.families.base import Batch, DataSpec, GenerativeModel, Phase, register_family
from genbench.metrics import HELD_OUT, Metric
from genbench.rng import SeedRNG

CODE_SOURCES = ("prior", "uniform")


# --------------------------------------------------------------------------- autoencoder

class ResBlock(nn.Module):
    """The paper's residual block: x + 1x1(relu(3x3(relu(x))))."""

    def __init__(self, ch: int):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def _encoder(in_ch: int, ch: int, code_dim: int, levels: int, res_blocks: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, ch, 3, padding=1)]
    for _ in range(levels):                       # [ch, s, s] -> [ch, s/2, s/2]
        layers += [nn.ReLU(), nn.Conv2d(ch, ch, 4, stride=2, padding=1)]
    layers += [ResBlock(ch) for _ in range(res_blocks)]
    layers += [nn.ReLU(), nn.Conv2d(ch, code_dim, 1)]   # -> [code_dim, h, w]
    return nn.Sequential(*layers)


def _decoder(out_ch: int, ch: int, code_dim: int, levels: int, res_blocks: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(code_dim, ch, 3, padding=1)]
    layers += [ResBlock(ch) for _ in range(res_blocks)]
    for _ in range(levels):                       # [ch, s, s] -> [ch, 2s, 2s]
        layers += [nn.ReLU(), nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1)]
    layers += [nn.ReLU(), nn.Conv2d(ch, out_ch, 3, padding=1)]
    return nn.Sequential(*layers)


class EMAQuantizer(nn.Module):
    """Nearest-neighbour codebook whose entries are EMAs of their assigned encoder vectors.

    State (all buffers, so checkpoints carry it): embed [K, D] the codebook; cluster_size [K] the EMA
    of how many vectors each code got per batch; embed_sum [K, D] the EMA of their sum;
    initialized, set once the codebook was seeded from the first batch of encoder outputs.
    """

    def __init__(self, num_codes: int, dim: int, decay: float, eps: float = 1e-5,
                 dead_threshold: float = 1.0):
        super().__init__()
        self.num_codes, self.dim, self.decay, self.eps = num_codes, dim, decay, eps
        self.dead_threshold = dead_threshold
        self.register_buffer("embed", torch.randn(num_codes, dim))
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("embed_sum", self.embed.clone())
        self.register_buffer("initialized", torch.tensor(False))

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, D] -> index of the nearest code [N] (squared Euclidean distance, float32)."""
        z = z.float()
        d = z.pow(2).sum(1, keepdim=True) - 2 * z @ self.embed.t() + self.embed.pow(2).sum(1)[None]  # [N, K]
        return d.argmin(dim=1)

    @torch.no_grad()
    def ema_update(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        """One EMA step from the batch's encoder vectors z [N, D] and their codes [N]:
        N_k <- g N_k + (1-g) n_k,  m_k <- g m_k + (1-g) sum_{i: code i = k} z_i,
        e_k = m_k / N~_k with N~ the Laplace-smoothed counts (so an empty code never divides by 0)."""
        onehot = F.one_hot(codes, self.num_codes).float()                # [N, K]
        self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(onehot.t() @ z.float(), alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
        self.embed.copy_(self.embed_sum / smoothed[:, None])

    @torch.no_grad()
    def seed_from(self, z: torch.Tensor) -> None:
        """First batch: place the codes on random encoder outputs (k-means style init), so no code
        starts far from the data and dead."""
        pick = torch.randint(z.shape[0], (self.num_codes,), device=z.device)
        self.embed.copy_(z[pick].float())
        self.embed_sum.copy_(self.embed)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def restart_dead(self, z: torch.Tensor) -> int:
        """Codes whose usage EMA fell below dead_threshold jump to random encoder outputs of this
        batch, with a count of one. Returns how many were restarted."""
        dead = self.cluster_size < self.dead_threshold                  # [K] bool
        k = int(dead.sum())
        if k:
            pick = torch.randint(z.shape[0], (k,), device=z.device)
            self.embed[dead] = z[pick].float()
            self.embed_sum[dead] = z[pick].float()
            self.cluster_size[dead] = 1.0
        return k

    def forward(self, z_e: torch.Tensor, update: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """z_e [B, D, h, w] -> (straight-through z_q [B, D, h, w], codes [B, h, w], stats with the
        plain z_q and the number of restarts). With update=True (autoencoder training) the codebook takes one EMA step and restarts."""
        b, d, h, w = z_e.shape
        with torch.autocast(z_e.device.type, enabled=False):   # distances need float32
            flat = z_e.float().permute(0, 2, 3, 1).reshape(-1, d)   # [B*h*w, D]
            if update and not bool(self.initialized):
                self.seed_from(flat.detach())
            codes = self.assign(flat.detach())                      # [B*h*w]
            # z_q from the codebook the codes were assigned with (indexing copies, so the update
            # below cannot move it).
            z_q = self.embed[codes].view(b, h, w, d).permute(0, 3, 1, 2)   # [B, D, h, w]
            restarts = 0
            if update:
                self.ema_update(flat.detach(), codes)
                restarts = self.restart_dead(flat.detach())
            # Straight-through: forward uses z_q, backward copies dL/dz_q onto z_e unchanged.
            z_st = z_e.float() + (z_q - z_e.float()).detach()
        return z_st, codes.view(b, h, w), {"restarts": restarts, "z_q": z_q}


def code_stats(codes: torch.Tensor, num_codes: int) -> tuple[float, float]:
    """(perplexity, share of codes used) of a batch of codes: perplexity is exp(entropy) of the
    code histogram, from 1 (one code) to num_codes (all used equally)."""
    p = torch.bincount(codes.flatten(), minlength=num_codes).float()
    used = (p > 0).float().mean().item()
    p = p / p.sum()
    return math.exp(-(p * torch.log(p.clamp_min(1e-12))).sum().item()), used


# --------------------------------------------------------------------------- gated PixelCNN prior

class GatedLayer(nn.Module):
    """One gated PixelCNN layer, with causality built from padding and crops instead of masks.

    Invariant (raster order): the vertical stack at (i, j) sees only rows < i of the input; the
    horizontal stack at (i, j) sees rows < i (through the vertical stack) and row i left of j.
    The first layer ("A") excludes the current row / pixel from its own input; later layers ("B")
    may include it, because their input already obeys the invariant.
    """

    def __init__(self, ch: int, k: int, first: bool, num_classes: int):
        super().__init__()
        self.k, self.first = k, first
        kh = k // 2 + (0 if first else 1)          # rows i-k//2 .. i-1 (A) or .. i (B)
        self.v_conv = nn.Conv2d(ch, 2 * ch, (kh, k))
        self.h_conv = nn.Conv2d(ch, 2 * ch, (1, kh))   # cols j-k//2 .. j-1 (A) or .. j (B)
        self.v_to_h = nn.Conv2d(2 * ch, 2 * ch, 1)
        self.h_out = nn.Conv2d(ch, ch, 1)
        self.cond = nn.Embedding(num_classes, 4 * ch) if num_classes else None

    @staticmethod
    def _gate(a: torch.Tensor) -> torch.Tensor:
        t, s = a.chunk(2, dim=1)
        return torch.tanh(t) * torch.sigmoid(s)

    def forward(self, v: torch.Tensor, h: torch.Tensor, y: torch.Tensor | None):
        H, W, p = v.shape[2], v.shape[3], self.k // 2
        v_pre = self.v_conv(F.pad(v, (p, p, p, 0)))[:, :, :H]         # pad top only; [B, 2ch, H, W]
        h_pre = self.h_conv(F.pad(h, (p, 0, 0, 0)))[:, :, :, :W]      # pad left only; [B, 2ch, H, W]
        h_pre = h_pre + self.v_to_h(v_pre)       # v at (i, j) sees rows < i only: safe to feed right
        if self.cond is not None:
            cv, ch_ = self.cond(y)[:, :, None, None].chunk(2, dim=1)   # [B, 2ch, 1, 1] each
            v_pre, h_pre = v_pre + cv, h_pre + ch_
        h_new = self.h_out(self._gate(h_pre))
        # No residual in the first layer: its input at (i, j) is the very code being predicted.
        return self._gate(v_pre), (h_new if self.first else h + h_new)


class GatedPixelCNN(nn.Module):
    """Codes [B, h, w] (+ labels) -> logits [B, K, h, w]; logits at (i, j) depend only on codes
    before (i, j) in raster order."""

    def __init__(self, num_codes: int, ch: int, layers: int, k: int, num_classes: int):
        super().__init__()
        self.embed = nn.Embedding(num_codes, ch)
        self.layers = nn.ModuleList(GatedLayer(ch, k, i == 0, num_classes)
                                    for i in range(layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 1), nn.ReLU(), nn.Conv2d(ch, num_codes, 1))

    def stacks(self, e: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded input e [B, ch, h, w] -> (vertical, horizontal) stack outputs, each [B, ch, h, w]."""
        v = h = e
        for layer in self.layers:
            v, h = layer(v, h, y)
        return v, h

    def forward_embedded(self, e: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.head(self.stacks(e, y)[1])

    def forward(self, codes: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        e = self.embed(codes).permute(0, 3, 1, 2)     # [B, h, w] -> [B, ch, h, w]
        return self.forward_embedded(e, y)            # [B, K, h, w]


# --------------------------------------------------------------------------- the family

@register_family("vqvae")
class VQVAEPixelCNN(GenerativeModel):
    """params: num_codes, code_dim, channels, code_size (side of the code grid; the encoder halves
    the image log2(H / code_size) times, so one card gives 8x8 codes on 16x16 and 32x32 data),
    res_blocks, commitment, ema_decay, dead_threshold (usage EMA below which a code restarts), lr,
    prior_channels, prior_layers, prior_kernel, prior_lr, conditional (class-conditional prior),
    autoencoder_share (fraction of the budget for phase 1), grad_clip."""

    sampler_options = ("codes",)
    # genbench check-family: a tiny configuration and the values each sampler option is tried at
    conformance_params = {"num_codes": 16, "code_dim": 8, "channels": 16, "prior_channels": 16, "prior_layers": 2}
    sampler_examples = {"codes": ["prior", "uniform"]}
    declared_metrics = (
        Metric("recon_mse", "family", False, "recon MSE", HELD_OUT,
               "squared reconstruction error of held-out images, in [-1, 1] units"),
        Metric("codebook_perplexity", "family", True, "codebook perplexity", HELD_OUT,
               "exp of the entropy of the held-out images' code histogram"),
        Metric("codebook_usage", "family", True, "codebook usage", HELD_OUT, "share of the codes the held-out images use"),
        Metric("prior_bits_per_code", "family", False, "prior bits/code", HELD_OUT,
               "the prior's NLL of the held-out codes, bits per code position"),
    )

    def __init__(self, spec: DataSpec, num_codes: int = 64, code_dim: int = 16, channels: int = 32,
                 code_size: int = 4, res_blocks: int = 1, commitment: float = 0.25,
                 ema_decay: float = 0.99, dead_threshold: float = 1.0, lr: float = 1e-3,
                 prior_channels: int = 32, prior_layers: int = 4, prior_kernel: int = 3,
                 prior_lr: float = 1e-3, conditional: bool = False, autoencoder_share: float = 0.5,
                 grad_clip: float | None = None):
        super().__init__(spec)
        if not spec.is_image:
            raise ValueError(f"vqvae: needs images (C, H, W), got data shape {spec.shape}")
        c, H, W = spec.shape
        downsample = round(math.log2(H / code_size)) if 0 < code_size <= H else -1
        if downsample < 0 or H != code_size << downsample or W != code_size << downsample:
            raise ValueError(f"vqvae: a {H}x{W} image cannot be halved down to a {code_size}x{code_size} "
                             f"code grid; pick code_size = H / 2^k")
        if not 0 < autoencoder_share < 1:
            raise ValueError(f"vqvae: autoencoder_share must be in (0, 1), got {autoencoder_share}")
        if prior_kernel < 3 or prior_kernel % 2 == 0:
            raise ValueError(f"vqvae: prior_kernel must be odd and >= 3, got {prior_kernel}")
        if conditional and spec.num_classes < 1:
            raise ValueError("vqvae: conditional=True needs a dataset with class labels")
        self.conditional = bool(conditional)
        self.num_codes, self.grid = num_codes, (H >> downsample, W >> downsample)
        self.commitment, self.lr, self.prior_lr = commitment, lr, prior_lr
        self.autoencoder_share, self.grad_clip = autoencoder_share, grad_clip
        self.encoder = _encoder(c, channels, code_dim, downsample, res_blocks)
        self.decoder = _decoder(c, channels, code_dim, downsample, res_blocks)
        self.quantizer = EMAQuantizer(num_codes, code_dim, ema_decay, dead_threshold=dead_threshold)
        self.prior = GatedPixelCNN(num_codes, prior_channels, prior_layers, prior_kernel,
                                   spec.num_classes if conditional else 0)

    def phases(self) -> list[Phase]:
        return [Phase("autoencoder", self.autoencoder_share), Phase("prior", 1.0 - self.autoencoder_share)]

    def start_phase(self, phase: Phase) -> None:
        # The prior learns the codes of a fixed encoder: freeze the autoencoder for phase 2.
        frozen = phase.name == "prior"
        for net in (self.encoder, self.decoder):
            net.requires_grad_(not frozen)

    def configure_optimizers(self, phase: Phase) -> dict[str, torch.optim.Optimizer]:
        if phase.name == "autoencoder":
            params = list(self.encoder.parameters()) + list(self.decoder.parameters())
            return {"autoencoder": torch.optim.Adam(params, lr=self.lr)}
        if phase.name == "prior":
            return {"prior": torch.optim.Adam(self.prior.parameters(), lr=self.prior_lr)}
        raise ValueError(f"vqvae: unknown phase {phase.name!r}")

    # ---- pieces

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        z_q = self.quantizer.embed[codes].permute(0, 3, 1, 2)   # [B, h, w] -> [B, D, h, w]
        return self.decoder(z_q)                                # [B, C, H, W]

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer(self.encoder(x), update=False)[1]   # [B, h, w]

    def _labels(self, y: torch.Tensor | None, n: int) -> torch.Tensor | None:
        if not self.conditional:
            return None
        if y is None or len(y) != n:
            raise ValueError(f"vqvae: this model is class-conditional; pass {n} labels")
        return y.to(self.device).long()

    def prior_nll(self, codes: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Mean negative log-likelihood of codes [B, h, w] under the prior, nats per code."""
        logits = self.prior(codes, self._labels(y, codes.shape[0]))
        return F.cross_entropy(logits.float(), codes)

    def _clip(self, params) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, self.grad_clip or float("inf"))

    # ---- training

    def train_step(self, batch: Batch, phase: Phase,
                   optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        if phase.name == "autoencoder":
            opt = optimizers["autoencoder"]
            opt.zero_grad(set_to_none=True)
            z_e = self.encoder(batch.x)                               # [B, D, h, w]
            z_st, codes, stats = self.quantizer(z_e, update=True)
            recon = self.decoder(z_st)                                # [B, C, H, W]
            rec = F.mse_loss(recon.float(), batch.x.float())
            # Commitment pulls the encoder towards its (fixed) codes; the codebook moves by EMA.
            commit = F.mse_loss(z_e.float(), stats["z_q"])
            loss = rec + self.commitment * commit
            loss.backward()
            gn = self._clip(opt.param_groups[0]["params"])
            opt.step()
            perplexity, usage = code_stats(codes, self.num_codes)
            return self.step_logs(loss=loss, recon_mse=rec, commit=commit, codebook_perplexity=perplexity,
                                  codebook_usage=usage, code_restarts=float(stats["restarts"]),
                                  grad_norm_autoencoder=gn)
        if phase.name == "prior":
            opt = optimizers["prior"]
            opt.zero_grad(set_to_none=True)
            nll = self.prior_nll(self.encode_codes(batch.x), batch.y)
            nll.backward()
            gn = self._clip(self.prior.parameters())
            opt.step()
            return self.step_logs(loss=nll, prior_bits_per_code=nll.double() / math.log(2), grad_norm_prior=gn)
        raise ValueError(f"vqvae: unknown phase {phase.name!r}")

    # ---- sampling and evaluation

    def _code_source(self, sampler: dict) -> str:
        unknown = sorted(set(sampler) - set(self.sampler_options))
        if unknown:
            raise ValueError(f"vqvae: unknown sampler option {unknown[0]!r}; accepted: {', '.join(self.sampler_options)}")
        src = sampler.get("codes", "prior")
        if src not in CODE_SOURCES:
            raise ValueError(f"vqvae: sampler option codes must be one of {CODE_SOURCES}, got {src!r}")
        return src

    def sample(self, rng: SeedRNG, labels: torch.Tensor | None = None, **sampler) -> torch.Tensor:
        codes = self.sample_codes(rng, labels, self._code_source(sampler))      # [n, h, w]
        return self.decode_codes(codes).float().clamp(-1.0, 1.0)                 # [n, C, H, W]

    @torch.no_grad()
    def sample_codes(self, rng: SeedRNG, labels: torch.Tensor | None = None, src: str = "prior") -> torch.Tensor:
        """A code grid [n, h, w] per image, drawn only from that image's random stream."""
        n, (h, w) = rng.n, self.grid
        if src == "uniform":
            codes = rng.randint(self.num_codes, h, w).to(self.device)            # [n, h, w]
        else:
            y = self._labels(labels, n)
            codes = torch.zeros(n, h, w, dtype=torch.long, device=self.device)
            for i in range(h):
                for j in range(w):
                    # Rows below i cannot influence row i (the prior only looks up and left), so
                    # only rows 0..i are evaluated.
                    logits = self.prior(codes[:, : i + 1], y)[:, :, i, j]        # [n, K]
                    codes[:, i, j] = rng.categorical(logits.float().to(rng.device)).to(self.device)
        return codes

    def nfe(self, **sampler) -> int:
        """Prior evaluations per image, one per code position; uniform codes only run the decoder."""
        return self.grid[0] * self.grid[1] if self._code_source(sampler) == "prior" else 1

    @torch.no_grad()
    def extra_metrics(self, batch: Batch) -> dict[str, float]:
        """On the given (held-out) batch: recon_mse in [-1, 1] units; codebook_perplexity and
        codebook_usage (share of the K codes used) of its codes; prior_bits_per_code, the prior's
        NLL of those codes in bits per code position (log2 K for a uniform prior). No random draws
        and no state change (the codebook is not updated); perplexity and usage are statistics of
        the whole histogram, not means over images, so they are meant for the whole held-out set at
        once, which is how the harness calls this."""
        x = batch.x.to(self.device)
        z_st, codes, _ = self.quantizer(self.encoder(x), update=False)
        recon = self.decoder(z_st).float().clamp(-1.0, 1.0)
        perplexity, usage = code_stats(codes, self.num_codes)
        y = batch.y.to(self.device) if (self.conditional and batch.y is not None) else None
        return {"recon_mse": (recon - x.float()).pow(2).mean().item(),
                "codebook_perplexity": perplexity, "codebook_usage": usage,
                "prior_bits_per_code": self.prior_nll(codes, y).item() / math.log(2)}
