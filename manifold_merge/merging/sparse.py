"""Sparsified task arithmetic: TIES, DARE (ALGORITHMS.md section 5, mergekit's semantics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from manifold_merge.merging.registry import REQUIRED, register

CONSENSUS = ("sum", "count")


def magnitude_prune(tv, density: float):
    """Keep the k = floor(density * D) largest-|.| entries of each row of (N, D) task vectors."""
    d = tv.shape[1]
    k = int(density * d)
    if density >= 1.0:
        return tv
    if k == 0:
        return jnp.zeros_like(tv)
    threshold_idx = jax.lax.top_k(jnp.abs(tv), k)[1]
    mask = jnp.zeros_like(tv, dtype=bool)
    mask = jax.vmap(lambda m, i: m.at[i].set(True))(mask, threshold_idx)
    return jnp.where(mask, tv, 0.0)


def dare_drop(tv, density: float, key, rescale: bool):
    """Drop each entry with probability 1 - density (seeded) and rescale by 1/density."""
    if density >= 1.0:
        return tv
    keep = jax.random.bernoulli(key, density, tv.shape)
    out = jnp.where(keep, tv, 0.0)
    return out / density if rescale else out


def sign_consensus(deltas, weights, method: str, normalize: bool):
    """TIES' elected-sign disjoint merge of weighted deltas (N, D), mergekit's rules: the sign
    of sum_i w_i tau_i ("sum") or of the count of signs ("count"), 0 counting as +; entries that
    agree with it are summed and, with ``normalize``, divided by the weights that contributed."""
    if method not in CONSENSUS:
        raise ValueError(f"consensus must be one of {CONSENSUS}, got {method!r}")
    weighted = deltas * weights[:, None]
    votes = jnp.sum(weighted, 0) if method == "sum" else jnp.sum(jnp.sign(weighted), 0)
    sign = jnp.where(votes >= 0, 1.0, -1.0)
    mask = jnp.sign(weighted) == sign
    mixed = jnp.sum(jnp.where(mask, weighted, 0.0), 0)
    if normalize:
        divisor = jnp.sum(jnp.where(mask, weights[:, None], 0.0), 0)
        mixed = mixed / jnp.where(divisor == 0, 1.0, divisor)
    return mixed


def _check_density(params, weights, n, has_base):
    d = params["density"]
    if not isinstance(d, (int, float)) or not 0 < d <= 1:
        raise ValueError(f"density must be a number in (0, 1], got {d!r}")


@register(
    "ties",
    defaults={"density": REQUIRED, "lambda": 1.0, "normalize": True, "consensus": "sum"},
    requires_base=True,
    negative_weights=True,
    check=_check_density,
)
def ties(points, base, weights, key, density=1.0, normalize=True, consensus="sum", **kw):
    """TIES-merging: trim each task vector to its top ``density`` fraction by magnitude, elect a
    sign per coordinate, average the agreeing entries (disjoint mean), theta_0 + lambda tau_m.
    Weights are applied before the election, as in mergekit."""
    del key
    tv = magnitude_prune(points - base, float(density))
    return base + kw["lambda"] * sign_consensus(tv, weights, consensus, normalize), {}


@register(
    "dare_linear",
    defaults={"density": REQUIRED, "lambda": 1.0, "normalize": False, "rescale": True},
    requires_base=True,
    negative_weights=True,
    check=_check_density,
)
def dare_linear(points, base, weights, key, density=1.0, normalize=False, rescale=True, **kw):
    """DARE then task arithmetic: each task-vector entry kept with probability ``density`` and
    rescaled by 1/density (reproducible from ``seed``)."""
    keys = jax.random.split(key, points.shape[0])
    tv = jax.vmap(lambda t, k: dare_drop(t, float(density), k, rescale))(points - base, keys)
    total = weights @ tv
    if normalize:
        total = total / jnp.sum(weights)
    return base + kw["lambda"] * total, {}


@register(
    "dare_ties",
    defaults={
        "density": REQUIRED,
        "lambda": 1.0,
        "normalize": True,
        "rescale": True,
        "consensus": "sum",
    },
    requires_base=True,
    negative_weights=True,
    check=_check_density,
)
def dare_ties(
    points, base, weights, key, density=1.0, normalize=True, rescale=True, consensus="sum", **kw
):
    """DARE's random drop and rescale, then TIES' sign election and disjoint mean."""
    keys = jax.random.split(key, points.shape[0])
    tv = jax.vmap(lambda t, k: dare_drop(t, float(density), k, rescale))(points - base, keys)
    return base + kw["lambda"] * sign_consensus(tv, weights, consensus, normalize), {}
