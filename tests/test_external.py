"""Scoring what a suite run did not make: sample sets from files (eval --samples), a stored run
re-scored (eval --run) and a stored run's samples written out (sample)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from genbench import store
from genbench.cli import main
from genbench.data import load
from helpers import write_suite

TINY_DDPM = {"params": {"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
                        "timesteps": 50, "nll_timesteps": 4, "lr": 2e-3},
             "sampler": {"sampler": "ddim", "steps": 4, "eta": 0.0}, "batch_size": 32, "ema": None}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(r, *needles):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
    """A tiny finished ddpm run with a steps sweep (module-scoped: trained once)."""
    tmp = tmp_path_factory.mktemp("ddpm")
    suite = write_suite(tmp, cards=("ddpm",), overrides={"ddpm": TINY_DDPM}, budget_kimg=0.1, n_fake=100,
                        batch_size=50, metrics=["fid", "kid", "prc", "modes"], kid_subset_size=50)
    text = suite.read_text() + "sweeps:\n- {name: ddim-steps, param: steps, values: [2], cards: [ddpm]}\n"
    suite.write_text(text)
    r = invoke("run", "--suite", suite, "--results-dir", tmp / "res", "--device", "cpu", "--no-progress")
    assert r.exit_code == 0, r.output
    return store.run_dir(tmp / "res", "tiny", "digits", "ddpm", 0)


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src.parents[3], dst)
    return dst / src.relative_to(src.parents[3])


def test_eval_run_reproduces_the_stored_sweep_point_and_adds_one_point(ddpm_run, tmp_path):
    rdir = _copy_run(ddpm_run, tmp_path / "res")
    sweep = next(p for p in store.read_record(rdir).sweeps if p.name == "ddim-steps")
    r = invoke("eval", "--run", rdir, "--steps", 2, "--device", "cpu", "--no-progress")
    assert r.exit_code == 0, r.output
    rec = store.read_record(rdir)
    added = [p for p in rec.sweeps if p.name == "eval"]
    assert len(added) == 1 and added[0].param == "steps" and added[0].value == 2
    assert added[0].metrics == sweep.metrics           # exactly: same model, seeds and reference
    assert added[0].sampling["nfe"] == 2
    r = invoke("eval", "--run", rdir, "--steps", 2, "--device", "cpu", "--no-progress")
    assert r.exit_code == 0 and "skipped" in r.output
    assert len(store.read_record(rdir).sweeps) == len(rec.sweeps)    # running it twice added one point
    df = store.load_results(rdir.parents[3])
    assert set(df["eval"]) == {"main", "ddim-steps", "eval"}


@pytest.mark.parametrize("case", ["no-folder", "not-a-run", "truncated-model", "missing-model", "changed-model",
                                  "unknown-option", "steps-too-many", "failed-run"])
def test_eval_run_bad_input(ddpm_run, tmp_path, case):
    rdir = _copy_run(ddpm_run, tmp_path / "res")
    args = ["--steps", 2]
    needle = str(rdir)
    if case == "no-folder":
        rdir = tmp_path / "nothing"
        needle = "no such folder"
    elif case == "not-a-run":
        rdir = tmp_path / "res"
        needle = "not a run folder"
    elif case == "truncated-model":
        data = (rdir / "model.pt").read_bytes()
        (rdir / "model.pt").write_bytes(data[: len(data) // 2])
        needle = "truncated"
    elif case == "missing-model":
        (rdir / "model.pt").unlink()
        needle = "model.pt is missing"
    elif case == "changed-model":
        data = bytearray((rdir / "model.pt").read_bytes())
        data[-100] ^= 0xFF
        (rdir / "model.pt").write_bytes(bytes(data))
        needle = "sha256"
    elif case == "unknown-option":
        args = ["--option", "truncation=0.5"]
        needle = "'truncation'"
    elif case == "steps-too-many":
        args = ["--steps", 51]
        needle = "steps must be an integer in [1, T=50]"
    elif case == "failed-run":
        m = json.loads((rdir / "metrics.json").read_text())
        m["status"] = "failed"
        (rdir / "metrics.json").write_text(json.dumps(m))
        needle = "failed, not complete"
    before = (rdir / "metrics.json").read_bytes() if (rdir / "metrics.json").exists() else None
    one_line_error(invoke("eval", "--run", rdir, *args, "--device", "cpu"), needle)
    if before is not None:
        assert (rdir / "metrics.json").read_bytes() == before


def test_sample_shares_first_images_and_writes_an_adm_npz(ddpm_run, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert invoke("sample", "--run", ddpm_run, "--n", 6, "--out", a, "--device", "cpu").exit_code == 0
    assert invoke("sample", "--run", ddpm_run, "--n", 10, "--out", b, "--device", "cpu", "--batch-size", 3).exit_code == 0
    with np.load(a, allow_pickle=False) as za, np.load(b, allow_pickle=False) as zb:
        xa, xb = za["arr_0"], zb["arr_0"]
    assert xa.dtype == np.uint8 and xa.shape == (6, 16, 16, 1) and xb.shape == (10, 16, 16, 1)
    assert np.array_equal(xa, xb[:6])
    c = tmp_path / "c.npz"   # --seed-start continues where --n 6 stopped
    assert invoke("sample", "--run", ddpm_run, "--n", 4, "--seed-start", 6, "--out", c, "--device", "cpu").exit_code == 0
    with np.load(c, allow_pickle=False) as zc:
        assert np.array_equal(zc["arr_0"], xb[6:])
    d = tmp_path / "pngs"
    assert invoke("sample", "--run", ddpm_run, "--n", 3, "--out", d, "--device", "cpu").exit_code == 0
    assert sorted(p.name for p in d.iterdir()) == ["000000.png", "000001.png", "000002.png"]


def test_sample_bad_output_writes_nothing(ddpm_run, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    one_line_error(invoke("sample", "--run", ddpm_run, "--n", 3, "--out", f / "x.npz", "--device", "cpu"), str(f))
    one_line_error(invoke("sample", "--run", ddpm_run, "--n", 0, "--out", tmp_path / "y.npz", "--device", "cpu"), "--n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def _digits_as_files(tmp_path: Path, n: int = 120) -> tuple[Path, Path, torch.Tensor]:
    from PIL import Image

    x = load("digits", "test").x[:n]                       # uint8 [n, 1, 16, 16]
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(x):
        Image.fromarray(img[0].numpy()).save(folder / f"{i:04d}.png")
    npz = tmp_path / "samples.npz"
    np.savez(npz, arr_0=x.permute(0, 2, 3, 1).numpy())
    return folder, npz, x


def test_eval_samples_folder_and_npz_agree_and_equal_torch_fidelity(tmp_path):
    import torch_fidelity

    folder, npz, x = _digits_as_files(tmp_path)
    res = tmp_path / "res"
    common = ("--dataset", "digits", "--ref-split", "train", "--kid-subset-size", 100, "--results-dir", res,
              "--device", "cpu", "--no-progress")
    r1 = invoke("eval", "--samples", folder, "--name", "png", *common)
    r2 = invoke("eval", "--samples", npz, "--name", "npz", *common)
    r7 = invoke("eval", "--samples", npz, "--name", "npz7", *common, "--batch-size", 7)
    assert r1.exit_code == 0 and r2.exit_code == 0 and r7.exit_code == 0, r1.output + r2.output + r7.output
    a = store.read_record(store.run_dir(res, "external", "digits", "png", 0))
    b = store.read_record(store.run_dir(res, "external", "digits", "npz", 0))
    c = store.read_record(store.run_dir(res, "external", "digits", "npz7", 0))
    assert a.metrics == b.metrics and a.kind == "external"
    # another batch size: the same numbers up to the extractor's float rounding in other batch shapes
    assert c.metrics == pytest.approx(a.metrics, rel=1e-6, abs=1e-9)
    assert a.samples["sha256"] == b.samples["sha256"] and a.samples["count"] == 120
    assert a.samples["kind"] == "folder" and b.samples["kind"] == "npz"
    real = load("digits", "train").x

    class Wrap(torch.utils.data.Dataset):
        def __len__(self):
            return len(real)

        def __getitem__(self, i):
            return real[i]

    theirs = torch_fidelity.calculate_metrics(
        input1=str(folder), input2=Wrap(), cuda=False, isc=True, fid=True, kid=True, prc=True,
        feature_extractor="genbench-digits", kid_subset_size=100, verbose=False, cache=False, batch_size=60,
        save_cpu_ram=True,                                    # no DataLoader worker processes
        rng_seed=0)   # genbench seeds IS splits and KID subsets with the sample set's --seed
    assert a.metrics["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    assert a.metrics["is_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-5)
    assert a.metrics["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4, abs=1e-7)
    assert a.metrics["precision"] == pytest.approx(theirs["precision"])
    assert a.metrics["recall"] == pytest.approx(theirs["recall"])
    # the same samples again: nothing redone
    r3 = invoke("eval", "--samples", folder, "--name", "png", *common)
    assert r3.exit_code == 0 and "skipped" in r3.output
    # beside suite runs in report and compare
    from genbench.compare import summarize

    s = summarize(res)
    assert {e["card"] for e in s["entries"]} == {"png", "npz", "npz7"}


@pytest.mark.parametrize("case", ["empty-folder", "float-npz", "wrong-size", "few-for-kid", "labels-count",
                                  "bad-dataset", "points-dataset", "no-dataset", "both", "neither",
                                  "results-under-file", "run-option"])
def test_eval_samples_bad_input(tmp_path, case):
    folder, npz, x = _digits_as_files(tmp_path, n=30)
    res = tmp_path / "res"
    args = ["--samples", npz, "--dataset", "digits", "--kid-subset-size", 20]
    needle = ""
    if case == "empty-folder":
        (tmp_path / "empty").mkdir()
        args[1], needle = tmp_path / "empty", "empty"
    elif case == "float-npz":
        f = tmp_path / "f.npz"
        np.savez(f, arr_0=x.permute(0, 2, 3, 1).numpy().astype(np.float32) / 255)
        args[1], needle = f, "float32"
    elif case == "wrong-size":
        args += ["--image-size", 8]
        needle = "8"
    elif case == "few-for-kid":
        args[-1], needle = 100, "'kid'"
    elif case == "labels-count":
        lab = tmp_path / "l.npy"
        np.save(lab, np.zeros(5, dtype=np.int64))
        args += ["--labels", lab]
        needle = "5"
    elif case == "bad-dataset":
        args[3], needle = "imagenet", "unknown dataset"
    elif case == "points-dataset":
        args[3], needle = "ring8", "2-D"
    elif case == "no-dataset":
        args, needle = ["--samples", npz], "--dataset"
    elif case == "both":
        args += ["--run", tmp_path]
        needle = "exactly one"
    elif case == "neither":
        args, needle = ["--dataset", "digits"], "exactly one"
    elif case == "results-under-file":
        (tmp_path / "f").write_text("x")
        res, needle = tmp_path / "f" / "res", "is a file"
    elif case == "run-option":
        args += ["--steps", 5]
        needle = "--steps applies to --run"
    one_line_error(invoke("eval", *args, "--results-dir", res, "--device", "cpu"), needle)
    assert not res.exists() or not list(res.rglob("metrics.json"))
