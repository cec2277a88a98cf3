"""`genbench report` on constructed results trees: the Markdown and self-contained HTML it writes,
the tables' columns (extractor, direction, intervals), stability and provenance sections, empty and
partial trees, and the HTML rendered by headless Chromium with every image loaded."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from genbench import report
from results_fixtures import build_tree, frame, seeds, write_run

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and Path(p).exists()), None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One full report of a constructed tree, shared by the tests below (plotting is the slow part)."""
    root = tmp_path_factory.mktemp("results")
    build_tree(root)
    out = tmp_path_factory.mktemp("report")
    md = report.write_report(root, out)
    return root, out, md


def test_writes_markdown_html_and_plots(built):
    _, out, md = built
    assert md == out / "report.md" and md.is_file() and (out / "report.html").is_file()
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    tag = "smoke_digits_"
    for kind in ("curves_fid", "curves_modes", "precision_recall", "pareto", "steps", "guidance", "modes",
                 "grad_norms", "samples_dcgan", "samples_vae"):
        assert f"{tag}{kind}.png" in plots, kind
    text = md.read_text()
    linked = re.findall(r"\]\((plots/[^)]+\.png)\)", text)
    assert sorted(Path(p).name for p in linked) == plots     # every plot linked, every link a file
    assert "could not be drawn" not in text


def test_html_is_self_contained(built):
    _, out, _ = built
    html = (out / "report.html").read_text()
    srcs = re.findall(r"<img[^>]*\ssrc='([^']*)'", html)
    assert len(srcs) == len(list((out / "plots").glob("*.png")))
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:|//|plots/)", html)
    assert "<link" not in html and "<script" not in html


def test_results_table_columns(built):
    _, _, md = built
    text = md.read_text()
    assert "FID ↓ [digits-classifier]" in text and "precision ↑ [digits-classifier]" in text
    assert "img/s ↑ [cpu]" in text and "NFE ↓" in text
    # dcgan: 2 complete seeds (19, 20) and one diverged; the 95% t-interval uses t(0.975, 1) = 12.706
    line = next(l for l in text.splitlines() if l.startswith("| dcgan | gan |"))
    assert "2 complete, 1 diverged" in line
    assert "19.5 ± 0.71 [13.15, 25.85] (n=2)" in line


def test_claims_section_shows_every_claim(built):
    _, _, md = built
    text = md.read_text()
    for i in range(1, 9):
        assert re.search(rf"^\| C{i} \| (supported|contradicted|inconclusive|not measured) \|", text, re.M), i
        assert f"### C{i}: " in text
    assert "Published anchors " in text and "- Ho, Jain & Abbeel 2020" in text and "Table 1" in text
    assert "t-intervals over seeds do not overlap" in text      # the stated rule


def test_stability_and_provenance(built):
    _, _, md = built
    text = md.read_text()
    line = next(l for l in text.splitlines() if l.startswith("| dcgan | 1/3"))
    assert "at kimg 1.5" in line and "seed0: 1" in line         # the diverged run and the collapse event
    prov = next(l for l in text.splitlines() if l.startswith("| smoke | digits | digits-classifier |"))
    for part in ("ab" * 32, "1797", "500", "test", "1x8x8", "torch 2.14.1", "dcgan seeds 0,1,2"):
        assert part in prov, part


def test_extractors_never_share_a_column():
    rows = seeds("dcgan", {"fid": [10.0, 11.0]})
    rows += [dict(r, prov_extractor="inception-v3-compat", fid=r["fid"] + 100) for r in seeds("vae", {"fid": [1.0, 2.0]})]
    doc = report.Doc()
    report.results_table(doc, frame(rows))
    _, headers, body = next(b for b in doc.blocks if b[0] == "table")
    assert "FID ↓ [digits-classifier]" in headers and "FID ↓ [inception-v3-compat]" in headers
    by_card = {r[0]: dict(zip(headers, r)) for r in body}
    assert by_card["dcgan"]["FID ↓ [inception-v3-compat]"] == "–"
    assert by_card["vae"]["FID ↓ [digits-classifier]"] == "–"
    assert by_card["vae"]["FID ↓ [inception-v3-compat]"].startswith("101.5 ±")


