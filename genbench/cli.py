"""genbench's command line: flags map onto configuration, nothing else happens here.

Every user mistake ends as one line on stderr and exit code 2 (UserError, and click's own usage
errors), never a traceback; every output path is checked before any work.
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


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class OneLineErrors(click.Group):
    """click's usage errors (unknown option, bad value, missing argument) as one `error:` line on stderr,
    exit code 2, like genbench's own errors."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = f"{e.ctx.command_path}: " if e.ctx is not None else ""
            click.echo(f"error: {where}{_one_line(e.format_message())}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"error: {_one_line(e.format_message())}", err=True)
            sys.exit(2)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


def user_errors(fn):
    """Turn UserError into one clear line and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {_one_line(e)}", err=True)
            sys.exit(2)
    return wrapper


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


def _only(value: str | None) -> tuple[str, ...]:
    names = _csv(value)
    if value is not None and not names:
        raise UserError(f"--only {value!r} names no card")
    return names


def _progress(no_progress: bool) -> bool:
    return not no_progress and not os.environ.get("CI")


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="genbench")
def main():
    """genbench: train, sample and evaluate generative models of four families side by side."""


def _sampler_options(fn):
    """Sampler options shared by eval --run, sample: the common ones by name, any other by --option."""
    for decl, kw in reversed([
        ("--sampler", dict(default=None, help="Diffusion sampler: ancestral or ddim.")),
        ("--steps", dict(type=int, default=None, help="Sampling steps (diffusion; at most the model's T).")),
        ("--eta", dict(type=float, default=None, help="DDIM noise (0: deterministic given x_T).")),
        ("--guidance", dict(type=float, default=None, help="Classifier-free guidance weight w.")),
        ("--classifier-scale", dict(type=float, default=None, help="Classifier guidance scale s.")),
        ("--option", dict(multiple=True, metavar="KEY=VALUE",
                          help="Any other sampler option of the card's family (repeatable), e.g. "
                               "--option variance=small, --option codes=uniform, --option truncation=0.7.")),
    ]):
        fn = click.option(decl, **kw)(fn)
    return fn


def _overrides(sampler, steps, eta, guidance, classifier_scale, option) -> dict:
    from genbench.external import parse_option

    out = {k: v for k, v in (("sampler", sampler), ("steps", steps), ("eta", eta), ("guidance", guidance),
                             ("classifier_scale", classifier_scale)) if v is not None}
    for text in option:
        k, v = parse_option(text)
        out[k] = v
    return out


@main.command("run")
@click.option("--suite", "suite_name", default="smoke", show_default=True,
              help="Suite name (on the search path: $GENBENCH_PATH's suites/, then the shipped ones) or a path to "
                   "a suite YAML.")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
              show_default=True, help="Where run folders are written (<dir>/<suite>/<dataset>/<card>/seed<k>).")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder holding dataset files (CIFAR-10's cifar-10-batches-py/, Fashion-MNIST's .gz files).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seeds", type=int, default=None, help="Number of seeds per card (default: the suite's).")
@click.option("--first-seed", type=int, default=0, show_default=True,
              help="Seeds run from this one: --first-seed 16 --seeds 2 runs seeds 16 and 17.")
@click.option("--only", default=None, help="Comma-separated card names: run only these cards of the suite.")
@click.option("--inception-weights", type=click.Path(dir_okay=False), default=None,
              envvar="GENBENCH_INCEPTION_WEIGHTS", show_envvar=True,
              help="Path to torch-fidelity's Inception weights (pt_inception-2015-12-05).")
@click.option("--extractor", default=None, help="Score with this feature extractor instead of the suite's.")
@click.option("--budget-kimg", type=float, default=None, help="Override the suite's training budget (kimg).")
@click.option("--download", is_flag=True, help="Allow downloading missing datasets and weights (off by default).")
@click.option("--dry-run", is_flag=True,
              help="Check everything a run checks (values, data, weights, output folder) and print the resolved "
                   "configuration as JSON; run nothing.")
@click.option("--rerun", is_flag=True,
              help="Redo finished runs whose settings (budget, suite version, card, dataset, eval) differ from "
                   "this plan; without it they are kept and named.")
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
@click.option("--train-channels-last/--no-train-channels-last", default=True, show_default=True,
              help="channels_last in training (CUDA, image models).")
@click.option("--train-fused/--no-train-fused", default=True, show_default=True,
              help="Fused AdamW/Adam/SGD steps and a multi-tensor EMA update in training (CUDA).")
@click.option("--train-compile", default="off", show_default=True, type=click.Choice(COMPILE_MODES),
              help="torch.compile each network for the training steps (reduce-overhead/tuned add CUDA graphs); the "
                   "first steps' seconds are recorded.")
@click.option("--log-every", type=int, default=None,
              help="Training logs to the host every K steps (default 25 on CUDA, 1 on a CPU); divergence is still "
                   "recorded at its exact step.")
@click.option("--data-on-device/--no-data-on-device", default=True, show_default=True,
              help="Hold the training set on the GPU when it fits (2 GiB and a quarter of free memory).")
@click.option("--jobs", type=int, default=None,
              help="Runs at once, in worker processes sharing the CPU threads (default: the suite's "
                   "`jobs`, usually 1). Pays off for many small CPU runs, e.g. the mixtures suite.")
@click.option("--executor", type=click.Choice(["local", "submitit", "ray"]), default="local", show_default=True,
              help="Where runs execute: local worker processes (--jobs), Slurm jobs through submitit, or Ray tasks.")
@click.option("--no-wait", is_flag=True,
              help="submitit: submit the pending runs and return; a later `genbench run` collects them.")
@click.option("--partition", default=None, help="Slurm partition (submitit).")
@click.option("--gpus-per-run", type=float, default=None,
              help="GPUs per run: per Slurm job (whole numbers) or per Ray task (fractions allowed).")
@click.option("--cpus-per-run", type=int, default=None,
              help="CPUs per run (Slurm job or Ray task); also the torch threads a run uses.")
@click.option("--mem-gb", type=float, default=None, help="Memory per run, GB (Slurm, Ray).")
@click.option("--time-min", type=int, default=None,
              help="Slurm time limit per job, minutes (default 60); a job near its limit checkpoints, is requeued "
                   "and resumes.")
@click.option("--array-parallelism", type=int, default=None, help="At most this many Slurm array tasks at once.")
@click.option("--max-requeues", type=int, default=None,
              help="Time-outs after which a Slurm job is not requeued again (default 3; preemptions do not count).")
@click.option("--submitit-cluster", type=click.Choice(["slurm", "local", "debug"]), default=None,
              help="submitit backend: slurm (default), local (jobs as local processes) or debug (in this process).")
@click.option("--submitit-folder", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="submitit's job folder (pickles, logs); default RESULTS_DIR/.submitit.")
@click.option("--ray-address", default=None,
              help="Address of a running Ray cluster (auto, ray://head:10001); default $RAY_ADDRESS, else a local one.")
@click.option("--ray-max-retries", type=int, default=None,
              help="Times Ray retries a run whose worker process died (default 2).")
@click.option("--lease-stale-s", type=float, default=None, envvar="GENBENCH_LEASE_STALE_S", show_envvar=True,
              help="A run's lease whose holder has been silent this long is stale and taken over (default 600).")
@click.option("--checkpoint-every-s", type=float, default=None, envvar="GENBENCH_CHECKPOINT_EVERY_S",
              show_envvar=True, help="Seconds between training checkpoints (default 60; 0: after every step).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--nproc", type=int, default=None,
              help="Data-parallel on this machine: start N ranks (torchrun --standalone --nproc_per_node N) that "
                   "train each run with gradients averaged over them and shard its sampling and evaluation; one "
                   "GPU per rank (NCCL), or gloo on the CPU. The card's batch size is the global batch.")
@user_errors
def run_cmd(suite_name, results_dir, data_root, device, seeds, first_seed, only, inception_weights, extractor,
            budget_kimg, download, dry_run, rerun, bf16, train_bf16, channels_last, feature_cache, compile_mode,
            train_channels_last, train_fused, train_compile, log_every, data_on_device, jobs, executor, no_wait,
            partition, gpus_per_run, cpus_per_run, mem_gb, time_min, array_parallelism, max_requeues,
            submitit_cluster, submitit_folder, ray_address, ray_max_retries, lease_stale_s, checkpoint_every_s,
            no_progress, nproc):
    """Train, sample and evaluate every card of a suite; finished runs are skipped.

    Under torchrun (`torchrun --nproc_per_node N -m genbench run ...`, or --nproc N here) the N ranks run
    each run together: gradients averaged over the ranks, sampling and evaluation sharded, rank 0 writes."""
    from genbench import distributed
    from genbench.config import load_suite
    from genbench.executors import check_engine
    from genbench.fastpath import FastPath
    from genbench.runner import RunOptions, plan, run_suite
    from genbench.train import TrainFastPath

    check_engine(executor)
    if log_every is not None and log_every < 1:
        raise UserError(f"--log-every must be at least 1, got {log_every}")
    suite = load_suite(suite_name)
    cluster = {k: v for k, v in {"partition": partition, "gpus_per_task": gpus_per_run, "cpus_per_task": cpus_per_run,
               "mem_gb": mem_gb, "time_min": time_min, "array_parallelism": array_parallelism,
               "max_requeues": max_requeues, "submitit_cluster": submitit_cluster,
               "folder": str(submitit_folder) if submitit_folder else None, "ray_address": ray_address,
               "max_retries": ray_max_retries}.items() if v is not None}
    opts = RunOptions(results_dir=results_dir, data_root=data_root, device=device, seeds=seeds, first_seed=first_seed,
                      only=_only(only), inception_weights=inception_weights, download=download, extractor=extractor,
                      progress=_progress(no_progress), budget_kimg=budget_kimg,
                      fast=FastPath(bf16=bf16, channels_last=channels_last, compile=compile_mode),
                      train_bf16=train_bf16, feature_cache=feature_cache, jobs=jobs, rerun=rerun,
                      executor=executor, cluster=cluster, wait=not no_wait, lease_stale_s=lease_stale_s,
                      checkpoint_every_s=checkpoint_every_s,
                      train_fast=TrainFastPath(bf16=train_bf16, channels_last=train_channels_last, fused=train_fused,
                                               compile=train_compile, log_every=log_every,
                                               data_on_device=data_on_device))
    if nproc is not None and (isinstance(nproc, bool) or nproc < 1):
        raise UserError(f"--nproc must be a whole number of at least 1, got {nproc}")
    if nproc is not None and distributed.launched():
        raise UserError(f"--nproc: this process already is one of {distributed.env_world()} ranks (torchrun); "
                        f"drop --nproc")
    p = plan(suite, opts)
    if nproc is not None and nproc > 1:
        from genbench.runner import check_world

        check_world(p.opts, p.cards, nproc, p.device)   # what the ranks would refuse, said once, here
        if not dry_run:
            _launch_ranks(nproc, p.device)
    if dry_run:
        if distributed.env_rank() == 0:
            click.echo(json.dumps(p.describe(), indent=2))
        return
    main_rank = distributed.env_rank() == 0
    try:
        counts = run_suite(p, log=(lambda s: click.echo(s, err=True)) if main_rank else (lambda s: None))
        distributed.shutdown()
    except distributed.JobAborted as e:
        if main_rank:
            click.echo(f"genbench: {e}", err=True)
        sys.exit(1)
    if not main_rank:
        sys.exit(1 if counts["failed"] else 0)
    click.echo(f"{suite.name}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v) +
               f"; results in {results_dir / suite.name}")
    if counts["failed"]:
        sys.exit(1)


def torchrun_argv(nproc: int, args: list[str]) -> list[str]:
    """The command `genbench run --nproc N ARGS` becomes: torchrun on this machine, N ranks, the same ARGS."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "genbench", "run", *args]


def _command_line_args(ctx: click.Context, drop: tuple[str, ...] = ("nproc",)) -> list[str]:
    """The options of this command that were given on its command line, written out again (values from
    environment variables travel in the environment)."""
    from click.core import ParameterSource

    out: list[str] = []
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or not param.expose_value or param.name in drop:
            continue
        if ctx.get_parameter_source(param.name) != ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        if param.is_flag:
            if param.secondary_opts:
                out.append(param.opts[0] if value else param.secondary_opts[0])
            elif value:
                out.append(param.opts[0])
        else:
            out += [param.opts[0], str(value)]
    return out


def _launch_ranks(nproc: int, device) -> None:
    """Replace this process by torchrun starting `nproc` ranks of the same command. On a CPU each rank
    gets an even share of the cores as its torch threads (OMP_NUM_THREADS, unless set)."""
    import torch

    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise UserError(f"--nproc {nproc}: this machine has {torch.cuda.device_count()} CUDA device(s), one per rank")
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    argv = torchrun_argv(nproc, _command_line_args(click.get_current_context()))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)


