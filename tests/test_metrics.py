"""The harness's numbers: FID against its closed form, and equal to torch-fidelity's own pipeline."""
import numpy as np
import pytest
import torch
from scipy import linalg

from genbench import evaluators
from genbench.scoring import fidelity_metrics

SPEC = evaluators.ExtractorSpec("t", "t", "f", "l", None, None)


def _gaussian(n, mu, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return mu + torch.randn(n, len(mu), generator=g, dtype=torch.float64) * scale


def test_fid_matches_closed_form_on_gaussians():
    d = 8
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.full((d,), 0.5, dtype=torch.float64)
    s1, s2 = torch.linspace(0.5, 1.5, d, dtype=torch.float64), torch.linspace(1.0, 2.0, d, dtype=torch.float64)
    a, b = _gaussian(200_000, mu1, s1, 0), _gaussian(200_000, mu2, s2, 1)
    fid = fidelity_metrics({"f": a}, {"f": b}, SPEC, ["fid"])["fid"]
    # Population value for diagonal covariances: |mu1-mu2|^2 + sum (s1 - s2)^2.
    population = float(((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum())
    assert fid == pytest.approx(population, rel=0.02)
    # And exactly the Frechet distance of the sample statistics (matrix square root via scipy).
    c1, c2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    m = (a.mean(0) - b.mean(0)).numpy()
    exact = m @ m + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert fid == pytest.approx(exact, rel=1e-8)


def test_fid_zero_for_identical_features_and_kid_prc_sane():
    a = _gaussian(2000, torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), 0).float()
    m = fidelity_metrics({"f": a, "l": a}, {"f": a}, SPEC, ["fid", "kid", "prc"], kid_subset_size=500)
    shifted = fidelity_metrics({"f": a + 1}, {"f": a}, SPEC, ["kid"], kid_subset_size=500)
    assert abs(m["fid"]) < 1e-3
    # KID's unbiased estimate over random subsets scatters around 0 for identical sets.
    assert abs(m["kid_mean"]) < 0.05 < shifted["kid_mean"]
    assert m["precision"] == 1.0 and m["recall"] == 1.0


def test_our_metrics_equal_torch_fidelity_calculate_metrics():
    """Same images, same registered extractor: our one-pass harness == torch-fidelity end to end."""
    import torch_fidelity

    from genbench.data import load
    from genbench.scoring import build_extractor, extract

    real = load("digits", "train").x[:600]
    fake = load("digits", "test").x[:300]
    ext = build_extractor("digits", torch.device("cpu"))
    ours = fidelity_metrics(extract(ext, [fake]), extract(ext, [real]), ext.spec, ["fid", "isc", "kid", "prc"],
                            kid_subset_size=200, seed=2020)

    class Wrap(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    theirs = torch_fidelity.calculate_metrics(
        input1=Wrap(fake), input2=Wrap(real), cuda=False, isc=True, fid=True, kid=True, prc=True,
        feature_extractor="genbench-digits", kid_subset_size=200, verbose=False, cache=False,
        save_cpu_ram=True, batch_size=300)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    assert ours["is_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-5)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4, abs=1e-7)
    assert ours["precision"] == pytest.approx(theirs["precision"])
    assert ours["recall"] == pytest.approx(theirs["recall"])


def test_missing_inception_weights_is_one_clear_error(tmp_path):
    with pytest.raises(evaluators.WeightsNotFound, match="--inception-weights PATH or set GENBENCH_INCEPTION"):
        evaluators.check_extractor(evaluators.INCEPTION)
    w = tmp_path / "w.pth"
    from genbench.evaluators import inception

    torch.save({k: torch.zeros(s, dtype=d) for k, (s, d) in inception.expected_inception_state().items()}, w)
    assert evaluators.check_extractor(evaluators.INCEPTION, inception_weights=w) == str(w)


def test_device_fid_statistics_match_torch_fidelity():
    """The device statistics equal numpy's cov (torch-fidelity's) to float64 rounding."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    from genbench.device_metrics import fid_statistics

    f = _gaussian(3000, torch.zeros(16, dtype=torch.float64), torch.linspace(0.1, 3, 16, dtype=torch.float64),
                  3).float()
    ours, theirs = fid_statistics(f), fid_features_to_statistics(f)
    f64 = f.double()
    fid_statistics(f64)
    assert torch.equal(f64, f.double())     # centring happens in a copy, even of float64 features
    np.testing.assert_allclose(ours.mu.numpy(), theirs["mu"], atol=1e-6)   # numpy sums in float32, we in float64
    np.testing.assert_allclose(ours.sigma.numpy(), theirs["sigma"], rtol=1e-9, atol=1e-12)


def _correlated(n, d, seed, shift=0.0):
    """Features with a full, non-diagonal covariance (and all-positive like pooled activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    return ((torch.randn(n, d, generator=g, dtype=torch.float64) @ mix).abs() + shift).float()


@pytest.mark.parametrize("n_fake,n_real,d", [(4000, 3000, 32), (300, 100, 128)])   # second: rank-deficient
def test_fid_equals_torch_fidelity_eigenvalue_formula(n_fake, n_real, d):
    """eigvalsh(R S1 R) with R = sqrt(S2) gives the float64 Frechet distance (scipy's sqrtm) to 1e-8,
    full rank or not, and torch-fidelity's eigvals(S1 S2) FID to its float32 mean's 1e-6."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    from genbench.device_metrics import fid_statistics, frechet_distance, reference_statistics

    for shift in (0.0, 0.3):
        a, b = _correlated(n_fake, d, 1, shift), _correlated(n_real, d, 2)
        theirs = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b),
                                          verbose=False)["frechet_inception_distance"]
        c1, c2 = np.cov(a.double().numpy(), rowvar=False), np.cov(b.double().numpy(), rowvar=False)
        m = (a.double().mean(0) - b.double().mean(0)).numpy()
        exact = m @ m + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
        ours = frechet_distance(fid_statistics(a), reference_statistics(b))
        assert ours == pytest.approx(exact, rel=1e-8)
        assert ours == pytest.approx(theirs, rel=1e-5)


def test_kid_equals_torch_fidelity_on_the_same_subsets():
    from torch_fidelity.metric_kid import kid_features_to_metric

    from genbench.device_metrics import kid

    a, b = _correlated(400, 64, 3, 0.05), _correlated(300, 64, 4)
    for seed, subset in ((2020, 150), (7, 300)):
        theirs = kid_features_to_metric(a, b, kid_subset_size=subset, rng_seed=seed, verbose=False)
        mean, std = kid(a, b, subset, seed)
        assert mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-5)
        assert std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-4)
    assert kid(a, b, 150, 1) != kid(a, b, 150, 2)    # the seed picks the subsets


def test_kid_runs_in_full_fp32_and_restores_the_matmul_precision():
    from genbench.device_metrics import kid

    a = _correlated(300, 16, 5)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        kid(a, a, 100, 0)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("n_fake,n_real,d,block", [(700, 500, 8, 128), (900, 1300, 32, 256), (1500, 1200, 6, 10_000)])
def test_precision_recall_equals_torch_fidelity_block_by_block(n_fake, n_real, d, block):
    """Distances reduced block by block on the device give exactly torch-fidelity's full-matrix result,
    with uneven last blocks and more blocks of one set than the other."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    from genbench.device_metrics import precision_recall

    a = _gaussian(n_fake, torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64), 4).float()
    b = _gaussian(n_real, torch.full((d,), 0.3, dtype=torch.float64), torch.full((d,), 1.3, dtype=torch.float64),
                  5).float()
    theirs = prc_features_to_metric(a, b, save_cpu_ram=False, prc_batch_size=block, verbose=False)
    p, r = precision_recall(a, b, block=block)
    assert 0.05 < p < 0.999 and 0.05 < r < 0.999
    assert (p, r) == (theirs["precision"], theirs["recall"])
    if block == 10_000:   # and through the harness, with torch-fidelity's default arguments
        ours = fidelity_metrics({"f": a}, {"f": b}, SPEC, ["prc"])
        assert ours == {"precision": theirs["precision"], "recall": theirs["recall"],
                        "f_score": pytest.approx(theirs["f_score"], rel=1e-12)}


def test_reference_fid_statistics_computed_once_and_same_numbers(monkeypatch):
    from genbench.scoring import Reference, reference as ref_mod, score as score_mod

    a = _gaussian(800, torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64), 6).float()
    b = _gaussian(900, torch.full((5,), 0.2, dtype=torch.float64), torch.ones(5, dtype=torch.float64), 7).float()
    plain = fidelity_metrics({"f": a}, {"f": b}, SPEC, ["fid", "kid", "prc"], kid_subset_size=300)
    ref = Reference.on(torch.device("cpu"), {"f": b})
    calls = []
    for mod, name in ((score_mod, "fid_statistics"), (ref_mod, "reference_statistics")):
        original = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda f, original=original: calls.append(len(f)) or original(f))
    first = fidelity_metrics({"f": a}, ref, SPEC, ["fid", "kid", "prc"], kid_subset_size=300)
    second = fidelity_metrics({"f": a[:400]}, ref, SPEC, ["fid"])
    assert first == plain
    assert second["fid"] != first["fid"]
    assert calls == [800, 900, 400]        # the reference's statistics once, each fake set once


def test_compiled_extractor_pads_partial_batches_to_one_shape():
    """A compiled extractor (CUDA) pads a smaller batch to the first batch's size so the compiled graph
    is reused; the padding must not leak into, or change, the features. The padding logic is checked on
    the CPU with the module left uncompiled."""
    from genbench.data import load
    from genbench.scoring import Extractor, build_extractor

    plain = build_extractor("digits", torch.device("cpu"))
    seen = []
    padded = Extractor(plain.spec, lambda x: (seen.append(len(x)), plain.module(x))[1], None, plain.device,
                       compiled=True)
    x = load("digits", "test").x[:11]
    full, part = padded(x[:8]), padded(x[8:])
    assert seen == [8, 8]                                # the 3-image batch ran as 8
    for k in plain.layers:
        assert part[k].shape[0] == 3
        assert torch.allclose(part[k], plain(x[8:])[k], atol=1e-5)
        assert torch.allclose(full[k], plain(x[:8])[k], atol=1e-5)


@pytest.mark.parametrize("autotune", [False, True])
def test_extractor_sets_cudnn_autotune_for_its_forward_only(autotune):
    """The extractor runs its module with cuDNN's autotuner as its field says (off by default: the timing
    falls on a cold evaluation's first batch) and leaves the process-wide flag as it found it."""
    from genbench.data import load
    from genbench.scoring import Extractor, build_extractor

    plain = build_extractor("digits", torch.device("cpu"))
    assert plain.cudnn_autotune is False
    seen = []
    ext = Extractor(plain.spec, lambda x: (seen.append(torch.backends.cudnn.benchmark), plain.module(x))[1], None,
                    plain.device, cudnn_autotune=autotune)
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = not autotune
        ext(load("digits", "test").x[:4])
        assert seen == [autotune]
        assert torch.backends.cudnn.benchmark is (not autotune)
    finally:
        torch.backends.cudnn.benchmark = before


def test_reference_features_with_a_progress_bar_that_redraws(monkeypatch):
    """tqdm's update() returns True whenever it redraws; the extraction must not depend on that value
    (a run with progress on once handed the extractor `True` instead of a batch)."""
    import genbench.scoring.reference as ev
    from genbench.data import load
    from genbench.scoring import build_extractor

    class Redrawing(ev.tqdm):
        def update(self, n=1):
            super().update(n)
            return True

    monkeypatch.setattr(ev, "tqdm", Redrawing)
    ext, data = build_extractor("digits", torch.device("cpu")), load("digits", "test")
    with_bar = ev.reference_features(ext, data, 70, None, batch_size=32, progress=True)
    without = ev.reference_features(ext, data, 70, None, batch_size=32, progress=False)
    for k in ext.layers:
        assert with_bar[k].shape[0] == 70
        assert torch.equal(with_bar[k], without[k])


def _digits_reference():
    from genbench.data import load
    from genbench.scoring import build_extractor

    return build_extractor("digits", torch.device("cpu")), load("digits", "test")


def test_reference_cache_is_written_by_a_thread_and_read_back(tmp_path, monkeypatch):
    """The cold call returns before its cache file exists; the next call for the same file waits for
    that write and reads it back instead of extracting again; the features are the same."""
    import threading

    from genbench.scoring import reference as evaluate

    evaluate.wait_for_cache_writes()   # writes started by earlier tests
    ext, data = _digits_reference()
    calls, release = [], threading.Event()
    real_extract, real_save = evaluate.extract, evaluate.atomic_torch_save
    monkeypatch.setattr(evaluate, "extract", lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    monkeypatch.setattr(evaluate, "atomic_torch_save", lambda p, o: release.wait(10) and real_save(p, o))
    first = evaluate.reference_features(ext, data, 120, tmp_path, batch_size=50)
    assert list(tmp_path.glob("*.pt")) == [] and len(evaluate._cache_writes) == 1   # still being written
    release.set()
    again = evaluate.reference_features(ext, data, 120, tmp_path, batch_size=50)
    assert len(calls) == 1 and len(list(tmp_path.glob("*.pt"))) == 1 and not evaluate._cache_writes
    assert all(torch.equal(first[k], again[k]) for k in first) and len(first[ext.spec.fid_layer]) == 120


def test_reference_cache_write_failure_is_one_warning_line(tmp_path, monkeypatch, capsys):
    from genbench.scoring import reference as evaluate

    ext, data = _digits_reference()

    def disk_full(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate, "atomic_torch_save", disk_full)
    feats = evaluate.reference_features(ext, data, 60, tmp_path, batch_size=50)
    evaluate.wait_for_cache_writes()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(feats[ext.spec.fid_layer]) == 60 and list(tmp_path.iterdir()) == []
    assert len(err) == 1 and err[0].startswith("genbench: warning: reference features not cached") and "No space" in err[0]


def test_reference_extraction_shows_progress_only_when_asked(capsys):
    """Inception on a CPU takes hours for 50,000 reference images: the run shows how far it is."""
    from genbench.scoring import reference_features

    ext, data = _digits_reference()
    reference_features(ext, data, 120, None, batch_size=50, progress=True)
    err = capsys.readouterr().err
    assert "reference features (digits test)" in err and "/120 " in err
    reference_features(ext, data, 120, None, batch_size=50)
    assert capsys.readouterr().err == ""
