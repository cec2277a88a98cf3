"""Denoiser networks for the diffusion family: one configurable UNet, its encoder half as a
noise-aware classifier, and a small MLP for 2-D points.

The UNet carries the options the DDPM / improved-DDPM / ADM papers ablate, so every card is the
same class with different arguments:
  * sinusoidal time embedding -> 2-layer MLP (width 4*ch), plus a learned class embedding;
  * residual blocks whose embedding enters additively (DDPM) or as adaptive group norm,
    norm(h) * (1 + scale) + shift (ADM, `scale_shift_norm=True`);
  * self-attention at chosen feature-map resolutions with a chosen number of heads
    (`num_heads`, or `head_channels` per head as in ADM), via F.scaled_dot_product_attention;
  * plain conv down/up sampling (DDPM) or BigGAN-style residual blocks that resample
    (`resblock_updown=True`);
  * dropout inside the residual blocks.
With ch=128, ch_mult=(1,2,2,2), two residual blocks, attention at 16x16 and one head this is the
DDPM CIFAR-10 network (35.7 M parameters at 32x32).

Every module is written for the GPU fast path: no host syncs, no data-dependent Python control
flow, reshape (not view) so channels_last inputs work, and group norm / attention left to the
kernels that torch.autocast(bfloat16) already handles. The output block (norm, SiLU, last conv) runs
in fp32 even under bf16 autocast: its output is the predicted noise, which a sampler divides by
sqrt(alpha_bar) (x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar), a factor of ~150 at the
noisiest DDPM step), so bf16's rounding of it (2^-9 relative) moved FD out of the seed spread
(bench/bf16_vs_fp32_quality.py). The block is under 0.1% of the network's FLOPs; sampling on an H200
was about 4% slower with it (README, Performance).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style sinusoids of (possibly fractional) timesteps: [B] -> [B, dim], float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]                     # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)     # [B, 2*half]
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(ch: int) -> nn.GroupNorm:
    """32 groups as in the papers (ch >= 128); narrower CPU-sized networks keep at least 4 channels
    per group. With one channel per group the norm would subtract any per-channel constant, and
    the additive (DDPM-style) time embedding, which is exactly such a constant, would vanish."""
    groups = max(1, min(32, ch // 4))
    while ch % groups:
        groups -= 1
    return nn.GroupNorm(groups, ch, eps=1e-5)


def zero_module(m: nn.Module) -> nn.Module:
    # Output layers of residual branches start at zero so every block starts as the identity
    # (DDPM scales them by 1e-10, ADM zeros them): deep UNets then train stably from step one.
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


class ResBlock(nn.Module):
    """GN-SiLU-conv, embedding injection, GN-SiLU-dropout-conv, plus a (1x1 if needed) skip.

    up/down: BigGAN-style, the block itself resamples (nearest / average pooling) both its
    branch and its skip, so resolution changes inside a residual connection.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float,
                 scale_shift_norm: bool, up: bool = False, down: bool = False):
        super().__init__()
        self.scale_shift_norm = scale_shift_norm
        self.up, self.down = up, down
        self.in_norm = group_norm(in_ch)
        self.in_conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_ch, out_ch * (2 if scale_shift_norm else 1))
        self.out_norm = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")   # [B,C,2H,2W]
        if self.down:
            return F.avg_pool2d(x, 2)                                   # [B,C,H/2,W/2]
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.in_norm(x))
        h = self.in_conv(self._resample(h))
        x = self._resample(x)
        e = self.emb(F.silu(emb))[:, :, None, None]                     # [B, C or 2C, 1, 1]
        if self.scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift                  # adaptive group norm
        else:
            h = self.out_norm(h + e)                                    # additive (DDPM)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual."""

    def __init__(self, ch: int, num_heads: int = 1, head_channels: int = -1):
        super().__init__()
        if head_channels > 0:
            if ch % head_channels:
                raise ValueError(f"attention: {ch} channels do not split into heads of {head_channels}")
            num_heads = ch // head_channels
        if num_heads < 1 or ch % num_heads:
            raise ValueError(f"attention: {ch} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_module(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, hgt * wid)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))      # each [B, heads, HW, d]
        out = F.scaled_dot_product_attention(q, k, v)                   # [B, heads, HW, d]
        out = out.transpose(-1, -2).reshape(b, c, hgt, wid)             # [B, C, H, W]
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)                                             # [B,C,H/2,W/2]


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))   # [B,C,2H,2W]


