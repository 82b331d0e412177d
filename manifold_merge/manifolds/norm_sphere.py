"""Paper A's spherical proxy: a nonzero vector as a direction on the unit sphere times a norm."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from manifold_merge.manifolds.base import (
    AbstractManifold,
    compute_dtype,
    safe_div,
    safe_norm,
    sphere_angle,
    static_dataclass,
    upcast,
)
from manifold_merge.manifolds.sphere import Sphere

NORM_MEANS = ("arithmetic", "geometric")


@static_dataclass
class NormSphere(AbstractManifold):
    """R^dim minus the origin as the product S^(dim-1) x R_+ (direction x norm).

    A point is an ordinary nonzero array W; it is read as the pair (W/||W||, ||W||). The metric
    is the product of the unit sphere's (on directions, in radians) and a metric on the norm
    factor chosen by ``norm_mean``:

    * ``"arithmetic"`` (default, Paper A): d(r, s) = |r - s|, so the Karcher mean's norm is the
      weighted arithmetic mean sum_i w_i ||W_i||;
    * ``"geometric"``: d(r, s) = |log r - log s|, giving the weighted geometric mean.

    dist(W, V)^2 = theta(W, V)^2 + d(||W||, ||V||)^2. Because the metric is a product, the
    Karcher mean is (sphere Karcher mean of the directions) x (mean of the norms): for N = 2
    experts it is SLERP of the directions, rescaled.

    Tangent vectors are ambient arrays u, read through the differential of (d, r) -> r d: the
    radial part a = <W/||W||, u> moves the norm and (u - a W/||W||)/||W|| moves the direction.
    Every ambient vector is tangent (``proj`` is the identity). With ``"arithmetic"`` the norm
    factor is a half-line, so ``exp`` is valid while a > -||W||; the Karcher iteration with
    step size in (0, 1] never leaves it.

    Example:
        >>> import jax.numpy as jnp
        >>> from manifold_merge.manifolds import NormSphere
        >>> from manifold_merge.solvers import karcher_mean
        >>> w = jnp.array([[2.0, 0.0], [0.0, 4.0]])
        >>> mean = karcher_mean(NormSphere(2), w).mean  # 45 degrees, norm (2 + 4) / 2 = 3
        >>> [round(float(c), 4) for c in mean]
        [2.1213, 2.1213]
    """

    dim: int
    norm_mean: str = "arithmetic"

    def __post_init__(self):
        if self.dim < 2:
            raise ValueError(f"NormSphere needs dim >= 2 coordinates, got dim={self.dim}")
        if self.norm_mean not in NORM_MEANS:
            raise ValueError(
                f"NormSphere norm_mean must be one of {NORM_MEANS}, got {self.norm_mean!r}"
            )

    @property
    def directions(self) -> Sphere:
        """The unit sphere of directions."""
        return Sphere(self.dim - 1)

    @property
    def _geometric(self) -> bool:
        return self.norm_mean == "geometric"

    @staticmethod
    def _polar(x):
        r = safe_norm(x)
        return safe_div(x, r, 0.0), r

    @staticmethod
    def _split(xh, r, u):
        """Radial part a and direction tangent xi (in radians) of ambient tangent u at r xh."""
        a = jnp.sum(xh * u)
        return a, safe_div(u - a * xh, r, 0.0)

    @classmethod
    def _pair(cls, x, y):
        """Polar forms of x and y plus the differences yh - xh and s - r, formed from y - x.

        Subtracting the normalised vectors would lose the relative precision of tiny angles to
        the rounding of the two divisions; with d = y - x (exact for close inputs),
        s - r = <d, x + y> / (r + s) and yh - xh = d/r - yh (s - r)/r are accurate.
        """
        xh, r = cls._polar(x)
        yh, s = cls._polar(y)
        d = y - x
        ds = safe_div(jnp.sum(d * (x + y)), r + s, 0.0)
        dh = safe_div(d - yh * ds, r, 0.0)
        return xh, r, yh, s, dh, ds

    def _norm_weight(self, r):  # g(a, a) = a^2 * weight on the norm factor
        return safe_div(1.0, jnp.square(r), 0.0) if self._geometric else 1.0

    def inner(self, x, u, v):
        xh, r = self._polar(upcast(x))
        au, xu = self._split(xh, r, upcast(u))
        av, xv = self._split(xh, r, upcast(v))
        return jnp.sum(xu * xv) + au * av * self._norm_weight(r)

    def proj(self, x, u):
        return jnp.asarray(u).astype(jnp.result_type(x))

    def _new_norm(self, r, a):
        return r * jnp.exp(safe_div(a, r, 0.0)) if self._geometric else r + a

    def _radial_dist(self, r, ds):  # signed distance of the norm factor, from s - r
        return jnp.log1p(safe_div(ds, r, 0.0)) if self._geometric else ds

    def exp(self, x, v):
        xh, r = self._polar(upcast(x))
        a, xi = self._split(xh, r, upcast(v))
        direction = self.directions._exp(xh, xi)
        return (self._new_norm(r, a) * direction).astype(jnp.result_type(x))

    def log(self, x, y):
        xh, r, yh, _, dh, ds = self._pair(upcast(x), upcast(y))
        xi = self.directions._log(xh, yh, dh)
        a = r * self._radial_dist(r, ds) if self._geometric else ds
        return (r * xi + a * xh).astype(jnp.result_type(x))

    def dist(self, x, y):
        xh, r, yh, _, dh, ds = self._pair(upcast(x), upcast(y))
        return safe_norm(jnp.stack([sphere_angle(xh, yh, dh), self._radial_dist(r, ds)]))

    def transp(self, x, y, v):
        """Parallel transport of the product: sphere transport of the direction part; the norm
        part is kept (``"geometric"``: its relative size a/||W|| is kept)."""
        xh, r = self._polar(upcast(x))
        yh, s = self._polar(upcast(y))
        a, xi = self._split(xh, r, upcast(v))
        xi_y = self.directions.transp(xh, yh, xi)
        a_y = a * safe_div(s, r, 1.0) if self._geometric else a
        return (s * xi_y + a_y * yh).astype(jnp.result_type(v))

    def random_point(self, key, dtype=jnp.float32):
        """A uniform direction times a log-normal norm exp(N(0, 1))."""
        kd, kr = jax.random.split(key)
        direction = self.directions.random_point(kd, compute_dtype(dtype))
        return (jnp.exp(jax.random.normal(kr, (), direction.dtype)) * direction).astype(dtype)

    def belongs(self, x, atol=1e-5):
        x = upcast(x)
        return jnp.asarray(x.size == self.dim) & jnp.all(jnp.isfinite(x)) & (safe_norm(x) > atol)

    def injectivity_radius(self) -> float:
        return math.pi

    def within_uniqueness_radius(self, x, y):
        """Directions less than pi/2 apart (the norm factor is flat), and both norms nonzero."""
        xh, r, yh, s, dh, _ = self._pair(upcast(x), upcast(y))
        return (sphere_angle(xh, yh, dh) < jnp.pi / 2) & (r > 0) & (s > 0)

    def relative_norm(self, x, v):
        """sqrt(||xi||^2 + (a/||W||)^2): radians for the direction, relative change of the norm."""
        xh, r = self._polar(upcast(x))
        a, xi = self._split(xh, r, upcast(v))
        return safe_norm(jnp.stack([safe_norm(xi), safe_div(a, r, 0.0)]))

    def init_mean(self, points, weights):
        """Extrinsic mean of the directions, times the exact mean of the norms."""
        points = upcast(points)
        w = weights.astype(points.dtype)
        norms = jax.vmap(safe_norm)(points)
        units = points * safe_div(1.0, norms, 0.0).reshape((-1,) + (1,) * (points.ndim - 1))
        direction = self.directions.init_mean(units, w)
        return self.mean_of_norms(norms, w) * direction

    def mean_of_norms(self, norms, weights):
        """The Karcher mean of the norm factor, in closed form: sum_i w_i r_i, or with
        ``"geometric"`` exp(sum_i w_i log r_i) (weights normalised by the caller; zero weights
        ignored, so their norms may be 0). With the sphere mean of the directions it gives the
        whole Karcher mean, the metric being a product."""
        if self._geometric:
            return jnp.exp(jnp.sum(weights * jnp.log(jnp.where(weights > 0, norms, 1.0))))
        return jnp.sum(weights * norms)
