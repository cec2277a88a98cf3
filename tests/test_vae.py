"""VAE family: the discretized likelihood, bits/dim bookkeeping, sampling determinism, 2-D variant."""
import math

import pytest
import torch

from genbench.families import Batch, DataSpec, get_family
from genbench.families.vae import discretized_log_prob, gaussian_kl, to_bin_index
from genbench.rng import SeedRNG

SPEC = DataSpec((1, 16, 16), 10)
SMALL = dict(z_dim=4, channels=8, max_channels=16)


def _images(n=8, spec=SPEC, seed=0):
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (n, *spec.shape), generator=g)
    return u8.float() / 127.5 - 1.0            # exactly how the loader scales uint8


def _zero_last(module: torch.nn.Module):
    """Zero a network's final layer, so its output is identically zero."""
    last = [m for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))][-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)


@pytest.mark.parametrize("kind", ["logistic", "gaussian"])
@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.9, -5.0), (-1.0, 0.5), (0.3, -8.0)])
def test_discretized_likelihood_sums_to_one_over_256_values(kind, mean, log_scale):
    x = torch.arange(256).float() / 127.5 - 1.0                      # all 8-bit values
    lp = discretized_log_prob(x, torch.full_like(x, mean), torch.full_like(x, log_scale), kind)
    assert torch.isfinite(lp).all()
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_discretized_logistic_matches_cdf_difference():
    x = torch.tensor([-1.0, 10 / 127.5 - 1, 1.0])
    mu, s = torch.tensor(0.1), 0.2
    cdf = lambda v: torch.sigmoid((v - mu) / s)
    want = torch.stack([cdf(x[0] + 1 / 255), cdf(x[1] + 1 / 255) - cdf(x[1] - 1 / 255), 1 - cdf(x[2] - 1 / 255)])
    got = discretized_log_prob(x, mu.expand(3), torch.full((3,), math.log(s)), "logistic").exp()
    assert torch.allclose(got, want, rtol=1e-5)


def test_sharp_decoder_is_stable_far_from_the_data():
    # Mass far in the tail must stay finite (no log(0)) so training never sees -inf.
    x = torch.tensor([0.0, 1.0, -1.0])
    for kind in ("logistic", "gaussian"):
        lp = discretized_log_prob(x, torch.tensor([0.9, -0.9, 0.9]), torch.full((3,), -7.0), kind)
        assert torch.isfinite(lp).all() and (lp < -50).all()


def test_bin_index_round_trips_uint8():
    u8 = torch.arange(256)
    assert torch.equal(to_bin_index(u8.float() / 127.5 - 1.0), u8)


def test_uniform_decoder_gives_8_bits_per_dim():
    # Posterior = prior (KL 0) and a categorical decoder with all-zero logits (uniform over 256
    # values): the negative ELBO is exactly log(256) nats per dimension = 8 bits/dim.
    m = get_family("vae")(SPEC, likelihood="categorical", **SMALL)
    _zero_last(m.encoder)
    _zero_last(m.decoder)
    bpd = m.nll_bpd(Batch(_images()))
    assert bpd.shape == (8,)                                   # one value per image
    assert torch.allclose(bpd, torch.full((8,), 8.0, dtype=bpd.dtype), atol=1e-4)


def test_kl_of_prior_is_zero_and_matches_closed_form():
    assert gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)).abs().max() == 0
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(4.0)]])
    # 0.5*(1) + 0.5*(4 - 1 - log 4)
    assert gaussian_kl(mu, logvar).item() == pytest.approx(0.5 + 0.5 * (3 - math.log(4)), rel=1e-6)


@pytest.mark.parametrize("kind", ["logistic", "gaussian", "categorical"])
def test_train_step_improves_loss_and_logs_floats(kind):
    torch.manual_seed(0)
    m = get_family("vae")(SPEC, likelihood=kind, lr=3e-3, **SMALL)
    ph = m.phases()[0]
    opts = m.configure_optimizers(ph)
    x = _images(8)
    first = m.train_step(Batch(x), ph, opts)
    for _ in range(8):
        last = m.train_step(Batch(x), ph, opts)
    assert all(isinstance(v, float) and math.isfinite(v) for v in last.values())
    assert "grad_norm_vae" in last
    assert last["loss"] < first["loss"]


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 32, 32), (3, 64, 64)])
def test_shapes_and_range(shape):
    m = get_family("vae")(DataSpec(shape), **SMALL)
    with torch.no_grad():
        s = m.sample(SeedRNG.for_run(0, 3))
    assert s.shape == (3, *shape)
    assert s.min() >= -1 and s.max() <= 1