def test_collapse_events():
    assert report.collapse_events(pd.Series([2, 5, 8, 8, 3, 2, 8, 9, 4])) == 2
    assert report.collapse_events(pd.Series([1, 2, 3, 3, 2.5])) == 0     # a 17% dip is no collapse
    assert report.collapse_events(pd.Series([], dtype=float)) == 0


def test_mean_cell():
    assert report.mean_cell(pd.Series([1.0, 2.0, 3.0])) == "2 ± 1 [-0.4841, 4.484] (n=3)"
    assert report.mean_cell(pd.Series([4.0, None])) == "4 (n=1)"
    assert report.mean_cell(pd.Series([], dtype=float)) == "–"


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_empty_tree_still_renders(tmp_path, kind):
    root = tmp_path / "results"
    if kind == "empty":
        root.mkdir()
    md = report.write_report(root, tmp_path / "out")
    text = md.read_text()
    assert "No runs found" in text and "No runs." in text
    assert text.count("Not measured") >= 8
    assert "</html>" in (tmp_path / "out" / "report.html").read_text()


def test_partial_tree_still_renders(tmp_path):
    root = tmp_path / "results"
    write_run(root, "dcgan", 0, status="failed", samples=False)                    # no metrics at all
    write_run(root, "vae", 0, metrics={"fid": 30.0}, samples=False)                # one metric, no curves
    bad = root / "smoke/digits/sngan/seed0"
    bad.mkdir(parents=True)
    (bad / "metrics.json").write_text("{truncated")                                 # unreadable: skipped
    (root / "smoke/digits/vae/seed0/curves.csv").write_text("not,a\ncurve")         # no kimg column
    md = report.write_report(root, root)             # the CLI's default: the report beside the runs
    text = md.read_text()
    assert md == root / "report.md" and (root / "plots").is_dir()
    assert "| vae | vae | 1 complete |" in text and "| dcgan | gan | 1 failed |" in text
    assert "No sample grids" in text and "could not be drawn" not in text


def _chromium_image_check(html_path: Path) -> dict:
    """Load the page in headless Chromium; a script appended to a copy lists images that failed to
    decode. A deliberately broken control image proves the check can fail."""
    probe = ("<img alt='__control__' src='data:image/png;base64,AAAA'><script>"
             "window.addEventListener('load',function(){var im=Array.from(document.images);"
             "var bad=im.filter(function(i){return !i.complete||i.naturalWidth===0;}).map(function(i){return i.alt;});"
             "var d=document.createElement('pre');d.textContent='IMGCHECK'+JSON.stringify({n:im.length,bad:bad})+'END';"
             "document.body.appendChild(d);});</script>")
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(html_path.read_text().replace("</body>", probe + "</body>"))
        cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={Path(tmp) / 'profile'}", "--virtual-time-budget=10000",
               "--dump-dom", page.as_uri()]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    m = re.search(r"IMGCHECK(\{.*?\})END", out)
    assert m, "Chromium printed no DOM with the image check"
    return json.loads(m.group(1))


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (Debian: apt-get install -y chromium)")
def test_html_renders_in_chromium_with_every_image(built):
    _, out, _ = built
    n_plots = len(list((out / "plots").glob("*.png")))
    result = _chromium_image_check(out / "report.html")
    assert result["bad"] == ["__control__"], result
    assert result["n"] == n_plots + 1


def test_plot_axes_name_the_feature_space(tmp_path, monkeypatch):
    """Classifier-space FD is not Inception FID: plot axes carry the extractor, as table columns do."""
    root = tmp_path / "results"
    build_tree(root)
    labels: dict[str, list[str]] = {}
    original = report.Plotter.__call__

    def recording(self, name, caption, draw, **kw):
        def spy(*axes):
            draw(*axes)
            labels[name] = [ax.get_ylabel() for ax in axes]
        return original(self, name, caption, spy, **kw)

    monkeypatch.setattr(report.Plotter, "__call__", recording)
    report.write_report(root, tmp_path / "out")
    assert labels["smoke_digits_steps"] == ["FID ↓ [digits-classifier]"]
    assert labels["smoke_digits_curves_fid"] == ["FID ↓ [digits-classifier]"]
    assert "recall ↑ [digits-classifier]" in labels["smoke_digits_guidance"]
