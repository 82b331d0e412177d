"""Closed-form baselines: linear, task arithmetic, NRE, model stock (ALGORITHMS.md section 5)."""

from __future__ import annotations

import jax.numpy as jnp

from manifold_merge.manifolds.base import safe_div, safe_norm
from manifold_merge.merging.registry import register


def weighted_sum(weights, points, normalize: bool):
    """sum_i w_i x_i (divided by sum_i w_i if ``normalize``), as one ``w @ X``."""
    total = weights @ points
    return total / jnp.sum(weights) if normalize else total


@register("linear", defaults={"normalize": True}, uses_base=False)
def linear(points, base, weights, key, normalize=True):
    """Model soup: sum_i w_i theta_i / sum_i w_i (mergekit ``linear``; ``normalize=False``
    skips the division). A base model is ignored."""
    del base, key
    return weighted_sum(weights, points, normalize), {}


@register(
    "task_arithmetic",
    defaults={"lambda": 1.0, "normalize": False},
    requires_base=True,
    negative_weights=True,
)
def task_arithmetic(points, base, weights, key, normalize=False, **kw):
    """theta_0 + lambda sum_i w_i (theta_i - theta_0), mergekit's defaults (weights not
    normalised unless ``normalize=True``; negative weights negate a task)."""
    del key
    return base + kw["lambda"] * weighted_sum(weights, points - base, normalize), {}


@register("nre", defaults={})
def nre(points, base, weights, key):
    """Norm-rescaled Euclidean: the weighted average rescaled to sum_i a_i ||theta_i||
    (a = normalised weights); with a base, on task vectors. The baseline Karcher must beat:
    for close experts the Karcher direction and the normalised average nearly coincide."""
    del key
    vecs = points if base is None else points - base
    a = weights / jnp.sum(weights)
    avg = a @ vecs
    norm = a @ jnp.sqrt(jnp.sum(jnp.square(vecs), axis=1))
    out = avg * safe_div(norm, safe_norm(avg), 0.0)
    return (out if base is None else base + out), {}


@register("model_stock", defaults={}, requires_base=True, num_models=(2, None))
def model_stock(points, base, weights, key):
    """Model Stock (Jang et al. 2024): t = N cos(phi) / (1 + (N - 1) cos(phi)), cos(phi) the mean
    pairwise cosine of the task vectors (per block), theta = t avg_w(theta_i) + (1 - t) theta_0.
    The average honours the weights; the angle estimate is unweighted, as in mergekit."""
    del key
    n = points.shape[0]
    tv = points - base
    norms = jnp.sqrt(jnp.sum(jnp.square(tv), axis=1))
    units = tv / jnp.where(norms > 0, norms, 1.0)[:, None]
    cos = units @ units.T
    iu = jnp.triu_indices(n, 1)
    c = jnp.mean(cos[iu])
    t = safe_div(n * c, 1.0 + (n - 1) * c, 0.0)
    avg = weighted_sum(weights, points, True)
    return t * avg + (1.0 - t) * base, {}
