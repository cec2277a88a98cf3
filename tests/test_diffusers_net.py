"""A diffusers UNet2DModel as the diffusion family's noise-prediction network (card param `network`):
built from a config in the card or loaded from a save_pretrained folder, trained by genbench's loop and
sampled by its samplers; genbench's DDIM with it equals diffusers' DDIMScheduler stepping the same UNet;
every bad `network:` is one line and exit 2 before any training, diffusers missing included.

DDIM conventions matched (eta 0): prediction_type "epsilon"; clip_sample True with
use_clipped_model_output=True (genbench clips x0 to [-1, 1] and re-derives eps from the clipped x0), or
both unclipped; set_alpha_to_one=True (the last step goes to alpha_bar = 1, as genbench's); steps_offset 0.
Timesteps: genbench's respaced_timesteps spaces K steps evenly from T-1 down to 0 (diffusers'
"linspace" spacing visits the same ones), but diffusers' DDIM always steps from t to t - T//K, which is
not the next visited timestep unless K = T. So the full chain (K = T) is compared with diffusers' own
schedule (linear betas from beta_start/beta_end), and a respaced chain with a DDIMScheduler over the K
visited timesteps (trained_betas = 1 - alpha_bar(t_i)/alpha_bar(t_{i-1}), iDDPM's respacing) whose
network is called at the original timestep t_i.
"""
import json
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner

from genbench import runner, store
from genbench.cli import main
from genbench.config import load_suite
from genbench.families import DataSpec, get_family
from genbench.families.diffusion import respaced_timesteps
from genbench.rng import SeedRNG
from helpers import assert_one_line_error, write_suite

NEEDS = "diffusers is not installed (pip install 'genbench[diffusers]')"
TINY = {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 8,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}


def diffusers_or_skip():
    return pytest.importorskip("diffusers", reason=NEEDS)


def save_unet(path, **over):
    """A tiny UNet2DModel for 1x16x16 images, saved with save_pretrained into `path`."""
    diffusers = diffusers_or_skip()
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=1, **{**TINY, **over})
    unet.save_pretrained(str(path))
    return path


def card(tmp_path, network, name="unet-card", **params):
    d = {"name": name, "family": "diffusion",
         "params": {"timesteps": 50, "lr": 1e-3, "nll_timesteps": 2, "network": network, **params},
         "sampler": {"sampler": "ddim", "steps": 5}, "batch_size": 32}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def suite_with(tmp_path, card_path, **eval_kw):
    return write_suite(tmp_path, cards=(card_path.name,), overrides={}, budget_kimg=0.1,
                       metrics=["fid", "nll"], n_fake=100, cheap_n_fake=100, kid_subset_size=50, n_likelihood=40,
                       **eval_kw)


# --------------------------------------------------------------------------- training and sampling


@pytest.mark.slow
def test_a_card_with_a_saved_unet_trains_samples_and_reloads(tmp_path):
    unet_dir = save_unet(tmp_path / "unet")
    res = tmp_path / "res"
    suite = load_suite(str(suite_with(tmp_path, card(tmp_path, {"type": "diffusers", "path": str(unet_dir)}))))
    p = runner.plan(suite, runner.RunOptions(results_dir=res, device="cpu", progress=False))
    assert runner.run_suite(p, log=lambda s: None)["complete"] == 1
    rdir = store.run_dir(res, "tiny", "digits", "unet-card", 0)
    rec = store.read_record(rdir)
    assert rec.status == "complete" and rec.family == "diffusion" and rec.training["steps"] >= 3
    assert rec.sampling["nfe"] == 5 and rec.metrics["fid"] > 0 and rec.metrics["nll_bpd"] > 0
    state = torch.load(rdir / store.MODEL_FILE, weights_only=True)
    assert any(k.startswith("net.unet.") for k in state)             # the UNet's weights are the run's
    saved = diffusers_or_skip().UNet2DModel.from_pretrained(str(unet_dir)).state_dict()
    trained = {k[len("net.unet."):]: v for k, v in state.items() if k.startswith("net.unet.")}
    assert trained.keys() == saved.keys()
    assert any(not torch.equal(trained[k], saved[k]) for k in saved)  # and training moved them
    from genbench.external import open_run

    run = open_run(rdir, torch.device("cpu"))                          # eval --run / sample rebuild it
    assert all(torch.equal(run.model.state_dict()[k], state[k]) for k in state)


