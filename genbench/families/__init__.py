"""Family registry. A card's `family:` is one of
  * a built-in family: a module here that registers itself with `@register_family` (FAMILY_MODULES);
  * a name an installed package registers under the entry-point group `genbench.families`
    (`[project.entry-points."genbench.families"] myfam = "my_pkg.models:MyGAN"`);
  * an import path `package.module:Class` to a GenerativeModel subclass.
Modules load on first lookup, so `genbench list` and the data loader do not pay for importing every
network, and a worker process (spawned, importing nothing of its parent) resolves the same name the
same way.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from genbench.errors import UserError
from genbench.families.base import (FAMILIES, Batch, DataSpec, GenerativeModel, Phase, register_declared_metrics,
                                    register_family)

FAMILY_MODULES: tuple[str, ...] = ("vae", "gan", "diffusion", "vqvae")
ENTRY_POINT_GROUP = "genbench.families"

__all__ = ["Batch", "DataSpec", "GenerativeModel", "Phase", "register_family", "get_family", "families",
           "resolve_family", "FamilyError"]


class FamilyError(UserError):
    """A card's family that cannot be resolved to a GenerativeModel (one line, exit 2)."""


def builtin_families() -> dict[str, type[GenerativeModel]]:
    for m in FAMILY_MODULES:
        importlib.import_module(f"genbench.families.{m}")
    return FAMILIES


def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def families() -> dict[str, type[GenerativeModel]]:
    """Built-in families and every installed entry point that loads (by name)."""
    out = dict(builtin_families())
    for name in _entry_points():
        if name not in out:
            try:
                out[name] = resolve_family(name)
            except FamilyError:
                continue
    return out


def _check_class(obj, what: str, where: str) -> type[GenerativeModel]:
    if not (isinstance(obj, type) and issubclass(obj, GenerativeModel)):
        raise FamilyError(f"{where}{what} is {obj!r}, not a genbench GenerativeModel subclass")
    try:
        register_declared_metrics(obj)   # a plug-in's own metrics, known to list, report and gate
    except (TypeError, ValueError, AttributeError) as e:
        raise FamilyError(f"{where}{what}: its declared_metrics cannot be registered ({e})") from None
    return obj


def resolve_family(name: str, where: str = "") -> type[GenerativeModel]:
    """The class a card's `family:` names; FamilyError (naming the module and `where`, the card file) when
    it does not import or is not a GenerativeModel."""
    at = f"{where}: " if where else ""
    if not isinstance(name, str) or not name.strip():
        raise FamilyError(f"{at}family must be a non-empty string, got {name!r}")
    known = builtin_families()
    if name in known:
        return known[name]
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            module = importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - any import failure is the card's problem, said in one line
            raise FamilyError(f"{at}family {name!r}: module {mod!r} does not import "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        obj = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise FamilyError(f"{at}family {name!r}: module {mod!r} has no {attr!r}")
            obj = getattr(obj, part)
        cls = _check_class(obj, f"family {name!r}", at)
        return cls
    eps = _entry_points()
    if name in eps:
        try:
            obj = eps[name].load()
        except Exception as e:  # noqa: BLE001
            raise FamilyError(f"{at}family {name!r}: entry point {eps[name].value!r} (group {ENTRY_POINT_GROUP}) "
                              f"fails to load ({type(e).__name__}: {e})") from None
        cls = _check_class(obj, f"entry point {name!r}", at)
        return cls
    choices = sorted(set(known) | set(eps))
    raise FamilyError(f"{at}unknown family {name!r}; known: {', '.join(choices)} "
                      "(or an import path package.module:Class)")


def get_family(name: str) -> type[GenerativeModel]:
    return resolve_family(name)
