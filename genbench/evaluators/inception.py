"""torch-fidelity's InceptionV3, with its input resize done as two matrix products.

torch-fidelity's forward resizes every image to 299 x 299 with TensorFlow 1.x's bilinear rule through
gathers: eight index operations and a dozen element-wise passes over [B, 3, 299, 299] float tensors,
then the (x - 128) / 128 scaling, in NCHW (which a channels_last network converts once more). For a
fixed input size that resize is a linear map per axis, R_h x R_w^T, with two non-zero weights per row:
on 32 x 32 inputs it is two small matmuls that write the 299 x 299 tensor once, already channels_last.
On the 2-core CPU, 100 images: 1.31 s for torch-fidelity's resize and scaling, 0.11 s this way; the whole
forward takes about 24 s, so about 5% of it (python bench/eval_vs_torch_fidelity.py's `--forms` rows show
the GPU effect). The rest of the forward runs torch-fidelity's own layers and weights, in its order,
with its feature taps; tests/test_inception.py holds both to torch-fidelity's forward.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# torch-fidelity's FeatureExtractorInceptionV3.forward, stage by stage: the submodules run in turn, then
# the feature named after them can be taken (64, 192 and 768 by global average pooling).
_STAGES = (
    (("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1"), "64"),
    (("Conv2d_3b_1x1", "Conv2d_4a_3x3", "MaxPool_2"), "192"),
    (("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"), "768"),
    (("Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool"), "2048"),
)
_LOGITS = ("logits_unbiased", "logits")
# Recorded with every Inception number (provenance "extractor_forward"): bump when a change here can move a value.
FORWARD_CODE = "genbench.evaluators.inception/1: torch-fidelity's layers and weights, TF1.x resize as two matmuls"


def tf1_resize_matrix(n_in: int, n_out: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """[n_out, n_in]: TensorFlow 1.x bilinear resizing along one axis (align_corners=False), with the
    source coordinates computed in float32 exactly as torch-fidelity's resize computes them."""
    src = torch.arange(n_out, dtype=torch.float32, device=device) * torch.tensor(n_in / n_out, dtype=torch.float32)
    lo = src.long()
    hi = (lo + 1).clamp_max(n_in - 1)
    frac = src - lo.float()
    rows = torch.arange(n_out, device=device)
    m = torch.zeros(n_out, n_in, dtype=torch.float32, device=device)
    m.index_put_((rows, lo), 1 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)   # hi == lo at the border: the weights add to one
    return m.to(dtype)


def resize_to_inception(x_uint8: torch.Tensor, size: int, dtype=torch.float32) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> [B, 3, size, size] scaled to [-1, 1), channels_last, as torch-fidelity's
    resize then (x - 128) / 128 (the rows of each matrix sum to one, so scaling first is the same)."""
    b, c, h, w = x_uint8.shape
    z = (x_uint8.to(dtype) - 128) / 128
    r_h = tf1_resize_matrix(h, size, dtype, z.device)
    r_w = tf1_resize_matrix(w, size, dtype, z.device)
    u = torch.matmul(z, r_w.T)                                   # [B, C, H, size]: the small product first
    u = u.permute(0, 2, 3, 1).reshape(b, h, size * c)            # [B, H, (size, C)]
    out = torch.matmul(r_h, u).view(b, size, size, c)            # [B, size, size, C]: NHWC in memory
    return out.permute(0, 3, 1, 2)                               # NCHW view with channels_last strides


class MatmulResizeInception(nn.Module):
    """Wraps a torch-fidelity FeatureExtractorInceptionV3 (its weights, layers and requested features)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.features_list = list(net.features_list)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {x.dtype} {tuple(x.shape)}")
        net, wanted, out = self.net, set(self.features_list), {}
        x = resize_to_inception(x, net.INPUT_IMAGE_SIZE, net.feature_extractor_internal_dtype)
        for names, tap in _STAGES:
            if not wanted - out.keys():
                break
            for name in names:
                x = getattr(net, name)(x)
            if tap == "2048":
                x = torch.flatten(x, 1)
                feature = x
            elif tap in wanted:
                feature = F.adaptive_avg_pool2d(x, output_size=(1, 1)).flatten(1)
            if tap in wanted:
                out[tap] = feature.to(torch.float32)
        if wanted & set(_LOGITS):
            if "logits_unbiased" in wanted:   # torch-fidelity: the product, then the bias added to it
                x = x.mm(net.fc.weight.T)
                out["logits_unbiased"] = x.to(torch.float32)
                x = x + net.fc.bias.unsqueeze(0)
            else:
                x = net.fc(x)
            out["logits"] = x.to(torch.float32)
        return tuple(out[f] for f in self.features_list)


