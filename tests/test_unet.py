"""The denoiser networks: shapes, the ablation switches, channels_last, bf16 autocast, parameter counts."""
import math

import pytest
import torch

from genbench.families.unet import (Attention, EncoderClassifier, MLPDenoiser, ResBlock, UNet, Upsample,
                                    timestep_embedding)




def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Zero-initialised output layers make a fresh network output exactly 0; give them weights so
    comparisons between inputs mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_ddpm_cifar_network_has_35_7m_parameters():
    with torch.device("meta"):
        net = UNet(3, 3, 32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1)
    # The published DDPM CIFAR-10 model (and its PyTorch ports) has 35,746,307 parameters.
    assert n_params(net) == 35_746_307


def test_timestep_embedding_values():
    e = timestep_embedding(torch.tensor([0.0, 5.0]), 8)
    assert e.shape == (2, 8)
    assert torch.allclose(e[0, :4], torch.ones(4)) and torch.allclose(e[0, 4:], torch.zeros(4))
    # first frequency is 1: cos(5), sin(5)
    assert math.isclose(e[1, 0].item(), math.cos(5.0), abs_tol=1e-6)
    assert math.isclose(e[1, 4].item(), math.sin(5.0), abs_tol=1e-6)


@pytest.mark.parametrize("kw", [
    {},                                                                  # DDPM style
    dict(num_heads=2, scale_shift_norm=True, resblock_updown=True),      # ADM style
    dict(head_channels=8, num_classes=11, dropout=0.1),                  # heads by width, class embedding
])
def test_unet_shapes_and_channels_last(kw):
    torch.manual_seed(0)
    net = randomize(UNet(1, 2, 8, **TINY, **kw)).eval()
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([0, 10, 999])
    y = torch.tensor([0, 5, 10]) if kw.get("num_classes") else None
    out = net(x, t, y)
    assert out.shape == (3, 2, 8, 8)
    out_cl = net(x.to(memory_format=torch.channels_last), t, y)
    assert torch.allclose(out, out_cl, atol=1e-5)
    # the timestep reaches the output
    assert not torch.allclose(net(x, t + 100, y), out, atol=1e-4)


def test_ablation_switches_change_the_network():
    base = UNet(1, 1, 8, **TINY)
    ss = UNet(1, 1, 8, **TINY, scale_shift_norm=True)
    ud = UNet(1, 1, 8, **TINY, resblock_updown=True)
    # AdaGN doubles each block's embedding projection (scale and shift)
    extra = sum(m.emb.out_features // 2 * (m.emb.in_features + 1) for m in ss.modules() if isinstance(m, ResBlock))
    assert n_params(ss) - n_params(base) == extra
    # BigGAN up/down: resampling residual blocks replace the plain resampling convs
    assert any(isinstance(m, Upsample) for m in base.modules())
    assert not any(isinstance(m, Upsample) for m in ud.modules())
    assert any(isinstance(m, ResBlock) and m.up for m in ud.modules())
    assert any(isinstance(m, ResBlock) and m.down for m in ud.modules())


def test_attention_heads_and_errors():
    assert Attention(64, head_channels=16).num_heads == 4
    assert Attention(64, num_heads=2).num_heads == 2
    with pytest.raises(ValueError, match="heads"):
        Attention(48, head_channels=64)
    with pytest.raises(ValueError, match="heads"):
        Attention(30, num_heads=4)
    a = randomize(Attention(16, num_heads=4))
    x = torch.randn(2, 16, 4, 4)
    # permuting positions permutes the output (self-attention is permutation-equivariant)
    perm = torch.randperm(16)
    xp = x.flatten(2)[:, :, perm].reshape(2, 16, 4, 4)
    assert torch.allclose(a(xp).flatten(2), a(x).flatten(2)[:, :, perm], atol=1e-5)


def test_class_embedding_matters_and_is_required():
    net = randomize(UNet(1, 1, 8, **TINY, num_classes=3)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 5])
    assert not torch.allclose(net(x, t, torch.tensor([0, 0])), net(x, t, torch.tensor([1, 1])), atol=1e-4)
    with pytest.raises(ValueError, match="class-conditional"):
        net(x, t)


def test_bf16_autocast_forward_is_finite():
    net = randomize(UNet(1, 2, 8, **TINY, num_heads=2, scale_shift_norm=True)).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 1, 8, 8).to(memory_format=torch.channels_last), torch.tensor([1, 500]))
    assert out.shape == (2, 2, 8, 8) and torch.isfinite(out.float()).all()


def test_output_block_runs_in_fp32_under_bf16_autocast():
    """The predicted noise is not rounded to bf16 (a sampler divides it by sqrt(alpha_bar)): the output
    block leaves autocast, so under bf16 it comes back float32 with more than bf16's 8 mantissa bits;
    without autocast the switch changes nothing."""
    net = randomize(UNet(1, 1, 8, **TINY)).eval()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([1, 200, 500, 999])
    with torch.no_grad():
        ref = net(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fp32_head = net(x, t)
            net.out_fp32 = False
            bf16_head = net(x, t)
        plain = net(x, t)
    assert fp32_head.dtype == torch.float32 and bf16_head.dtype == torch.bfloat16
    assert torch.equal(plain, ref)
    assert not torch.equal(fp32_head, fp32_head.bfloat16().float())


def test_encoder_classifier_and_mlp_shapes():
    clf = EncoderClassifier(1, 10, 8, **TINY)
    assert clf(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])).shape == (4, 10)
    mlp = MLPDenoiser(2, 4, hidden=32, layers=2, num_classes=5)
    assert mlp(torch.randn(7, 2), torch.arange(7), torch.zeros(7, dtype=torch.long)).shape == (7, 4)


def test_image_size_must_halve():
    with pytest.raises(ValueError, match="halved"):
        UNet(1, 1, 6, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=())
