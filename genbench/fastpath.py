"""The GPU fast path for sampling, each part switchable: bf16 autocast, channels_last, torch.compile
(optionally with CUDA graphs through mode="reduce-overhead"). Nothing here changes what a family
computes, only how: the same seeds give the same images up to bf16 rounding.

On CUDA, cuDNN's autotuner (`cudnn.benchmark`) is on for sampling: it runs the same few shapes
thousands of times, so timing the convolution algorithms once per shape can pay. The feature extractor
runs with it off (`cudnn_autotune`, used by `evaluate.Extractor`): there the timing is paid once per
process on a cold evaluation's first batch and bought no extraction speed (bench/extractor_first_batch.py).

On CPU every part is off (bf16 autocast on CPU is slow and not what users run), except bf16 when
asked for explicitly with bf16_cpu: that is how bf16's effect on sample quality is checked on a
machine without a GPU (bench/bf16_vs_fp32_quality.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from genbench.config import COMPILE_MODES, TUNED

# COMPILE_MODES are torch.compile's own modes plus "tuned": CUDA graphs (as reduce-overhead) with
# inductor's coordinate-descent tuning of its generated kernels. On the DDPM CIFAR-10 UNet at batch 1024
# on an H200, cuDNN's convolutions took 45% of a step's GPU time and inductor's fused group-norm/SiLU/add
# kernels most of the rest (bench/results/h200-checks-run1.log); tuning those took the step from 39.0 to
# 35.0 ms (46% of the bf16 peak) for 163 s of compilation instead of 31 s (bench/results/h200-sampling.json).
# max-autotune adds template autotuning of convolutions and matmuls to the same tuning; it did not finish
# compiling within the bench's time limit there.
_TUNED_OPTIONS = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}


@dataclass(frozen=True)
class FastPath:
    bf16: bool = True             # autocast sampling to bf16 (CUDA only)
    channels_last: bool = True    # NHWC weights and activations (CUDA only, image models)
    compile: str = "off"          # torch.compile mode for the model's networks; opt-in
    bf16_cpu: bool = False        # also autocast on CPU (slow; for quality checks off a GPU)

    def uses_bf16(self, device) -> bool:
        return self.bf16 and (torch.device(device).type == "cuda" or self.bf16_cpu)

    def describe(self, device: torch.device) -> dict:
        on_cuda = torch.device(device).type == "cuda"
        return {"bf16": self.uses_bf16(device), "channels_last": self.channels_last and on_cuda,
                "compile": self.compile}


def tune_cudnn(device) -> None:
    """Let cuDNN time its convolution algorithms per shape (CUDA only; process-wide)."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True


@contextlib.contextmanager
def cudnn_autotune(on: bool):
    """cuDNN's autotuner on or off for the block (process-wide flag, restored after)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def prepare(model: torch.nn.Module, device, fp: FastPath) -> torch.nn.Module:
    """Apply memory format and compilation to `model` in place; returns it."""
    on_cuda = torch.device(device).type == "cuda"
    tune_cudnn(device)
    if on_cuda and fp.channels_last and getattr(model, "spec", None) is not None and model.spec.is_image:
        model.to(memory_format=torch.channels_last)
    compile_networks(model, fp.compile)
    return model


def compile_networks(model: torch.nn.Module, mode: str) -> list[str]:
    """torch.compile each child network of `model` in place (static shapes), in `mode`; returns the
    children's names. The calling loop (sampling, a training step) stays Python and every network call
    inside it runs the compiled graph (with CUDA graphs under reduce-overhead and tuned). "off": nothing."""
    if mode == "off":
        return []
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {COMPILE_MODES}")
    how = {"options": _TUNED_OPTIONS} if mode == TUNED else {"mode": mode}
    names = []
    for name, child in model.named_children():
        if any(True for _ in child.parameters()):
            child.compile(dynamic=False, **how)
            names.append(name)
    return names


def uncompile_networks(model: torch.nn.Module, names) -> None:
    """Undo compile_networks for these children (their eager forward again; weights untouched)."""
    for name in names:
        child = getattr(model, name, None)
        if child is not None and hasattr(child, "_compiled_call_impl"):
            child._compiled_call_impl = None


def uses_cudagraphs(mode: str) -> bool:
    """Whether a compile mode captures CUDA graphs (then each training step marks its start)."""
    return mode in ("reduce-overhead", TUNED, "max-autotune")


def autocast(device, fp: FastPath):
    if fp.uses_bf16(device):
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
