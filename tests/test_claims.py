"""Claims C1-C8 on constructed results tables: every claim is "not measured" on an empty table, and
each claim reaches supported / contradicted / inconclusive on tables built to make it so."""
from __future__ import annotations

import pandas as pd
import pytest

from genbench.claims import (CONTRADICTED, INCONCLUSIVE, NOT_MEASURED, SUPPORTED, VERDICTS, Check, Sample, all_of,
                             across_scopes, differ, evaluate_claims, no_worse)
from results_fixtures import frame, row, seeds, sweep


def verdict(df: pd.DataFrame, cid: str) -> str:
    return {v.id: v for v in evaluate_claims(df)}[cid].verdict


def claim(df: pd.DataFrame, cid: str):
    return {v.id: v for v in evaluate_claims(df)}[cid]


@pytest.mark.parametrize("df", [None, pd.DataFrame(), frame([row("unknown-card", fid=1.0)])],
                         ids=["none", "empty", "unrelated"])
def test_every_claim_not_measured_without_its_runs(df):
    out = evaluate_claims(df)
    assert [v.id for v in out] == [f"C{i}" for i in range(1, 9)]
    assert all(v.verdict == NOT_MEASURED for v in out), [(v.id, v.verdict) for v in out]
    assert all(v.anchor for v in out) and all(v.title for v in out)


# --------------------------------------------------------------------------- rules


def test_differ_rule():
    a, b = Sample("a", pd.Series([1.0, 1.1, 1.2]).to_numpy()), Sample("b", pd.Series([2.0, 2.1, 2.2]).to_numpy())
    assert differ(a, b, "m", False, "").verdict == SUPPORTED
    assert differ(a, b, "m", True, "").verdict == CONTRADICTED
    c = Sample("c", pd.Series([1.0, 2.2, 1.5]).to_numpy())
    assert differ(a, c, "m", False, "").verdict == INCONCLUSIVE      # intervals overlap
    one = Sample("one", pd.Series([5.0]).to_numpy())
    assert differ(one, b, "m", True, "").verdict == INCONCLUSIVE     # fewer than 2 seeds
    assert differ(Sample("x", pd.Series([], dtype=float).to_numpy()), b, "m", True, "").verdict == NOT_MEASURED


def test_no_worse_rule():
    base = Sample("b", pd.Series([10.0, 10.1, 9.9]).to_numpy())
    close = Sample("a", pd.Series([10.2, 10.3, 10.1]).to_numpy())
    far = Sample("a", pd.Series([15.0, 15.1, 14.9]).to_numpy())
    assert no_worse(close, base, "fid", False, 0.10, "").verdict == SUPPORTED
    assert no_worse(far, base, "fid", False, 0.10, "").verdict == CONTRADICTED
    assert no_worse(far, base, "fid", True, 0.10, "").verdict == SUPPORTED   # higher fid would be better here


def test_a_half_measured_claim_is_not_supported():
    c = lambda v: Check("", v, "")
    assert all_of([c(SUPPORTED), c(SUPPORTED)]) == SUPPORTED
    assert all_of([c(SUPPORTED), c(NOT_MEASURED)]) == INCONCLUSIVE
    assert all_of([c(CONTRADICTED), c(NOT_MEASURED)]) == CONTRADICTED
    assert all_of([c(NOT_MEASURED), c(NOT_MEASURED)]) == NOT_MEASURED


def test_across_scopes():
    assert across_scopes([SUPPORTED, CONTRADICTED]) == INCONCLUSIVE
    assert across_scopes([SUPPORTED, NOT_MEASURED]) == SUPPORTED
    assert across_scopes([INCONCLUSIVE, CONTRADICTED]) == CONTRADICTED
    assert across_scopes([]) == NOT_MEASURED


# --------------------------------------------------------------------------- C1


def c1_supported() -> list[dict]:
    gan = seeds("dcgan", {"fid": [10.0, 20.0, 30.0], "precision": [0.9, 0.91, 0.92], "recall": [0.2, 0.21, 0.22]})
    gan += [row("dcgan", seed=s, status="diverged") for s in range(3, 8)]
    vae = seeds("vae", {"fid": [40.0, 40.1, 40.2], "precision": [0.4, 0.41, 0.42], "recall": [0.5, 0.51, 0.5]})
    dif = seeds("ddpm", {"fid": [5.0, 5.1, 5.2], "precision": [0.7, 0.7, 0.71], "recall": [0.7, 0.72, 0.71]})
    return gan + vae + dif


