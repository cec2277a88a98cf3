"""The committed reference set (results/reference/, made by results/reference/regenerate.sh) loads, and
the claims over it give the verdicts that results/reference/verdicts.json records and that the
README's "Claims on real data" table states (the table is rendered from verdicts.json), so README,
verdicts.json and the data cannot drift apart. Reads records only; trains nothing (about a second)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT / "results" / "reference"
SUITES = ("claims-digits", "claims-fashion", "claims-stacked", "claims-mixtures")
RUN_FILES = ("metrics.json", "config.json", "curves.csv", "train_log.csv", "samples.png")
NOT_COMMITTED = ("model.pt", "checkpoint.pt")   # weights stay out of the tree (and leases, caches)


def _verdicts():
    spec = importlib.util.spec_from_file_location("reference_verdicts", REF / "verdicts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def verdicts():
    assert (REF / "verdicts.json").is_file(), "results/reference/verdicts.json is missing"
    return _verdicts()


@pytest.fixture(scope="module")
def summary(verdicts):
    return verdicts.summarize(REF)


def test_reference_tree_loads_and_holds_no_weights():
    from genbench.store import load_results

    df = load_results(REF)
    main = df[df["eval"].fillna("main") == "main"]
    assert set(SUITES) <= set(main["suite"]), f"suites in the tree: {sorted(set(main['suite']))}"
    assert not (main["status"] == "failed").any(), main[main["status"] == "failed"][["suite", "card", "seed"]]
    runs = sorted(p.parent for p in REF.rglob("metrics.json"))
    assert len(runs) == len(main)
    for rdir in runs:
        # a diverged run stops before sampling: it has no sample grid
        complete = json.loads((rdir / "metrics.json").read_text())["status"] == "complete"
        need = RUN_FILES if complete else ("metrics.json", "config.json", "train_log.csv")
        missing = [f for f in need if not (rdir / f).is_file()]
        assert not missing, f"{rdir}: missing {missing}"
    stray = [p for p in REF.rglob("*") if p.name in NOT_COMMITTED or p.name.startswith("lease")
             or p.name == ".cache" or p.name.startswith(".replaced-")]
    assert not stray, f"weights, leases or caches in the reference tree: {stray[:5]}"
    # every card in a suite has the seeds its suite promises (3, or 5 for the cheap cards)
    for (suite, dataset, card), g in main.groupby(["suite", "dataset", "card"]):
        assert g["seed"].nunique() >= 3, f"{suite}/{dataset}/{card}: {g['seed'].nunique()} seeds"


def test_claims_give_the_recorded_verdicts(verdicts, summary):
    diff = verdicts.differences(verdicts.load_expected(), summary)
    assert not diff, "the reference tree's claims differ from verdicts.json:\n" + "\n".join(diff)


def test_every_claim_is_measured(summary):
    for cid, c in summary.items():
        assert c["verdict"] != "not measured", f"{cid} is not measured on the reference set"


def test_readme_table_is_verdicts_json(verdicts):
    readme = (ROOT / "README.md").read_text()
    assert verdicts.README_HEADING in readme, (
        f"README.md has no '{verdicts.README_HEADING}' section; its table is "
        "`python results/reference/verdicts.py --table`")
    table = verdicts.readme_table(verdicts.load_expected())
    section = readme.split(verdicts.README_HEADING, 1)[1]
    assert table in section, ("the README's claims table differs from verdicts.json; "
                              "regenerate it with `python results/reference/verdicts.py --table`")


def test_report_marks_points_sampled_at_another_n():
    """The 1000-step DDPM point is sampled on 100 images (the runs on 500): the report's sweep table
    says so beside its FID, and the quality plots leave it out (genbench/store.py at_run_n)."""
    from genbench import claims, report
    from genbench.store import at_run_n, load_results

    df = claims.normalize(load_results(REF / "claims-digits"))
    doc = report.Doc()
    report.sweep_table(doc, df)
    points = [r[2] for b in doc.blocks if b[0] == "table" for r in b[2] if r[1] == "ancestral-1000"]
    assert points and all(p == "steps=1000 (n=100)" for p in points), points
    kept = at_run_n(df[df["status"] == "complete"])
    assert not (kept["eval"] == "ancestral-1000").any()
    assert (kept["eval"] == "ancestral-steps").any()
