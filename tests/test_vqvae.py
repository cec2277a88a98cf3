"""VQ-VAE + gated PixelCNN prior: causality, straight-through gradients, the EMA codebook, dead-code
restarts, the two phases, and batch-invariant autoregressive sampling."""
import math

import pytest
import torch

from genbench.families import Batch, DataSpec, get_family
from genbench.families.vqvae import EMAQuantizer, GatedPixelCNN, code_stats
from genbench.rng import SeedRNG

SPEC = DataSpec((1, 16, 16), 10)
TINY = dict(num_codes=16, code_dim=4, channels=8, prior_channels=8, prior_layers=2)


def _images(n=8, spec=SPEC, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *spec.shape), generator=g).float() / 127.5 - 1.0


def _model(**kw):
    torch.manual_seed(0)
    return get_family("vqvae")(kw.pop("spec", SPEC), **{**TINY, **kw})


def _run_phase(m, name, x, y=None, steps=1):
    phase = next(p for p in m.phases() if p.name == name)
    m.start_phase(phase)
    opts = m.configure_optimizers(phase)
    return [m.train_step(Batch(x, y), phase, opts) for _ in range(steps)]


# ---------------------------------------------------------------- PixelCNN causality

def _grad_map(out_fn, e, i, j):
    """|d out(i, j) / d e| summed over channels: [h, w]."""
    e = e.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(out_fn(e)[0, :, i, j].sum(), e)
    return g.abs().sum(dim=1)[0]


@pytest.mark.parametrize("num_classes", [0, 3])
def test_pixelcnn_is_causal_in_both_stacks(num_classes):
    torch.manual_seed(0)
    h, w = 5, 6
    net = GatedPixelCNN(num_codes=8, ch=8, layers=3, k=3, num_classes=num_classes)
    y = torch.tensor([1]) if num_classes else None
    e = torch.randn(1, 8, h, w)
    raster = torch.arange(h * w).view(h, w)
    for i in range(h):
        for j in range(w):
            now = i * w + j
            # Output (horizontal stack + head): nothing at or after (i, j) in raster order.
            g = _grad_map(lambda t: net.forward_embedded(t, y), e, i, j)
            assert g[raster >= now].abs().max() == 0, f"output at {(i, j)} sees the future"
            if j > 0:
                assert g[i, j - 1] > 0, "must see the code to its left"
            if i > 0:
                assert g[i - 1, j] > 0, "must see the code above"
                if j + 1 < w:
                    assert g[i - 1, j + 1] > 0, "blind spot: must see the code above-right"
            # Vertical stack alone: only rows strictly above.
            gv = _grad_map(lambda t: net.stacks(t, y)[0], e, i, j)
            assert gv[i:].abs().max() == 0, f"vertical stack at {(i, j)} sees row {i} or below"
            if i > 0:
                assert gv[i - 1, j] > 0
            # Horizontal stack output (before the head) obeys the same rule as the output.
            gh = _grad_map(lambda t: net.stacks(t, y)[1], e, i, j)
            assert gh[raster >= now].abs().max() == 0


def test_pixelcnn_conditioning_changes_the_logits():
    torch.manual_seed(0)
    net = GatedPixelCNN(num_codes=8, ch=8, layers=2, k=3, num_classes=3)
    codes = torch.randint(0, 8, (1, 4, 4)).expand(2, 4, 4)
    out = net(codes, torch.tensor([0, 2]))
    assert not torch.allclose(out[0], out[1])


# ---------------------------------------------------------------- quantizer

def test_straight_through_passes_the_gradient_unchanged():
    torch.manual_seed(0)
    q = EMAQuantizer(num_codes=5, dim=3, decay=0.9)
    z_e = torch.randn(2, 3, 4, 4, requires_grad=True)
    z_st, codes, _ = q(z_e, update=False)
    # Forward value: the nearest codebook entry.
    flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    nearest = torch.cdist(flat, q.embed).argmin(1)
    assert torch.equal(codes.flatten(), nearest)
    assert torch.allclose(z_st.permute(0, 2, 3, 1).reshape(-1, 3), q.embed[nearest])
    # Backward: dL/dz_e == dL/dz_q.
    g = torch.randn_like(z_st)
    z_st.backward(g)
    assert torch.equal(z_e.grad, g)


def test_autoencoder_step_reaches_the_encoder_through_the_quantizer():
    m = _model()
    phase = m.phases()[0]
    m.start_phase(phase)
    opts = m.configure_optimizers(phase)
    before = [p.detach().clone() for p in m.encoder.parameters()]
    logs = m.train_step(Batch(_images()), phase, opts)
    assert logs["grad_norm_autoencoder"] > 0
    first_conv = next(m.encoder.parameters())
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, m.encoder.parameters()))