@main.command("eval")
@click.option("--samples", default=None,
              help="Score images made elsewhere: a folder of PNG/JPEG/WebP files (recursive), an .npz in the "
                   "ADM evaluator's layout (arr_0 uint8 [N,H,W,C], optional arr_1 labels), a uint8 .npy, or a "
                   "quoted glob of such shards.")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Re-score a finished run's model.pt (a run folder .../seed<k>) with other sampler options or "
                   "another extractor; the result is added to that run as one more evaluation point.")
@click.option("--dataset", default=None, help="With --samples: the reference dataset (digits, fashion, cifar10, ...).")
@click.option("--name", default=None,
              help="With --samples: the label in results/external/<dataset>/<name>/ (default: the file or folder "
                   "name). With --run: the point's name (default: eval).")
@click.option("--extractor", default=None, help="Feature extractor (default: the dataset's, or the run's).")
@click.option("--ref-split", default="test", show_default=True, help="With --samples: reference split (train or test).")
@click.option("--labels", default=None, help="With --samples: class labels, a .npy or a text file of integers.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="With --samples: the seed label of this sample set (sets from several training seeds of one "
                   "model pool as seeds in report and compare).")
@click.option("--family", default=None,
              help="With --samples: the family the samples come from (gan, vae, vqvae, diffusion, or an import "
                   "path), so claims can count them.")
@click.option("--n-real", type=int, default=None, help="With --samples: reference images used (default: the whole split).")
@click.option("--n-fake", type=int, default=None, help="With --run: images to sample (default: the suite's n_fake).")
@click.option("--metrics", default=None, help="With --samples: comma-separated metric groups (default: fid,isc,kid,prc,modes).")
@click.option("--kid-subset-size", type=int, default=1000, show_default=True, help="With --samples: KID's subset size.")
@click.option("--image-size", type=int, default=None,
              help="With --samples: resize the reference dataset to this size (the size the model was trained at).")
@click.option("--batch-size", type=int, default=None, help="Images per batch (default: 250, or the run's).")
@_sampler_options
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
              show_default=True, help="With --samples: the results tree the record goes into.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder holding dataset files.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--inception-weights", type=click.Path(dir_okay=False), default=None,
              envvar="GENBENCH_INCEPTION_WEIGHTS", show_envvar=True, help="Path to torch-fidelity's Inception weights.")
