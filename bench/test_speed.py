"""Speed benchmarks at smoke sizes, on the CPU: sampling, feature extraction, one training step per family
(per phase), the metric stage. Each round is a fraction of a second and each benchmark runs a few rounds,
so the whole file runs in well under a minute:

    python -m pytest bench --benchmark-json=bench-speed.json            # measure
    python -m pytest bench --benchmark-autosave                          # save under .benchmarks/
    python -m pytest bench --benchmark-compare --benchmark-compare-fail=median:25%   # against the last saved
    python -m pytest bench --benchmark-disable                           # each benchmark once: does it run

Timings compare only with a run saved on the same machine (bench/README.md, "Gating speed"); nothing
here asserts a time.
"""
import copy
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from genbench.bench import synthetic_data  # noqa: E402
from genbench.config import load_suite, suite_cards  # noqa: E402
from genbench.families import get_family  # noqa: E402
from genbench.families.base import DataSpec  # noqa: E402
from genbench.rng import SeedRNG  # noqa: E402
from genbench.train import Batcher  # noqa: E402

SPEC = DataSpec((1, 16, 16), 10)     # the smoke suite's digits at 16x16
# Few rounds: the file runs in well under a minute. GENBENCH_BENCH_ROUNDS=10 gives tighter medians for a
# speed gate on one's own runner (bench/README.md).
ROUNDS = dict(rounds=int(os.environ.get("GENBENCH_BENCH_ROUNDS", "3")), warmup_rounds=1, iterations=1)
CARDS = {c.name: c for c in suite_cards(load_suite("smoke"))}


def _model(name: str):
    torch.manual_seed(0)
    card = CARDS[name]
    return card, get_family(card.family)(SPEC, **card.params)


@pytest.mark.parametrize("name,sampler,n", [pytest.param("vae", {}, 250, id="vae-250"),
                                            pytest.param("dcgan", {}, 250, id="dcgan-250"),
                                            pytest.param("ddpm", {"sampler": "ddim", "steps": 5, "eta": 0.0}, 32,
                                                         id="ddpm-ddim5-32")])
def test_sampling(benchmark, name, sampler, n):
    card, model = _model(name)
    model.eval()
    rng = SeedRNG.for_run(0, n)
    kw = {**card.sampler, **sampler}

    def run():
        with torch.no_grad():
            return model.sample(rng, **kw)

    out = benchmark.pedantic(run, **ROUNDS)
    assert out.shape == (n, *SPEC.shape)
    benchmark.extra_info.update(images=n, nfe=model.nfe(**kw))


def test_feature_extraction(benchmark):
    from genbench.scoring import build_extractor

    ext = build_extractor("digits", torch.device("cpu"))
    x = synthetic_data(SPEC, 250).x
    feats = benchmark.pedantic(lambda: ext(x), **ROUNDS)
    assert all(v.shape[0] == 250 for v in feats.values())
    benchmark.extra_info["images"] = 250


def _phases():
    for name in CARDS:
        fam = get_family(CARDS[name].family)
        for ph in fam(SPEC, **CARDS[name].params).phases():
            yield pytest.param(name, ph.name, id=f"{name}-{ph.name}")


@pytest.mark.parametrize("name,phase", list(_phases()))
def test_training_step(benchmark, name, phase):
    """One training step (the family's train_step on a batch of the card's size, as genbench.train runs it)."""
    card, model = _model(name)
    ph = next(p for p in model.phases() if p.name == phase)
    model.start_phase(ph)
    opts = model.configure_optimizers(ph)
    model.train()
    data = synthetic_data(SPEC, 4 * card.batch_size)
    batches = Batcher(data, card.batch_size, torch.Generator().manual_seed(0), "cpu")
    logs = benchmark.pedantic(lambda: model.train_step(batches.next(), ph, opts), **ROUNDS)
    assert logs
    benchmark.extra_info["batch_size"] = card.batch_size


@pytest.fixture(scope="module")
def features():
    from genbench.scoring import build_extractor

    ext = build_extractor("digits", torch.device("cpu"))
    fake = ext(synthetic_data(SPEC, 500, seed=1).x)
    real = ext(synthetic_data(SPEC, 500, seed=2).x)
    return ext, fake, real


def test_metric_stage(benchmark, features):
    """FID, IS, KID and precision/recall from 500 x 500 features, as a run's evaluation point computes them."""
    from genbench.scoring import Reference, fidelity_metrics

    ext, fake, real = features
    ref = Reference(copy.copy(real))
    out = benchmark.pedantic(lambda: fidelity_metrics(fake, ref, ext.spec, ["fid", "isc", "kid", "prc"],
                                                      kid_subset_size=250), **ROUNDS)
    assert {"fid", "kid_mean", "precision", "recall"} <= set(out)
