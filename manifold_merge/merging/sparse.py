"""Sparsified task arithmetic: TIES, DARE (ALGORITHMS.md section 5, mergekit's semantics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from manifold_merge.merging.registry import REQUIRED, register
from manifold_merge.sharding import axis_offset, over_parameter_axis

CONSENSUS = ("sum", "count")


def magnitude_prune(tv, density: float):
    """Keep the k = floor(density * D) largest-|.| entries of each row of (N, D) task vectors;
    of entries tied at the k-th magnitude, the first in index order (``lax.top_k``'s rule).

    The k-th magnitude is found by bisection on the bit patterns of |tv| (which order like the
    values): one count per bit, fused passes over the data instead of a sort (3-9x faster
    than ``top_k`` for D = 1.6e6 measured), and the counts are plain sums, so when the
    parameter axis is split over devices (:mod:`manifold_merge.sharding`) each device counts
    its own entries and the counts are added."""
    d = tv.shape[1]
    k = int(density * d)
    if density >= 1.0:
        return tv
    if k == 0:
        return jnp.zeros_like(tv)
    bits_dtype = jnp.uint64 if tv.dtype == jnp.float64 else jnp.uint32
    bits = jax.lax.bitcast_convert_type(jnp.abs(tv).astype(tv.dtype), bits_dtype)
    nbits = jnp.iinfo(bits_dtype).bits

    def bisect(_, lohi):  # invariant: count(bits >= lo) >= k > count(bits >= hi)
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(bits >= mid[:, None], axis=1) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    n = tv.shape[0]
    top = jnp.asarray(jnp.iinfo(bits_dtype).max, bits_dtype)
    lo, _ = jax.lax.fori_loop(
        0, nbits, bisect, (jnp.zeros(n, bits_dtype), jnp.full(n, top, bits_dtype))
    )
    threshold = lo[:, None]  # the bits of the k-th largest magnitude of each row
    above = bits > threshold
    room = k - jnp.sum(above, axis=1)  # how many of the tied entries are kept
    tied = bits == threshold
    rank = over_parameter_axis(_tie_rank, tied, replicated=False)
    return jnp.where(above | (tied & (rank <= room[:, None])), tv, 0.0)


def _tie_rank(axis, tied):
    """1-based index-order rank of each tied entry among its row's tied entries (a cumulative
    count, offset by the tied entries on the devices before this one)."""
    local = jnp.cumsum(tied, axis=1, dtype=jnp.int32)
    return local + axis_offset(local[:, -1:], axis)


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