def test_c1_supported():
    c = claim(frame(c1_supported()), "C1")
    assert c.verdict == SUPPORTED, c.evidence
    assert all(ch.verdict == SUPPORTED for s in c.scopes for ch in s.checks)
    assert c.numbers["smoke/digits | gan precision mean"] == pytest.approx(0.91)
    assert "PacGAN" in c.anchor and "6.3 +- 0.5 of 8" in c.anchor


def test_c1_contradicted_when_the_vae_is_more_precise():
    rows = seeds("dcgan", {"precision": [0.3, 0.31, 0.32]}) + seeds("vae", {"precision": [0.8, 0.81, 0.82]})
    c = claim(frame(rows), "C1")
    assert c.verdict == CONTRADICTED
    assert "the other way" in c.evidence


def test_c1_inconclusive_when_intervals_overlap():
    rows = seeds("dcgan", {"precision": [0.5, 0.7, 0.6]}) + seeds("vae", {"precision": [0.55, 0.65, 0.45]})
    assert verdict(frame(rows), "C1") == INCONCLUSIVE


def test_c1_not_measured_with_gans_alone():
    assert verdict(frame(seeds("dcgan", {"precision": [0.5, 0.7, 0.6], "fid": [1, 2, 3]})), "C1") == NOT_MEASURED


def test_c1_pools_cards_of_a_family_and_keeps_scopes_apart():
    rows = c1_supported()
    # the same runs on another dataset, with the VAE now more precise: mixed scopes -> inconclusive
    other = [dict(r, dataset="fashion") for r in rows]
    for r in other:
        if r["card"] == "vae":
            r["precision"] = 0.99 + 0.001 * r["seed"]
    c = claim(frame(rows + other), "C1")
    assert {s.scope: s.verdict for s in c.scopes} == {"smoke/digits": SUPPORTED, "smoke/fashion": CONTRADICTED}
    assert c.verdict == INCONCLUSIVE


def test_scopes_split_by_extractor():
    rows = seeds("dcgan", {"precision": [0.9, 0.91, 0.92]}) + seeds("vae", {"precision": [0.4, 0.41, 0.42]})
    for r in rows[3:]:
        r["prov_extractor"] = "inception-v3-compat"   # the VAE was scored in another feature space
    c = claim(frame(rows), "C1")
    assert c.verdict == NOT_MEASURED
    assert len(c.scopes) == 2


# --------------------------------------------------------------------------- C2, C3


def test_c2_verdicts():
    gan = seeds("dcgan", {"fid": [10.0, 11.0, 12.0], "precision": [0.9, 0.91, 0.92], "recall": [0.2, 0.21, 0.22]})
    vae = seeds("vae", {"fid": [40.0, 41.0, 42.0], "precision": [0.4, 0.41, 0.42], "recall": [0.5, 0.51, 0.52]})
    assert verdict(frame(gan + vae), "C2") == SUPPORTED
    better_vae = seeds("vae", {"fid": [4.0, 4.1, 4.2]})
    assert verdict(frame(gan + better_vae), "C2") == CONTRADICTED
    assert verdict(frame(gan[:1] + vae[:1]), "C2") == INCONCLUSIVE   # one seed each


def _vq(codes_uniform: float, n: int = 3, diverged: bool = False) -> list[dict]:
    rows = seeds("vqvae-pixelcnn", {"fid": [25.0, 25.1, 25.2][:n]})
    rows += sweep("vqvae-pixelcnn", "codes", "codes", {"prior": [(25.0,), (25.1,), (25.2,)][:n],
                                                       "uniform": [(codes_uniform + 0.1 * i,) for i in range(n)]},
                  ("fid",))
    if diverged:
        rows.append(row("vqvae-pixelcnn", seed=9, status="diverged"))
    return rows


def test_c3_verdicts():
    gan = seeds("dcgan", {"fid": [10.0, 20.0, 30.0]})
    assert verdict(frame(gan + _vq(60.0)), "C3") == SUPPORTED
    assert verdict(frame(gan + _vq(60.0, diverged=True)), "C3") == CONTRADICTED
    assert verdict(frame(gan + _vq(10.0)), "C3") == CONTRADICTED   # uniform codes better than the prior
    assert verdict(frame(_vq(60.0, n=1)), "C3") == INCONCLUSIVE


# --------------------------------------------------------------------------- C4


def _speed(card: str, nfe: int, ips: float, n: int = 3) -> list[dict]:
    return seeds(card, {"nfe": [nfe] * n, "img_per_s": [ips * (1 + 0.01 * i) for i in range(n)],
                        "ms_per_img": [1000 / (ips * (1 + 0.01 * i)) for i in range(n)]})


