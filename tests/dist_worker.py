"""Run by tests/test_distributed.py under `torchrun --standalone --nproc_per_node=2` (gloo, one thread
per rank); never collected by pytest.

    dist_worker.py checks IN OUT   sharded sampling, evaluation, training, resume and a one-rank NaN,
                                   each result saved by rank 0 to OUT/checks.pt for the test to hold
                                   against one process (IN holds the models the test built)
    dist_worker.py run ARGS...     `genbench run ARGS...` with faults planted on rank 1 by the
                                   environment: GENBENCH_TEST_NAN_SEED (that seed's run gets a NaN at
                                   step 2 on rank 1 only), GENBENCH_TEST_CRASH_SEED (that seed's run
                                   raises at step 2 on rank 1 only)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from genbench import distributed as gdist  # noqa: E402


def checks(inp: Path, out: Path) -> None:
    from dist_family import PlainAutoencoder, Replay

    from genbench import train as train_mod
    from genbench.data import load
    from genbench.evaluation import PointSettings, evaluate_point
    from genbench.evaluators import auto_extractor
    from genbench.families import get_family
    from genbench.scoring import Reference, build_extractor, reference_features, sample_stream

    d = gdist.init(torch.device("cpu"))
    assert d is not None and d.world == 2 and d.backend == "gloo"
    res: dict = {"world": d.world, "provenance": d.provenance()}
    digits, ring = load("digits", "train", image_size=16), load("ring8", "train")

    # ---- sampling: 37 images at batch sizes 8 (5 batches), 32 (rank 1 gets 5 images), 64 (rank 1 none)
    models = torch.load(inp / "models.pt", weights_only=False)
    replay = Replay(digits.spec, models["replay_x"])
    gan = get_family("gan")(digits.spec, **models["gan_params"])
    gan.load_state_dict(models["gan"])
    gan.eval()
    for name, m in (("replay", replay), ("cgan", gan)):
        for b in (8, 32, 64):
            lo, hi = gdist.shard(37, b)
            xs = list(sample_stream(m, hi - lo, 3, b, {}, start=lo))
            res[f"sample/{name}/{b}"] = gdist.gather_rows(torch.cat(xs) if xs else None)
            res[f"shard/{name}/{b}"] = gdist.all_gather_object((lo, hi))

    # ---- evaluation: reference features sharded on a cache miss (rank 0 writes the cache), then read
    extractor = build_extractor(auto_extractor("digits"), torch.device("cpu"))
    cache = out / "cache"
    miss = reference_features(extractor, digits, 200, cache, batch_size=64)
    from genbench.scoring import wait_for_cache_writes

    wait_for_cache_writes()
    hit = reference_features(extractor, digits, 200, cache, batch_size=64)
    res["ref_miss"], res["ref_hit"] = miss, hit
    res["ref_is_none_on"] = gdist.all_gather_object((miss is None, hit is None))
    reference = Reference.on(extractor.device, hit) if hit is not None else None
    settings = PointSettings(75, 32, ("fid", "isc", "kid", "prc", "modes"), 20)
    m, s, grid = evaluate_point(replay, {}, 5, settings, digits, extractor, reference, keep=40)
    res["eval_images"], res["eval_sampling"], res["eval_grid"] = m, s, grid
    ring_replay = Replay(ring.spec, ring.x[:500].float())
    m, _, grid = evaluate_point(ring_replay, {}, 5, PointSettings(75, 32, ("modes",), 20), ring, None, None,
                                keep=50)
    res["eval_points"], res["eval_points_grid"] = m, grid

    # ---- training: five steps at global batch 16 of a family without training noise
    torch.manual_seed(0)
    ae = PlainAutoencoder(digits.spec)
    r = train_mod.train(ae, digits, budget_kimg=0.08, batch_size=16, seed=0, progress=False)
    res["ae_state"], res["ae_log"], res["ae_steps"] = r.model.state_dict(), r.state.log, r.state.steps
    res["ae_same_on_ranks"] = gdist.all_gather_object([p.detach().clone() for p in r.model.parameters()])

    # ---- a GAN (noise from torch's generator, batch norm, two optimizers) stopped after 3 steps, resumed
    def fresh():
        torch.manual_seed(1)
        return get_family("gan")(digits.spec, **models["gan_params_uncond"])

    full = train_mod.train(fresh(), digits, budget_kimg=0.08, batch_size=16, seed=1, progress=False)
    run_dir = out / "ckpt"

    def stop_after_three(state):
        if state.steps == 4:   # step 4 is done but not checkpointed: the checkpoint holds step 3
            raise KeyboardInterrupt("killed")

    try:
        train_mod.train(fresh(), digits, budget_kimg=0.08, batch_size=16, seed=1, run_dir=run_dir,
                        checkpoint_every_s=0.0, progress=False, on_step=stop_after_three)
    except KeyboardInterrupt:
        pass
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=True) if d.main else None
    res["ckpt_steps"] = ck["state"]["steps"] if ck is not None else None
    resumed = train_mod.train(fresh(), digits, budget_kimg=0.08, batch_size=16, seed=1, run_dir=run_dir,
                              progress=False)
    res["gan_full"], res["gan_resumed"] = full.model.state_dict(), resumed.model.state_dict()
    res["gan_full_log"], res["gan_resumed_log"] = full.state.log, resumed.state.log
    res["gan_same_on_ranks"] = gdist.all_gather_object({k: v.clone() for k, v in full.model.state_dict().items()})

    # ---- WGAN-GP: a double backward (the gradient penalty) and D-only steps (n_critic 2) stay in step
    torch.manual_seed(2)
    wgan = get_family("gan")(digits.spec, loss="wasserstein", gp_weight=10.0, n_critic=2,
                             **models["gan_params_uncond"])
    r = train_mod.train(wgan, digits, budget_kimg=0.064, batch_size=16, seed=2, progress=False)
    res["wgan_log"] = r.state.log
    res["wgan_same_on_ranks"] = gdist.all_gather_object({k: v.clone() for k, v in r.model.state_dict().items()})

    # ---- a NaN on rank 1 only: both ranks stop at the same step with the same record
    torch.manual_seed(0)
    r = train_mod.train(PlainAutoencoder(digits.spec), digits, budget_kimg=0.08, batch_size=16, seed=0,
                        progress=False, inject_nan_at_step=2 if d.rank == 1 else None)
    res["nan"] = gdist.all_gather_object((r.state.steps, r.state.diverged_at_kimg, r.state.diverged_reason,
                                          r.state.log[-1]))
    if d.main:
        torch.save(res, out / "checks.pt")
    gdist.shutdown()


def run(args: list[str]) -> None:
    """`genbench run ARGS` with faults planted on rank 1 only (see the module docstring)."""
    from genbench import runner
    from genbench.cli import main
    from genbench.families import get_family

    nan_seed, crash_seed = os.environ.get("GENBENCH_TEST_NAN_SEED"), os.environ.get("GENBENCH_TEST_CRASH_SEED")
    real_train = runner.train
    rank = gdist.env_rank()

    def planted(model, data, **kw):
        if rank == 1 and nan_seed is not None and kw["seed"] == int(nan_seed):
            kw["inject_nan_at_step"] = 2
        if rank == 1 and crash_seed is not None and kw["seed"] == int(crash_seed):
            step, calls = type(model).train_step, [0]

            def crashing(self, *a, **k):
                calls[0] += 1
                if calls[0] == 3:
                    raise RuntimeError("planted crash on rank 1")
                return step(self, *a, **k)

            model.train_step = crashing.__get__(model)
        return real_train(model, data, **kw)

    runner.train = planted
    get_family("vae")
    main(["run", *args])


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "checks":
        checks(Path(sys.argv[2]), Path(sys.argv[3]))
    elif what == "run":
        run(sys.argv[2:])
    else:
        raise SystemExit(f"unknown: {what}")
