"""Feature extractors on a device: torch-fidelity's networks (the Inception with genbench's forward, the
domain classifiers), channels_last and optionally compiled on CUDA, fed uint8 batches."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch_fidelity.utils import create_feature_extractor

from genbench import evaluators
from genbench.device_metrics import full_fp32_matmul
from genbench.evaluators.classifier import file_sha256
from genbench.evaluators.inception import FORWARD_CODE, MatmulResizeInception
from genbench.fastpath import cudnn_autotune


@dataclass
class Extractor:
    spec: evaluators.ExtractorSpec
    module: torch.nn.Module
    sha256: str | None
    device: torch.device
    compiled: bool = False
    forward_code: str | None = None   # set where genbench's forward replaces torch-fidelity's (provenance)
    # cuDNN timing its convolution algorithms on each new shape: off, since the timing falls on a cold
    # evaluation's first batch and the extractor is no faster for it (bench/extractor_first_batch.py)
    cudnn_autotune: bool = False
    # A compiled extractor pads every smaller batch to the first batch's size: one graph, and no
    # recompilation for a run's last, partial batch (the networks are per-image in eval mode).
    _batch: int = field(default=0, repr=False)

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys([self.spec.fid_layer, self.spec.isc_layer]))

    @torch.no_grad()
    def __call__(self, x_uint8: torch.Tensor) -> dict[str, torch.Tensor]:
        # Standard NCHW strides: images decoded as NHWC (and any [N, 1, H, W] with channel stride 1) look
        # channels_last to torch, whose convolutions then round differently, so one set of pixels would
        # score differently by how it was loaded. A copy of a uint8 batch costs nothing beside the network.
        x, n = x_uint8.to(self.device).clone(memory_format=torch.contiguous_format), len(x_uint8)
        if self.compiled:
            self._batch = self._batch or n
            if n < self._batch:
                x = torch.cat([x, x.new_zeros((self._batch - n, *x.shape[1:]))])
        # the Inception's resize is a matmul: TF32 would round the pixels
        with full_fp32_matmul(), cudnn_autotune(self.cudnn_autotune):
            feats = self.module(x)
        return {k: v[:n].float() for k, v in zip(self.layers, feats)}


def build_extractor(name: str, device: torch.device, *, inception_weights=None, download=False,
                    compile: bool = False) -> Extractor:
    """torch-fidelity's extractor `name` on `device`; the Inception with genbench's forward (its input resize
    as two matmuls, `evaluators.inception`). On CUDA: channels_last, and with `compile`
    torch.compile, compiled on the first batch (H200, 50,000 Inception images at batch 500: 5.2 s instead
    of 8.5 s once compiled, for about 35 s of compilation in a machine's first process and about 9 s of
    importing and loading in a later one; bench/results/h200-eval-run4*.json)."""
    weights = evaluators.check_extractor(name, inception_weights=inception_weights, download=download)
    spec = evaluators.EXTRACTORS[name]
    layers = list(dict.fromkeys([spec.fid_layer, spec.isc_layer]))
    kwargs, sha256 = {}, None
    if name == evaluators.INCEPTION and weights:
        # torch-fidelity would torch.load(weights_only=False) the user's file: it gets the tensors genbench
        # loaded safely and checked instead (verified at plan time by check_extractor, once per process),
        # serialised by genbench into memory; its sha256 is that of the file's checked bytes
        verified = evaluators.verify_inception_weights(weights)
        kwargs["feature_extractor_weights_path"], sha256 = verified.open(), verified.sha256
    elif name == evaluators.INCEPTION:   # --download: torch-fidelity fetches its published file
        kwargs["feature_extractor_weights_path"] = None
    elif weights:
        sha256 = file_sha256(Path(weights))
    module = create_feature_extractor(spec.fidelity_name, layers, cuda=False, verbose=False, **kwargs).to(device)
    forward_code = None
    if name == evaluators.INCEPTION:   # its layers and weights, its input resize as two matmuls
        module, forward_code = MatmulResizeInception(module), FORWARD_CODE
    compiled = compile and device.type == "cuda"
    if device.type == "cuda":   # NHWC convolutions: faster on tensor-core GPUs, same math
        module = module.to(memory_format=torch.channels_last)
    if compiled:
        module = torch.compile(module, dynamic=False)
    return Extractor(spec, module, sha256, device, compiled, forward_code)


def extract(extractor: Extractor, batches: Iterable[torch.Tensor], to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """uint8 batches -> {layer: float32 [N, D]}, on the CPU or left on the extractor's device."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in extractor.layers}
    for xb in batches:
        for k, v in extractor(xb).items():
            out[k].append(v.cpu() if to_cpu else v)
    return {k: torch.cat(v) for k, v in out.items()}