def test_c4_verdicts():
    assert verdict(frame(_speed("dcgan", 1, 5000) + _speed("ddpm", 1000, 20)), "C4") == SUPPORTED
    # DDPM only 10x slower than the GAN per image: the 100x part is contradicted
    assert verdict(frame(_speed("dcgan", 1, 200) + _speed("ddpm", 1000, 20)), "C4") == CONTRADICTED
    # a 10-step sampler needs fewer evaluations than the autoregressive prior
    assert verdict(frame(_speed("vqvae-pixelcnn", 64, 5000) + _speed("adm", 10, 20)), "C4") == CONTRADICTED
    # NFE supported, but one seed of timing: img/s inconclusive
    assert verdict(frame(_speed("dcgan", 1, 5000, n=1) + _speed("ddpm", 1000, 20, n=1)), "C4") == INCONCLUSIVE


def test_c4_timings_compared_only_on_one_device():
    gan = _speed("dcgan", 1, 5000)
    dif = [dict(r, device="cuda") for r in _speed("ddpm", 1000, 20)]
    c = claim(frame(gan + dif), "C4")
    checks = {ch.text: ch.verdict for s in c.scopes for ch in s.checks}
    assert checks["diffusion has the lowest img/s on the same device"] == NOT_MEASURED
    assert checks["1000-step DDPM at least 100x slower per image than the GAN"] == NOT_MEASURED
    assert checks["diffusion needs more network evaluations per image than every other family"] == SUPPORTED
    assert c.verdict == INCONCLUSIVE   # NFE alone is supported, but half the claim is not measured


# --------------------------------------------------------------------------- C5, C6


def test_c5_verdicts():
    ddpm = seeds("ddpm", {"fid": [10.0, 10.1, 10.2]})
    iddpm = seeds("iddpm", {"fid": [10.0, 10.2, 10.1]})
    assert verdict(frame(ddpm + iddpm), "C5") == SUPPORTED
    assert verdict(frame(ddpm + iddpm + [row("ddpm", seed=5, status="diverged")]), "C5") == CONTRADICTED
    worse = seeds("ddpm", {"fid": [20.0, 20.1, 20.2]})
    assert verdict(frame(worse + iddpm), "C5") == CONTRADICTED
    assert verdict(frame(ddpm[:1] + iddpm[:1]), "C5") == INCONCLUSIVE


def _steps(card: str, loss: float, nll: float) -> list[dict]:
    rows = seeds(card, {"fid": [10.0, 10.1, 10.2], "nll_bpd": [nll, nll + 0.01, nll + 0.02]})
    rows += sweep(card, "steps", "steps_ancestral",
                  {50: [(10 + loss + 0.1 * i,) for i in range(3)], 1000: [(10 + 0.1 * i,) for i in range(3)]},
                  ("fid",))
    return rows


def test_c6_verdicts():
    assert verdict(frame(_steps("ddpm", 20, 3.2) + _steps("iddpm", 5, 3.0)), "C6") == SUPPORTED
    assert verdict(frame(_steps("ddpm", 5, 3.2) + _steps("iddpm", 20, 3.0)), "C6") == CONTRADICTED
    assert verdict(frame(_steps("ddpm", 20, 3.0) + _steps("iddpm", 5, 3.2)), "C6") == CONTRADICTED
    mixed = _steps("ddpm", 20, 3.0) + _steps("iddpm", 5, 3.001)   # nll intervals overlap
    assert verdict(frame(mixed), "C6") == INCONCLUSIVE


def test_c6_never_mixes_two_step_sweeps():
    # a DDIM sweep (flat) and an ancestral one (steep) for each card: the ancestral one is read
    rows = _steps("ddpm", 20, 3.2) + _steps("iddpm", 5, 3.0)
    for card in ("ddpm", "iddpm"):
        rows += sweep(card, "steps", "steps_ddim", {50: [(50.0,)] * 3, 1000: [(10.0,)] * 3}, ("fid",))
    c = claim(frame(rows), "C6")
    assert c.verdict == SUPPORTED
    assert "steps_ancestral" in c.evidence


# --------------------------------------------------------------------------- C7


def _adm(adm_fid: float, prec_hi: float = 0.9, fid25: float = 5.3) -> list[dict]:
    rows = seeds("adm", {"fid": [adm_fid + 0.1 * i for i in range(3)]})
    rows += seeds("ddpm", {"fid": [10.0, 10.1, 10.2]})
    rows += sweep("adm", "steps", "steps_ddim", {25: [(fid25 + 0.05 * i,) for i in range(3)],
                                                 250: [(5.0 + 0.05 * i,) for i in range(3)]}, ("fid",))
    rows += sweep("adm-cg", "classifier_scale", "classifier_scale",
                  {0.0: [(0.7 + 0.01 * i, 0.7 - 0.01 * i, 5.0) for i in range(3)],
                   10.0: [(prec_hi + 0.01 * i, 0.3 - 0.01 * i, 9.0) for i in range(3)]},
                  ("precision", "recall", "is_mean"))
    return rows


