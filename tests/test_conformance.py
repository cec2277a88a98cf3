"""One conformance test over every registered family (lm-eval's habit): it builds, takes a training
step in every phase without NaN, samples [n, *shape] in [-1, 1], and the same seeds give the same
samples whatever the batch size."""
import math

import pytest
import torch

from genbench.families import Batch, DataSpec, families
from genbench.rng import SeedRNG

# family -> (tiny constructor params, sampler kwargs that keep sampling fast on CPU).
# A new family must add its tiny configuration here: the test below fails until it does.
TINY = {
    "vae": ({"z_dim": 4, "channels": 8, "max_channels": 16}, {}),
    "gan": ({"g_channels": 16, "d_channels": 16, "z_dim": 8}, {}),
    "vqvae": ({}, {}),
    "diffusion": ({"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8],
                   "timesteps": 50}, {"steps": 5}),
}
SHAPES = {"grey16": (1, 16, 16), "rgb16": (3, 16, 16)}


@pytest.mark.parametrize("family", sorted(families()))
def test_family_has_tiny_config(family):
    assert family in TINY, f"add a tiny configuration for family {family!r} to TINY in {__file__}"


def _build(family, shape, num_classes=10):
    params, sampler = TINY[family]
    torch.manual_seed(0)
    return families()[family](DataSpec(shape, num_classes), **params), sampler


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("family", sorted(TINY))
def test_conformance(family, shape):
    if family not in families():
        pytest.skip(f"family {family!r} is not registered")
    model, sampler = _build(family, shape)
    x = torch.rand(8, *shape) * 2 - 1
    x = (torch.round((x + 1) * 127.5) / 127.5 - 1)            # 8-bit values, as the loader gives
    y = torch.arange(8) % 10
    for phase in model.phases():
        model.start_phase(phase)
        opts = model.configure_optimizers(phase)
        model.train()
        logs = model.train_step(Batch(x, y), phase, opts)
        assert logs, f"{family} phase {phase.name} returned no logs"
        bad = {k: v for k, v in logs.items() if not math.isfinite(float(v))}
        assert not bad, f"{family} phase {phase.name}: non-finite logs {bad}"
    model.eval()
    labels = (torch.arange(4) % 10) if model.conditional else None
    with torch.no_grad():
        whole = model.sample(SeedRNG.for_run(7, 4), labels=labels, **sampler)
        rng = SeedRNG.for_run(7, 4)
        split = torch.cat([model.sample(rng[0:1], labels=None if labels is None else labels[0:1], **sampler),
                           model.sample(rng[1:4], labels=None if labels is None else labels[1:4], **sampler)])
        again = model.sample(SeedRNG.for_run(7, 4), labels=labels, **sampler)
        other = model.sample(SeedRNG.for_run(8, 4), labels=labels, **sampler)
    assert whole.shape == (4, *shape)
    assert torch.isfinite(whole).all() and whole.min() >= -1 and whole.max() <= 1
    assert torch.equal(whole, again), "same seeds must give the same samples"
    assert torch.allclose(whole, split, atol=1e-4), "samples must not depend on the batch split"
    assert not torch.allclose(whole, other), "different seeds must give different samples"
    assert model.nfe(**sampler) >= 1