@click.option("--download", is_flag=True, help="Allow downloading missing datasets and weights.")
@click.option("--feature-cache/--no-feature-cache", default=True, show_default=True,
              help="Reuse cached reference features (under the results folder's .cache).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@user_errors
def eval_cmd(samples, run_dir, dataset, name, extractor, ref_split, labels, seed, family, n_real, n_fake, metrics,
             kid_subset_size, image_size, batch_size, sampler, steps, eta, guidance, classifier_scale, option,
             results_dir, data_root, device, inception_weights, download, feature_cache, no_progress):
    """Score samples made elsewhere (--samples) or re-score a stored run (--run)."""
    from genbench import external
    from genbench.runner import resolve_device

    if (samples is None) == (run_dir is None):
        raise UserError("eval needs exactly one of --samples PATH or --run RUN_DIR")
    for flag, v in (("--batch-size", batch_size), ("--n-real", n_real), ("--n-fake", n_fake),
                    ("--kid-subset-size", kid_subset_size), ("--image-size", image_size)):
        if v is not None and v < 1:
            raise UserError(f"{flag} must be at least 1, got {v}")
    if seed < 0:
        raise UserError(f"--seed must be at least 0, got {seed}")
    overrides = _overrides(sampler, steps, eta, guidance, classifier_scale, option)
    dev = resolve_device(device)
    log = lambda s: click.echo(s, err=True)  # noqa: E731
    if samples is not None:
        if dataset is None:
            raise UserError("eval --samples needs --dataset NAME (the reference data)")
        extra = [f for f, v in (("--n-fake", n_fake), *((f"--{k.replace('_', '-')}", v) for k, v in overrides.items()))
                 if v is not None]
        if extra:
            raise UserError(f"{extra[0]} applies to --run, not to --samples")
        req = external.SampleEval(samples, dataset, name=name, extractor=extractor, ref_split=ref_split,
                                  labels=labels, seed=seed, family=family, n_real=n_real, metrics=_csv(metrics),
                                  batch_size=batch_size or 250, kid_subset_size=kid_subset_size, image_size=image_size)
        rdir = external.eval_samples(req, results_dir=results_dir, device=dev, data_root=data_root,
                                     inception_weights=inception_weights, download=download,
                                     feature_cache=feature_cache, progress=_progress(no_progress), log=log)
        from genbench.store import read_record

        rec = read_record(rdir)
        click.echo(json.dumps({"record": str(rdir / "metrics.json"), "metrics": rec.metrics}, indent=2))
        return
    extra = [f for f, v in (("--dataset", dataset), ("--labels", labels), ("--family", family), ("--n-real", n_real),
                            ("--metrics", metrics), ("--image-size", image_size)) if v is not None]
    if extra:
        raise UserError(f"{extra[0]} applies to --samples, not to --run")
    point = external.eval_run(run_dir, device=dev, overrides=overrides, name=name or "eval", n_fake=n_fake,
                              extractor=extractor, batch_size=batch_size, data_root=data_root,
                              inception_weights=inception_weights, download=download, feature_cache=feature_cache,
                              progress=_progress(no_progress), log=log)
    click.echo(json.dumps({"record": str(Path(run_dir) / "metrics.json"), "point": point.name,
                           "sampler": point.sampler, "metrics": point.metrics}, indent=2))


@main.command("sample")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="A finished run folder (.../seed<k>) whose model.pt is sampled.")
@click.option("--n", type=int, required=True, help="Number of images.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="FILE.npz (the ADM evaluator's layout: arr_0 uint8 [N,H,W,C], arr_1 labels) or a new folder "
                   "of PNG files.")
@click.option("--seed-start", type=int, default=0, show_default=True,
              help="Index of the first image: images are seeded one by one, so --n 100 then --n 200 share their "
                   "first 100 images, and --seed-start 100 --n 100 continues where --n 100 stopped.")
@click.option("--labels", default=None,
              help="Class labels for a conditional model, a .npy or text file of --n integers (default: image k "
                   "gets class k mod C).")
@click.option("--batch-size", type=int, default=None, help="Images per batch (default: the run's).")
@_sampler_options
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder holding dataset files (for the data shape).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@user_errors
def sample_cmd(run_dir, n, out, seed_start, labels, batch_size, sampler, steps, eta, guidance, classifier_scale,
               option, data_root, device, no_progress):
    """Write a stored run's samples as uint8 images (npz or PNG files), one seed per image."""
    from genbench import external
    from genbench.runner import resolve_device

    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    path = external.sample_run(run_dir, out, n=n, device=resolve_device(device),
                               overrides=_overrides(sampler, steps, eta, guidance, classifier_scale, option),
                               seed_start=seed_start, labels=labels, batch_size=batch_size, data_root=data_root,
                               progress=_progress(no_progress))
    click.echo(f"samples: {path} ({n} images)")


@main.command("report")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
              show_default=True, help="Results tree to read.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where report.md, report.html and plots/ go (default: the results dir).")