def test_a_card_with_a_unet_config_passes_check_family_with_learned_sigma_and_guidance(tmp_path):
    """From a config: in/out channels and sample_size come from the data (out 2C with learn_sigma), the
    class embedding from the labels (10 classes + the null class for label dropout)."""
    diffusers_or_skip()
    path = card(tmp_path, {"type": "diffusers", "config": TINY}, learn_sigma=True, class_cond=True, p_uncond=0.2)
    r = CliRunner().invoke(main, ["check-family", str(path)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "sampler[guidance=" in r.output or "sampler[" in r.output
    from genbench.families.networks import DiffusersUNet

    m = get_family("diffusion")(DataSpec((1, 16, 16), 10), timesteps=50, learn_sigma=True, class_cond=True,
                                p_uncond=0.2, network={"type": "diffusers", "config": TINY})
    assert isinstance(m.net, DiffusersUNet)
    cfg = m.net.unet.config
    assert (cfg.in_channels, cfg.out_channels, cfg.sample_size, cfg.num_class_embeds) == (1, 2, 16, 11)


def test_the_plan_builds_a_saved_unet_from_its_config_without_reading_weights(tmp_path, monkeypatch):
    diffusers = diffusers_or_skip()
    unet_dir = save_unet(tmp_path / "unet")

    def refuse(*a, **k):
        raise AssertionError("the plan must not load weights")

    monkeypatch.setattr(diffusers.UNet2DModel, "from_pretrained", refuse)
    suite = load_suite(str(suite_with(tmp_path, card(tmp_path, {"type": "diffusers", "path": str(unet_dir)}))))
    runner.plan(suite, runner.RunOptions(results_dir=tmp_path / "res", device="cpu", progress=False))
    with torch.device("meta"):
        m = get_family("diffusion")(DataSpec((1, 16, 16), 10), timesteps=50,
                                    network={"type": "diffusers", "path": str(unet_dir)})
    assert next(m.net.parameters()).device.type == "meta"


# --------------------------------------------------------------------------- DDIM against diffusers


def _genbench_with(unet_dir, T):
    return get_family("diffusion")(DataSpec((1, 16, 16), 0), timesteps=T,
                                   network={"type": "diffusers", "path": str(unet_dir)}).eval()


def _diffusers_ddim(unet, sched, x, t_of):
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet(x, t_of(t)).sample
            x = sched.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    return x.clamp(-1, 1)        # genbench returns images clamped to [-1, 1]


# Measured on this CPU: clipped 7.0e-6 (K=T) and 6.6e-6 (K=12); unclipped 1.5e-5, where the untrained
# UNet drives |x| to ~800 before the final clamp (float32 rounding relative to that scale).
@pytest.mark.parametrize("clip,atol", [(True, 2e-5), (False, 4e-5)], ids=["clip_sample", "no_clip"])
@pytest.mark.parametrize("K", [pytest.param(100, marks=pytest.mark.slow), 12], ids=["full_chain", "respaced_12"])
def test_genbench_ddim_equals_diffusers_ddim_scheduler(tmp_path, K, clip, atol):
    diffusers = diffusers_or_skip()
    torch.manual_seed(0)
    T = 100
    unet_dir = save_unet(tmp_path / "unet")
    model = _genbench_with(unet_dir, T)
    unet = diffusers.UNet2DModel.from_pretrained(str(unet_dir), low_cpu_mem_usage=False).eval()
    x_T = SeedRNG.for_run(0, 4).randn(1, 16, 16)                                   # the same x_T for both
    with torch.no_grad():
        ours = model.run_sampler(x_T, SeedRNG.for_run(0, 4), sampler="ddim", steps=K, eta=0.0, clip_denoised=clip)
    ts = respaced_timesteps(T, K)
    common = dict(clip_sample=clip, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
                  timestep_spacing="leading")
    if K == T:
        sched = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4 * 1000 / T,
                                        beta_end=0.02 * 1000 / T, **common)
        sched.set_timesteps(K)
        assert sched.timesteps.flip(0).tolist() == ts.tolist() == list(range(T))
        t_of = lambda t: t                                                          # noqa: E731
    else:
        linspace = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing="linspace")
        linspace.set_timesteps(K)
        assert linspace.timesteps.flip(0).tolist() == ts.tolist()                   # the same visited timesteps
        ab = model.alpha_bar.double()[ts]
        betas = 1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        sched = diffusers.DDIMScheduler(num_train_timesteps=K, trained_betas=betas.numpy(), **common)
        sched.set_timesteps(K)
        t_of = lambda i: ts[int(i)]                                                 # noqa: E731 - index -> t_i
    theirs = _diffusers_ddim(unet, sched, x_T.clone(), t_of)
    diff = (ours - theirs).abs().max().item()
    assert diff <= atol, f"genbench DDIM vs diffusers DDIMScheduler: max |diff| {diff:.3g}"