def test_c7_verdicts():
    assert verdict(frame(_adm(5.0)), "C7") == SUPPORTED
    assert verdict(frame(_adm(15.0)), "C7") == CONTRADICTED           # ADM worse than DDPM
    assert verdict(frame(_adm(5.0, fid25=9.0)), "C7") == CONTRADICTED  # 25 steps far from 250
    one = [r for r in _adm(5.0) if r["seed"] == 0]
    assert verdict(frame(one), "C7") == INCONCLUSIVE


# --------------------------------------------------------------------------- C8


def _cfg(fids: dict, n: int = 3, cfg_nfe: int = 200, adm_nfe: int = 100) -> list[dict]:
    per = {w: [(f + 0.1 * i, 5 + 2 * w + 0.01 * i, 0.7 - 0.1 * w - 0.01 * i) for i in range(n)] for w, f in fids.items()}
    rows = sweep("adm-cfg", "guidance", "guidance", per, ("fid", "is_mean", "recall"))
    rows += seeds("adm-cfg", {"nfe": [cfg_nfe] * n}) + seeds("adm", {"nfe": [adm_nfe] * n})
    return rows


def test_c8_supported():
    c = claim(frame(_cfg({0.0: 10.0, 0.5: 8.0, 3.0: 14.0})), "C8")
    assert c.verdict == SUPPORTED, c.evidence
    assert "interior minimum at w=0.5" in c.evidence


def test_c8_contradicted_when_fid_only_rises():
    c = claim(frame(_cfg({0.0: 8.0, 0.5: 10.0, 3.0: 14.0})), "C8")
    assert c.verdict == CONTRADICTED
    assert "minimum at the end w=0" in c.evidence


def test_c8_contradicted_when_guidance_is_free():
    assert verdict(frame(_cfg({0.0: 10.0, 0.5: 8.0, 3.0: 14.0}, cfg_nfe=100)), "C8") == CONTRADICTED


def test_c8_inconclusive():
    assert verdict(frame(_cfg({0.0: 10.0, 0.5: 8.0, 3.0: 14.0}, n=1)), "C8") == INCONCLUSIVE
    # minimum in the middle but not clearly below the ends
    assert verdict(frame(_cfg({0.0: 8.1, 0.5: 8.0, 3.0: 14.0})), "C8") == INCONCLUSIVE


def test_c8_not_measured_without_a_guidance_sweep():
    assert verdict(frame(seeds("adm", {"fid": [1.0, 2.0]})), "C8") == NOT_MEASURED


def test_verdicts_are_from_the_four():
    out = evaluate_claims(frame(c1_supported() + _cfg({0.0: 10.0, 0.5: 8.0, 3.0: 14.0}) + _adm(5.0)))
    assert {v.verdict for v in out} <= set(VERDICTS)
    for v in out:
        for s in v.scopes:
            assert all(ch.verdict in VERDICTS for ch in s.checks)


def test_sampler_read_from_the_stored_sampler_options():
    # the sweep's name says nothing; the sampler dict the store keeps per row says DDIM
    rows = [dict(r, eval="steps", sampler={"sampler": "ddim", "steps": r["sweep_value"]}) if r["eval"] == "steps_ddim"
            else r for r in _adm(5.0)]
    c = claim(frame(rows), "C7")
    assert c.verdict == SUPPORTED
    assert "~25 DDIM steps stay within 25%" in c.evidence and "adm 25 steps" in c.evidence
    # the same rows marked ancestral: no DDIM sweep left to read
    rows = [dict(r, sampler={"sampler": "ancestral"}) if r["eval"] == "steps" else r for r in rows]
    checks = {ch.text: ch.verdict for s in claim(frame(rows), "C7").scopes for ch in s.checks}
    assert checks["~25 DDIM steps stay within 25% of the FID at ~250 steps"] == NOT_MEASURED


# --------------------------------------------------------------------------- what the independent check found


