"""Reference features: extracted once per dataset, split, size, count and extractor weights, cached on
disk (a thread writes the file while the run goes on), and kept on the extractor's device with their
FID statistics computed once (`Reference`).

Under torchrun at world N > 1 only rank 0 reads and writes the cache, and only rank 0 gets the features
(it alone scores); on a cache miss every rank extracts its block of the reference's batches
(genbench.distributed.shard: the batches one process extracts) and rank 0 gathers them in image order."""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from genbench.data import Data
from genbench.device_metrics import ReferenceStats, reference_statistics
from genbench.scoring.extractor import Extractor, extract
from genbench.store import atomic_torch_save


# Reference-cache files being written by a background thread, by path.
_cache_writes: dict[Path, threading.Thread] = {}


def reference_features(extractor: Extractor, data: Data, n_real: int | None, cache_dir: Path | None,
                       batch_size: int = 500, progress: bool = False) -> dict[str, torch.Tensor]:
    """{layer: float32 [N, D]} of the first `n_real` images of `data`, on the extractor's device.

    Read from the disk cache when it has them; else extracted, and the cache file written by a thread
    while the caller goes on (50,000 Inception features are 611 MB: about 2.5 s of writing and fsync on
    the 2-core CPU, work a cold evaluation no longer waits for).

    At world N > 1 (torchrun) every rank must call this; rank 0 gets the features and the others None."""
    from genbench import distributed as gdist

    n = len(data) if n_real is None else min(n_real, len(data))
    key = (f"{data.name}-{data.split}-{tuple(data.x.shape[1:])}-{n}-{extractor.spec.name}-"
           f"{(extractor.sha256 or 'nohash')[:16]}.pt").replace(" ", "").replace("/", "_")
    path = Path(cache_dir) / key if cache_dir else None
    dist = gdist.current()
    main = dist is None or dist.main
    cached = None
    if main and path is not None and path in _cache_writes:   # written by this process a moment ago
        _cache_writes.pop(path).join()
    if main and path is not None and path.is_file():
        cached = _read_cache(path, extractor, n)
    if dist is not None:
        hit = gdist.broadcast_object(cached is not None)
        if hit:
            return cached if main else None
    elif cached is not None:
        return cached
    lo, hi = (0, n) if dist is None else gdist.shard(n, batch_size)
    # Inception on a CPU extracts a few images a second: 50,000 reference images take hours, so show it
    bar = tqdm(total=hi - lo, desc=f"reference features ({data.name} {data.split})", unit="img", disable=not progress,
               leave=False)

    def counted_batches():   # tqdm's update() returns True when it redraws: never chain on its value
        for i in range(lo, hi, batch_size):
            xb = data.x[i:min(i + batch_size, hi)]
            yield xb
            bar.update(len(xb))

    if dist is None:
        feats = extract(extractor, counted_batches(), to_cpu=False)
    else:
        mine = extract(extractor, counted_batches(), to_cpu=False) if hi > lo else {}
        feats = {k: gdist.gather_rows(mine.get(k), extractor.device) for k in extractor.layers}
        if not main:
            bar.close()
            return None
    bar.close()
    if path is not None:
        host = {k: v.cpu() for k, v in feats.items()}   # one copy now: the thread never touches the device
        thread = threading.Thread(target=_write_cache, args=(path, host), name=f"genbench cache {key}")
        thread.start()   # not a daemon: the interpreter waits for it before exiting
        _cache_writes[path] = thread
    return feats


def _read_cache(path: Path, extractor: Extractor, n: int) -> dict[str, torch.Tensor] | None:
    """The cached features, or None after setting aside a file that is not a complete cache of them
    (truncated, garbage, other layers or counts): the caller extracts again and rewrites it."""
    try:
        feats = torch.load(path, map_location=extractor.device, weights_only=True)
        if not isinstance(feats, dict) or set(feats) != set(extractor.layers) or \
                any(not isinstance(v, torch.Tensor) or v.dim() != 2 or len(v) != n for v in feats.values()):
            raise ValueError(f"not {n} features of layers {extractor.layers}")
        return feats
    except Exception as e:  # noqa: BLE001 - a cache: set it aside and rebuild, never fail the run on it
        from genbench.store import set_aside

        moved = set_aside(path)
        print(f"genbench: reference-feature cache {path} could not be read ({type(e).__name__}: {str(e)[:200]}); "
              f"moved to {moved.name}, extracting again", file=sys.stderr)
        return None


def _write_cache(path: Path, feats: dict[str, torch.Tensor]) -> None:
    try:
        atomic_torch_save(path, feats)
    except OSError as e:   # a cache: the run goes on without it, and the next run extracts again
        print(f"genbench: warning: reference features not cached at {path}: {e}", file=sys.stderr)


def wait_for_cache_writes() -> None:
    """Block until every reference-cache file this process started writing is on disk."""
    while _cache_writes:
        _cache_writes.pop(next(iter(_cache_writes))).join()


@dataclass
class Reference:
    """Reference features on one device, with the FID statistics of each layer (mean, covariance and the
    covariance's square root) computed once.

    An evaluation point used to recompute the reference mean and covariance from its features every
    time: 5 s of the 16 s FID stage for 50,000 x 2048 features on the 2-core CPU, with torch-fidelity's
    functions (bench/results/cpu-metric-cost-50k-torch-fidelity-prc.json); a run scores many points."""
    feats: dict[str, torch.Tensor]
    _fid_stats: dict[str, ReferenceStats] = field(default_factory=dict, repr=False)

    @classmethod
    def on(cls, device: torch.device, feats: dict[str, torch.Tensor]) -> "Reference":
        return cls({k: v.to(device) for k, v in feats.items()})

    def __getitem__(self, layer: str) -> torch.Tensor:
        return self.feats[layer]

    def fid_stats(self, layer: str) -> ReferenceStats:
        if layer not in self._fid_stats:
            self._fid_stats[layer] = reference_statistics(self.feats[layer])
        return self._fid_stats[layer]
