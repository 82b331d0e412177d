"""Categorical distributions with the Fisher–Rao metric, as a pullback of a sphere."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from manifold_merge.manifolds.base import (
    AbstractManifold,
    compute_dtype,
    safe_div,
    sphere_angle,
    static_dataclass,
    upcast,
)
from manifold_merge.manifolds.sphere import Sphere


@static_dataclass
class FisherRao(AbstractManifold):
    """The open probability simplex {p in R^K : p > 0, sum p = 1} with the Fisher–Rao metric.

    The map phi(p) = 2 sqrt(p) is an isometry onto the positive orthant of the sphere of
    radius 2 (ALGORITHMS.md section 4), so every operation is the sphere's, pulled back:

    * g_p(u, v) = sum_k u_k v_k / p_k; tangent vectors satisfy sum_k u_k = 0
    * dist(p, q) = 2 arccos(sum_k sqrt(p_k q_k)), computed in the stable atan2 form
    * log_p(q) = sqrt(p) * Log^S_{phi(p)}(phi(q)), exp_p(u) = phi^-1(Exp^S_{phi(p)}(u / sqrt(p)))
    * proj_p(u) = u - (sum_k u_k) p (orthogonal in g_p)

    The simplex is not geodesically complete: an ``exp`` that would cross its boundary is folded
    back by the square in phi^-1 (the result is still a distribution). The Karcher mean of
    predictive distributions is the squared, renormalised sphere mean of the sqrt(p_i).

    Example:
        >>> import jax.numpy as jnp
        >>> from manifold_merge.manifolds import FisherRao
        >>> p, q = jnp.array([0.5, 0.5]), jnp.array([1.0, 0.0])
        >>> round(float(FisherRao(2).dist(p, q)), 6)  # 2 arccos(sqrt(1/2)) = pi / 2
        1.570796
    """

    num_classes: int

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"FisherRao needs num_classes >= 2, got {self.num_classes}")

    @property
    def sphere(self) -> Sphere:
        """The sphere of radius 2 that phi(p) = 2 sqrt(p) maps the simplex onto."""
        return Sphere(self.num_classes - 1, radius=2.0)

    @staticmethod
    def _phi(p):
        return 2.0 * jnp.sqrt(jnp.maximum(p, 0.0))

    @staticmethod
    def _dphi_diff(p, q):
        """phi(q) - phi(p) = 2 (q - p) / (sqrt(p) + sqrt(q)), exact to rounding for close p, q."""
        return safe_div(
            2.0 * (q - p), jnp.sqrt(jnp.maximum(p, 0.0)) + jnp.sqrt(jnp.maximum(q, 0.0)), 0.0
        )

    @staticmethod
    def _dphi(p, u):  # differential of phi: u / sqrt(p)
        return safe_div(u, jnp.sqrt(jnp.maximum(p, 0.0)), 0.0)

    def inner(self, x, u, v):
        x = upcast(x)
        return jnp.sum(self._dphi(x, upcast(u)) * self._dphi(x, upcast(v)))

    def proj(self, x, u):
        x, u32 = upcast(x), upcast(u)
        return (u32 - jnp.sum(u32) * x).astype(jnp.result_type(x))

    def exp(self, x, v):
        x32 = upcast(x)
        s = self.sphere._exp(self._phi(x32), self._dphi(x32, upcast(v)))
        q = jnp.square(s) / 4.0
        return (q / jnp.sum(q)).astype(jnp.result_type(x))

    def log(self, x, y):
        x32, y32 = upcast(x), upcast(y)
        xi = self.sphere._log(self._phi(x32), self._phi(y32), self._dphi_diff(x32, y32))
        return (jnp.sqrt(jnp.maximum(x32, 0.0)) * xi).astype(jnp.result_type(x))

    def dist(self, x, y):
        x, y = upcast(x), upcast(y)
        return 2.0 * sphere_angle(self._phi(x), self._phi(y), self._dphi_diff(x, y))

    def transp(self, x, y, v):
        """Parallel transport, pulled back from the sphere's."""
        x32, y32 = upcast(x), upcast(y)
        xi = self.sphere.transp(self._phi(x32), self._phi(y32), self._dphi(x32, upcast(v)))
        return (jnp.sqrt(jnp.maximum(y32, 0.0)) * xi).astype(jnp.result_type(v))

    def random_point(self, key, dtype=jnp.float32):
        """Uniform on the simplex (Dirichlet(1, ..., 1))."""
        p = jax.random.dirichlet(key, jnp.ones((self.num_classes,), compute_dtype(dtype)))
        return p.astype(dtype)

    def random_tangent(self, key, x):
        """sqrt(p) * z for standard normal z, projected: unit-scale in the Fisher metric."""
        x32 = upcast(x)
        z = jax.random.normal(key, x32.shape, x32.dtype) * jnp.sqrt(x32)
        return self.proj(x, z.astype(jnp.result_type(x)))

    def belongs(self, x, atol=1e-5):
        x = upcast(x)
        return (
            jnp.asarray(x.size == self.num_classes)
            & jnp.all(jnp.isfinite(x))
            & jnp.all(x >= -atol)
            & (jnp.abs(jnp.sum(x) - 1.0) <= atol)
        )

    def injectivity_radius(self) -> float:
        return 2.0 * math.pi

    def within_uniqueness_radius(self, x, y):
        return self.sphere.within_uniqueness_radius(self._phi(upcast(x)), self._phi(upcast(y)))

    def relative_norm(self, x, v):
        """The angle on the radius-2 sphere, in radians (half the Fisher–Rao length)."""
        return self.norm(x, v) / 2.0

    def init_mean(self, points, weights):
        """The normalised square of the projected extrinsic mean of the sqrt(p_i)."""
        points = upcast(points)
        s = self.sphere.init_mean(self._phi(points), weights)
        q = jnp.square(s) / 4.0
        return q / jnp.sum(q)
