"""genbench's Inception forward (resize as two matmuls) against torch-fidelity's own forward; Inception weights
files loaded safely (weights_only=True) and checked before torch-fidelity sees their tensors."""
import builtins
import os
import pickle
import re
import shlex
import shutil

import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from genbench import evaluators, runner
from genbench.config import load_suite
from genbench.errors import UserError
from genbench.evaluators import inception as inception_mod
from genbench.evaluators.classifier import file_sha256
from genbench.scoring import build_extractor, extract
from genbench.evaluators.inception import MatmulResizeInception, resize_to_inception, write_random_inception_weights
from helpers import write_suite

ALL = ["64", "192", "768", "2048", "logits_unbiased", "logits"]


def smooth_images(n, seed, h=32, w=32):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, max(1, h // 4), max(1, w // 4), generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random-inception.pt"
    write_random_inception_weights(path, [smooth_images(6, 1), smooth_images(6, 2)])
    return path


@pytest.mark.parametrize("h,w", [(32, 32), (16, 16), (28, 28), (24, 40), (299, 299), (320, 300)])
def test_resize_equals_torch_fidelity(h, w):
    x = torch.randint(0, 256, (3, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(h * w))
    theirs = (interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False) - 128) / 128
    ours = resize_to_inception(x, 299)
    assert ours.shape == theirs.shape
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert (ours - theirs).abs().max().item() < 2e-6   # values in [-1, 1): float32 rounding only


def test_forward_equals_torch_fidelity_at_every_tap(weights):
    net = FeatureExtractorInceptionV3("inception-v3-compat", ALL, feature_extractor_weights_path=str(weights)).eval()
    x = torch.cat([smooth_images(2, 7), torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)])
    theirs = net(x)
    ours = MatmulResizeInception(net)(x)
    for name, a, b in zip(ALL, ours, theirs):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 1e-4 * scale, name
    # the calibrated features tell images apart (a resize that lost the image would not)
    f = theirs[ALL.index("2048")]
    assert (f[0] - f[1]).abs().max().item() > 1e-2 * f.abs().max().item()


@pytest.mark.slow
def test_build_extractor_uses_it_for_the_requested_layers_only(weights):
    ext = build_extractor(evaluators.INCEPTION, torch.device("cpu"), inception_weights=str(weights))
    assert isinstance(ext.module, MatmulResizeInception)
    assert ext.forward_code.startswith("genbench.evaluators.inception/")   # recorded in provenance
    x = smooth_images(3, 11)
    ours = extract(ext, [x[:2], x[2:]])
    assert set(ours) == {"2048", "logits_unbiased"}
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=str(weights)).eval()
    for name, b in zip(["2048", "logits_unbiased"], net(x)):
        assert torch.allclose(ours[name], b, rtol=0, atol=1e-4 * b.abs().max().item()), name


def test_refuses_what_torch_fidelity_refuses(weights):
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    with pytest.raises(ValueError, match="uint8"):
        MatmulResizeInception(net)(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="uint8"):
        MatmulResizeInception(net)(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))


# --- weights files --------------------------------------------------------------------------------------------