class EmbSequential(nn.Sequential):
    """A Sequential whose layers all take (h, emb); layers that do not need emb ignore it."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            h = layer(h, emb)
        return h


class _Stem(nn.Module):
    def __init__(self, in_ch: int, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


def _check_size(image_size: int, ch_mult: tuple[int, ...]) -> None:
    if image_size % (2 ** (len(ch_mult) - 1)):
        raise ValueError(f"image size {image_size} cannot be halved {len(ch_mult) - 1} times (ch_mult={ch_mult})")


class _Trunk(nn.Module):
    """Embeddings, the down path and the middle block: shared by the UNet and its encoder."""

    def __init__(self, in_ch: int, image_size: int, ch: int, ch_mult, num_res_blocks: int,
                 attn_resolutions, dropout: float, num_heads: int, head_channels: int,
                 scale_shift_norm: bool, resblock_updown: bool, num_classes: int):
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        attn_resolutions = {int(r) for r in attn_resolutions}
        _check_size(image_size, ch_mult)
        self.ch = ch
        emb_ch = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.label_embed = nn.Embedding(num_classes, emb_ch) if num_classes > 0 else None
        res_kw = dict(emb_ch=emb_ch, dropout=dropout, scale_shift_norm=scale_shift_norm)
        attn_kw = dict(num_heads=num_heads, head_channels=head_channels)

        self.down = nn.ModuleList([EmbSequential(_Stem(in_ch, ch))])
        skip_chs = [ch]          # channels of every activation the up path concatenates back
        cur, res = ch, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(cur, mult * ch, **res_kw)]
                cur = mult * ch
                if res in attn_resolutions:
                    layers.append(Attention(cur, **attn_kw))
                self.down.append(EmbSequential(*layers))
                skip_chs.append(cur)
            if level != len(ch_mult) - 1:
                self.down.append(EmbSequential(ResBlock(cur, cur, down=True, **res_kw) if resblock_updown
                                               else Downsample(cur)))
                res //= 2
                skip_chs.append(cur)
        self.middle = EmbSequential(ResBlock(cur, cur, **res_kw), Attention(cur, **attn_kw),
                                    ResBlock(cur, cur, **res_kw))
        self.out_ch, self.out_res, self.skip_chs = cur, res, skip_chs
        self.res_kw, self.attn_kw, self.attn_resolutions = res_kw, attn_kw, attn_resolutions

    def embed(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.ch))          # [B, 4ch]
        if self.label_embed is not None:
            if y is None:
                raise ValueError("this network is class-conditional: pass labels y")
            emb = emb + self.label_embed(y)
        return emb


class UNet(nn.Module):
    """x [B, in_ch, H, W], t [B] (float or int timesteps), y [B] or None -> [B, out_ch, H, W]."""

    def __init__(self, in_ch: int, out_ch: int, image_size: int, ch: int = 128,
                 ch_mult=(1, 2, 2, 2), num_res_blocks: int = 2, attn_resolutions=(16,),
                 dropout: float = 0.0, num_heads: int = 1, head_channels: int = -1,
                 scale_shift_norm: bool = False, resblock_updown: bool = False, num_classes: int = 0):
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        self.trunk = _Trunk(in_ch, image_size, ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
                            num_heads, head_channels, scale_shift_norm, resblock_updown, num_classes)
        tr = self.trunk
        skips = list(tr.skip_chs)
        cur, res = tr.out_ch, tr.out_res
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(cur + skips.pop(), mult * ch, **tr.res_kw)]
                cur = mult * ch
                if res in tr.attn_resolutions:
                    layers.append(Attention(cur, **tr.attn_kw))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(cur, cur, up=True, **tr.res_kw) if resblock_updown else Upsample(cur))
                    res *= 2
                self.up.append(EmbSequential(*layers))
        self.out = nn.Sequential(group_norm(cur), nn.SiLU(), zero_module(nn.Conv2d(cur, out_ch, 3, padding=1)))
        self.out_fp32 = True    # the output block outside autocast (module docstring); False only to measure why

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.trunk.embed(t, y)
        hs = []
        h = x
        for block in self.trunk.down:
            h = block(h, emb)
            hs.append(h)
        h = self.trunk.middle(h, emb)
        for block in self.up:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)           # [B, C + C_skip, H, W] -> [B, C', H', W']
        if not self.out_fp32:
            return self.out(h)
        with torch.autocast(h.device.type, enabled=False):            # a no-op when nothing autocasts
            return self.out(h.float())


class EncoderClassifier(nn.Module):
    """ADM's noise-aware classifier: the UNet's down path and middle, then GN-SiLU-average pool-linear.
    x_t [B, C, H, W], t [B] -> logits [B, num_classes]."""

    def __init__(self, in_ch: int, num_classes: int, image_size: int, ch: int = 128,
                 ch_mult=(1, 2, 2, 2), num_res_blocks: int = 2, attn_resolutions=(16,),
                 dropout: float = 0.0, num_heads: int = 1, head_channels: int = -1,
                 scale_shift_norm: bool = True, resblock_updown: bool = True):
        super().__init__()
        self.trunk = _Trunk(in_ch, image_size, ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
                            num_heads, head_channels, scale_shift_norm, resblock_updown, num_classes=0)
        cur = self.trunk.out_ch
        self.norm = group_norm(cur)
        self.head = nn.Linear(cur, num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.trunk.embed(t, None)
        h = x
        for block in self.trunk.down:
            h = block(h, emb)
        h = self.trunk.middle(h, emb)
        h = F.silu(self.norm(h)).mean(dim=(2, 3))                      # [B, C]
        return self.head(h)                                            # [B, num_classes]


class MLPDenoiser(nn.Module):
    """For 2-D points: x [B, in_dim], t [B], y [B] or None -> [B, out_dim].

    Residual MLP blocks, each told the timestep (and class) embedding, since a toy mixture needs
    the time signal at every depth far more than it needs width.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256, layers: int = 4,
                 emb_dim: int = 128, num_classes: int = 0):
        super().__init__()
        self.emb_dim = emb_dim
        self.time_embed = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label_embed = nn.Embedding(num_classes, hidden) if num_classes > 0 else None
        self.inp = nn.Linear(in_dim, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(hidden), "fc1": nn.Linear(hidden, hidden),
                           "emb": nn.Linear(hidden, hidden), "fc2": zero_module(nn.Linear(hidden, hidden))})
            for _ in range(layers))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.emb_dim))     # [B, hidden]
        if self.label_embed is not None:
            if y is None:
                raise ValueError("this network is class-conditional: pass labels y")
            emb = emb + self.label_embed(y)
        emb = F.silu(emb)
        h = self.inp(x)                                                # [B, hidden]
        for blk in self.blocks:
            a = F.silu(blk["fc1"](blk["norm"](h)) + blk["emb"](emb))
            h = h + blk["fc2"](a)
        return self.out(h)                                             # [B, out_dim]
