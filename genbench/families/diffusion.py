"""Gaussian diffusion: DDPM (Ho et al. 2020), improved DDPM (Nichol & Dhariwal 2021) and ADM with
classifier / classifier-free guidance (Dhariwal & Nichol 2021; Ho & Salimans 2021), one family.

Training
  * schedule "linear" (DDPM; betas 1e-4..0.02 rescaled by 1000/T) or "cosine" (iDDPM, s=0.008,
    betas clipped at 0.999); T steps (card param `timesteps`, default 1000).
  * eps-prediction with L_simple; with `learn_sigma` the network also outputs v per pixel and the
    variance is exp(f log beta_t + (1 - f) log beta~_t) with f = (tanh(v) + 1) / 2. iDDPM uses
    f = (v + 1) / 2 unbounded; the tanh keeps the variance inside [beta~_t, beta_t] always, with
    the same value and slope at v = 0. Loss L_hybrid = L_simple + lambda * L_vlb, lambda = 0.001,
    L_vlb = T * E_t[L_t] (L_t in bits/dim) with a stop-gradient on the mean so the VLB trains only
    the variance.
  * class-conditional (`class_cond`) with label dropout `p_uncond` to a null class, for
    classifier-free guidance; or a noise-aware classifier trained on x_t as a second phase
    (`classifier`: its network arguments) for classifier guidance.

Sampling (sampler kwargs; one checkpoint serves all of them)
  sampler  "ancestral" | "ddim"
  steps    K respaced timesteps (default T), evenly spaced from T-1 down to 0
  eta      DDIM noise (0 = deterministic given x_T)
  variance ancestral variance: "large" (beta_t), "small" (beta~_t) or "learned"
  guidance classifier-free weight w: eps = eps_c + w (eps_c - eps_u); w = 0 is the conditional model
  classifier_scale  classifier guidance scale s
  clip_denoised     clip the predicted x_0 to [-1, 1] (images; default True)
The loop is plain Python over precomputed per-step tensors, one network call per step (CFG runs
conditional and unconditional passes as one batch of 2n), no host syncs, so torch.compile and
bf16 autocast apply. All noise comes from the per-image SeedRNG.

Network (card param `network`, images only): left out, genbench's UNet above (the UNet arguments);
{type: diffusers, config: {...}} a fresh diffusers UNet2DModel, {type: diffusers, path: DIR} a saved one
(genbench/families/networks.py; the optional extra genbench[diffusers]). The UNet arguments then do
not apply; the schedule, losses, samplers and likelihood are the same.

Likelihood: nll_bpd is the variational bound in bits/dim on 8-bit data, one per image, estimated by
stratified sampling of timesteps, dense where the bound's terms are large, with every draw from the
image's own held-out stream, so no number depends on the batch (see nll_bpd).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from genbench.families.base import Batch, DataSpec, GenerativeModel, Phase, held_out_streams, register_family
from genbench.families.unet import EncoderClassifier, MLPDenoiser, UNet
from genbench.metrics import HELD_OUT, Metric
from genbench.rng import SeedRNG

SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ancestral", "ddim")
VARIANCES = ("large", "small", "learned")
LN2 = math.log(2.0)
EXTRA_CHUNK = 256        # images per network call in extra_metrics (it gets the whole held-out set)


# ---------------------------------------------------------------- schedules and Gaussian helpers

def make_betas(schedule: str, T: int) -> torch.Tensor:
    """[T] float64 betas. Linear is DDPM's 1e-4..0.02 at T=1000, rescaled so other T keep its shape."""
    if schedule == "linear":
        scale = 1000.0 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    if schedule == "cosine":
        return cosine_betas(T)
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")


def cosine_alpha_bar(t: torch.Tensor, T: int, s: float = 0.008) -> torch.Tensor:
    """iDDPM eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos(((t/T + s) / (1 + s)) * pi/2)^2."""
    f = lambda u: torch.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2
    return f(t.double()) / f(torch.zeros((), dtype=torch.float64))


