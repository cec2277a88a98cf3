"""genbench's Inception forward (resize as two matmuls) against torch-fidelity's own forward."""
import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from genbench import evaluators
from genbench.scoring import build_extractor, extract
from genbench.evaluators.inception import MatmulResizeInception, resize_to_inception, write_random_inception_weights

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
