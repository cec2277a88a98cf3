"""Where every number comes from: the extractor and its weights hash, how it ran, the sample counts,
the reference split, image size, versions, device and seed."""
from __future__ import annotations

import math
import platform

import torch

from genbench.device_metrics import METRIC_CODE
from genbench.modes import MODES_CODE


def provenance(extractor, *, n_real: int | None, n_fake: int, ref_split: str,
               image_size, device, seed: int) -> dict:
    import torch_fidelity

    import genbench

    return {
        "extractor": extractor.spec.name if extractor else "mixture-modes",
        "extractor_sha256": extractor.sha256 if extractor else None,
        "extractor_compiled": extractor.compiled if extractor else None,   # compiled kernels round differently
        "extractor_forward": extractor.forward_code if extractor else None,
        "prc_features": extractor.spec.fid_layer if extractor else None,
        "metric_code": METRIC_CODE if extractor else None,
        "modes_code": MODES_CODE if extractor is not None and extractor.spec.num_modes else None,
        "n_real": n_real, "n_fake": n_fake, "ref_split": ref_split, "image_size": image_size,
        "versions": {"genbench": genbench.__version__, "torch": torch.__version__,
                     "torch_fidelity": torch_fidelity.__version__, "python": platform.python_version()},
        "device": str(device) if str(device) == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "device_model": device_model(device),
        "seed": seed,
    }


def device_model(device) -> str:
    """What the device is, for comparing timings across runs: the GPU's name, or the CPU's model name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def finite(d: dict) -> bool:
    return all(not isinstance(v, float) or math.isfinite(v) for v in d.values())
