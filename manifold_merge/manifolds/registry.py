"""Manifolds by name, so configs can choose them (``manifold="sphere"``, ``manifold_kwargs``)."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from manifold_merge.manifolds.base import AbstractManifold

_REGISTRY: dict[str, type[AbstractManifold]] = {}


def register_manifold(name: str) -> Callable[[type], type]:
    """Class decorator that makes a manifold constructible by ``name`` from configs.

    Example:
        >>> from manifold_merge.manifolds import Euclidean, register_manifold
        >>> @register_manifold("my_flat")
        ... class MyFlat(Euclidean):
        ...     pass
        >>> from manifold_merge.manifolds import get_manifold
        >>> get_manifold("my_flat", dim=3)
        MyFlat(dim=3)
    """

    def decorate(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, AbstractManifold)):
            raise TypeError(f"register_manifold({name!r}) needs an AbstractManifold subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a manifold is already registered as {name!r}: {_REGISTRY[name]}")
        _REGISTRY[name] = cls
        return cls

    return decorate


def get_manifold(name: str, **kwargs) -> AbstractManifold:
    """Build the manifold registered as ``name`` with ``kwargs`` (its dataclass fields)."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(
            f"unknown manifold {name!r}; registered: {sorted(_REGISTRY)}.{hint}"
        ) from None
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise TypeError(f"manifold {name!r} ({cls.__name__}): {err}") from None


def list_manifolds() -> list[str]:
    """Names of the registered manifolds, sorted."""
    return sorted(_REGISTRY)
