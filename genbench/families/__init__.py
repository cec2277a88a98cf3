"""Family registry. A family is one module here that registers itself with `@register_family`;
adding one is the module plus its name in FAMILY_MODULES. Modules load on first lookup, so
`genbench list` and the data loader do not pay for importing every network."""
from __future__ import annotations

import importlib

from genbench.families.base import FAMILIES, Batch, DataSpec, GenerativeModel, Phase, register_family

FAMILY_MODULES: tuple[str, ...] = ("vae", "gan", "diffusion", "vqvae")

__all__ = ["Batch", "DataSpec", "GenerativeModel", "Phase", "register_family", "get_family", "families"]


def families() -> dict[str, type[GenerativeModel]]:
    for m in FAMILY_MODULES:
        importlib.import_module(f"genbench.families.{m}")
    return FAMILIES


def get_family(name: str) -> type[GenerativeModel]:
    known = families()
    if name not in known:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(sorted(known))}")
    return known[name]
