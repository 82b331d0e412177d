"""Flat space R^dim with the standard inner product."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from manifold_merge.manifolds.base import (
    AbstractManifold,
    Array,
    safe_norm,
    static_dataclass,
    upcast,
)


@static_dataclass
class Euclidean(AbstractManifold):
    """Euclidean space: exp(x, v) = x + v, log(x, y) = y - x, dist = ||x - y||.

    Points are arrays of any shape (the whole array is one point); ``dim`` is the number of
    coordinates and fixes the shape of :meth:`random_point` to ``(dim,)``. The Karcher mean is
    the weighted average, reached in one step.

    Example:
        >>> import jax.numpy as jnp
        >>> from manifold_merge.manifolds import Euclidean
        >>> float(Euclidean(3).dist(jnp.zeros(3), jnp.array([3.0, 4.0, 0.0])))
        5.0
    """

    dim: int

    def inner(self, x, u, v):
        del x
        return jnp.sum(upcast(u) * upcast(v))

    def norm(self, x, v):
        del x
        return safe_norm(upcast(v))

    def proj(self, x, u):
        return jnp.asarray(u).astype(jnp.result_type(x))

    def exp(self, x, v):
        return (upcast(x) + upcast(v)).astype(jnp.result_type(x))

    def log(self, x, y):
        return (upcast(y) - upcast(x)).astype(jnp.result_type(x))

    def dist(self, x, y):
        return safe_norm(upcast(y) - upcast(x))

    def random_point(self, key, dtype=jnp.float32):
        """A standard normal vector of shape ``(dim,)``."""
        return jax.random.normal(key, (self.dim,), dtype)

    def belongs(self, x, atol=1e-5):
        del atol
        x = jnp.asarray(x)
        return jnp.asarray(x.size == self.dim) & jnp.all(jnp.isfinite(x))

    def relative_norm(self, x, v):
        """``||v|| / max(1, ||x||)``: absolute near the origin, relative far from it."""
        return safe_norm(upcast(v)) / jnp.maximum(1.0, safe_norm(upcast(x)))

    def init_mean(self, points, weights) -> Array:
        """The weighted average itself (the exact Karcher mean)."""
        points = upcast(points)
        return jnp.tensordot(weights.astype(points.dtype), points, axes=1)