def cosine_betas(T: int, max_beta: float = 0.999) -> torch.Tensor:
    t = torch.arange(T + 1, dtype=torch.float64)
    ab = cosine_alpha_bar(t, T)
    # Clipped at 0.999 to avoid the singularity at t = T (iDDPM section 3.2).
    return torch.clamp(1 - ab[1:] / ab[:-1], max=max_beta)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _log_sub_exp(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """log(exp(log_a) - exp(log_b)) for log_a > log_b: log_a + log(1 - exp(log_b - log_a)), with
    expm1 so that close values keep their precision (the clamp only keeps log(0) out)."""
    return log_a + torch.log(-torch.expm1((log_b - log_a).clamp(max=-1e-300)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) in nats, elementwise, for x on the 8-bit grid in [-1, 1] (bins 2/255 wide), under
    N(mean, exp(log_scale)^2).

    The edge bins take the whole tail: P(x=-1) = Phi(-1 + 1/255), P(x=1) = 1 - Phi(1 - 1/255)
    (DDPM section 3.3), so the 256 probabilities sum to one.

    Computed in log space, in float64, with no floor on the result:
      * the edges are log Phi(hi) and log(1 - Phi(lo)) = log Phi(-lo), the mirrored tail;
      * a middle bin is Phi(hi) - Phi(lo), taken on the side of the mean where it does not cancel:
        above the mean (lo > 0) as Phi(-lo) - Phi(-hi), both lower tails, and in either case as
        log Phi(a) + log(1 - exp(log Phi(b) - log Phi(a))).
    (hi, lo: the bin's upper and lower edge standardized by the mean and scale.) A plain difference
    of CDFs would lose the upper tail in float32 (1 - Phi rounds to 0 beyond about 5 sigma) and a
    floor on the probability would cap the log; float64 keeps the middle bins of a wide Gaussian,
    whose log-CDFs nearly cancel, exact too. The result has the inputs' (promoted) dtype.
    """
    dtype = torch.promote_types(torch.promote_types(x.dtype, mean.dtype), log_scale.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    x, mean, log_scale = x.double(), mean.double(), log_scale.double()
    inv_std = torch.exp(-log_scale)
    hi = (x - mean + 1.0 / 255) * inv_std                       # standardized upper bin edge
    lo = (x - mean - 1.0 / 255) * inv_std                       # standardized lower bin edge
    upper = lo > 0                                              # the whole bin lies above the mean
    a = torch.where(upper, -lo, hi)
    b = torch.where(upper, -hi, lo)                             # b < a; Phi(a) - Phi(b) is the bin's mass
    middle = _log_sub_exp(torch.special.log_ndtr(a), torch.special.log_ndtr(b))
    bottom = torch.special.log_ndtr(hi)                         # x = -1: mass of (-inf, hi]
    top = torch.special.log_ndtr(-lo)                           # x = +1: mass of [lo, inf), mirrored
    out = torch.where(x < -0.999, bottom, torch.where(x > 0.999, top, middle))
    return out.to(dtype)


def gaussian_log_likelihood(x, mean, logvar) -> torch.Tensor:
    """Continuous Gaussian log density in nats (the decoder term for 2-D points)."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def learned_logvar(v: torch.Tensor, log_beta: torch.Tensor, log_post: torch.Tensor) -> torch.Tensor:
    """iDDPM's interpolation in log space between beta~_t (f=0) and beta_t (f=1), with f = (tanh(v)+1)/2
    so the result never leaves [beta~_t, beta_t] (iDDPM's (v+1)/2 is unbounded)."""
    frac = (torch.tanh(v) + 1) / 2
    return frac * log_beta + (1 - frac) * log_post


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)                         # [B, ...] -> [B]


def _bcast(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample coefficients [B] -> [B, 1, ...] to broadcast against x."""
    return c.reshape(-1, *([1] * (x.dim() - 1)))


def respaced_timesteps(T: int, steps: int) -> torch.Tensor:
    """The K timesteps a K-step sampler visits, increasing; K = T gives 0..T-1.
    Evenly spaced from T-1 down to 0, so K = 1 still starts from (almost) pure noise."""
    return torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().flip(0)


def stratum_edges(T: int, k: int) -> list[tuple[int, int]]:
    """At most k strata [a, b) covering 1..T-2 exactly once, widths growing geometrically."""
    lo, hi = 1, T - 1                                   # half-open range [1, T-1)
    if hi <= lo:
        return []
    k = max(1, min(k, hi - lo))
    cuts = torch.logspace(0, math.log10(hi - lo + 1), k + 1, dtype=torch.float64) - 1   # 0 .. hi-lo
    edges = [lo]
    for i in range(1, k + 1):   # strictly increasing, leaving room for the strata still to come
        edges.append(min(max(lo + int(round(cuts[i].item())), edges[-1] + 1), hi - (k - i)))
    return list(zip(edges[:-1], edges[1:]))


# ---------------------------------------------------------------- the family

@register_family("diffusion")
class Diffusion(GenerativeModel):
    sampler_options = ("sampler", "steps", "eta", "variance", "guidance", "classifier_scale", "clip_denoised")
    # genbench check-family: a tiny model exercising every sampler option (learned variance, classifier-free
    # guidance with label dropout and a noise-aware classifier where the data has classes), sampled briefly
    conformance_sampler = {"steps": 5}

    @staticmethod
    def conformance_params(spec: DataSpec) -> dict:
        p = {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0,
             "timesteps": 50, "learn_sigma": True, "mlp_hidden": 32, "mlp_layers": 2, "nll_timesteps": 4}
        if spec.num_classes > 0:
            p.update(class_cond=True, p_uncond=0.2, classifier_share=0.5,
                     classifier={"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": []}
                     if spec.is_image else {"hidden": 16, "layers": 1})
        return p

    @staticmethod
    def sampler_examples(spec: DataSpec) -> list[dict]:
        ex = [{"sampler": "ancestral"}, {"sampler": "ddim"}, {"sampler": "ddim", "eta": 0.5}, {"steps": 1},
              {"variance": "large"}, {"variance": "small"}, {"variance": "learned"}, {"clip_denoised": False}]
        if spec.num_classes > 0:
            ex += [{"guidance": 2.0}, {"sampler": "ddim", "guidance": 1.0}, {"classifier_scale": 1.0},
                   {"sampler": "ddim", "classifier_scale": 1.0}]
        return ex
    declared_metrics = (
        Metric("eps_mse", "family", False, "held-out eps MSE", HELD_OUT,
               "noise-prediction error on held-out images at timesteps spread over 0..T-1"),
        Metric("noisy_classifier_acc", "family", True, "noisy-classifier acc.", HELD_OUT,
               "accuracy of the guidance classifier on noised held-out images"),
    )

    def __init__(self, spec: DataSpec, *, schedule: str = "linear", timesteps: int = 1000,
                 learn_sigma: bool = False, hybrid_lambda: float = 0.001,
                 # UNet (images)
                 ch: int = 128, ch_mult=(1, 2, 2, 2), num_res_blocks: int = 2, attn_resolutions=(16,),
                 dropout: float = 0.1, num_heads: int = 1, head_channels: int = -1,
                 scale_shift_norm: bool = False, resblock_updown: bool = False,
                 # another noise-prediction network instead of the UNet (genbench/families/networks.py)
                 network: dict | None = None,
                 # MLP (2-D points)
                 mlp_hidden: int = 256, mlp_layers: int = 4,
                 # conditioning and guidance
                 class_cond: bool = False, p_uncond: float = 0.0,
                 classifier: dict | None = None, classifier_share: float = 0.2,
                 classifier_lr: float = 3e-4, classifier_weight_decay: float = 0.05,
                 # optimisation
                 lr: float = 2e-4, weight_decay: float = 0.0, warmup_steps: int = 0, grad_clip: float | None = 1.0,
                 # likelihood estimate
                 nll_timesteps: int = 50):
        super().__init__(spec)
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
        if int(timesteps) < 2:
            raise ValueError(f"timesteps must be at least 2, got {timesteps}")
        if schedule == "linear" and 0.02 * 1000.0 / int(timesteps) >= 0.999:
            # the linear schedule is DDPM's shape rescaled by 1000/T: at T <= 20 its last beta reaches 1
            raise ValueError(f"schedule 'linear' with timesteps {timesteps} puts beta_T at "
                             f"{0.02 * 1000.0 / int(timesteps):.3g}; use timesteps >= 21 or schedule 'cosine'")
        if (class_cond or classifier is not None) and spec.num_classes < 1:
            raise ValueError("class_cond / classifier need a dataset with class labels (num_classes > 0)")
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {p_uncond}")
        if p_uncond > 0 and not class_cond:
            raise ValueError("p_uncond (label dropout) needs class_cond: true")
        if classifier is not None and not 0.0 < classifier_share < 1.0:
            raise ValueError(f"classifier_share must be in (0, 1), got {classifier_share}")
        self.schedule, self.T = schedule, int(timesteps)   # T in the papers' notation
        self.learn_sigma, self.hybrid_lambda = bool(learn_sigma), float(hybrid_lambda)
        self.class_cond, self.p_uncond = bool(class_cond), float(p_uncond)
        self.conditional = self.class_cond or classifier is not None
        self.classifier_share, self.classifier_lr = float(classifier_share), float(classifier_lr)
        self.classifier_weight_decay = float(classifier_weight_decay)
        self.lr, self.weight_decay, self.warmup_steps = float(lr), float(weight_decay), int(warmup_steps)
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.nll_timesteps = int(nll_timesteps)
        self.null_label = spec.num_classes            # index of the "no class" embedding for CFG

        c = spec.shape[0]
        out = c * (2 if self.learn_sigma else 1)
        n_emb = spec.num_classes + 1 if self.class_cond else 0
        if network is not None and not spec.is_image:
            raise ValueError(f"network: a UNet needs images [C, H, W]; the data are points {list(spec.shape)} "
                             "(leave `network` out for genbench's MLP)")
        if spec.is_image:
            if spec.shape[1] != spec.shape[2]:
                raise ValueError(f"the UNet needs square images, got {spec.shape}")
        if network is not None:
            from genbench.families.networks import build_network

            self.net = build_network(network, in_channels=c, out_channels=out, image_size=spec.shape[1],
                                     num_labels=spec.num_classes + int(self.p_uncond > 0) if self.class_cond else 0,
                                     fill_labels=n_emb, timesteps=self.T)
        elif spec.is_image:
            self.net = UNet(c, out, spec.shape[1], ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                            attn_resolutions=attn_resolutions, dropout=dropout, num_heads=num_heads,
                            head_channels=head_channels, scale_shift_norm=scale_shift_norm,
                            resblock_updown=resblock_updown, num_classes=n_emb)
        else:  # 2-D points: the UNet arguments do not apply, an MLP does the same job
            self.net = MLPDenoiser(c, out, hidden=mlp_hidden, layers=mlp_layers, num_classes=n_emb)
        self.classifier = None
        if classifier is not None:
            kw = dict(classifier)
            if spec.is_image:
                self.classifier = EncoderClassifier(c, spec.num_classes, spec.shape[1], **kw)
            else:
                self.classifier = MLPDenoiser(c, spec.num_classes, **kw)

        # The schedule is derived from the card, so it is rebuilt, never checkpointed
        # (persistent=False); kept in float64 and cast per use.
        betas = make_betas(schedule, self.T)
        ab = torch.cumprod(1 - betas, 0)
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        post_var = betas * (1 - ab_prev) / (1 - ab)
        sched = {
            "betas": betas, "alpha_bar": ab, "alpha_bar_prev": ab_prev,
            "sqrt_ab": ab.sqrt(), "sqrt_1mab": (1 - ab).sqrt(),
            "post_var": post_var,
            # beta~_0 = 0: its log is replaced by beta~_1's (iDDPM's clipped posterior log-variance)
            "post_logvar": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            "post_c0": betas * ab_prev.sqrt() / (1 - ab),
            "post_ct": (1 - ab_prev) * (1 - betas).sqrt() / (1 - ab),
        }
        for k, v in sched.items():
            self.register_buffer(k, v, persistent=False)
        # Optimizer steps taken in the diffusion phase: drives LR warm-up and survives resume.
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64))

    # ------------------------------------------------------------ training

    def phases(self) -> list[Phase]:
        if self.classifier is None:
            return [Phase("diffusion", 1.0)]
        return [Phase("diffusion", 1.0 - self.classifier_share), Phase("classifier", self.classifier_share)]

    def start_phase(self, phase: Phase) -> None:
        # The classifier phase trains on q(x_t | x_0) only: the denoiser is frozen and never called.
        self.net.requires_grad_(phase.name != "classifier")
        self._steps_host = None   # the warm-up's step count, read from the buffer once per phase (after resume)
        if self.classifier is not None:
            self.classifier.requires_grad_(phase.name == "classifier")

    def configure_optimizers(self, phase: Phase) -> dict[str, torch.optim.Optimizer]:
        if phase.name == "classifier":
            if self.classifier is None:
                raise ValueError("this model has no classifier phase")
            return {"classifier": torch.optim.AdamW(self.classifier.parameters(), lr=self.classifier_lr,
                                                    weight_decay=self.classifier_weight_decay)}
        return {"net": torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)}

    def _coef(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Schedule entry `name` at timesteps t [B], float32, shaped to broadcast against x."""
        return _bcast(getattr(self, name)[t].float(), x)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        return self._coef("sqrt_ab", t, x0) * x0 + self._coef("sqrt_1mab", t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7)."""
        mean = self._coef("post_c0", t, x0) * x0 + self._coef("post_ct", t, xt) * xt
        return mean, self._coef("post_logvar", t, x0).expand_as(x0)

    def _split(self, out: torch.Tensor):
        """Network output -> (eps, v or None), both float32 (losses stay out of bf16)."""
        out = out.float()
        if self.learn_sigma:
            eps, v = out.chunk(2, dim=1)
            return eps, v
        return out, None

    def _logvar(self, v: torch.Tensor | None, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Model log-variance at full-schedule timesteps t: learned from v, else beta~_t (the
        posterior variance, clipped at t = 0), which is what the bound is scored with."""
        lo = self._coef("post_logvar", t, x)
        if v is not None:
            return learned_logvar(v, self._coef("betas", t, x).log(), lo)
        return lo.expand_as(x)

    def _vb_terms(self, x0, xt, t, eps, v, clip: bool = False) -> torch.Tensor:
        """L_t in bits/dim per sample [B]: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, the
        decoder -log p(x_0|x_1) for t = 0 (discretized on images, continuous on points).
        clip: the model's x_0 estimate is clipped to [-1, 1], as the sampler does; near t = T it is
        eps / sqrt(alpha_bar_t), and unclipped a tiny eps error becomes a large KL there."""
        x0_pred = self._coef("sqrt_ab", t, xt).reciprocal() * (xt - self._coef("sqrt_1mab", t, xt) * eps)
        if clip:
            x0_pred = x0_pred.clamp(-1, 1)
        model_mean, _ = self.q_posterior(x0_pred, xt, t)
        model_logvar = self._logvar(v, t, xt)
        true_mean, true_logvar = self.q_posterior(x0, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / LN2
        if self.spec.is_image:
            ll = discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)
        else:
            ll = gaussian_log_likelihood(x0, model_mean, model_logvar)
        decoder = -mean_flat(ll) / LN2
        return torch.where(t == 0, decoder, kl)

    def _net_labels(self, y: torch.Tensor | None, n: int, device) -> torch.Tensor | None:
        if not self.class_cond:
            return None
        if y is None:
            raise ValueError("class_cond model: the training batch has no labels")
        y = y.to(device)
        if self.p_uncond > 0:  # label dropout teaches the null class the unconditional model
            drop = torch.rand(n, device=device) < self.p_uncond
            y = torch.where(drop, torch.full_like(y, self.null_label), y)
        return y

    def train_step(self, batch: Batch, phase: Phase,
                   optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float | torch.Tensor]:
        if phase.name == "classifier":
            return self._classifier_step(batch, optimizers["classifier"])
        opt = optimizers["net"]
        x0 = batch.x.to(self.device).float()
        n = x0.shape[0]
        t = torch.randint(0, self.T, (n,), device=x0.device)
        noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        eps, v = self._split(self.net(xt, t, self._net_labels(batch.y, n, x0.device)))
        mse = mean_flat((noise - eps) ** 2)                                  # [B]
        logs = {}
        loss = mse
        if self.learn_sigma:
            # Stop-gradient on the mean: L_vlb only trains the variance (iDDPM section 3.1).
            vb = self._vb_terms(x0, xt, t, eps.detach(), v)
            loss = mse + self.hybrid_lambda * self.T * vb
            logs["vb"] = vb.mean()
        loss = loss.mean()

        if self.warmup_steps > 0:
            if getattr(self, "_steps_host", None) is None:   # one host read per phase, not one per step
                self._steps_host = int(self.steps_done.item())
            scale = min(1.0, (self._steps_host + 1) / self.warmup_steps)
            for g in opt.param_groups:
                g["lr"] = self.lr * scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.net.parameters(),
                                            self.grad_clip if self.grad_clip is not None else float("inf"))
        opt.step()
        self.steps_done += 1
        if getattr(self, "_steps_host", None) is not None:
            self._steps_host += 1
        logs.update(loss=loss, mse=mse.mean(), grad_norm_net=gn)
        return self.step_logs(**logs)

    def _classifier_step(self, batch: Batch, opt: torch.optim.Optimizer) -> dict[str, float]:
        if batch.y is None:
            raise ValueError("the classifier phase needs labelled batches")
        x0 = batch.x.to(self.device).float()
        y = batch.y.to(x0.device)
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        xt = self.q_sample(x0, t, torch.randn_like(x0))                     # noise-aware: train on x_t
        logits = self.classifier(xt, t).float()
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.classifier.parameters(), float("inf"))
        opt.step()
        acc = (logits.argmax(1) == y).float().mean()
        return self.step_logs(loss_classifier=loss, acc_classifier=acc, grad_norm_classifier=gn)

    # ------------------------------------------------------------ sampling

    def _options(self, sampler: str = "ancestral", steps: int | None = None, eta: float = 0.0,
                 variance: str | None = None, guidance: float = 0.0, classifier_scale: float = 0.0,
                 clip_denoised: bool | None = None, **unknown) -> dict:
        """Validate sampler kwargs and fill defaults; every error names the option."""
        if unknown:
            raise ValueError(f"unknown sampler option {sorted(unknown)[0]!r}; "
                             f"the diffusion family accepts {', '.join(self.sampler_options)}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        steps = self.T if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.T:
            raise ValueError(f"steps must be an integer in [1, T={self.T}], got {steps!r}")
        if float(eta) < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        variance = variance or ("learned" if self.learn_sigma else "large")
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
        if variance == "learned" and not self.learn_sigma:
            raise ValueError("variance 'learned' needs a model trained with learn_sigma: true")
        if guidance != 0 and not (self.class_cond and self.p_uncond > 0):
            raise ValueError("guidance (classifier-free) needs a class_cond model trained with p_uncond > 0")
        if classifier_scale != 0 and self.classifier is None:
            raise ValueError("classifier_scale needs a model with a classifier phase (card param 'classifier')")
        if clip_denoised is None:
            clip_denoised = self.spec.is_image
        return dict(sampler=sampler, steps=steps, eta=float(eta), variance=variance, guidance=float(guidance),
                    classifier_scale=float(classifier_scale), clip_denoised=bool(clip_denoised))

    def nfe(self, **sampler) -> int:
        """Denoiser evaluations per sample: steps, doubled when classifier-free guidance runs the
        unconditional pass too (w != 0). A classifier-guidance step also runs the classifier
        forward and backward; that smaller network is not counted here (timing measures it)."""
        o = self._options(**sampler)
        return o["steps"] * (2 if o["guidance"] != 0 else 1)

    def step_constants(self, steps: int, eta: float = 0.0) -> dict[str, torch.Tensor]:
        """Per-step tensors [K] of a K-step sampler on the model's device, computed once in float64.

        Respacing keeps alpha_bar at the visited timesteps and re-derives the betas between them,
        beta_i = 1 - alpha_bar(t_i) / alpha_bar(t_{i-1}); with K = T they are the original ones.
        """
        ts = respaced_timesteps(self.T, steps)
        ab = self.alpha_bar.detach().cpu()[ts]
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        beta = 1 - ab / ab_prev
        post_var = beta * (1 - ab_prev) / (1 - ab)
        post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]])) if steps > 1 else torch.log(beta)
        log_beta = torch.log(beta)
        large = torch.cat([post_logvar[:1], log_beta[1:]])          # beta, with beta~_1 at the last step
        sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
        c = {
            "t": ts.double(),
            "sqrt_ab": ab.sqrt(), "sqrt_1mab": (1 - ab).sqrt(),
            "sqrt_recip_ab": (1 / ab).sqrt(), "sqrt_recipm1_ab": (1 / ab - 1).sqrt(),
            "post_c0": beta * ab_prev.sqrt() / (1 - ab),
            "post_ct": (1 - ab_prev) * (1 - beta).sqrt() / (1 - ab),
            "logvar_small": post_logvar, "logvar_large": large, "log_beta": log_beta,
            "ddim_c0": ab_prev.sqrt(), "ddim_ceps": (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt(),
            "ddim_sigma": sigma,
        }
        return {k: v.to(device=self.device, dtype=torch.float32) for k, v in c.items()}

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, guidance: float):
        """(eps, v) at x_t; classifier-free guidance as one batch of 2n."""
        if not self.class_cond:
            return self._split(self.net(x, t))
        if labels is None:  # no labels: the unconditional model (null class), if it was trained
            if self.p_uncond == 0:
                raise ValueError("class_cond model trained without label dropout: pass labels")
            return self._split(self.net(x, t, torch.full((x.shape[0],), self.null_label,
                                                         dtype=torch.long, device=x.device)))
        if guidance == 0:
            return self._split(self.net(x, t, labels))
        null = torch.full_like(labels, self.null_label)
        out = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))   # [2n, ...]
        eps, v = self._split(out)
        eps_c, eps_u = eps.chunk(2)
        eps = eps_c + guidance * (eps_c - eps_u)
        return eps, (None if v is None else v.chunk(2)[0])   # variance from the conditional pass

    def _classifier_grad(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """grad_x log p(y | x_t), [n, *shape]; sample() runs under no_grad, so grad is re-enabled here."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logp = F.log_softmax(self.classifier(xg, t).float(), dim=-1)
            sel = logp.gather(1, labels[:, None]).sum()
            return torch.autograd.grad(sel, xg)[0].float()

    def run_sampler(self, x_T: torch.Tensor, rng: SeedRNG, labels: torch.Tensor | None = None,
                    **sampler) -> torch.Tensor:
        """Reverse process from a given x_T [n, *shape]; step noise comes from `rng`."""
        o = self._options(**sampler)
        if o["classifier_scale"] != 0 and labels is None:
            raise ValueError("classifier_scale needs labels to guide towards")
        n, K = x_T.shape[0], o["steps"]
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long).to(self.device).reshape(-1)
            if labels.numel() != n:
                raise ValueError(f"got {labels.numel()} labels for {n} samples")
        c = self.step_constants(K, o["eta"])
        w, s, clip = o["guidance"], o["classifier_scale"], o["clip_denoised"]
        ddim = o["sampler"] == "ddim"
        x = x_T.to(self.device).float()
        for i in reversed(range(K)):
            t = c["t"][i].expand(n)                                   # original timestep, [n]
            eps, v = self._denoise(x, t, labels, w)
            x0 = c["sqrt_recip_ab"][i] * x - c["sqrt_recipm1_ab"][i] * eps
            if clip:
                x0 = x0.clamp(-1, 1)
            if ddim:
                eps = (c["sqrt_recip_ab"][i] * x - x0) / c["sqrt_recipm1_ab"][i]   # consistent with clipped x0
                if s != 0:   # ADM Algorithm 2: shift eps along the classifier score
                    eps = eps - c["sqrt_1mab"][i] * s * self._classifier_grad(x, t, labels)
                    x0 = c["sqrt_recip_ab"][i] * x - c["sqrt_recipm1_ab"][i] * eps
                x = c["ddim_c0"][i] * x0 + c["ddim_ceps"][i] * eps
                if i > 0 and o["eta"] > 0:
                    x = x + c["ddim_sigma"][i] * rng.randn(*x.shape[1:]).to(x)
                continue
            mean = c["post_c0"][i] * x0 + c["post_ct"][i] * x
            if o["variance"] == "learned":
                logvar = learned_logvar(v, c["log_beta"][i], c["logvar_small"][i])
            else:
                logvar = c["logvar_" + o["variance"]][i]
            if s != 0:   # ADM Algorithm 1: shift the mean by s * Sigma * grad log p(y | x_t)
                mean = mean + s * torch.exp(logvar) * self._classifier_grad(x, t, labels)
            if i > 0:
                x = mean + torch.exp(0.5 * logvar) * rng.randn(*x.shape[1:]).to(x)
            else:
                x = mean
        return x.clamp(-1, 1) if self.spec.is_image else x

    def sample(self, rng: SeedRNG, labels: torch.Tensor | None = None, **sampler) -> torch.Tensor:
        self._options(**sampler)                     # fail before drawing anything
        x_T = rng.randn(*self.spec.shape)            # [n, *shape], one stream per image
        return self.run_sampler(x_T, rng, labels, **sampler)

    # ------------------------------------------------------------ likelihood and diagnostics

    @contextlib.contextmanager
    def _evaluating(self):
        """Held-out numbers are the eval-mode model's: dropout off, whatever mode the caller left it in."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            yield
        finally:
            for m, training in modes:   # each submodule back as it was (modes may be mixed)
                m.training = training

    @torch.no_grad()
    def nll_bpd(self, batch: Batch) -> torch.Tensor | None:
        """Variational bound in bits/dim on 8-bit images, one value per image [B] (float64); None for
        2-D points, which are continuous.

        bound = L_T (prior KL) + L_0 (discretized Gaussian decoder on the 8-bit grid) + L_{T-1}
                + sum_{t=1}^{T-2} L_t.
        L_T is exact; L_0 and L_{T-1} are always evaluated (no timestep is sampled for them); the
        middle sum is estimated by stratified sampling: 1..T-2 is cut into at most
        K = nll_timesteps strata with geometrically growing widths (the L_t fall roughly like 1/t,
        so the first steps, which carry most of the bound, get strata of width one), each image
        draws one t uniformly in each stratum and its L_t is weighted by the stratum's width.
        Each L_t is itself a one-sample estimate over x_t ~ q(x_t | x_0). So the bound is unbiased
        in both the timesteps and the noise; K >= T-2 makes every stratum one step wide, the exact
        sum over t (only the x_t draws remain random). Cost: about K + 2 network passes over the
        batch.

        All draws come from the image's own stream in `batch.rng` (its timesteps first, then one
        x_t noise draw per term, in a fixed order), so an image gets the same bound in any batch and
        next to any other images; the harness averages the per-image values exactly. batch.rng is
        not advanced (a copy is used), so the same batch gives the same numbers; without streams
        (a direct call) the images use those of SeedRNG.for_run(0, B). The model is scored in eval
        mode. The x_0 estimate is clipped to [-1, 1] as in sampling (iDDPM's calc_bpd_loop does
        the same). Fixed-variance models are scored with beta~_t.
        """
        if not self.spec.is_image:
            return None
        x0 = batch.x.to(self.device).float()
        x0 = torch.round((x0 + 1) * 127.5).clamp(0, 255) / 127.5 - 1      # snap onto the 8-bit grid
        n = x0.shape[0]
        labels = batch.y.to(self.device) if (self.class_cond and batch.y is not None) else None
        rng = held_out_streams(batch, n, self.device)
        strata = stratum_edges(self.T, self.nll_timesteps)
        if strata:   # t[i, k]: image i's timestep in stratum k, uniform on [a_k, b_k)
            lo = torch.tensor([a for a, _ in strata], dtype=torch.float64, device=self.device)
            width = torch.tensor([b - a for a, b in strata], dtype=torch.float64, device=self.device)
            u = rng.rand(len(strata)).to(self.device).double()                          # [n, K]
            t_mid = (lo + torch.minimum(torch.floor(u * width), width - 1)).long()        # [n, K]

        def term(t: torch.Tensor) -> torch.Tensor:                          # L_t, [n] bits/dim, float64
            noise = rng.randn(*x0.shape[1:]).to(self.device)                  # this image's x_t noise
            xt = self.q_sample(x0, t, noise)
            eps, v = self._denoise(xt, t, labels, 0.0)
            return self._vb_terms(x0, xt, t, eps, v, clip=True).double()

        at = lambda k: torch.full((n,), k, dtype=torch.long, device=self.device)
        with self._evaluating():
            total = term(at(0)) + term(at(self.T - 1))
            for k in range(len(strata)):
                total = total + width[k] * term(t_mid[:, k])
        t_last = at(self.T - 1)
        mean_T = self._coef("sqrt_ab", t_last, x0) * x0
        logvar_T = torch.log(1 - self._coef("alpha_bar", t_last, x0)).expand_as(x0)
        prior = mean_flat(normal_kl(mean_T, logvar_T, torch.zeros_like(x0), torch.zeros_like(x0))) / LN2
        return total + prior.double()

    @torch.no_grad()
    def extra_metrics(self, batch: Batch) -> dict[str, float]:
        """Held-out eps-MSE, and noisy-classifier accuracy (on the same x_t) if there is a classifier.

        Image k of the n given (the harness passes the whole held-out set) is noised to
        t = k * T // n, so the timesteps spread evenly over 0..T-1, with noise from its own stream
        in `batch.rng` (a copy; SeedRNG.for_run(0, n) without one). The network runs over chunks of
        EXTRA_CHUNK images, which changes no number: each image's x_t depends only on its index,
        n and its stream. Eval mode, as nll_bpd."""
        x0 = batch.x.to(self.device).float()
        n = x0.shape[0]
        rng = held_out_streams(batch, n, self.device)
        t = torch.arange(n, device=self.device) * self.T // n                       # spread over 0..T-1
        noise = rng.randn(*x0.shape[1:]).to(self.device)                           # [n, *shape]
        labels = batch.y.to(self.device) if (self.class_cond and batch.y is not None) else None
        score = self.classifier is not None and batch.y is not None
        sq_err, correct = 0.0, 0
        with self._evaluating():
            for i in range(0, n, EXTRA_CHUNK):
                j = min(i + EXTRA_CHUNK, n)
                xt = self.q_sample(x0[i:j], t[i:j], noise[i:j])
                eps, _ = self._denoise(xt, t[i:j], None if labels is None else labels[i:j], 0.0)
                sq_err += float(((eps - noise[i:j]).double() ** 2).sum())
                if score:
                    pred = self.classifier(xt, t[i:j]).argmax(1)
                    correct += int((pred == batch.y[i:j].to(self.device)).sum())
        out = {"eps_mse": sq_err / max(noise.numel(), 1)}
        if score:
            out["noisy_classifier_acc"] = correct / max(n, 1)
        return out
