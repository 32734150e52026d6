"""Name registries: build an object by the name it was registered under.

A neutral home that every layer (tasks, optimizers, controllers, meta-networks) imports, so that none of them has
to import another's package for this one helper. A registry is a plain ``dict`` from a lowercase name to a
constructor.
"""
from __future__ import annotations

from typing import Any


def from_registry(registry: dict, name: str, what: str, **kwargs: Any):
    """Build ``registry[name.lower()](**kwargs)``; an unknown name raises ``ValueError`` listing the known."""
    key = str(name).lower()
    if key not in registry:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(sorted(registry))}")
    return registry[key](**kwargs)
