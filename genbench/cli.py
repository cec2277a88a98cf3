"""genbench's command line: flags map onto configuration, nothing else happens here.

Every user mistake ends as one line on stderr and exit code 2 (UserError), never a traceback.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

from genbench.config import COMPILE_MODES
from genbench.errors import UserError


def user_errors(fn):
    """Turn UserError into one clear line and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
    return wrapper


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="genbench")
def main():
    """genbench: train, sample and evaluate generative models of four families side by side."""


@main.command("run")
@click.option("--suite", "suite_name", default="smoke", show_default=True,
              help="Suite name (suites/NAME.yaml) or a path to a suite YAML.")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
              show_default=True, help="Where run folders are written (<dir>/<suite>/<dataset>/<card>/seed<k>).")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder holding dataset files (CIFAR-10's cifar-10-batches-py/, Fashion-MNIST's .gz files).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seeds", type=int, default=None, help="Number of seeds per card (default: the suite's).")
@click.option("--only", default=None, help="Comma-separated card names: run only these cards of the suite.")
@click.option("--inception-weights", type=click.Path(dir_okay=False), default=None,
              envvar="GENBENCH_INCEPTION_WEIGHTS", show_envvar=True,
              help="Path to torch-fidelity's Inception weights (pt_inception-2015-12-05).")
@click.option("--extractor", default=None, help="Score with this feature extractor instead of the suite's.")
@click.option("--budget-kimg", type=float, default=None, help="Override the suite's training budget (kimg).")
@click.option("--download", is_flag=True, help="Allow downloading missing datasets and weights (off by default).")
@click.option("--dry-run", is_flag=True, help="Print the resolved configuration as JSON and exit.")
@click.option("--bf16/--no-bf16", default=True, show_default=True, help="bf16 autocast while sampling (CUDA only).")
@click.option("--train-bf16/--no-train-bf16", default=True, show_default=True,
              help="bf16 autocast in the training steps (CUDA only); --no-train-bf16 trains in fp32.")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="channels_last memory format for sampling (CUDA, image models).")
@click.option("--feature-cache/--no-feature-cache", default=True, show_default=True,
              help="Reuse reference features cached under RESULTS_DIR/.cache; --no-feature-cache extracts "
                   "them again and writes no cache.")
@click.option("--compile", "compile_mode", default="off", show_default=True,
              type=click.Choice(COMPILE_MODES),
              help="torch.compile the networks for sampling, in this mode, and the feature extractor "
                   "(CUDA; reduce-overhead adds CUDA graphs to sampling, tuned adds kernel tuning to that).")
@click.option("--jobs", type=int, default=None,
              help="Runs at once, in worker processes sharing the CPU threads (default: the suite's "
                   "`jobs`, usually 1). Pays off for many small CPU runs, e.g. the mixtures suite.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@user_errors
def run_cmd(suite_name, results_dir, data_root, device, seeds, only, inception_weights, extractor, budget_kimg,
            download, dry_run, bf16, train_bf16, channels_last, feature_cache, compile_mode, jobs, no_progress):
    """Train, sample and evaluate every card of a suite; finished runs are skipped."""
    from genbench.config import load_suite
    from genbench.fastpath import FastPath
    from genbench.runner import RunOptions, plan, run_suite

    suite = load_suite(suite_name)
    opts = RunOptions(results_dir=results_dir, data_root=data_root, device=device, seeds=seeds, only=_csv(only),
                      inception_weights=inception_weights, download=download, extractor=extractor,
                      progress=not no_progress and not os.environ.get("CI"), budget_kimg=budget_kimg,
                      fast=FastPath(bf16=bf16, channels_last=channels_last, compile=compile_mode),
                      train_bf16=train_bf16, feature_cache=feature_cache, jobs=jobs)
    p = plan(suite, opts)
    if dry_run:
        click.echo(json.dumps(p.describe(), indent=2))
        return
    counts = run_suite(p, log=lambda s: click.echo(s, err=True))
    click.echo(f"{suite.name}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v) +
               f"; results in {results_dir / suite.name}")
    if counts["failed"]:
        sys.exit(1)


@main.command("report")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
              show_default=True, help="Results tree to read.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where report.md, report.html and plots/ go (default: the results dir).")
@user_errors
def report_cmd(results_dir, out):
    """Write report.md, a self-contained report.html and plots from a results tree."""
    from genbench.report import write_report

    if not results_dir.is_dir():
        raise UserError(f"--results-dir {results_dir}: no such folder (run `genbench run` first)")
    path = write_report(results_dir, out or results_dir)
    click.echo(f"report: {path} and {Path(path).with_suffix('.html')}")


@main.command("compare")
@click.argument("baseline")
@click.argument("current")
@click.option("--summary-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the comparison table (Markdown) to this file, e.g. $GITHUB_STEP_SUMMARY.")
@user_errors
def compare_cmd(baseline, current, summary_out):
    """Regression gate: exit 1 if CURRENT is worse than BASELINE beyond tolerance, 2 on unusable input."""
    from genbench.compare import compare

    result = compare(baseline, current)
    click.echo(result.markdown)
    if summary_out:
        from genbench.store import atomic_write_bytes

        atomic_write_bytes(summary_out, result.markdown.encode())
    sys.exit(result.exit_code)


