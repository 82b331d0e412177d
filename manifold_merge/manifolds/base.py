"""The manifold interface every geometry in manifold_merge implements.

A manifold is a frozen dataclass whose fields are static configuration (dimension, radius,
metric choice). Instances are registered as static pytrees, so they pass through ``jax.jit``
and ``jax.vmap`` untouched and two equal instances share compiled code.

Every method takes *one* point (base point first, as in pymanopt and ManifoldsBase.jl);
batch with ``jax.vmap``. Points and tangent vectors are arrays (or small pytrees such as
``LoraFactors``). Whatever the input dtype, arithmetic is done in float32 or better
(``compute_dtype``); points and tangent vectors come back in the dtype of the base point,
scalars (``inner``, ``norm``, ``dist``) in the compute dtype.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Point = Any  # an array or a pytree of arrays
Tangent = Any


def static_dataclass(cls):
    """Make ``cls`` a frozen dataclass: hashable, comparable configuration.

    Subclasses of :class:`AbstractManifold` are registered as static (leafless) pytrees
    automatically, so the fields become part of the jit cache key and must be hashable
    (ints, floats, strings, tuples).
    """
    return dataclasses.dataclass(frozen=True)(cls)


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype arithmetic is done in: ``dtype`` promoted to at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def upcast(x: Array) -> Array:
    """``x`` as an array in its compute dtype (float32 or better)."""
    x = jnp.asarray(x)
    return x.astype(compute_dtype(x.dtype))


def safe_norm(x: Array) -> Array:
    """Euclidean norm over all axes with a zero (not NaN) gradient at ``x = 0``.

    The "double where": the norm of 0 is differentiated through a dummy value, so no 0/0
    reaches the backward pass. NaN inputs give NaN.
    """
    sq = jnp.sum(jnp.square(x))
    positive = sq > 0
    # sq itself where it is not positive: 0 stays 0 and NaN stays NaN (never swallowed).
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), sq)


def safe_div(num: Array, den: Array, default: Array | float) -> Array:
    """``num / den``, or ``default`` where ``den == 0``, with finite gradients there.

    NaN in ``den`` propagates (it is not replaced by the default).
    """
    zero = den == 0
    return jnp.where(zero, default, num / jnp.where(zero, 1.0, den))


def first_argmax(x: Array) -> Array:
    """Index (int32) of the first maximum of the vector ``x``: ``jnp.argmax`` without its
    lowering, which fixes its dtypes when the program is compiled and so breaks on float64
    values computed inside a ``jax.enable_x64`` scope of a program compiled outside one
    (as the two-pass Gram solver does)."""
    n = x.shape[0]
    return jnp.min(jnp.where(x == jnp.max(x), jnp.arange(n, dtype=jnp.int32), n))


def sphere_angle(x: Array, y: Array, d: Array | None = None) -> Array:
    """Angle between two vectors of equal norm: ``2 atan2(||y - x||, ||x + y||)``.

    Unlike ``arccos(<x, y>)`` this keeps full relative precision for tiny angles and is
    exact at 0 and pi (ALGORITHMS.md section 2). Pass ``d = y - x`` when the caller can form
    the difference more accurately than by subtracting ``x`` and ``y``.
    """
    if d is None:
        d = y - x
    return 2.0 * jnp.arctan2(safe_norm(d), safe_norm(2.0 * x + d))


class AbstractManifold(abc.ABC):
    """A Riemannian manifold, described by the operations the merge solvers need.

    Subclasses implement ``inner, proj, exp, log, random_point, belongs`` (and usually
    ``dist`` with a stable closed form); the rest have generic defaults. Check a new
    manifold with :func:`manifold_merge.testing.check_manifold`.

    Example:
        >>> import jax
        >>> from manifold_merge.manifolds import Sphere
        >>> s = Sphere(dim=2)
        >>> x, y = s.random_point(jax.random.key(0)), s.random_point(jax.random.key(1))
        >>> bool(s.dist(y, s.exp(x, s.log(x, y))) < 1e-5)
        True
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Static pytree: instances pass through jit/vmap as part of the treedef, never traced.
        jax.tree_util.register_static(cls)

    # ----------------------------------------------------------------- metric
    @abc.abstractmethod
    def inner(self, x: Point, u: Tangent, v: Tangent) -> Array:
        """Riemannian inner product g_x(u, v) of two tangent vectors at ``x``."""

    def norm(self, x: Point, v: Tangent) -> Array:
        """Riemannian norm sqrt(g_x(v, v)), with a finite gradient at ``v = 0``."""
        sq = self.inner(x, v, v)
        positive = sq > 0
        return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), sq)

    @abc.abstractmethod
    def proj(self, x: Point, u: Tangent) -> Tangent:
        """Orthogonal (in g_x) projection of an ambient vector onto the tangent space at ``x``."""

    # ------------------------------------------------------------- geodesics
    @abc.abstractmethod
    def exp(self, x: Point, v: Tangent) -> Point:
        """Riemannian exponential: the point reached at time 1 by the geodesic (x, v)."""

    @abc.abstractmethod
    def log(self, x: Point, y: Point) -> Tangent:
        """Riemannian logarithm: the tangent v at ``x`` with exp(x, v) = y, ||v|| = dist(x, y).

        Defined for ``y`` inside the injectivity radius of ``x``; on the cut locus (e.g. the
        antipode on a sphere) the result is finite but arbitrary, and
        :meth:`within_uniqueness_radius` is False there.
        """

    def dist(self, x: Point, y: Point) -> Array:
        """Geodesic distance; the default is ``norm(x, log(x, y))``."""
        return self.norm(x, self.log(x, y))

    def retr(self, x: Point, v: Tangent) -> Point:
        """A retraction (first-order approximation of ``exp``); the default is ``exp``."""
        return self.exp(x, v)

    def transp(self, x: Point, y: Point, v: Tangent) -> Tangent:
        """Vector transport of ``v`` from T_x to T_y; the default projects onto T_y."""
        del x
        return self.proj(y, v)

    # ------------------------------------------------------------ sampling
    @abc.abstractmethod
    def random_point(self, key: Array, dtype=jnp.float32) -> Point:
        """A random point (the distribution is documented by each manifold)."""

    def random_tangent(self, key: Array, x: Point) -> Tangent:
        """A random tangent vector at ``x``: a standard normal ambient vector, projected."""
        leaves, treedef = jax.tree.flatten(x)
        keys = jax.random.split(key, len(leaves))
        noise = [
            jax.random.normal(k, jnp.shape(leaf), compute_dtype(jnp.result_type(leaf))).astype(
                jnp.result_type(leaf)
            )
            for k, leaf in zip(keys, leaves)
        ]
        return self.proj(x, jax.tree.unflatten(treedef, noise))

    @abc.abstractmethod
    def belongs(self, x: Point, atol: float = 1e-5) -> Array:
        """Whether ``x`` is a point of the manifold, up to ``atol``."""

    # ------------------------------------------------------- solver support
    def injectivity_radius(self) -> float:
        """Largest r such that ``log`` inverts ``exp`` on every ball of radius r (inf if none)."""
        return float("inf")

    def within_uniqueness_radius(self, x: Point, y: Point) -> Array:
        """True where ``y`` lies in the open ball around ``x`` on which weighted Fréchet means
        are unique (Afsari 2011). If every input of a mean lies in that ball around a critical
        point of the Fréchet function, that point is *the* mean. Default: always True
        (manifolds of non-positive curvature, such as Euclidean space)."""
        del x, y
        return jnp.asarray(True)

    def relative_norm(self, x: Point, v: Tangent) -> Array:
        """Size of tangent ``v`` at ``x`` in scale-free units, compared with solver tolerances.

        The default is the Riemannian norm. Manifolds with a radius or a norm factor override it
        so that a tolerance means the same thing at any scale (radians on a sphere of any radius;
        the relative change of a vector for Euclidean space and for the norm factor of
        ``NormSphere``), which also keeps it above float rounding at large coordinates.
        """
        return self.norm(x, v)

    def init_mean(self, points: Point, weights: Array) -> Point:
        """A starting point for the Karcher iteration from stacked ``points`` (expert axis first).

        The default returns the point of largest weight; manifolds override it with the
        projected weighted extrinsic mean, which is far closer.
        """
        i = first_argmax(weights)
        return jax.tree.map(lambda leaf: leaf[i], points)
