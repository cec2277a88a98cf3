"""Feature extractors the harness scores samples with, all registered with torch-fidelity.

An extractor entry says which torch-fidelity name builds it, which of its features feed FID/KID/PRC
and which feed IS, and how many modes its logits count (None: its logits are not modes of the data).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from genbench.errors import UserError, WeightsNotFound
from genbench.evaluators import classifier, inception

INCEPTION = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's cache file name
INCEPTION_ENV = "GENBENCH_INCEPTION_WEIGHTS"


@dataclass(frozen=True)
class ExtractorSpec:
    name: str                 # genbench's name (suite `eval.extractor`)
    fidelity_name: str        # torch-fidelity's registry name
    fid_layer: str
    isc_layer: str
    num_modes: int | None     # logits count data modes (domain classifiers)
    weights: str | None       # file whose sha256 goes into provenance; None: resolved at build time


EXTRACTORS: dict[str, ExtractorSpec] = {}


def register_extractor(spec: ExtractorSpec, cls: type[FeatureExtractorBase] | None = None) -> None:
    """Add an extractor; `cls` is registered with torch-fidelity under spec.fidelity_name if given."""
    if spec.name in EXTRACTORS and EXTRACTORS[spec.name] != spec:
        raise ValueError(f"extractor {spec.name!r} is already registered")
    if cls is not None and spec.fidelity_name not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(spec.fidelity_name, cls)
    EXTRACTORS[spec.name] = spec


register_extractor(ExtractorSpec(INCEPTION, INCEPTION, "2048", "logits_unbiased", None, None))
for _name, _cls, _modes in (("digits", classifier.DigitsExtractor, 10),
                            ("fashion", classifier.FashionExtractor, 10),
                            ("fashion-stacked", classifier.FashionStackedExtractor, 1000)):
    register_extractor(ExtractorSpec(_name, f"genbench-{_name}", "features", "logits", _modes,
                                     str(classifier.weights_path(_cls.dataset))), _cls)

# Which extractor scores a dataset when a suite says `extractor: auto`.
AUTO_EXTRACTOR = {"digits": "digits", "fashion": "fashion", "stacked-fashion": "fashion-stacked"}


def auto_extractor(dataset: str) -> str:
    return AUTO_EXTRACTOR.get(dataset, INCEPTION)


def _locate_inception_weights(explicit: str | Path | None, download: bool) -> tuple[str, str | None]:
    """(where it came from, path): --inception-weights, else $GENBENCH_INCEPTION_WEIGHTS, else torch-fidelity's
    cache; path None means 'let torch-fidelity download' and is only allowed with --download."""
    for source, p in (("--inception-weights", explicit), (INCEPTION_ENV, os.environ.get(INCEPTION_ENV))):
        if p:
            if not Path(p).is_file():
                raise WeightsNotFound(f"{source}: Inception weights file {p} does not exist")
            return source, str(p)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return "torch-fidelity's weights cache", str(cached)
    if download:
        return "--download", None
    raise WeightsNotFound(f"Inception weights not found (looked in {cached}); pass --inception-weights PATH "
                          f"or set {INCEPTION_ENV}=PATH (or add --download when online)")


def resolve_inception_weights(explicit: str | Path | None, download: bool) -> str | None:
    """The Inception weights file to use (see _locate_inception_weights); None: torch-fidelity downloads them."""
    return _locate_inception_weights(explicit, download)[1]


def verify_inception_weights(path: str | Path, source: str = "Inception weights") -> inception.VerifiedInceptionWeights:
    """Load a user's Inception weights file safely (torch.load weights_only=True: no code runs) and check it is
    exactly torch-fidelity's InceptionV3 state dict; cached per process per version of the file. Anything
    wrong is one WeightsNotFound line naming the file. torch-fidelity only ever gets the checked tensors."""
    try:
        return inception.verified_inception_weights(path)
    except inception.InceptionWeightsError as e:
        raise WeightsNotFound(f"{source}: Inception weights file {path} not used: {e}") from None
    except OSError as e:
        raise WeightsNotFound(f"{source}: Inception weights file {path} cannot be read: "
                              f"{e.strerror or e}") from None


def check_extractor(name: str, *, inception_weights=None, download: bool = False) -> str | None:
    """Fail early (before any training) when an extractor cannot be built; returns its weights path."""
    if name not in EXTRACTORS:
        raise UserError(f"unknown extractor {name!r}; choose one of: {', '.join(sorted(EXTRACTORS))}")
    spec = EXTRACTORS[name]
    if name == INCEPTION:   # the file is loaded (safely) and checked here, at plan time, before any training
        source, path = _locate_inception_weights(inception_weights, download)
        if path is not None:
            verify_inception_weights(path, source)
        return path
    if spec.weights and not Path(spec.weights).is_file():
        raise WeightsNotFound(f"no weights for extractor {name!r} at {spec.weights}; "
                              f"train them with `genbench evaluator train --dataset {name.split('-')[0]}`")
    return spec.weights