@main.command("summarize")
@click.argument("results_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@user_errors
def summarize_cmd(results_dir, out):
    """Write a small JSON summary of a results tree (a baseline for `genbench compare`)."""
    from genbench.compare import summarize
    from genbench.store import write_json

    if not results_dir.is_dir():
        raise UserError(f"{results_dir}: no such folder")
    write_json(out, summarize(results_dir))
    click.echo(f"summary: {out}")


@main.command("bench")
@click.option("--suite", "suite_name", default="smoke", show_default=True, help="Suite whose cards are timed.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-sizes", default="64", show_default=True, help="Comma-separated sampling batch sizes.")
@click.option("--batches", type=int, default=2, show_default=True, help="Timed batches per point (after warm-up).")
@click.option("--only", default=None, help="Comma-separated card names.")
@click.option("--steps", type=int, default=None,
              help="Override the sampler's steps (diffusion cards; the other families have no steps).")
@click.option("--bf16/--no-bf16", default=True, show_default=True, help="bf16 autocast while sampling (CUDA).")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="channels_last memory format (CUDA, image models).")
@click.option("--compile", "compile_mode", default="off", show_default=True,
              type=click.Choice(COMPILE_MODES),
              help="torch.compile mode for the networks (reduce-overhead adds CUDA graphs, tuned adds "
                   "kernel tuning to that: slower to compile, faster to run).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("results/bench.json"),
              show_default=True, help="JSON file for the measurements.")
@user_errors
def bench_cmd(suite_name, device, batch_sizes, batches, only, steps, bf16, channels_last, compile_mode, out):
    """Sampling cost of every card in a suite: img/s, ms/img, NFE, peak memory (untrained weights)."""
    from genbench.bench import bench_suite, table
    from genbench.config import load_suite
    from genbench.fastpath import FastPath
    from genbench.runner import resolve_device
    from genbench.store import write_json

    suite = load_suite(suite_name)
    dev = resolve_device(device)
    try:
        sizes = [int(b) for b in _csv(batch_sizes)]
    except ValueError:
        raise UserError(f"--batch-sizes: {batch_sizes!r} is not a comma-separated list of integers") from None
    if not sizes or min(sizes) < 1 or batches < 1:
        raise UserError("--batch-sizes and --batches must be positive")
    if steps is not None and steps < 1:
        raise UserError("--steps must be at least 1")
    rows = bench_suite(suite, dev, sizes, batches, FastPath(bf16, channels_last, compile_mode), _csv(only),
                       {"steps": steps} if steps is not None else None, log=lambda s: click.echo(s, err=True))
    write_json(out, {"suite": suite.name, "rows": rows})
    click.echo(table(rows))
    click.echo(f"bench: {out}")


@main.command("list")
def list_cmd():
    """Print the suites, model cards, datasets, metrics and feature extractors genbench knows."""
    from genbench import data
    from genbench import metrics as registry
    from genbench.config import list_names, metric_groups, search_dirs
    from genbench.evaluators import EXTRACTORS
    from genbench.families import families

    def section(title, items):
        click.echo(f"{title}:")
        for it in items:
            click.echo(f"  {it}")

    suites = []
    for n in list_names("suites"):
        try:
            from genbench.config import load_suite

            s = load_suite(n)
            suites.append(f"{n:16s} v{s.version}  {', '.join(d.name for d in s.datasets)}: {', '.join(s.cards)}")
        except UserError as e:
            suites.append(f"{n:16s} (invalid: {e})")
    section("suites", suites)
    cards = []
    for n in list_names("models"):
        from genbench.config import load_card

        try:
            c = load_card(n)
            text = " ".join(c.description.split())
            cards.append(f"{n:16s} {c.family:10s} {text[:90] + ('...' if len(text) > 90 else '')}")
        except UserError as e:
            cards.append(f"{n:16s} (invalid: {e})")
    section("model cards", cards)
    section("families", sorted(families()))
    section("datasets", data.dataset_names())
    families()   # registers the families' declared metrics
    section("metric groups (suite eval.metrics)", [f"{g:10s} {registry.GROUPS[g].description}"
                                                   for g in metric_groups()])
    section("metrics (direction, gate, computed from)",
            [f"{k:20s} {'higher' if m.higher_is_better else 'lower' if m.higher_is_better is False else 'no direction':12s}"
             f" {m.gate:6s} {m.source}" for k, m in registry.METRICS.items()])
    section("search path (suites/, models/)", [str(d.parent) for d in search_dirs("suites")])
    section("feature extractors", [f"{k:18s} fid/kid/prc: {v.fid_layer}, is: {v.isc_layer}"
                                   for k, v in sorted(EXTRACTORS.items())])


@main.group("evaluator")
def evaluator_group():
    """Domain classifiers that score small datasets."""


@evaluator_group.command("train")
@click.option("--dataset", type=click.Choice(["digits", "fashion"]), required=True,
              help="Which classifier to train.")
@click.option("--epochs", type=int, default=None, help="Epochs (default: 30 for digits, 6 for fashion).")
@click.option("--seed", type=int, default=0, show_default=True, help="Training seed.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder holding the dataset files.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Weights file (default: the packaged genbench/evaluators/weights/DATASET.pt).")
@user_errors
def evaluator_train_cmd(dataset, epochs, seed, data_root, out):
    """Train a domain classifier and write its weights; prints its test accuracy."""
    from genbench.evaluators.classifier import train_classifier

    if epochs is not None and epochs < 1:
        raise UserError("--epochs must be at least 1")
    epochs = epochs or {"digits": 30, "fashion": 6}[dataset]
    r = train_classifier(dataset, epochs=epochs, seed=seed, out=out, data_root=data_root)
    click.echo(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
