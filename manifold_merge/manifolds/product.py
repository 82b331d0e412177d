"""Products of manifolds laid over a pytree: one manifold per leaf of the parameter tree."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from manifold_merge.manifolds.base import AbstractManifold, safe_norm, static_dataclass


def _is_manifold(node: Any) -> bool:
    return isinstance(node, AbstractManifold)


@static_dataclass
class ProductManifold(AbstractManifold):
    """The Riemannian product of one manifold per leaf of a pytree.

    ``ProductManifold({"dense": {"kernel": Sphere(9), "bias": Euclidean(3)}})`` has points of
    the same tree shape, ``{"dense": {"kernel": (10,) array, "bias": (3,) array}}``. The
    metric is the sum of the factors' metrics, so dist^2 = sum of squared factor distances and
    the Karcher mean is the tuple of the factors' Karcher means. A factor whose points are
    themselves small pytrees (e.g. ``LoraFactors``) is one leaf of the manifold tree; points
    are matched to it with ``flatten_up_to``.

    Example:
        >>> import jax.numpy as jnp
        >>> from manifold_merge.manifolds import Euclidean, ProductManifold, Sphere
        >>> m = ProductManifold({"w": Sphere(1), "b": Euclidean(1)})
        >>> x = {"w": jnp.array([1.0, 0.0]), "b": jnp.array([0.0])}
        >>> y = {"w": jnp.array([0.0, 1.0]), "b": jnp.array([0.0])}
        >>> round(float(m.dist(x, y)), 6)
        1.570796
    """

    treedef: Any
    factors: tuple

    def __init__(self, manifolds: Any):
        factors, treedef = jax.tree.flatten(manifolds, is_leaf=_is_manifold)
        if not factors or not all(_is_manifold(f) for f in factors):
            raise TypeError(
                "ProductManifold needs a non-empty pytree whose leaves are manifolds, got "
                f"{manifolds!r}"
            )
        object.__setattr__(self, "treedef", treedef)
        object.__setattr__(self, "factors", tuple(factors))

    @property
    def manifolds(self) -> Any:
        """The pytree of factor manifolds, as given."""
        return jax.tree.unflatten(self.treedef, self.factors)

    def _leaves(self, tree):
        return self.treedef.flatten_up_to(tree)

    def _map(self, fn, *trees):
        parts = [self._leaves(t) for t in trees]
        out = [fn(m, *args) for m, *args in zip(self.factors, *parts)]
        return jax.tree.unflatten(self.treedef, out)

    def _sum(self, fn, *trees):
        parts = [self._leaves(t) for t in trees]
        return sum(fn(m, *args) for m, *args in zip(self.factors, *parts))

    def inner(self, x, u, v):
        return self._sum(lambda m, x, u, v: m.inner(x, u, v), x, u, v)

    def proj(self, x, u):
        return self._map(lambda m, x, u: m.proj(x, u), x, u)

    def exp(self, x, v):
        return self._map(lambda m, x, v: m.exp(x, v), x, v)

    def log(self, x, y):
        return self._map(lambda m, x, y: m.log(x, y), x, y)

    def dist(self, x, y):
        parts = self._leaves(x), self._leaves(y)
        return safe_norm(jnp.stack([m.dist(a, b) for m, a, b in zip(self.factors, *parts)]))

    def retr(self, x, v):
        return self._map(lambda m, x, v: m.retr(x, v), x, v)

    def transp(self, x, y, v):
        return self._map(lambda m, x, y, v: m.transp(x, y, v), x, y, v)

    def random_point(self, key, dtype=jnp.float32):
        keys = jax.random.split(key, len(self.factors))
        pts = [m.random_point(k, dtype) for m, k in zip(self.factors, keys)]
        return jax.tree.unflatten(self.treedef, pts)

    def random_tangent(self, key, x):
        keys = jax.random.split(key, len(self.factors))
        xs = self._leaves(x)
        vs = [m.random_tangent(k, p) for m, k, p in zip(self.factors, keys, xs)]
        return jax.tree.unflatten(self.treedef, vs)

    def belongs(self, x, atol=1e-5):
        try:
            xs = self._leaves(x)
        except ValueError:
            return jnp.asarray(False)
        return jnp.all(jnp.stack([m.belongs(p, atol) for m, p in zip(self.factors, xs)]))

    def injectivity_radius(self) -> float:
        return min(m.injectivity_radius() for m in self.factors)

    def within_uniqueness_radius(self, x, y):
        parts = self._leaves(x), self._leaves(y)
        flags = [m.within_uniqueness_radius(a, b) for m, a, b in zip(self.factors, *parts)]
        return jnp.all(jnp.stack(flags))

    def relative_norm(self, x, v):
        parts = self._leaves(x), self._leaves(v)
        return safe_norm(
            jnp.stack([m.relative_norm(a, b) for m, a, b in zip(self.factors, *parts)])
        )

    def init_mean(self, points, weights):
        return self._map(lambda m, p: m.init_mean(p, weights), points)
