"""GANs: one family, three classic objectives chosen by card params.

  loss: ns           DCGAN (Radford et al. 2016) with the non-saturating generator loss of Goodfellow et al.
  loss: hinge        + spectral_norm: true  -> SNGAN (Miyato et al. 2018)
  loss: wasserstein  + gp_weight: 10, n_critic: 5 -> WGAN-GP (Gulrajani et al. 2017)

Networks follow the data: DCGAN-style conv nets for square images whose side is 4 * 2**k (8..64 and
up, 1 or 3 channels), MLPs for 2-D points (spec.shape == (2,)). Class conditioning (`conditional:
true`) feeds a label embedding to G and uses a projection discriminator (Miyato & Koyama 2018),
which works with every loss here.

One `train_step` = one discriminator update on the real batch; every `n_critic`-th call also updates
G. kimg therefore counts real images shown to D whatever n_critic is.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _sn

from genbench.families.base import Batch, DataSpec, GenerativeModel, Phase, register_family
from genbench.rng import SeedRNG

LOSSES = ("ns", "hinge", "wasserstein")
_TRUNCATION_ROUNDS = 16   # redraws for the truncation trick; fixed so it stays batch-invariant


# --------------------------------------------------------------------------- networks


def _conv_levels(spec: DataSpec) -> int:
    """k such that the image side is 4 * 2**k; G grows 4x4 -> side, D shrinks side -> 4x4."""
    c, h, w = spec.shape
    k = round(math.log2(h / 4)) if h >= 8 else -1
    if h != w or k < 1 or 4 * 2 ** k != h:
        raise ValueError(f"gan: conv nets need square images with side 4*2**k >= 8 (8, 16, 32, 64, ...), "
                         f"got {h}x{w}")
    return k


def _channels(width: int, k: int) -> list[int]:
    """Channels per resolution level, coarsest (4x4) first: width*2**k ... width, capped at 8*width."""
    return [width * min(2 ** (k - i), 8) for i in range(k + 1)]


class ConvG(nn.Module):
    """z [B, z_dim] (+ label embedding) -> image [B, C, H, W] in (-1, 1)."""

    def __init__(self, spec: DataSpec, z_dim: int, width: int, num_classes: int, batchnorm: bool):
        super().__init__()
        k = _conv_levels(spec)
        ch = _channels(width, k)
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        in_dim = z_dim * (2 if num_classes else 1)
        self.fc = nn.Linear(in_dim, ch[0] * 16)
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        self.ch0 = ch[0]
        self.norm0 = norm(ch[0])
        ups = []
        for a, b in zip(ch[:-1], ch[1:]):
            ups += [nn.ConvTranspose2d(a, b, 4, 2, 1), norm(b), nn.ReLU()]
        self.ups = nn.Sequential(*ups)
        self.out = nn.Conv2d(ch[-1], spec.shape[0], 3, 1, 1)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)], dim=1)               # [B, 2*z_dim]
        h = self.fc(z).view(z.shape[0], self.ch0, 4, 4)            # [B, ch0, 4, 4]
        h = self.ups(F.relu(self.norm0(h)))                        # [B, width, H, W]
        return torch.tanh(self.out(h))                             # [B, C, H, W]


class ConvD(nn.Module):
    """image [B, C, H, W] -> score [B]. No normalisation layers: real and fake go through in one
    batch, and batch statistics would leak between them (and break the gradient penalty)."""

    def __init__(self, spec: DataSpec, width: int, num_classes: int):
        super().__init__()
        k = _conv_levels(spec)
        ch = _channels(width, k)[::-1]                             # finest first
        layers = [nn.Conv2d(spec.shape[0], ch[0], 3, 1, 1), nn.LeakyReLU(0.2)]
        for a, b in zip(ch[:-1], ch[1:]):
            layers += [nn.Conv2d(a, b, 4, 2, 1), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        feat = ch[-1] * 16
        self.head = nn.Linear(feat, 1)
        self.embed = nn.Embedding(num_classes, feat) if num_classes else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = self.body(x).flatten(1)                                # [B, ch0*16]
        out = self.head(h).squeeze(1)                              # [B]
        if self.embed is not None:                                 # projection term <e(y), h>
            out = out + (self.embed(y) * h).sum(1)
        return out


class MlpG(nn.Module):
    """z [B, z_dim] -> points [B, D]; linear output, since points are not scaled to [-1, 1]."""

    def __init__(self, dim: int, z_dim: int, hidden: int, layers: int, num_classes: int):
        super().__init__()
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        d = z_dim * (2 if num_classes else 1)
        body = []
        for _ in range(layers):
            body += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        self.net = nn.Sequential(*body, nn.Linear(d, dim))

    def forward(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)], dim=1)
        return self.net(z)                                         # [B, D]


class MlpD(nn.Module):
    def __init__(self, dim: int, hidden: int, layers: int, num_classes: int):
        super().__init__()
        body, d = [], dim
        for _ in range(layers):
            body += [nn.Linear(d, hidden), nn.LeakyReLU(0.2)]
            d = hidden
        self.body = nn.Sequential(*body)
        self.head = nn.Linear(d, 1)
        self.embed = nn.Embedding(num_classes, d) if num_classes else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = self.body(x)                                           # [B, hidden]
        out = self.head(h).squeeze(1)                              # [B]
        if self.embed is not None:
            out = out + (self.embed(y) * h).sum(1)
        return out


def _apply_spectral_norm(net: nn.Module) -> None:
    """Spectral-normalise every weight of D. torch's parametrization keeps u, v in buffers, so the
    power-iteration state is checkpointed with the model; one iteration per training forward."""
    for m in list(net.modules()):
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            _sn(m)


def _grad_norm(params) -> torch.Tensor:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


# --------------------------------------------------------------------------- the family


@register_family("gan")
class GAN(GenerativeModel):
    """Card params:
      loss            ns | hinge | wasserstein
      spectral_norm   spectral normalisation on every D weight (Miyato et al. 2018)
      gp_weight       lambda of the gradient penalty on random interpolates (0 = off)
      n_critic        D updates per G update (one real batch each)
      lr_g, lr_d, betas   Adam for G and D
      z_dim           latent size; z ~ N(0, I)
      g_channels, d_channels   conv channels at full resolution (x2 per halving, capped at x8)
      hidden, layers  MLP width and depth for 2-D points
      conditional     label embedding in G, projection D
      g_batchnorm     batch norm in the conv G (sampling uses its running statistics)
    Sampler: truncation (float or null)."""

    sampler_options = ("truncation",)
    # genbench check-family: a tiny configuration and the values each sampler option is tried at
    conformance_params = {"g_channels": 16, "d_channels": 16, "z_dim": 8, "hidden": 16, "layers": 2}
    sampler_examples = {"truncation": [0.5, None]}

    def __init__(self, spec: DataSpec, *, loss: str = "ns", spectral_norm: bool = False,
                 gp_weight: float = 0.0, n_critic: int = 1, lr_g: float = 2e-4, lr_d: float = 2e-4,
                 betas: tuple[float, float] | list[float] = (0.5, 0.999), z_dim: int = 64,
                 g_channels: int = 32, d_channels: int = 32, hidden: int = 128, layers: int = 3,
                 conditional: bool = False,
                 g_batchnorm: bool = True):
        super().__init__(spec)
        if loss not in LOSSES:
            raise ValueError(f"gan: unknown loss {loss!r}; choose one of: {', '.join(LOSSES)}")
        if loss == "wasserstein" and gp_weight <= 0 and not spectral_norm:
            raise ValueError("gan: loss 'wasserstein' needs a Lipschitz constraint on D: "
                             "set gp_weight > 0 or spectral_norm: true")
        if int(n_critic) < 1:
            raise ValueError(f"gan: n_critic must be >= 1, got {n_critic}")
        if len(betas) != 2:
            raise ValueError(f"gan: betas must be two numbers, got {betas!r}")
        if conditional and spec.num_classes < 1:
            raise ValueError("gan: conditional: true needs a dataset with class labels")
        self.loss, self.gp_weight, self.n_critic = loss, float(gp_weight), int(n_critic)
        self.lr_g, self.lr_d, self.betas = float(lr_g), float(lr_d), tuple(float(b) for b in betas)
        self.z_dim = int(z_dim)
        self.conditional = bool(conditional)
        k = spec.num_classes if conditional else 0
        if spec.is_image:
            self.G = ConvG(spec, self.z_dim, int(g_channels), k, g_batchnorm)
            self.D = ConvD(spec, int(d_channels), k)
        elif len(spec.shape) == 1:
            self.G = MlpG(spec.shape[0], self.z_dim, hidden, layers, k)
            self.D = MlpD(spec.shape[0], hidden, layers, k)
        else:
            raise ValueError(f"gan: unsupported data shape {spec.shape}")
        if spectral_norm:
            _apply_spectral_norm(self.D)
        # D updates so far; a buffer so a resumed run keeps the D:G schedule.
        self.register_buffer("d_steps", torch.zeros((), dtype=torch.int64))
        self._last_grad_norm_g = 0.0

    def configure_optimizers(self, phase: Phase) -> dict[str, torch.optim.Optimizer]:
        # Fused Adam: one kernel for all tensors; on CPU it halves the step time of the small MLPs.
        fused = all(p.device.type in ("cpu", "cuda") for p in self.parameters())
        # The D:G schedule's host-side count is re-read from the d_steps buffer at the next step (once per
        # phase, after the loop has loaded any checkpoint), then counted on the host: no sync per step.
        self._d_steps_host = None
        return {"d": torch.optim.Adam(self.D.parameters(), lr=self.lr_d, betas=self.betas, fused=fused),
                "g": torch.optim.Adam(self.G.parameters(), lr=self.lr_g, betas=self.betas, fused=fused)}

    # ---- losses (all on float32 scores: the loop may run the nets in bf16)

    def _loss_d(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        if self.loss == "ns":      # -log sigmoid(D(x)) - log(1 - sigmoid(D(G(z))))
            return F.softplus(-real).mean() + F.softplus(fake).mean()
        if self.loss == "hinge":
            return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
        return fake.mean() - real.mean()                  # Wasserstein critic

    def _loss_g(self, fake: torch.Tensor) -> torch.Tensor:
        if self.loss == "ns":      # -log sigmoid(D(G(z))), the non-saturating form
            return F.softplus(-fake).mean()
        return -fake.mean()        # hinge and Wasserstein share the generator loss

    def _gradient_penalty(self, x: torch.Tensor, fake: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """E[(||grad_x D(x_hat)||_2 - 1)^2] on random interpolates, in float32 with autocast off:
        the double backward is where bf16 rounding would hurt."""
        eps = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device)   # [B, 1, ...]
        x_hat = (eps * x.float() + (1 - eps) * fake.float()).requires_grad_(True)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = self.D(x_hat, y).float()
            (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
        return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()

    # ---- training

    def train_step(self, batch: Batch, phase: Phase,
                   optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float | torch.Tensor]:
        """One D update (and every n_critic-th call a G update). Logs are floats, or 0-d tensors on the
        model's device when the training loop asks for them (`tensor_logs`, set while it moves logs to the
        host every K steps): then a step makes no host sync (n_critic > 1 reads the d_steps buffer once
        per phase, then counts D updates on the host)."""
        x = batch.x
        y = None
        if self.conditional:
            if batch.y is None:
                raise ValueError("gan: a conditional model needs labels in every batch")
            y = batch.y
        n = x.shape[0]
        opt_d, opt_g = optimizers["d"], optimizers["g"]

        # D step: real and fake in one forward (D has no batch statistics), one power iteration.
        with torch.no_grad():
            fake = self.G(torch.randn(n, self.z_dim, device=x.device), y)
        yy = None if y is None else torch.cat([y, y])
        scores = self.D(torch.cat([x, fake.to(x.dtype)]), yy).float()          # [2B]
        s_real, s_fake = scores[:n], scores[n:]
        loss_d = self._loss_d(s_real, s_fake)
        logs = {}
        if self.gp_weight > 0:
            gp = self._gradient_penalty(x, fake, y)
            loss_d = loss_d + self.gp_weight * gp
            logs["gp"] = gp.detach()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        gn_d = _grad_norm(self.D.parameters())
        opt_d.step()
        self.d_steps += 1
        if self.n_critic == 1:
            g_update = True
        else:
            k = getattr(self, "_d_steps_host", None)
            k = int(self.d_steps) if k is None else k + 1
            self._d_steps_host = k
            g_update = k % self.n_critic == 0

        if g_update:
            # G step on fresh noise; gradients only into G (D's grads are not needed). D runs in
            # eval mode so spectral norm reuses this step's u, v: one power iteration per D update.
            fake = self.G(torch.randn(n, self.z_dim, device=x.device), y)
            d_mode = self.D.training
            self.D.eval()
            try:
                loss_g = self._loss_g(self.D(fake, y).float())
            finally:
                self.D.train(d_mode)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward(inputs=list(self.G.parameters()))
            gn_g = _grad_norm(self.G.parameters())
            opt_g.step()
        else:
            # D-only step: report G's loss on this step's fakes, and the last G gradient norm.
            loss_g = self._loss_g(s_fake.detach())
            gn_g = None
        keys = ["loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d"] + list(logs)
        vals = [loss_d.detach(), loss_g.detach(), s_real.detach().mean(), s_fake.detach().mean(), gn_d]
        vals += [v.float() for v in logs.values()]
        if gn_g is not None:
            keys.append("grad_norm_g")
            vals.append(gn_g)
        stacked = torch.stack(vals)
        tensor_logs = getattr(self, "tensor_logs", False)
        # The loop sets tensor_logs when it moves logs to the host every K steps: 0-d tensors, no sync here.
        # Otherwise floats, with one device sync for all of them.
        out = dict(zip(keys, stacked.unbind() if tensor_logs else stacked.tolist()))
        if "grad_norm_g" not in out:
            # On D-only steps (n_critic > 1) G's gradient norm is the one of its last update.
            last = self._last_grad_norm_g
            out["grad_norm_g"] = last if tensor_logs or not torch.is_tensor(last) else float(last)
        self._last_grad_norm_g = out["grad_norm_g"]
        return out

    # ---- sampling

    def _check_sampler(self, sampler: dict) -> float | None:
        unknown = sorted(set(sampler) - set(self.sampler_options))
        if unknown:
            raise ValueError(f"gan: unknown sampler option {unknown[0]!r}; "
                             f"valid: {', '.join(self.sampler_options)}")
        t = sampler.get("truncation")
        if t is not None and not (isinstance(t, (int, float)) and t > 0):
            raise ValueError(f"gan: truncation must be a positive number or null, got {t!r}")
        return None if t is None else float(t)

    def sample(self, rng: SeedRNG, labels: torch.Tensor | None = None, **sampler) -> torch.Tensor:
        """[rng.n, *shape]. `truncation: t` redraws latent entries with |z| > t (BigGAN's trick),
        a fixed number of rounds and then clamps, so each sample still depends only on its seed.
        Labels are used by a conditional model (drawn uniformly from rng when None) and ignored
        otherwise. G runs in eval mode so batch norm uses running statistics, never the batch."""
        t = self._check_sampler(sampler)
        z = rng.randn(self.z_dim)                                   # [n, z_dim]
        if t is not None:
            for _ in range(_TRUNCATION_ROUNDS):
                z = torch.where(z.abs() > t, rng.randn(self.z_dim), z)
            z = z.clamp(-t, t)
        y = None
        if self.conditional:
            if labels is None:
                labels = rng.randint(self.spec.num_classes)           # [n]
            labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
            if labels.numel() != rng.n:
                raise ValueError(f"gan: got {labels.numel()} labels for {rng.n} samples")
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.spec.num_classes):
                raise ValueError(f"gan: labels must lie in [0, {self.spec.num_classes})")
            y = labels.to(self.device)
        was_training = self.G.training
        self.G.eval()
        try:
            out = self.G(z.to(self.device), y)
        finally:
            self.G.train(was_training)
        return out.float()

    def nfe(self, **sampler) -> int:
        self._check_sampler(sampler)
        return 1