@user_errors
def report_cmd(results_dir, out):
    """Write report.md, a self-contained report.html and plots from a results tree."""
    from genbench.report import write_report
    from genbench.store import check_writable_dir

    if not results_dir.is_dir():
        raise UserError(f"--results-dir {results_dir}: no such folder (run `genbench run` first)")
    check_writable_dir(out or results_dir, "--out")
    path = write_report(results_dir, out or results_dir, warn=lambda s: click.echo(f"warning: {s}", err=True))
    click.echo(f"report: {path} and {Path(path).with_suffix('.html')}")


@main.command("compare")
@click.argument("baseline")
@click.argument("current")
@click.option("--summary-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the comparison table (Markdown) to this file, e.g. $GITHUB_STEP_SUMMARY.")
@click.option("--false-alarm-rate", type=float, default=None,
              help="Chance that an unchanged tree fails anywhere (all band checks together; default 0.01).")
@user_errors
def compare_cmd(baseline, current, summary_out, false_alarm_rate):
    """Regression gate: exit 1 if CURRENT is worse than BASELINE beyond tolerance, 2 on unusable input."""
    from genbench.compare import FWER, compare
    from genbench.store import atomic_write_bytes, check_writable_file

    fwer = FWER if false_alarm_rate is None else false_alarm_rate
    if not 0 < fwer < 1:
        raise UserError(f"--false-alarm-rate must be in (0, 1), got {fwer}")
    if summary_out:
        check_writable_file(summary_out, "--summary-out")
    result = compare(baseline, current, fwer)
    if result.exit_code == 2:
        raise UserError(result.markdown.split("**Unusable input**: ", 1)[-1].strip())
    click.echo(result.markdown)
    if summary_out:
        atomic_write_bytes(summary_out, result.markdown.encode())
    sys.exit(result.exit_code)


