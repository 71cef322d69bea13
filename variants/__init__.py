"""The objective variants, one module each, found by name.

Every module in this package defines one :class:`bench.diffusion.variant.Variant` subclass; importing the
package registers them all, so adding a variant means adding one module and nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil

from bench.diffusion.variant import Variant
from bench.errors import check_choice


def _discover() -> dict[str, type[Variant]]:
    found: dict[str, type[Variant]] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Variant) and obj.__module__ == module.__name__:
                if obj.name in found:
                    raise RuntimeError(f"two variants are named {obj.name!r}: {found[obj.name]} and {obj}")
                found[obj.name] = obj
    return found


VARIANTS: dict[str, type[Variant]] = _discover()


def get_variant(name: str, variance: str | None = None, **options) -> Variant:
    """A fresh instance of the variant ``name``; ``variance`` ('small' = β̃, 'large' = β) only for
    fixed-variance variants (default β̃); ``options`` what else its constructor takes (a weighted variant's
    ``weighting`` and ``adaptive``)."""
    check_choice("variant", name, sorted(VARIANTS))
    return VARIANTS[name](variance=variance, **options)


__all__ = ["VARIANTS", "Variant", "get_variant"]
