"""Scoring: uint8 image batches (or 2-D points) -> extractor features -> metrics from the registry.

One path for every source of samples: a suite run's sampler, `genbench eval --samples` (files made
elsewhere) and `genbench eval --run` (a stored model re-sampled) all hand this package uint8 batches.
  extractor.py   the feature extractors (torch-fidelity's, on the right device, the Inception's forward)
  reference.py   reference features, cached on disk, and their FID statistics computed once
  score.py       features -> the registered metric groups (FID, IS, KID, precision/recall, modes)
  streams.py     a model's samples as batches, one seed per image
  likelihood.py  held-out metrics of a model (bits/dim and a family's own)
  provenance.py  where every number comes from
"""
from genbench.scoring.extractor import Extractor, build_extractor, extract
from genbench.scoring.likelihood import likelihood_metrics
from genbench.scoring.provenance import provenance
from genbench.scoring.reference import Reference, reference_features, wait_for_cache_writes
from genbench.scoring.score import fidelity_metrics, score_features, score_images, score_points
from genbench.scoring.streams import balanced_labels, sample_stream, uint8_batches

__all__ = ["Extractor", "build_extractor", "extract", "likelihood_metrics", "provenance", "Reference",
           "reference_features", "wait_for_cache_writes", "fidelity_metrics", "score_features", "score_images",
           "score_points", "balanced_labels", "sample_stream", "uint8_batches"]
