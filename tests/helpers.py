"""Small builders shared by the tests: a suite file, the CLI through click's runner, and the check that a
user mistake ended in one `error: ...` line with exit code 2 and no traceback."""
from pathlib import Path

import yaml
from click.testing import CliRunner

from genbench.cli import main

TINY_VAE = {"params": {"z_dim": 4, "channels": 8, "max_channels": 16}, "batch_size": 32}


def write_suite(tmp_path: Path, name="tiny", dataset="digits", cards=("vae",), seeds=1, budget_kimg=0.2,
                extractor="auto", overrides=None, **eval_kw) -> Path:
    ev = {"extractor": extractor, "n_fake": 200, "batch_size": 100, "cheap_n_fake": 100, "kid_subset_size": 100,
          "ref_split": "train", **eval_kw}
    suite = {"name": name, "version": 1, "datasets": [{"name": dataset, "image_size": 16}],
             "cards": list(cards), "seeds": seeds, "budget_kimg": budget_kimg, "eval": ev,
             "overrides": overrides if overrides is not None else {c: TINY_VAE for c in cards if c == "vae"}}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(suite))
    return p


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(r, *needles):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in lines[0], lines[0]
