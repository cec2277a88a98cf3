"""The conformance checks (genbench/conformance.py, the ones `genbench check-family` runs) over every
built-in family: it builds (also as the runner plans it, on the meta device), takes a training step in
every phase without NaN, samples [n, *shape] in [-1, 1], the same seeds give the same samples whatever
the batch split, other seeds differ, nfe is a positive int, its state reloads, and every declared
sampler option is accepted at the family's example values. Each family's tiny configuration comes from
the conformance hooks (conformance_params, conformance_sampler, sampler_examples), not from here."""
import pytest
from click.testing import CliRunner

from genbench import conformance
from genbench.cli import main
from genbench.families import DataSpec, builtin_families

SHAPES = {"rgb16": (3, 16, 16), "points": (2,)}
IMAGES_ONLY = {"vqvae"}          # the VQ-VAE's conv autoencoder needs images
FAMILIES = sorted(builtin_families())


@pytest.mark.parametrize("family", FAMILIES)
def test_family_declares_a_conformance_config(family):
    cls = builtin_families()[family]
    assert conformance.declares_config(cls), (
        f"family {family!r} has no conformance_params: give its class the hooks so its checks stay fast")
    trials, missing = conformance.sampler_trials(cls, DataSpec((1, 16, 16), 10), cls.sampler_options)
    assert not missing, f"family {family!r}: no sampler example for {missing}"


@pytest.mark.parametrize("family", FAMILIES)
def test_check_family_passes_on_the_builtin_family(family):
    """The command itself, at its default shape (digits, 1x16x16, 10 classes)."""
    r = CliRunner().invoke(main, ["check-family", family], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "all " in r.output.splitlines()[-1] and "FAIL" not in r.output, r.output


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_conformance(family, shape):
    cls = builtin_families()[family]
    spec = DataSpec(shape, 10)
    rep = conformance.run_checks(cls, spec, target=family)
    if family in IMAGES_ONLY and len(shape) == 1:
        assert rep.failed == ["builds"], rep.table()   # refused at construction, in one named check
        return
    assert rep.ok, rep.table()
    names = [c.name for c in rep.checks]
    for must in ("builds", "plan", "nfe", "sample-shape", "sample-range", "same-seeds", "batch-split",
                 "seeds-differ", "reload", "held-out", "unknown-option"):
        assert must in names, names
    assert any(n.startswith("train[") for n in names)
    covered = {k for c in rep.checks if c.name.startswith("sampler[") for k in
               (kv.split("=")[0] for kv in c.name[len("sampler["):-1].split(","))}
    assert covered >= set(cls.sampler_options), (covered, cls.sampler_options)


def test_a_subclass_overrides_or_inherits_its_familys_hooks():
    from genbench.families.gan import GAN

    spec = DataSpec((1, 16, 16), 10)

    class SmallerGAN(GAN):
        conformance_params = {"g_channels": 8, "d_channels": 8, "z_dim": 4}

    class SameGAN(GAN):
        pass

    assert conformance.hook(SmallerGAN, "conformance_params", spec)["g_channels"] == 8
    assert conformance.hook(SameGAN, "conformance_params", spec) == GAN.conformance_params
    assert conformance.hook(SameGAN, "sampler_examples", spec) == {"truncation": [0.5, None]}
    assert conformance.hook(object, "conformance_params", spec, default="none") == "none"