@main.command("summarize")
@click.argument("results_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@user_errors
def summarize_cmd(results_dir, out):
    """Write a small JSON summary of a results tree (a baseline for `genbench compare`)."""
    from genbench.compare import summarize
    from genbench.store import check_writable_file, write_json

    if not results_dir.is_dir():
        raise UserError(f"{results_dir}: no such folder")
    check_writable_file(out, "OUT")
    write_json(out, summarize(results_dir))
    click.echo(f"summary: {out}")


@main.command("bench")
@click.option("--suite", "suite_name", default="smoke", show_default=True, help="Suite whose cards are timed.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--train", "train_mode", is_flag=True,
              help="Time training steps instead of sampling: img/s, ms per step, peak memory, FLOPs per step and "
                   "MFU, per card and phase.")
@click.option("--batch-sizes", default=None,
              help="Comma-separated batch sizes (default: 64 for sampling; each card's own batch size for --train).")
@click.option("--batches", type=int, default=2, show_default=True, help="Timed sampling batches per point (after warm-up).")
@click.option("--train-steps", type=int, default=5, show_default=True, help="With --train: timed steps per card and phase.")
@click.option("--warmup", type=int, default=3, show_default=True,
              help="With --train: steps before timing (compilation, CUDA graph recording), timed apart.")
@click.option("--peak-tflops", type=float, default=None,
              help="With --train: peak TFLOP/s for MFU (default: the device's bf16 dense peak from "
                   "genbench.bench.PEAK_TFLOPS; none on a CPU).")
@click.option("--only", default=None, help="Comma-separated card names.")
@click.option("--steps", type=int, default=None,
              help="Override the sampler's steps (diffusion cards; the other families have no steps).")
@click.option("--bf16/--no-bf16", default=True, show_default=True, help="bf16 autocast (CUDA).")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="channels_last memory format (CUDA, image models).")
@click.option("--fused/--no-fused", default=True, show_default=True,
              help="With --train: fused optimizer steps and a multi-tensor EMA update (CUDA).")