@pytest.mark.parametrize("eps,expected", [
    (0.0, [[2.0, 0.0], [1.0, 1.0]]),
    # Laplace smoothing: N~ = (N + eps) / (sum N + K eps) * sum N = [1.5, 1.0] -> [10/7, 15/14]
    (0.5, [[3 / (10 / 7), 0.0], [1 / (15 / 14), 1 / (15 / 14)]]),
])
def test_ema_codebook_update_matches_hand_computation(eps, expected):
    q = EMAQuantizer(num_codes=2, dim=2, decay=0.5, eps=eps)
    q.cluster_size.copy_(torch.tensor([1.0, 1.0]))
    q.embed_sum.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    z = torch.tensor([[2.0, 0.0], [4.0, 0.0], [1.0, 1.0]])
    q.ema_update(z, torch.tensor([0, 0, 1]))
    # N = 0.5 * [1, 1] + 0.5 * [2, 1];  m = 0.5 * [[0,0],[1,1]] + 0.5 * [[6,0],[1,1]]
    assert torch.allclose(q.cluster_size, torch.tensor([1.5, 1.0]))
    assert torch.allclose(q.embed_sum, torch.tensor([[3.0, 0.0], [1.0, 1.0]]))
    assert torch.allclose(q.embed, torch.tensor(expected), atol=1e-6)


def test_dead_codes_restart_at_encoder_outputs():
    torch.manual_seed(0)
    q = EMAQuantizer(num_codes=4, dim=2, decay=0.9, dead_threshold=1.0)
    q.cluster_size.copy_(torch.tensor([5.0, 0.2, 3.0, 0.5]))
    q.embed.copy_(torch.full((4, 2), 100.0))
    z = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert q.restart_dead(z) == 2
    for k in (1, 3):   # dead ones now sit on batch vectors, with a count of one
        assert any(torch.equal(q.embed[k], r) for r in z)
        assert q.cluster_size[k] == 1.0
    assert (q.embed[[0, 2]] == 100.0).all()   # live ones untouched


def test_code_stats():
    perplexity, usage = code_stats(torch.tensor([0, 0, 1, 1]), 4)
    assert perplexity == pytest.approx(2.0) and usage == 0.5
    assert code_stats(torch.tensor([3, 3, 3]), 4)[0] == pytest.approx(1.0)


# ---------------------------------------------------------------- the family

def test_phases_split_the_budget_and_the_prior_phase_freezes_the_autoencoder():
    m = _model(autoencoder_share=0.6)
    assert [(p.name, p.share) for p in m.phases()] == [("autoencoder", 0.6), ("prior", pytest.approx(0.4))]
    x = _images()
    _run_phase(m, "autoencoder", x)
    ae = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("prior.")}
    pr = [p.detach().clone() for p in m.prior.parameters()]
    logs = _run_phase(m, "prior", x, steps=2)[-1]
    assert {"prior_bits_per_code", "grad_norm_prior"} <= set(logs)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in ae.items()), "autoencoder moved in phase 2"
    assert any(not torch.equal(a, b) for a, b in zip(pr, m.prior.parameters()))


def test_training_lowers_reconstruction_and_prior_nll():
    m = _model(lr=1e-2, prior_lr=1e-2)
    # Structured images (each half one shade), unlike noise, can be reconstructed from 4x4 codes.
    g = torch.Generator().manual_seed(0)
    shade = torch.randint(0, 2, (8, 2, 1, 1, 1), generator=g).float() * 2 - 1      # [8, 2, 1, 1, 1]
    x = torch.cat([shade[:, 0].expand(8, 1, 16, 8), shade[:, 1].expand(8, 1, 16, 8)], dim=3)  # [8, 1, 16, 16]
    ae = _run_phase(m, "autoencoder", x, steps=10)
    assert ae[-1]["recon_mse"] < 0.85 * ae[0]["recon_mse"]
    assert all(math.isfinite(v) for v in ae[-1].values())
    pr = _run_phase(m, "prior", x, steps=10)
    assert pr[-1]["prior_bits_per_code"] < pr[0]["prior_bits_per_code"] - 0.2


def test_extra_metrics_and_uniform_prior_bits():
    m = _model(num_codes=32)
    # A prior whose last layer is zero predicts uniform codes: exactly log2(K) bits per code.
    torch.nn.init.zeros_(m.prior.head[-1].weight)
    torch.nn.init.zeros_(m.prior.head[-1].bias)
    met = m.extra_metrics(Batch(_images()))
    assert met["prior_bits_per_code"] == pytest.approx(5.0, abs=1e-5)
    assert 1.0 <= met["codebook_perplexity"] <= 32 and 0 < met["codebook_usage"] <= 1
    assert met["recon_mse"] > 0
    assert m.nll_bpd(Batch(_images())) is None