class _Call:
    """Pickles as a call of `fn(arg)`: what a crafted weights file runs when it is unpickled."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def write_crafted(path, marker, payload="os.system", writer="torch.save"):
    call = {"os.system": _Call(os.system, f"touch {shlex.quote(str(marker))}"),
            "builtins.exec": _Call(builtins.exec, f"open({str(marker)!r}, 'w').close()")}[payload]
    obj = {"Conv2d_1a_3x3.conv.weight": call}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    return path


def assert_one_line(e, *parts):
    msg = str(e.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg


@pytest.fixture(scope="module")
def state(weights):
    return torch.load(weights, weights_only=True)


@pytest.mark.parametrize("payload,writer", [("os.system", "torch.save"), ("builtins.exec", "torch.save"),
                                            ("os.system", "pickle"), ("builtins.exec", "pickle")])
def test_weights_that_would_run_code_are_refused_and_never_run(tmp_path, payload, writer):
    live = tmp_path / "LIVE"   # the payload is real: torch-fidelity's own load (weights_only=False) runs it
    try:   # a plain pickle runs while torch.load reads what it takes for the legacy format's magic number
        torch.load(write_crafted(tmp_path / "probe.pth", live, payload, writer), weights_only=False)
    except RuntimeError:
        assert writer == "pickle"
    assert live.exists()
    marker = tmp_path / "MARKER"
    path = write_crafted(tmp_path / "evil.pth", marker, payload, writer)
    with pytest.raises(UserError) as e:
        evaluators.check_extractor(evaluators.INCEPTION, inception_weights=str(path))
    assert_one_line(e, "--inception-weights", str(path), "may contain code", "not loaded")
    with pytest.raises(UserError) as e:
        build_extractor(evaluators.INCEPTION, torch.device("cpu"), inception_weights=str(path))
    assert_one_line(e, str(path), "may contain code")
    assert not marker.exists()


@pytest.mark.parametrize("how", ["env", "cache"])
def test_crafted_weights_from_the_environment_or_the_cache_are_refused(tmp_path, monkeypatch, how):
    marker = tmp_path / "MARKER"
    if how == "env":
        path = write_crafted(tmp_path / "evil.pth", marker)
        monkeypatch.setenv(evaluators.INCEPTION_ENV, str(path))
        source = evaluators.INCEPTION_ENV
    else:   # torch-fidelity's cache file (conftest points TORCH_HOME into tmp_path)
        path = torch.hub.get_dir() + "/checkpoints/" + evaluators.INCEPTION_FILE
        os.makedirs(os.path.dirname(path))
        write_crafted(path, marker)
        source = "cache"
    for download in (False, True):
        with pytest.raises(evaluators.WeightsNotFound) as e:
            evaluators.check_extractor(evaluators.INCEPTION, download=download)
        assert_one_line(e, source, str(path), "may contain code")
    assert not marker.exists()


def test_crafted_weights_fail_the_plan_before_any_training(tmp_path):
    marker = tmp_path / "MARKER"
    path = write_crafted(tmp_path / "evil.pth", marker)
    suite = load_suite(str(write_suite(tmp_path, dataset="cifar10", extractor="inception-v3-compat")))
    opts = runner.RunOptions(results_dir=tmp_path / "r", data_root=tmp_path / "data", device="cpu",
                             inception_weights=str(path), progress=False)
    with pytest.raises(UserError) as e:
        runner.plan(suite, opts)
    assert_one_line(e, str(path), "may contain code")
    assert not marker.exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("content,parts", [
    (b"x", ["not loaded", "may contain code"]),
    (b"", ["not loaded"]),
    ("truncated", ["not loaded", "zip"]),
    ([1, 2], ["holds a list, not a state dict"]),
    ({"state_dict": {}}, ["missing keys", "Conv2d_1a_3x3.conv.weight", "more"]),
])
def test_files_that_are_no_state_dict_are_refused(tmp_path, state, content, parts):
    path = tmp_path / "w.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "truncated":
        torch.save({"fc.bias": state["fc.bias"]}, path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        torch.save(content, path)
    with pytest.raises(evaluators.WeightsNotFound) as e:
        evaluators.check_extractor(evaluators.INCEPTION, inception_weights=str(path))
    assert_one_line(e, str(path), *parts)


@pytest.mark.parametrize("change,parts", [
    ("missing", ["1 missing key", "Mixed_6c.branch7x7_2.conv.weight"]),
    ("shape", ["fc.bias has shape [1000], expected [1008]"]),
])
def test_state_dict_with_a_missing_key_or_a_wrong_shape_is_refused(tmp_path, state, change, parts):
    sd = dict(state)
    if change == "missing":
        del sd["Mixed_6c.branch7x7_2.conv.weight"]
    else:
        sd["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    with pytest.raises(evaluators.WeightsNotFound) as e:
        evaluators.check_extractor(evaluators.INCEPTION, inception_weights=str(path))
    assert_one_line(e, "--inception-weights", str(path), *parts)
    with pytest.raises(evaluators.WeightsNotFound) as e:
        build_extractor(evaluators.INCEPTION, torch.device("cpu"), inception_weights=str(path))
    assert_one_line(e, str(path), *parts)


@pytest.mark.parametrize("key,value,message", [
    ("fc.extra", torch.zeros(1), "1 unexpected key (fc.extra)"),
    ("fc.bias", [0.0] * 1008, "fc.bias is a list, not a tensor"),
    ("fc.bias", torch.zeros(1008, dtype=torch.int32), "fc.bias is torch.int32, expected floating point"),
    ("fc.bias", torch.full((1008,), float("nan")), "fc.bias has non-finite values"),
    ("fc.bias", torch.zeros(1008).to_sparse(), "fc.bias is not a plain dense tensor"),
    ("Mixed_5b.branch1x1.bn.num_batches_tracked", torch.tensor(1.0), "num_batches_tracked is torch.float32"),
])
def test_state_dict_tensors_are_checked(state, key, value, message):
    with pytest.raises(inception_mod.InceptionWeightsError, match=re.escape(message)):
        inception_mod.check_inception_state({**state, key: value})


def test_expected_keys_are_torch_fidelitys(weights, state):
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    expected = inception_mod.expected_inception_state()
    assert {k: (tuple(v.shape), v.dtype) for k, v in net.state_dict().items()} == expected
    assert set(state) == set(expected)


@pytest.mark.parametrize("form", ["state_dict", "converted"])
def test_good_weights_give_torch_fidelitys_network_and_features_bit_for_bit(tmp_path, weights, state, form):
    """A valid file behaves as before: the network torch-fidelity builds from it itself, bit for bit. "converted"
    is a plain dict without num_batches_tracked, as torch-fidelity's own converted weights file is."""
    if form == "converted":
        path = tmp_path / "converted.pth"
        torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    else:
        path = weights
    ext = build_extractor(evaluators.INCEPTION, torch.device("cpu"), inception_weights=str(path))
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ext.layers,
                                         feature_extractor_weights_path=str(path)).eval()
    ours_sd, theirs_sd = ext.module.net.state_dict(), theirs.state_dict()
    assert ours_sd.keys() == theirs_sd.keys()
    for k, v in theirs_sd.items():
        assert ours_sd[k].dtype == v.dtype and torch.equal(ours_sd[k], v), k
    assert not ext.module.net.training and not any(p.requires_grad for p in ext.module.net.parameters())
    x = smooth_images(2, 5)
    ours = ext(x)
    for name, b in zip(ext.layers, MatmulResizeInception(theirs)(x)):
        assert torch.equal(ours[name], b), name
    assert ext.sha256 == file_sha256(path)   # provenance: the file's sha256, as before
    assert not evaluators.verify_inception_weights(path).official   # random weights: not torch-fidelity's file


def test_weights_are_verified_once_per_process_per_file_version(tmp_path, weights, monkeypatch):
    path = tmp_path / "w.pth"
    shutil.copy(weights, path)
    calls = []
    verify = inception_mod._read_and_verify
    monkeypatch.setattr(inception_mod, "_read_and_verify", lambda *a: calls.append(a[0]) or verify(*a))
    for _ in range(2):   # plan time, e.g. once per dataset
        assert evaluators.check_extractor(evaluators.INCEPTION, inception_weights=str(path)) == str(path)
    ext = build_extractor(evaluators.INCEPTION, torch.device("cpu"), inception_weights=str(path))
    assert ext.sha256 == file_sha256(path)
    assert calls == [str(path)]
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # a new version of the file: checked again
    evaluators.check_extractor(evaluators.INCEPTION, inception_weights=str(path))
    assert calls == [str(path)] * 2
