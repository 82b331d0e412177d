"""Merge methods by name: each is one block function plus its documented parameters."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Any

_METHODS: dict[str, MethodSpec] = {}


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A registered merge method.

    Attributes:
        name: the method's name (mergekit's where the method exists there).
        block_fn: ``fn(points, base, weights, key, **params) -> (merged, info)`` on one block:
            ``points`` (N, D) float32, ``base`` (D,) or None, raw per-model ``weights`` (N,),
            a PRNG ``key``; returns the merged (D,) block and a dict of scalar diagnostics
            (``num_steps``, ``grad_norm``, ``converged`` for iterative methods).
        defaults: every parameter the method accepts, with its default.
        requires_base: the method needs a base model (task vectors).
        uses_base: the method uses a base model when one is given.
        num_models: (min, max) number of models, max None for unbounded.
        negative_weights: the method accepts negative per-model weights (task negation).
        check: optional ``check(params, weights, num_models, has_base)`` run outside jit that
            raises ``ValueError`` for settings the method cannot honour.
        stats: names of per-model statistics the method takes as pytrees shaped like the
            models (e.g. ``"fishers"``); :func:`merge` blocks them like the parameters and
            passes each block's (N, D) array to ``block_fn`` as a keyword argument.
        required_stats: those of ``stats`` the method cannot run without.
        stat_shapes_free: statistics may have other shapes than the leaf (e.g. RegMean's
            (d_in, d_in) Grams); they are then passed whole, with granularity "tensor".
        lora: a LoRA method: ``block_fn(factors, weights, key, **params) -> (LoraFactors,
            info)`` on the list of one module's :class:`~manifold_merge.manifolds.LoraFactors`
            (scaling folded into ``b``; ranks may differ), applied to the ``LoraFactors``
            leaves of the adapters.
    """

    name: str
    block_fn: Callable
    defaults: dict[str, Any]
    requires_base: bool = False
    uses_base: bool = True
    num_models: tuple[int, int | None] = (1, None)
    negative_weights: bool = False
    check: Callable | None = None
    stats: tuple[str, ...] = ()
    required_stats: tuple[str, ...] = ()
    stat_shapes_free: bool = False
    lora: bool = False


#: Default of a parameter the user must set (e.g. TIES' ``density``).
REQUIRED = "<required>"


def register(
    name: str,
    *,
    defaults: dict[str, Any] | None = None,
    requires_base: bool = False,
    uses_base: bool = True,
    num_models: tuple[int, int | None] = (1, None),
    negative_weights: bool = False,
    check: Callable | None = None,
    stats: tuple[str, ...] = (),
    required_stats: tuple[str, ...] = (),
    stat_shapes_free: bool = False,
    lora: bool = False,
) -> Callable[[Callable], Callable]:
    """Decorator registering ``block_fn`` as merge method ``name``.

    Example:
        >>> import jax.numpy as jnp
        >>> from manifold_merge.merging import register, merge
        >>> @register("first_model")
        ... def first_model(points, base, weights, key):
        ...     return points[0], {}
        >>> merge("first_model", [{"w": jnp.ones(2)}, {"w": jnp.zeros(2)}]).params["w"]
        Array([1., 1.], dtype=float32)
    """

    def decorate(fn: Callable) -> Callable:
        if name in _METHODS and _METHODS[name].block_fn is not fn:
            raise ValueError(f"a merge method is already registered as {name!r}")
        _METHODS[name] = MethodSpec(
            name=name,
            block_fn=fn,
            defaults=dict(defaults or {}),
            requires_base=requires_base,
            uses_base=uses_base,
            num_models=num_models,
            negative_weights=negative_weights,
            check=check,
            stats=tuple(stats),
            required_stats=tuple(required_stats),
            stat_shapes_free=stat_shapes_free,
            lora=lora,
        )
        return fn

    return decorate


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` registered as ``name`` (KeyError with the closest name)."""
    try:
        return _METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(name, _METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown merge method {name!r}; known: {list_methods()}.{hint}") from None


def list_methods() -> list[str]:
    """Names of the registered merge methods, sorted."""
    return sorted(_METHODS)