# --------------------------------------------------------------------------- bad input: one line, exit 2


def run_cli(tmp_path, card_path, dry_run: bool):
    s = suite_with(tmp_path, card_path)
    res = tmp_path / "res"
    args = ["run", "--suite", str(s), "--device", "cpu", "--results-dir", str(res), "--no-progress"]
    r = CliRunner().invoke(main, args + (["--dry-run"] if dry_run else []))
    assert not res.exists(), "nothing may be written on bad input"
    return r


def _not_a_unet(tmp_path):
    diffusers = diffusers_or_skip()
    d = tmp_path / "vae"
    diffusers.AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8,), norm_num_groups=4,
                            latent_channels=2).save_pretrained(str(d))
    return {"type": "diffusers", "path": str(d)}


def _no_config(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    return {"type": "diffusers", "path": str(d)}


def _no_weights(tmp_path):
    d = save_unet(tmp_path / "unet")
    for f in d.glob("diffusion_pytorch_model*"):
        f.unlink()
    return {"type": "diffusers", "path": str(d)}


BAD = {   # case -> (network or a builder of it, extra params, needle)
    "unknown-type": ({"type": "keras", "path": "x"}, {}, "network: unknown type 'keras'"),
    "no-config-or-path": ({"type": "diffusers"}, {}, "exactly one of config"),
    "unknown-key": ({"type": "diffusers", "config": TINY, "weights": 1}, {}, "unknown key 'weights'"),
    "missing-folder": (lambda tmp: {"type": "diffusers", "path": str(tmp / "nope")}, {}, "is not a folder"),
    "not-a-unet": (_not_a_unet, {}, "holds a model of class AutoencoderKL, not a UNet2DModel"),
    "no-config-json": (_no_config, {}, "has no config.json"),
    "no-weights": (_no_weights, {}, "has no weights"),
    "learn-sigma-out-channels": (lambda tmp: {"type": "diffusers", "path": str(save_unet(tmp / "u"))},
                                 {"learn_sigma": True}, "out_channels is 1; learn_sigma needs 2"),
    "class-cond-without-embedding": (lambda tmp: {"type": "diffusers", "path": str(save_unet(tmp / "u"))},
                                     {"class_cond": True}, "class_cond needs a class embedding with at least 10"),
    "class-embedding-unconditional": (lambda tmp: {"type": "diffusers",
                                                   "path": str(save_unet(tmp / "u", num_class_embeds=11))},
                                      {}, "but the card is not class_cond"),
    "unknown-config-key": ({"type": "diffusers", "config": {**TINY, "channels": 3}}, {},
                           "unknown UNet2DModel argument 'channels'"),
    "config-does-not-build": ({"type": "diffusers", "config": {**TINY, "norm_num_groups": 32}}, {},
                              "UNet2DModel does not build"),
    "fourier-time": ({"type": "diffusers", "config": {**TINY, "time_embedding_type": "fourier"}}, {},
                     "does not take integer timesteps"),
    "image-size": ({"type": "diffusers", "config": {**TINY, "sample_size": 32}}, {}, "sample_size is 32"),
}


NO_DIFFUSERS_NEEDED = {"unknown-type", "no-config-or-path", "unknown-key"}   # refused before diffusers is imported


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_network_is_one_line_before_training(tmp_path, case, dry_run):
    if case not in NO_DIFFUSERS_NEEDED:
        diffusers_or_skip()
    network, extra, needle = BAD[case]
    network = network(tmp_path) if callable(network) else network
    path = card(tmp_path, network, **extra)
    assert_one_line_error(run_cli(tmp_path, path, dry_run), needle, str(path))


@pytest.mark.parametrize("kind", ["config", "path"])
def test_without_diffusers_a_card_that_needs_it_names_the_extra(tmp_path, monkeypatch, kind):
    """diffusers not importable (simulated: None in sys.modules makes `import diffusers` fail)."""
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    network = {"type": "diffusers", "config": TINY} if kind == "config" else {"type": "diffusers", "path": str(folder)}
    path = card(tmp_path, network)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    for dry in (True, False):
        assert_one_line_error(run_cli(tmp_path, path, dry), "pip install 'genbench[diffusers]'", str(path))
    assert_one_line_error(CliRunner().invoke(main, ["check-family", str(path)]), "pip install 'genbench[diffusers]'")


def test_a_point_dataset_refuses_a_unet(tmp_path):
    with pytest.raises(ValueError, match="a UNet needs images"):
        get_family("diffusion")(DataSpec((2,), 0), timesteps=50, network={"type": "diffusers", "config": TINY})