def write_random_inception_weights(path, calibration_batches=(), device="cpu", seed: int = 0) -> None:
    """Write a seeded random state dict for torch-fidelity's InceptionV3, for tests and benches on machines
    that cannot fetch the real weights (same architecture and FLOPs; its FID values mean nothing).

    Its constructor insists on loading a weights file, so it is built once with loading stubbed out.
    Random convolutions with untouched batch-norm statistics give near-constant features; the running
    statistics are re-estimated on `calibration_batches` (uint8 [B, 3, H, W]) so features depend on images."""
    import tempfile
    from pathlib import Path

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3 as Inception

    original = Inception.load_state_dict
    empty = Path(tempfile.mkdtemp()) / "empty.pt"
    torch.save({}, empty)
    torch.manual_seed(seed)
    try:
        Inception.load_state_dict = lambda self, sd, *a, **k: None
        net = Inception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    finally:
        Inception.load_state_dict = original
        empty.unlink()
        empty.parent.rmdir()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None   # cumulative average over the calibration batches
    net.train().to(device)
    with torch.no_grad():
        for xb in calibration_batches:
            net(xb.to(device))
    torch.save({k: v.cpu() for k, v in net.state_dict().items()}, path)


# --- Weights files: loaded and checked by genbench, never unpickled by torch-fidelity -------------------------
#
# torch-fidelity loads a weights file with torch.load(path, weights_only=False): a crafted file runs code while
# it is unpickled. genbench reads the user's file itself with weights_only=True (no globals beyond tensors and
# plain containers), checks it is a state dict of exactly the tensors torch-fidelity's InceptionV3 holds, and
# hands torch-fidelity those tensors re-serialised by genbench into memory (a BytesIO, which torch.load takes in
# place of a path), so torch-fidelity's own constructor and load_state_dict build the network as before.

OFFICIAL_SHA256_PREFIX = "6726825d"   # torch-fidelity's weights-inception-2015-12-05-6726825d.pth carries it
_OPTIONAL_SUFFIX = ".num_batches_tracked"   # absent from torch-fidelity's converted file; unused in eval mode


class InceptionWeightsError(ValueError):
    """A weights file that is no InceptionV3 state dict (the message says why; the caller names the file)."""


@dataclass(frozen=True)
class VerifiedInceptionWeights:
    path: str
    sha256: str          # of the bytes that were checked
    official: bool       # sha256 starts with torch-fidelity's published prefix
    blob: bytes = field(repr=False)   # the checked tensors, serialised by genbench

    def open(self) -> io.BytesIO:
        """What torch-fidelity's `feature_extractor_weights_path` gets: genbench's own serialisation."""
        return io.BytesIO(self.blob)


@functools.cache
def expected_inception_state() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{key: (shape, dtype)} of torch-fidelity's FeatureExtractorInceptionV3 state dict, read off the module
    built on the meta device (nothing allocated) by a subclass whose load_state_dict does nothing."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3 as Inception

    class Unloaded(Inception):
        def load_state_dict(self, *args, **kwargs):
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.device("meta"):
        net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    return {k: (tuple(v.shape), v.dtype) for k, v in net.state_dict().items()}