@click.option("--log-every", type=int, default=None,
              help="With --train: move logs to the host every K steps (default 25 on CUDA, 1 on a CPU).")
@click.option("--data-on-device/--no-data-on-device", default=True, show_default=True,
              help="With --train: hold the data on the GPU when it fits.")
@click.option("--compile", "compile_mode", default="off", show_default=True,
              type=click.Choice(COMPILE_MODES),
              help="torch.compile mode for the networks (reduce-overhead adds CUDA graphs, tuned adds "
                   "kernel tuning to that: slower to compile, faster to run).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("results/bench.json"),
              show_default=True, help="JSON file for the measurements.")
@user_errors
def bench_cmd(suite_name, device, train_mode, batch_sizes, batches, train_steps, warmup, peak_tflops, only, steps,
              bf16, channels_last, fused, log_every, data_on_device, compile_mode, out):
    """Sampling (or with --train, training) cost of every card in a suite, with untrained weights."""
    from genbench.bench import bench_suite, bench_training, table
    from genbench.config import load_suite
    from genbench.fastpath import FastPath
    from genbench.runner import resolve_device
    from genbench.store import check_writable_file, write_json

    suite = load_suite(suite_name)
    dev = resolve_device(device)
    try:
        sizes = [int(b) for b in _csv(batch_sizes)]
    except ValueError:
        raise UserError(f"--batch-sizes: {batch_sizes!r} is not a comma-separated list of integers") from None
    if batch_sizes is not None and (not sizes or min(sizes) < 1):
        raise UserError("--batch-sizes must be positive")
    if batches < 1 or train_steps < 1 or warmup < 0:
        raise UserError("--batches and --train-steps must be positive, --warmup at least 0")
    if steps is not None and steps < 1:
        raise UserError("--steps must be at least 1")
    if log_every is not None and log_every < 1:
        raise UserError("--log-every must be at least 1")
    if peak_tflops is not None and not peak_tflops > 0:
        raise UserError("--peak-tflops must be positive")
    check_writable_file(out, "--out")
    log = lambda s: click.echo(s, err=True)  # noqa: E731
    if train_mode:
        from genbench.train import TrainFastPath

        if steps is not None:
            raise UserError("--steps is a sampling option; --train times training steps (--train-steps)")
        fast = TrainFastPath(bf16=bf16, channels_last=channels_last, fused=fused, compile=compile_mode,
                             log_every=log_every, data_on_device=data_on_device)
        rows = bench_training(suite, dev, sizes or None, steps=train_steps, fast=fast, only=_only(only),
                              warmup=warmup, peak_tflops=peak_tflops, log=log)
        write_json(out, {"suite": suite.name, "mode": "train", "rows": rows})
    else:
        rows = bench_suite(suite, dev, sizes or [64], batches, FastPath(bf16, channels_last, compile_mode), _only(only),
                           {"steps": steps} if steps is not None else None, log=log)
        write_json(out, {"suite": suite.name, "mode": "sample", "rows": rows})
    click.echo(table(rows))
    click.echo(f"bench: {out}")