def test_same_seeds_same_samples_whatever_the_batch_split():
    m = get_family("vae")(SPEC, **SMALL)
    rng = SeedRNG.for_run(7, 4)
    with torch.no_grad():
        whole = m.sample(rng[0:4])
        parts = torch.cat([m.sample(rng[0:2]), m.sample(rng[2:4])])
        other = m.sample(SeedRNG.for_run(8, 4))
    assert torch.allclose(whole, parts, atol=1e-6)
    assert not torch.allclose(whole, other)


def test_sampler_options_are_validated():
    m = get_family("vae")(SPEC, **SMALL)
    with pytest.raises(ValueError, match="steps"):
        m.sample(SeedRNG.for_run(0, 2), steps=3)
    with pytest.raises(ValueError, match="temperature"):
        m.sample(SeedRNG.for_run(0, 2), temperature=-1)
    with torch.no_grad():   # temperature 0: every seed decodes z = 0, the same image
        s = m.sample(SeedRNG.for_run(0, 2), temperature=0.0)
    assert torch.allclose(s[0], s[1])
    assert m.nfe() == 1


def test_bad_params_are_errors():
    with pytest.raises(ValueError, match="likelihood"):
        get_family("vae")(SPEC, likelihood="bernoulli")
    with pytest.raises(TypeError):
        get_family("vae")(SPEC, not_a_param=1)


def test_extra_metrics_recon_mse_is_zero_for_perfect_reconstruction():
    m = get_family("vae")(SPEC, **SMALL)
    x = _images(4)
    metrics = m.extra_metrics(Batch(x))
    assert set(metrics) >= {"recon_mse"} and metrics["recon_mse"] > 0
    # A decoder that outputs the data itself (via a stub) has zero reconstruction error.
    m.decoder = _Const(torch.cat([x, torch.zeros_like(x)], dim=1))
    assert m.extra_metrics(Batch(x))["recon_mse"] == pytest.approx(0.0, abs=1e-12)


class _Const(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, z):
        return self.out


def test_points_use_mlp_gaussian_decoder_and_learn():
    torch.manual_seed(0)
    m = get_family("vae")(DataSpec((2,)), z_dim=2, hidden=32, depth=2, lr=3e-3)
    assert m.nll_bpd(Batch(torch.zeros(4, 2))) is None
    ph = m.phases()[0]
    opts = m.configure_optimizers(ph)
    x = torch.randn(64, 2) * 0.1 + torch.tensor([2.0, -1.0])
    first = m.train_step(Batch(x), ph, opts)["loss"]
    for _ in range(30):
        last = m.train_step(Batch(x), ph, opts)["loss"]
    assert last < first
    with torch.no_grad():
        s = m.sample(SeedRNG.for_run(0, 5))
    assert s.shape == (5, 2) and torch.isfinite(s).all()
    assert "recon_mse" in m.extra_metrics(Batch(x))


def test_point_samples_draw_from_the_decoder_gaussian():
    """A collapsed 2-D decoder (constant output) must give its Gaussian, not one repeated point."""
    m = get_family("vae")(DataSpec((2,), 0), z_dim=2, hidden=16)
    last = [l for l in m.decoder.modules() if isinstance(l, torch.nn.Linear)][-1]
    torch.nn.init.zeros_(last.weight)
    with torch.no_grad():
        last.bias.copy_(torch.tensor([1.0, -2.0, math.log(0.25), math.log(4.0)]))   # mean, log-variance
        s = m.sample(SeedRNG.for_run(0, 20000))
        mean_only = m.sample(SeedRNG.for_run(0, 5), decoder="mean")
    assert s.mean(0).tolist() == pytest.approx([1.0, -2.0], abs=0.05)
    assert s.std(0).tolist() == pytest.approx([0.5, 2.0], rel=0.03)
    assert torch.equal(mean_only, torch.tensor([[1.0, -2.0]]).expand(5, 2))


@pytest.mark.parametrize("likelihood", ["logistic", "gaussian", "categorical"])
def test_image_samples_from_the_decoder_are_8bit_and_batch_invariant(likelihood):
    torch.manual_seed(0)
    m = get_family("vae")(SPEC, likelihood=likelihood, **SMALL)
    with torch.no_grad():
        whole = m.sample(SeedRNG.for_run(3, 4), decoder="sample")
        parts = torch.cat([m.sample(SeedRNG.for_run(3, 4)[0:1], decoder="sample"),
                           m.sample(SeedRNG.for_run(3, 4)[1:4], decoder="sample")])
        mean = m.sample(SeedRNG.for_run(3, 4))
    assert torch.equal(whole, parts)
    assert torch.equal(to_bin_index(whole).float() / 127.5 - 1.0, whole)   # on the 8-bit grid
    assert not torch.allclose(whole, mean, atol=1e-2)                      # noise was drawn
    with pytest.raises(ValueError, match="decoder"):
        m.sample(SeedRNG.for_run(0, 1), decoder="mode")
