"""Exact Karcher means of long vectors in two passes over the data (ALGORITHMS.md section 3).

On the sphere and on ``NormSphere`` every iterate of the Karcher iteration stays in the span
of the N inputs, and the geometry of the inputs is fixed by their N x N Gram matrix G. So:

1. **pass 1** builds G in float64, blocked over the parameter axis;
2. an orthonormal basis of the span gives each input N coordinates, Y Y^T = G (Y from the
   eigendecomposition of G), and the ordinary Karcher iteration runs on those N-dimensional
   points in float64 (the same manifold, of dimension N, the same certified solver), to
   ``tol`` = 1e-10 by default;
3. **pass 2** forms the mean as a weighted sum of the inputs, a @ X, with the coefficients a
   that express the reduced mean in the inputs.

The map from the span to its coordinates is an isometry, so this is the Karcher mean itself,
not an approximation; its cost does not depend on the number of iterations.

Precision: each block of columns is summed by one float32 dot, the blocks in float64
(relative error of G about 1e-8). That fixes angles to about 1e-8 / theta rad, so when two
inputs are closer than :data:`SHIFT_BELOW` (full fine-tuned weights, without a base) pass 1 is
redone as the Gram of Z = [p_k; p_j - p_k (j != k)] around a reference input p_k, whose
entries are each accurate relative to their own size; G follows exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from manifold_merge.manifolds.base import compute_dtype, first_argmax
from manifold_merge.manifolds.norm_sphere import NormSphere
from manifold_merge.manifolds.sphere import Sphere
from manifold_merge.sharding import over_parameter_axis, psum
from manifold_merge.solvers.karcher import (
    KarcherResult,
    KarcherSolver,
    _is_concrete,
    _karcher_mean,
    validate_weights,
)

#: Columns per Gram block: each block's products are summed by one float32 dot (relative
#: error ~1e-8 measured), the blocks in float64. XLA's CPU dot of a short, very wide matrix is
#: several times faster in blocks than as one op (ALGORITHMS.md section 3); 8192 was the
#: fastest of 1024-65536 for N = 8, D = 1.6e7 on the 2-core machines.
GRAM_BLOCK = 8192

#: Default tolerance of the reduced (float64) iteration, in radians.
GRAM_TOL = 1e-10

#: Below this smallest pairwise angle (rad) pass 1 is redone around a reference input: the
#: Gram of the raw vectors knows an angle theta only to about 1e-8 / theta rad.
SHIFT_BELOW = 0.05


def supports_gram(manifold) -> bool:
    """Whether :func:`gram_karcher_mean` applies to ``manifold`` (Sphere or NormSphere)."""
    return isinstance(manifold, (Sphere, NormSphere))


def span_gram(points: jax.Array, ref: jax.Array | int | None = None) -> jax.Array:
    """Pass 1: the float64 Gram matrix G_ij = <p_i, p_j> of the rows of ``points`` (N, D).

    Summed over blocks of :data:`GRAM_BLOCK` columns (one dot per block, in the data's dtype;
    the blocks accumulated in float64). With ``ref`` (an input index) it is computed as the
    Gram of Z = [p_ref; p_j - p_ref] and mapped back (p_j = z_j + z_ref), so that the small
    differences between close inputs keep their relative precision; that costs about 3x the
    plain pass (the differences are formed block by block). Must be called with JAX's x64 mode
    on (as :func:`gram_karcher_mean` does). When the parameter axis is split over devices
    (:mod:`manifold_merge.sharding`), each device sums its own columns and a ``psum`` adds
    the devices' Grams.
    """
    n = points.shape[0]
    k = over_parameter_axis(functools.partial(_local_gram, ref=ref), points, replicated=True)
    if ref is None:
        return k
    others = (jnp.arange(n) != ref)[:, None]
    c = jnp.eye(n, dtype=jnp.float64) + others.astype(jnp.float64) * jax.nn.one_hot(
        ref, n, dtype=jnp.float64
    )
    return c @ k @ c.T


def _local_gram(axis, points, ref):
    """The Gram of this device's columns (all columns when ``axis`` is None), summed over the
    devices along ``axis``; with ``ref``, of the differences to the reference input."""
    n, d = points.shape
    if ref is not None:
        others = (jnp.arange(n) != ref)[:, None]

    def block_gram(blk):
        if ref is not None:
            blk = blk - jnp.where(others, blk[ref][None, :], 0.0)
        g = jax.lax.dot_general(blk, blk, (((1,), (1,)), ((), ())))
        return g.astype(jnp.float64)

    num_blocks, rest = divmod(d, GRAM_BLOCK)
    # The sum starts from the first block (not from zeros), so that under shard_map the loop
    # carry is a per-device value from the start.
    if num_blocks == 0:
        k = block_gram(points)
    elif num_blocks == 1:
        k = block_gram(points[:, :GRAM_BLOCK])
    else:

        def body(i, acc):
            blk = jax.lax.dynamic_slice_in_dim(points, i * GRAM_BLOCK, GRAM_BLOCK, axis=1)
            return acc + block_gram(blk)

        k = jax.lax.fori_loop(1, num_blocks, body, block_gram(points[:, :GRAM_BLOCK]))
    if rest and num_blocks:
        k = k + block_gram(points[:, num_blocks * GRAM_BLOCK :])
    return psum(k, axis)


def _smallest_angle(gram: jax.Array) -> jax.Array:
    """Smallest angle between two nonzero inputs, from their Gram (atan2 form; pi if none)."""
    r = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))
    ok = r > 0
    c = gram / jnp.where(ok, r, 1.0)[:, None] / jnp.where(ok, r, 1.0)[None, :]
    c = jnp.clip(c, -1.0, 1.0)
    theta = 2.0 * jnp.arctan2(jnp.sqrt(2.0 - 2.0 * c), jnp.sqrt(2.0 + 2.0 * c))
    pair = ok[:, None] & ok[None, :] & ~jnp.eye(gram.shape[0], dtype=bool)
    return jnp.min(jnp.where(pair, theta, jnp.pi))


def span_coordinates(gram: jax.Array):
    """Coordinates Y (N, N) of the inputs in an orthonormal basis of their span (Y Y^T = G),
    and the pseudo-inverse map ``to_coeffs`` with ``Y^T to_coeffs(m) = m`` for m in the span:
    the coefficients a of m = sum_i a_i y_i."""
    lam, q = jnp.linalg.eigh(gram)
    lam = jnp.maximum(lam, 0.0)
    keep = lam > lam[-1] * gram.shape[0] * jnp.finfo(jnp.float64).eps
    root = jnp.sqrt(lam)
    inv_root = jnp.where(keep, 1.0 / jnp.where(keep, root, 1.0), 0.0)
    y = q * jnp.where(keep, root, 0.0)

    def to_coeffs(m):
        return q @ (inv_root * m)

    return y, to_coeffs


def _weighted_sum(coeffs: jax.Array, data: jax.Array) -> jax.Array:
    """sum_i c_i x_i: for a few inputs as one fused elementwise loop (XLA's CPU dot of an (N,)
    vector with an (N, D) matrix ran 10x below memory bandwidth), else as a dot."""
    if data.shape[0] > 32:
        return coeffs @ data
    out = coeffs[0] * data[0]
    for i in range(1, data.shape[0]):
        out = out + coeffs[i] * data[i]
    return out


def gram_karcher_mean(
    manifold: Sphere | NormSphere,
    points: jax.Array,
    weights: jax.Array,
    solver: KarcherSolver | None = None,
) -> KarcherResult:
    """The weighted Karcher mean of the rows of ``points`` (N, D) on ``manifold`` (a
    :class:`Sphere` of dim D - 1 or a :class:`NormSphere` of dim D), exact, in two passes.

    Same contract as :func:`~manifold_merge.solvers.karcher_mean` (weights normalised, zero
    weights ignored, ``converged`` certified by the reduced solver); the reduced iteration is
    float64, to ``min(solver.tol, GRAM_TOL)`` (a tighter tolerance costs no extra pass over
    the data) within ``max(solver.max_steps, 1000)`` steps of N-dimensional arithmetic, so
    ``converged`` means the gradient is below that tolerance. Jittable and vmappable; the
    result is in the dtype of ``points``. ``karcher_mean(..., algorithm="auto")`` calls this
    where it applies.

    Example:
        >>> import jax.numpy as jnp
        >>> from manifold_merge.manifolds import NormSphere
        >>> w = jnp.array([[2.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
        >>> mean = gram_karcher_mean(NormSphere(3), w, jnp.array([0.5, 0.5])).mean
        >>> [round(float(c), 4) for c in mean]
        [2.1213, 2.1213, 0.0]
    """
    if not supports_gram(manifold):
        raise TypeError(f"gram_karcher_mean needs a Sphere or NormSphere, got {manifold!r}")
    solver = solver or KarcherSolver()
    reduced_solver = KarcherSolver(
        max_steps=max(solver.max_steps, 1000),
        tol=min(solver.tol, GRAM_TOL),
        step_size=solver.step_size,
    )
    points = jnp.asarray(points)
    n, d = points.shape
    if isinstance(manifold, Sphere) and d != manifold.dim + 1:
        raise ValueError(f"{manifold!r} has points of {manifold.dim + 1} coordinates, got {d}")
    if isinstance(manifold, NormSphere) and d != manifold.dim:
        raise ValueError(f"{manifold!r} has points of {manifold.dim} coordinates, got {d}")
    if _is_concrete(weights):
        weights = validate_weights(weights, n)
    out_dtype = jnp.result_type(points)
    data = points.astype(compute_dtype(out_dtype))
    with jax.enable_x64(True):
        w = jnp.asarray(weights, jnp.float64)
        ref = first_argmax(w)  # a point with positive weight
        gram = span_gram(data)
        gram = jax.lax.cond(
            _smallest_angle(gram) < SHIFT_BELOW, lambda: span_gram(data, ref), lambda: gram
        )
        y, to_coeffs = span_coordinates(gram)
        if n == 1:  # one point is its own mean; the reduced manifolds need 2 coordinates
            y = jnp.pad(y, ((0, 0), (0, 1)))
        w = w / jnp.sum(w)
        # NormSphere's metric is a product, so its Karcher mean is the sphere mean of the
        # directions times the mean of the norms (closed form): the reduced iteration runs on
        # the unit sphere either way (it also compiles in half the time of NormSphere's).
        radius = manifold.radius if isinstance(manifold, Sphere) else 1.0
        norms = jnp.linalg.norm(y, axis=1)
        units = y * jnp.where(norms > 0, radius / jnp.where(norms > 0, norms, 1.0), 0.0)[:, None]
        res = _karcher_mean(
            Sphere(y.shape[1] - 1, radius=radius), units, w, None, None, reduced_solver
        )
        if isinstance(manifold, NormSphere):
            scale = manifold.mean_of_norms(norms, w)
            # as NormSphere certifies: a zero vector of positive weight has no direction
            ok = jnp.all((norms > 0) | (w == 0))
            res = res._replace(mean=scale * res.mean, converged=res.converged & ok)
        coeffs = to_coeffs(res.mean[:n])
    mean = _weighted_sum(coeffs.astype(data.dtype), data)  # pass 2
    return KarcherResult(
        mean.astype(out_dtype), res.num_steps, res.grad_norm.astype(jnp.float32), res.converged
    )
