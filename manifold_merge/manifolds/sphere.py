"""The sphere of radius R in R^(dim+1), with the metric induced by the ambient space."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from manifold_merge.manifolds.base import (
    AbstractManifold,
    Array,
    compute_dtype,
    first_argmax,
    safe_div,
    safe_norm,
    sphere_angle,
    static_dataclass,
    upcast,
)


@static_dataclass
class Sphere(AbstractManifold):
    """The sphere S^dim(R) = {x in R^(dim+1) : ||x|| = R}.

    Formulas (ALGORITHMS.md section 2), with angle theta(x, y) = 2 atan2(||x - y||, ||x + y||):

    * dist(x, y) = R theta(x, y)
    * log_x(y) = R theta * w / ||w||, with w = proj_x(y - x) (computed from the difference so
      tiny angles keep their relative precision; 0 at y = x)
    * exp_x(v) = cos(||v||/R) x + sinc(||v||/R) v, renormalised to radius R
    * retr_x(v) = R (x + v) / ||x + v||; transp is exact parallel transport along the geodesic.

    Points are arrays of any shape whose size is ``dim + 1`` (all axes are reduced, so a weight
    matrix can be one point without reshaping). The cut locus of x is its antipode -x, where
    ``log`` returns 0 and :meth:`within_uniqueness_radius` is False; means are certified unique
    when every input lies within R pi/2 of the mean (an open hemisphere).

    Example:
        >>> import jax.numpy as jnp
        >>> from manifold_merge.manifolds import Sphere
        >>> s = Sphere(dim=1)
        >>> round(float(s.dist(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))), 6)
        1.570796
    """

    dim: int
    radius: float = 1.0

    def __post_init__(self):
        if self.dim < 1:
            raise ValueError(f"Sphere needs dim >= 1, got dim={self.dim}")
        if not (self.radius > 0 and math.isfinite(self.radius)):
            raise ValueError(f"Sphere needs a finite radius > 0, got radius={self.radius}")

    # Unit direction of x; all formulas below go through it so that any radius works.
    def _unit(self, x: Array) -> Array:
        return x / self.radius

    def inner(self, x, u, v):
        del x
        return jnp.sum(upcast(u) * upcast(v))

    def norm(self, x, v):
        del x
        return safe_norm(upcast(v))

    def _proj(self, x: Array, u: Array) -> Array:
        xh = self._unit(x)
        return u - jnp.sum(xh * u) * xh

    def proj(self, x, u):
        return self._proj(upcast(x), upcast(u)).astype(jnp.result_type(x))

    def _exp(self, x: Array, v: Array) -> Array:
        t = safe_norm(v) / self.radius
        y = jnp.cos(t) * x + jnp.sinc(t / jnp.pi) * v
        # exp is exact in exact arithmetic; renormalising removes the rounding drift.
        return y * (self.radius / safe_norm(y))

    def exp(self, x, v):
        return self._exp(upcast(x), upcast(v)).astype(jnp.result_type(x))

    def _log(self, x: Array, y: Array, d: Array | None = None) -> Array:
        """log_x(y); ``d = y - x`` may be passed when the caller has it more accurately."""
        if d is None:
            d = y - x
        w = self._proj(x, d)
        arc = self.radius * sphere_angle(x, y, d)
        # ||w|| = R sin(theta): the factor arc/||w|| -> 1 at y = x (first-order correct there).
        return w * safe_div(arc, safe_norm(w), 1.0)

    def log(self, x, y):
        return self._log(upcast(x), upcast(y)).astype(jnp.result_type(x))

    def dist(self, x, y):
        return self.radius * sphere_angle(upcast(x), upcast(y))

    def retr(self, x, v):
        y = upcast(x) + upcast(v)
        return (y * (self.radius / safe_norm(y))).astype(jnp.result_type(x))

    def transp(self, x, y, v):
        """Parallel transport along the minimising geodesic from x to y (identity at y = x).

        With e the unit direction of log_x(y) and theta the angle, the component of v along e
        rotates in the plane (x, e); the orthogonal complement is unchanged.
        """
        x, y, v = upcast(x), upcast(y), upcast(v)
        u = self._log(x, y)
        nu = safe_norm(u)
        e = u * safe_div(1.0, nu, 0.0)
        t = nu / self.radius
        ve = jnp.sum(e * v)
        out = v + ve * ((jnp.cos(t) - 1.0) * e - jnp.sin(t) * self._unit(x))
        return out.astype(jnp.result_type(v))

    def random_point(self, key, dtype=jnp.float32):
        """Uniform on the sphere: a normalised standard normal vector of shape ``(dim + 1,)``."""
        z = jax.random.normal(key, (self.dim + 1,), compute_dtype(dtype))
        return (z * (self.radius / safe_norm(z))).astype(dtype)

    def belongs(self, x, atol=1e-5):
        x = upcast(x)
        return (
            jnp.asarray(x.size == self.dim + 1)
            & jnp.all(jnp.isfinite(x))
            & (jnp.abs(safe_norm(x) - self.radius) <= atol * self.radius)
        )

    def injectivity_radius(self) -> float:
        return math.pi * self.radius

    def within_uniqueness_radius(self, x, y):
        """True where y is strictly closer than R pi/2 to x (inside the open hemisphere at x)."""
        return sphere_angle(upcast(x), upcast(y)) < jnp.pi / 2

    def relative_norm(self, x, v):
        """``||v|| / R``: the angle in radians."""
        del x
        return safe_norm(upcast(v)) / self.radius

    def init_mean(self, points, weights):
        """The projected weighted extrinsic mean R m/||m||, m = sum_i w_i x_i; if m = 0 (e.g.
        an equal-weight antipodal pair), the point of largest weight."""
        points = upcast(points)
        m = jnp.tensordot(weights.astype(points.dtype), points, axes=1)
        nm = safe_norm(m)
        ok = nm > self.radius * 64 * jnp.finfo(points.dtype).eps
        fallback = points[first_argmax(weights)]
        return jnp.where(ok, m * safe_div(self.radius, nm, 0.0), fallback)