@pytest.mark.parametrize("codes", ["prior", "uniform"])
def test_same_seeds_same_samples_whatever_the_batch_split(codes):
    m = _model()
    _run_phase(m, "autoencoder", _images())   # seeds the codebook from data
    rng = SeedRNG.for_run(3, 4)
    # The drawn codes are identical; decoded images agree to float tolerance (conv kernels may
    # sum in a different order for a different batch size).
    whole_codes = m.sample_codes(rng[0:4], src=codes)
    parts_codes = torch.cat([m.sample_codes(rng[0:2], src=codes), m.sample_codes(rng[2:4], src=codes)])
    assert torch.equal(whole_codes, parts_codes)
    with torch.no_grad():
        whole = m.sample(rng[0:4], codes=codes)
        parts = torch.cat([m.sample(rng[0:2], codes=codes), m.sample(rng[2:4], codes=codes)])
        other = m.sample(SeedRNG.for_run(4, 4), codes=codes)
    assert whole.shape == (4, *SPEC.shape) and whole.min() >= -1 and whole.max() <= 1
    assert torch.allclose(whole, parts, atol=1e-4)
    assert not torch.allclose(whole, other)


def test_prior_sampling_follows_the_prior():
    # A prior that always puts (almost) all mass on code 3 must yield the all-3 grid.
    m = _model()
    torch.nn.init.zeros_(m.prior.head[-1].weight)
    with torch.no_grad():
        m.prior.head[-1].bias.fill_(-30.0)
        m.prior.head[-1].bias[3] = 30.0
        s = m.sample(SeedRNG.for_run(0, 2))
        want = m.decode_codes(torch.full((1, *m.grid), 3)).clamp(-1, 1)
        uniform = m.sample(SeedRNG.for_run(0, 2), codes="uniform")
    assert torch.allclose(s, want.expand_as(s), atol=1e-6)
    assert not torch.allclose(uniform, want.expand_as(uniform))


def test_conditional_model_needs_labels_and_uses_them():
    m = _model(conditional=True)
    assert m.conditional
    x, y = _images(), torch.arange(8) % 10
    _run_phase(m, "autoencoder", x, y)
    _run_phase(m, "prior", x, y)
    with pytest.raises(ValueError, match="labels"):
        m.sample(SeedRNG.for_run(0, 2))
    rng = SeedRNG.for_run(0, 4)
    whole = m.sample_codes(rng[0:4], labels=torch.tensor([0, 1, 2, 3]))   # slices copy the stream
    parts = torch.cat([m.sample_codes(rng[0:1], labels=torch.tensor([0])),
                       m.sample_codes(rng[1:4], labels=torch.tensor([1, 2, 3]))])
    assert torch.equal(whole, parts)
    # Same seeds, other labels: the class reaches the sampled codes (amplified so one training
    # step's worth of class embedding is not lost in the Gumbel noise).
    with torch.no_grad():
        for layer in m.prior.layers:
            layer.cond.weight.mul_(100.0)
    whole = m.sample_codes(rng[0:4], labels=torch.tensor([0, 1, 2, 3]))
    relabelled = m.sample_codes(rng[0:4], labels=torch.tensor([5, 6, 7, 8]))
    assert not torch.equal(whole, relabelled)
    with pytest.raises(ValueError, match="class labels"):
        get_family("vqvae")(DataSpec((1, 16, 16), 0), conditional=True)


def test_nfe_and_sampler_validation():
    m = _model(code_size=8)                    # 16x16 -> 8x8 code grid: one halving
    assert m.grid == (8, 8)
    assert m.nfe() == 64 and m.nfe(codes="prior") == 64 and m.nfe(codes="uniform") == 1
    with pytest.raises(ValueError, match="codes"):
        m.nfe(codes="gaussian")
    with pytest.raises(ValueError, match="temperature"):
        m.sample(SeedRNG.for_run(0, 1), temperature=1.0)
    assert _model(spec=DataSpec((3, 32, 32)), code_size=8).sample(SeedRNG.for_run(0, 1), codes="uniform").shape == (1, 3, 32, 32)
    for bad in [(DataSpec((1, 18, 18)), 4), (DataSpec((1, 16, 16)), 32), (DataSpec((1, 16, 16)), 6)]:
        with pytest.raises(ValueError, match="code grid"):
            get_family("vqvae")(bad[0], code_size=bad[1])
    with pytest.raises(ValueError, match="images"):
        get_family("vqvae")(DataSpec((2,)))