def _refusal_reason(e: Exception) -> str:
    """torch.load's few-paragraph refusal as one short clause."""
    keep = []
    for line in str(e).splitlines():
        line = line.strip()
        if not line or line.startswith(("Weights only load failed", "Check the documentation")):
            continue
        line = line.split("WeightsUnpickler error:", 1)[-1].strip()
        keep.append(line.split(". ", 1)[0].rstrip("."))   # its first sentence
    reason = "; ".join(s for s in keep if s) or type(e).__name__
    return reason if len(reason) <= 200 else reason[:197] + "..."


def _shape(s) -> str:
    return "[" + ", ".join(map(str, s)) + "]"


def check_inception_state(obj) -> dict[str, torch.Tensor]:
    """The tensors of a loaded object that must be torch-fidelity's InceptionV3 state dict: exactly its keys
    (num_batches_tracked may be absent, as in torch-fidelity's own file), plain CPU tensors of its shapes,
    floating point (int64 counters), finite. Raises InceptionWeightsError naming the first offending key."""
    if not isinstance(obj, dict):
        raise InceptionWeightsError(f"it holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    expected = expected_inception_state()
    odd = [k for k in obj if not isinstance(k, str)]
    if odd:
        raise InceptionWeightsError(f"not a state dict: key {odd[0]!r} is not a string")
    missing = [k for k in expected if k not in obj and not k.endswith(_OPTIONAL_SUFFIX)]
    extra = [k for k in obj if k not in expected]
    for what, keys in (("missing", missing), ("unexpected", extra)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise InceptionWeightsError(f"not torch-fidelity's InceptionV3 state dict: {len(keys)} {what} "
                                        f"key{'s' if len(keys) > 1 else ''} ({shown})")
    out = {}
    for k, (shape, dtype) in expected.items():
        if k not in obj:
            continue
        t = obj[k]
        if type(t) not in (torch.Tensor, nn.Parameter):
            raise InceptionWeightsError(f"{k} is a {type(t).__name__}, not a tensor")
        if t.layout != torch.strided or t.device.type != "cpu" or t.is_quantized:
            raise InceptionWeightsError(f"{k} is not a plain dense tensor ({t.layout}, {t.device})")
        if tuple(t.shape) != shape:
            raise InceptionWeightsError(f"{k} has shape {_shape(t.shape)}, expected {_shape(shape)}")
        if dtype.is_floating_point:
            if not t.dtype.is_floating_point:
                raise InceptionWeightsError(f"{k} is {t.dtype}, expected floating point")
            if not bool(torch.isfinite(t).all()):
                raise InceptionWeightsError(f"{k} has non-finite values")
        elif t.dtype != dtype:
            raise InceptionWeightsError(f"{k} is {t.dtype}, expected {dtype}")
        out[k] = t.detach()
    return out


def _read_and_verify(path: str, f) -> VerifiedInceptionWeights:
    """Check the bytes of the open file `f` (hashed and loaded from one read, so both are of the same bytes)."""
    data = f.read()
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():   # e.g. "Detected pickle protocol 4": the refusal below says enough
            warnings.simplefilter("ignore")
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to load as plain tensors is the same refusal
        raise InceptionWeightsError(
            f"torch.load(weights_only=True) refused it ({_refusal_reason(e)}), so it was not loaded: it is not "
            f"a plain tensor file and may contain code") from None
    del data
    tensors = check_inception_state(obj)
    del obj
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return VerifiedInceptionWeights(path, sha256, sha256.startswith(OFFICIAL_SHA256_PREFIX), buf.getvalue())


_VERIFIED: dict[tuple, VerifiedInceptionWeights] = {}   # per process: one version of a file -> its checked weights


def verified_inception_weights(path) -> VerifiedInceptionWeights:
    """The checked weights of `path`, verified once per process per version of the file (its real path, inode,
    size and mtime, read off the open file whose bytes are checked). Raises InceptionWeightsError (or OSError)
    when the file cannot be used."""
    real = os.path.realpath(path)
    with open(real, "rb") as f:
        st = os.fstat(f.fileno())
        key = (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in _VERIFIED:
            for old in [k for k in _VERIFIED if k[0] == real]:   # an older version of the same file
                del _VERIFIED[old]
            _VERIFIED[key] = _read_and_verify(str(path), f)
    return _VERIFIED[key]
