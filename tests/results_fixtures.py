"""Constructed results for the report, claims and compare tests: rows for a DataFrame, and whole
results trees written the way genbench/store.py lays them out (metrics.json, curves.csv,
train_log.csv, samples.png), so the tests never need a trained model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from genbench import store

EXTRACTOR = "digits-classifier"
SHA = "ab" * 32
FAMILY = {"dcgan": "gan", "sngan": "gan", "wgan-gp": "gan", "vae": "vae", "vqvae-pixelcnn": "vqvae",
          "ddpm": "diffusion", "iddpm": "diffusion", "adm": "diffusion", "adm-cfg": "diffusion",
          "adm-cg": "diffusion"}


def row(card: str, seed: int = 0, status: str = "complete", eval: str = "main", param=None, value=None,
        suite: str = "smoke", dataset: str = "digits", **metrics) -> dict:
    """One DataFrame row as store.load_results would produce it."""
    return {"suite": suite, "dataset": dataset, "card": card, "family": FAMILY.get(card), "seed": seed,
            "status": status, "eval": eval, "sweep_param": param, "sweep_value": value,
            "prov_extractor": EXTRACTOR, "device": "cpu", **metrics}


def seeds(card: str, values: dict[str, list[float]], **kw) -> list[dict]:
    """Rows for seeds 0..n-1 of one card; `values` maps metric -> one value per seed."""
    n = len(next(iter(values.values())))
    return [row(card, seed=i, **kw, **{m: v[i] for m, v in values.items()}) for i in range(n)]


def sweep(card: str, param: str, name: str, per_value: dict, metric_names: tuple[str, ...], **kw) -> list[dict]:
    """Sweep rows: per_value maps a sweep value -> list over seeds of tuples (one entry per metric)."""
    out = []
    for v, per_seed in per_value.items():
        for i, vals in enumerate(per_seed):
            out.append(row(card, seed=i, eval=name, param=param, value=v, **kw, **dict(zip(metric_names, vals))))
    return out


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- trees on disk


def write_run(root: Path, card: str, seed: int, *, suite: str = "smoke", dataset: str = "digits",
              status: str = "complete", metrics: dict | None = None, sampling: dict | None = None,
              sweeps: list[dict] | None = None, curves: list[dict] | None = None,
              train_log: list[dict] | None = None, samples: bool = True, extractor: str = EXTRACTOR,
              tolerances: dict | None = None, traits: dict | None = None) -> Path:
    rdir = store.run_dir(root, suite, dataset, card, seed)
    rdir.mkdir(parents=True, exist_ok=True)
    m = {"status": status, "suite": suite, "suite_version": 1, "dataset": dataset, "card": card,
         "family": FAMILY.get(card, "gan"), "seed": seed, "metrics": metrics or {},
         "sampling": {"img_per_s": 500.0, "ms_per_img": 2.0, "nfe": 1, "peak_mem_mb": 10.0, "batch_size": 64,
                      "device": "cpu", "sampler": {}, **(sampling or {})},
         "training": {"kimg": 2.0, "wall_s": 10.0, "diverged_at_kimg": 1.5 if status == "diverged" else None,
                      "steps": 100},
         "provenance": {"extractor": extractor, "extractor_sha256": SHA, "n_real": 1797, "n_fake": 500,
                        "ref_split": "test", "image_size": [1, 8, 8], "versions": {"torch": "2.14.1", "genbench": "0.1.0"},
                        "device": "cpu", "seed": seed},
         "sweeps": sweeps or []}
    if tolerances is not None:
        m["gate"] = {"tolerances": tolerances}
    if traits is not None:
        m["traits"] = traits
    store.write_json(rdir / store.METRICS_FILE, m)
    if curves:
        store.write_csv(rdir / store.CURVES_FILE, curves)
    if train_log:
        store.write_csv(rdir / store.TRAIN_LOG_FILE, train_log)
    if samples:
        _write_png(rdir / store.SAMPLES_FILE, seed)
    return rdir


def _write_png(path: Path, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(path)


def build_tree(root: Path, n_seeds: int = 3, fid_shift: float = 0.0) -> Path:
    """A small but complete results tree: GAN, VAE, VQ-VAE (codes sweep), DDPM, iDDPM (steps sweeps),
    ADM-CFG (guidance sweep); one diverged GAN run; curves with a mode collapse in one GAN run."""
    root = Path(root)
    base = {"dcgan": (20.0, 0.80, 0.30, 6), "vae": (40.0, 0.40, 0.60, 9), "vqvae-pixelcnn": (25.0, 0.6, 0.5, 9),
            "ddpm": (10.0, 0.70, 0.70, 10), "iddpm": (11.0, 0.70, 0.72, 10), "adm-cfg": (8.0, 0.72, 0.70, 10)}
    speed = {"dcgan": (5000.0, 1), "vae": (6000.0, 1), "vqvae-pixelcnn": (300.0, 50), "ddpm": (20.0, 1000),
             "iddpm": (20.0, 1000), "adm-cfg": (10.0, 200)}
    for card, (fid, prec, rec, modes) in base.items():
        for seed in range(n_seeds):
            jitter = 0.2 * (seed - 1) * (5 if card == "dcgan" else 1)
            metrics = {"fid": fid + jitter + fid_shift, "is_mean": 5.0 + 0.1 * seed, "is_std": 0.1,
                       "kid_mean": fid / 1000, "kid_std": 0.001, "precision": prec + 0.01 * seed,
                       "recall": rec - 0.01 * seed, "f_score": 0.5, "modes_covered": modes, "modes_total": 10,
                       "mode_kl": 0.1, "high_quality_frac": 0.8}
            if FAMILY[card] == "diffusion":
                metrics["nll_bpd"] = 3.0 + (0.1 if card == "ddpm" else 0.0) + 0.01 * seed
            ips, nfe = speed[card]
            sweeps = []
            if card == "vqvae-pixelcnn":
                sweeps = [{"name": "codes", "param": "codes", "value": v, "sampler": {"codes": v},
                           "metrics": {"fid": fid + (0 if v == "prior" else 30) + jitter},
                           "sampling": {"nfe": nfe}} for v in ("prior", "uniform")]
            if card in ("ddpm", "iddpm"):
                loss = 20 if card == "ddpm" else 5
                sweeps = [{"name": "steps_ancestral", "param": "steps", "value": st,
                           "sampler": {"sampler": "ancestral", "steps": st},
                           "metrics": {"fid": fid + (loss if st == 50 else 0) + jitter},
                           "sampling": {"nfe": st, "img_per_s": ips * 1000 / st}} for st in (50, 1000)]
            if card == "adm-cfg":
                sweeps = [{"name": "guidance", "param": "guidance", "value": w, "sampler": {"guidance": w},
                           "metrics": {"fid": fid + {0.0: 2, 0.5: 0, 3.0: 6}[w] + jitter,
                                       "is_mean": 5 + w, "precision": 0.7 + 0.05 * w, "recall": 0.7 - 0.1 * w},
                           "sampling": {"nfe": nfe}} for w in (0.0, 0.5, 3.0)]
            status = "complete"
            if card == "dcgan" and seed == n_seeds - 1 and n_seeds > 2:
                status = "diverged"
            curves = [{"kimg": k, "fid": fid + 30 / (1 + k), "modes_covered": modes} for k in (0.5, 1.0, 1.5, 2.0)]
            if card == "dcgan" and seed == 0:
                curves[2]["modes_covered"] = 2     # a collapse event, recovered at the next evaluation
            train_log = [{"kimg": k / 10, "phase": "main", "loss_g": 1.0 / (1 + k), "grad_norm_g": 1.0 + k % 3}
                         for k in range(20)]
            write_run(root, card, seed, status=status, metrics=metrics, sampling={"img_per_s": ips, "ms_per_img":
                      1000 / ips, "nfe": nfe}, sweeps=sweeps, curves=curves, train_log=train_log)
    return root


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj))