@main.command("list")
@user_errors
def list_cmd():
    """Print the suites, model cards, datasets, metrics and feature extractors genbench knows."""
    from genbench import data
    from genbench import metrics as registry
    from genbench.config import list_names, load_card, load_suite, metric_groups, search_dirs
    from genbench.evaluators import EXTRACTORS
    from genbench.families import families

    def section(title, items):
        click.echo(f"{title}:")
        for it in items:
            click.echo(f"  {it}")

    suites = []
    for n in list_names("suites"):
        try:
            s = load_suite(n)
            suites.append(f"{n:16s} v{s.version}  {', '.join(d.name for d in s.datasets)}: {', '.join(s.cards)}")
        except UserError as e:
            suites.append(f"{n:16s} (invalid: {_one_line(e)})")
    section("suites", suites)
    cards = []
    for n in list_names("models"):
        try:
            c = load_card(n)
            text = " ".join(c.description.split())
            cards.append(f"{n:16s} {c.family:10s} {text[:90] + ('...' if len(text) > 90 else '')}")
        except UserError as e:
            cards.append(f"{n:16s} (invalid: {_one_line(e)})")
    section("model cards", cards)
    section("families", sorted(families()))
    section("datasets", data.dataset_names())
    section("metric groups (suite eval.metrics)", [f"{g:10s} {registry.GROUPS[g].description}"
                                                   for g in metric_groups()])
    section("metrics (direction, gate, computed from)",
            [f"{k:20s} {'higher' if m.higher_is_better else 'lower' if m.higher_is_better is False else 'no direction':12s}"
             f" {m.gate:6s} {m.source}" for k, m in registry.METRICS.items()])
    section("feature extractors", [f"{k:18s} fid/kid/prc: {v.fid_layer}, is: {v.isc_layer}"
                                   for k, v in sorted(EXTRACTORS.items())])
    section("search path (suites/ and models/ under each)", [str(d.parent) for d in search_dirs("suites")])


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
    from genbench.evaluators.classifier import train_classifier, weights_path
    from genbench.store import check_writable_file

    if epochs is not None and epochs < 1:
        raise UserError("--epochs must be at least 1")
    check_writable_file(out or weights_path(dataset), "--out")
    epochs = epochs or {"digits": 30, "fashion": 6}[dataset]
    r = train_classifier(dataset, epochs=epochs, seed=seed, out=out, data_root=data_root)
    click.echo(json.dumps(r, indent=2))


@main.command("check-family")
@click.argument("target")
@click.option("--shape", default=None,
              help="Data shape CxHxW (e.g. 1x16x16, 3x32x32) or 2 for 2-D points (default: digits, 1x16x16).")
@click.option("--classes", type=int, default=None, help="Classes in the data (default: 10, as digits).")
@click.option("--dataset", default=None,
              help="Take the shape and classes from this dataset (e.g. digits, fashion, ring8) instead of --shape.")
@click.option("--device", default="cpu", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--option", multiple=True, metavar="KEY=VALUE",
              help="A sampler option over the base sampler (the card's, or the class's conformance_sampler); "
                   "repeatable.")
@user_errors
def check_family_cmd(target, shape, classes, dataset, device, option):
    """Run genbench's conformance checks on a family: a built-in or entry-point name, an import path
    package.module:Class, or a card (file or name). Exit 0 when every check passes, 1 when one fails,
    2 on a target that does not resolve."""
    from genbench.conformance import check_target
    from genbench.external import parse_option

    sampler = dict(parse_option(text) for text in option)
    report = check_target(target, shape=shape, classes=classes, dataset=dataset, device=device, sampler=sampler)
    click.echo(report.table())
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