def test_scopes_split_on_the_extractor_weights_not_only_its_name():
    rows = seeds("dcgan", {"precision": [0.9, 0.91, 0.92]}) + seeds("vae", {"precision": [0.4, 0.41, 0.42]})
    for r in rows:
        r["prov_extractor_sha256"] = "ab" * 32
    for r in rows[3:]:
        r["prov_extractor_sha256"] = "cd" * 32   # the same classifier name, retrained: another feature space
    c = claim(frame(rows), "C1")
    assert len(c.scopes) == 2 and c.verdict == NOT_MEASURED
    assert any("weights abababab" in s.scope for s in c.scopes)


def test_scopes_split_on_n_fake():
    rows = seeds("dcgan", {"precision": [0.9, 0.91, 0.92]}) + seeds("vae", {"precision": [0.4, 0.41, 0.42]})
    for r in rows:
        r["run_n_fake"] = 500 if r["card"] == "dcgan" else 5000   # FID depends on n: never pooled
    c = claim(frame(rows), "C1")
    assert {s.scope for s in c.scopes} == {"smoke/digits [n_fake=500]", "smoke/digits [n_fake=5000]"}


def test_c4_counts_a_seed_once_when_its_main_point_and_a_sweep_point_both_run_1000_steps():
    gan = _speed("dcgan", 1, 5000)
    ddpm = _speed("ddpm", 1000, 20)
    again = [dict(r, eval="ancestral-steps", sweep_param="steps", sweep_value=1000) for r in ddpm]
    c = claim(frame(gan + ddpm + again), "C4")
    check = next(ch for s in c.scopes for ch in s.checks if ch.text.startswith("1000-step DDPM"))
    assert check.numbers["ddpm ms_per_img n"] == 3.0, check.evidence


def test_same_device_means_the_same_device_model():
    gan = [dict(r, device="cuda:0", prov_device_model="NVIDIA H100 80GB HBM3") for r in _speed("dcgan", 1, 5000)]
    dif = [dict(r, device="cuda:0", prov_device_model="NVIDIA H200") for r in _speed("ddpm", 1000, 20)]
    c = claim(frame(gan + dif), "C4")
    checks = {ch.text: ch.verdict for s in c.scopes for ch in s.checks}
    assert checks["1000-step DDPM at least 100x slower per image than the GAN"] == NOT_MEASURED
    same = [dict(r, prov_device_model="NVIDIA H200") for r in gan]
    checks = {ch.text: ch.verdict for s in claim(frame(same + dif), "C4").scopes for ch in s.checks}
    assert checks["1000-step DDPM at least 100x slower per image than the GAN"] == SUPPORTED


def test_a_point_sampled_at_another_n_is_left_out_of_a_sweeps_fid():
    rows = _steps("ddpm", 20, 3.2) + _steps("iddpm", 5, 3.0)
    for r in rows:
        r["run_n_fake"] = 500
        if r["sweep_value"] == 1000:
            r["prov_n_fake"] = 100     # timed on a modest n: its FID is not comparable
    c = claim(frame(rows), "C6")
    step = next(ch for s in c.scopes for ch in s.checks if ch.text.startswith("learned variance"))
    assert step.verdict == NOT_MEASURED


def test_c4_ratio_is_tested_on_log_time():
    """Three timings that vary by a factor of 2.5 (load on a shared CPU): their arithmetic t-interval
    reaches below zero, but every value is thousands of times the GAN's, and the log-time interval
    of the ratio says so; a DDPM about 30x slower is contradicted, and noisier, inconclusive."""
    from genbench.claims import log_ratio_interval

    gan = _speed("dcgan", 1, 5000)
    ddpm = seeds("ddpm", {"nfe": [1000] * 3, "ms_per_img": [1160.0, 1092.0, 468.0],
                          "img_per_s": [1000 / 1160, 1000 / 1092, 1000 / 468]})
    c = claim(frame(gan + ddpm), "C4")
    check = next(ch for s in c.scopes for ch in s.checks if ch.text.startswith("1000-step DDPM"))
    assert check.numbers["ddpm ms_per_img ci_lo"] < 0          # the arithmetic interval is useless here
    assert check.verdict == SUPPORTED and check.numbers["ratio ci_lo"] > 100, check.evidence
    for times, want in (([7.0, 6.0, 5.0], CONTRADICTED), ([9.0, 6.0, 3.0], INCONCLUSIVE)):
        slow = seeds("ddpm", {"nfe": [1000] * 3, "ms_per_img": times, "img_per_s": [1000 / t for t in times]})
        c = claim(frame(gan + slow), "C4")
        check = next(ch for s in c.scopes for ch in s.checks if ch.text.startswith("1000-step DDPM"))
        assert check.verdict == want, check.evidence
    lo, hi = log_ratio_interval([2.0, 2.0, 2.0], [1.0, 1.0])
    assert lo == hi == 2.0
