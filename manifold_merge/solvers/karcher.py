"""Weighted Karcher (Fréchet) means by Riemannian fixed-point iteration."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from manifold_merge.manifolds.base import AbstractManifold, compute_dtype
from manifold_merge.manifolds.product import ProductManifold


@dataclasses.dataclass(frozen=True)
class KarcherSolver:
    """Settings of the fixed-point iteration x <- exp_x(step_size * sum_i w_i log_x(p_i)).

    Attributes:
        max_steps: iteration cap (default 100). A problem that reaches it without meeting
            ``tol`` comes back with ``converged=False``.
        tol: stop when the Riemannian gradient sum_i w_i log_x(p_i), measured by the
            manifold's :meth:`~AbstractManifold.relative_norm`, is at most ``tol``
            (default 1e-7: radians on a sphere of any radius; relative change for Euclidean
            space and the norm factor of ``NormSphere``). Coordinate changes are never used:
            they are gauge-dependent on quotients and stop early for close inputs. The float32
            rounding floor of the gradient is about 1e-7 rad (one eps), so a tolerance at or
            below it is met by the floor rule: the iteration also stops, converged, once the
            gradient is below ``FLOOR_EPS`` (32) x eps of the compute dtype and has made
            no new low for two steps, as no iteration can do better there. With float64
            inputs use 1e-12 or so.
        step_size: geodesic damping eta in (0, 1] (default 1.0, the classic iteration, which
            converges linearly and fast for points in a hemisphere). Smaller is more robust for
            widely spread points and slower.
    """

    max_steps: int = 100
    tol: float = 1e-7
    step_size: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.max_steps, (int, np.integer)) and self.max_steps >= 0):
            raise ValueError(f"KarcherSolver.max_steps must be an int >= 0, got {self.max_steps!r}")
        if not (np.isfinite(self.tol) and self.tol >= 0):
            raise ValueError(f"KarcherSolver.tol must be finite and >= 0, got {self.tol!r}")
        if not (0 < self.step_size <= 1):
            raise ValueError(f"KarcherSolver.step_size must be in (0, 1], got {self.step_size!r}")


jax.tree_util.register_static(KarcherSolver)

#: The rounding-floor rule: a gradient below FLOOR_EPS * eps that made no new low for
#: FLOOR_PATIENCE steps counts as converged (see ``KarcherSolver.tol``).
FLOOR_EPS = 32
FLOOR_PATIENCE = 2

#: ``karcher_mean``'s algorithms, and the block length (in multiples of N) from which
#: ``algorithm="auto"`` picks the two-pass Gram solver.
ALGORITHMS = ("auto", "iterative", "gram")
GRAM_MIN_RATIO = 16


class KarcherResult(NamedTuple):
    """Outcome of :func:`karcher_mean`.

    Attributes:
        mean: the final iterate, a point in the dtype of the inputs.
        num_steps: iterations taken (int32).
        grad_norm: relative norm of the Riemannian gradient at ``mean`` (what ``tol`` bounds).
        converged: True only if ``grad_norm <= tol`` (or the gradient sits at the float
            rounding floor, see :class:`KarcherSolver`), everything is finite, the weights are
            valid, and every input with positive weight lies within the manifold's uniqueness
            radius of ``mean`` or of the inputs' unweighted centre (so ``mean`` is certified to
            be the unique weighted mean; on a sphere: all inputs in one open hemisphere).
            Antipodal and other undefined configurations come back with ``converged=False``.
    """

    mean: Any
    num_steps: jax.Array
    grad_norm: jax.Array
    converged: jax.Array


class _State(NamedTuple):
    x: Any
    grad: Any
    grad_norm: jax.Array
    num_steps: jax.Array
    best: jax.Array  # smallest grad_norm seen so far
    stalls: jax.Array  # steps since grad_norm last reached a new smallest value


def _num_points(points) -> int:
    leaves = jax.tree.leaves(points)
    if not leaves:
        raise ValueError("karcher_mean got no points (an empty pytree)")
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = [jnp.shape(leaf) for leaf in leaves]
        raise ValueError(
            "karcher_mean needs points stacked along a leading expert axis of the same length "
            f"in every leaf; got leaf shapes {shapes}"
        )
    (n,) = sizes
    if n == 0:
        raise ValueError("karcher_mean got zero points (leading axis of length 0)")
    return n


def _is_concrete(x) -> bool:
    try:
        np.asarray(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return False
    return True


def validate_weights(weights, num_points: int) -> np.ndarray:
    """Check concrete weights (finite, >= 0, positive sum, one per point) and normalise them.

    Raises:
        ValueError: naming what is wrong with the weights.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (num_points,):
        raise ValueError(f"weights must have shape ({num_points},) (one per point), got {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    if np.any(w < 0):
        raise ValueError(f"weights must be non-negative, got {w.tolist()}")
    total = w.sum()
    if not total > 0:
        raise ValueError(f"weights must have a positive sum, got {w.tolist()} (sum {total})")
    return w / total


def karcher_mean(
    manifold: AbstractManifold,
    points: Any,
    weights: Any = None,
    *,
    solver: KarcherSolver = KarcherSolver(),
    init: Any = None,
    metric_weights: Any = None,
    algorithm: str = "auto",
) -> KarcherResult:
    """Weighted Karcher mean argmin_x sum_i w_i dist(x, p_i)^2 by fixed-point iteration.

    x_{k+1} = exp_{x_k}(eta * sum_i w_i log_{x_k}(p_i)), from the manifold's projected extrinsic
    mean (or ``init``), in a ``lax.while_loop`` until the gradient's relative norm is below
    ``solver.tol`` (ALGORITHMS.md section 3). Computation is in float32 or better whatever the
    input dtype; the mean comes back in the input dtype. Works under ``jax.jit`` and
    ``jax.vmap`` (vmap it to solve many independent problems in one call); it never raises
    inside a trace, and reports failure through ``converged``.

    Args:
        manifold: any :class:`~manifold_merge.manifolds.AbstractManifold`.
        points: the N points stacked on a leading axis, shape (N, *point_shape) (or a pytree
            of such arrays for pytree points such as a ``ProductManifold``'s).
        weights: (N,) non-negative weights with positive sum, normalised here; default uniform.
            Concrete weights are validated with a ``ValueError``; traced weights (inside the
            caller's jit/vmap) are normalised in the graph and invalid ones give
            ``converged=False``.
        solver: a :class:`KarcherSolver`.
        init: optional starting point.
        metric_weights: optional non-negative diagonal metric per point, shaped like
            ``points`` (e.g. diagonal Fisher estimates). The tangent average becomes
            proj_x(sum_i w_i M_i * log_x(p_i) / sum_i w_i M_i), element-wise: Paper A's
            Fisher-preconditioned Karcher iteration. Constant M_i give the plain mean.
        algorithm: ``"iterative"`` (the iteration above, on the points themselves),
            ``"gram"`` (:func:`~manifold_merge.solvers.gram.gram_karcher_mean`: the same
            iteration on the N coordinates of the points in their span, in float64 to
            ``min(solver.tol, 1e-10)``, two passes over the data; ``Sphere`` and
            ``NormSphere`` points stacked as one (N, D) array, without ``init`` or
            ``metric_weights``), or ``"auto"`` (default): ``"gram"`` where it applies and
            D >= :data:`GRAM_MIN_RATIO` x N, else ``"iterative"``.

    Returns:
        A :class:`KarcherResult` ``(mean, num_steps, grad_norm, converged)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from manifold_merge import Sphere, karcher_mean
        >>> pts = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> res = karcher_mean(Sphere(2), pts, jnp.array([0.5, 0.5]))
        >>> [round(float(c), 6) for c in res.mean], bool(res.converged)
        ([0.707107, 0.707107, 0.0], True)
    """
    if not isinstance(manifold, AbstractManifold):
        raise TypeError(f"karcher_mean needs an AbstractManifold, got {type(manifold).__name__}")
    if not isinstance(solver, KarcherSolver):
        raise TypeError(f"solver must be a KarcherSolver, got {type(solver).__name__}")
    if isinstance(points, list) and not isinstance(manifold, ProductManifold):
        raise TypeError(
            f"karcher_mean got a list of {len(points)} points; stack them along a leading "
            "axis first: karcher_mean(manifold, jnp.stack(points), ...)"
        )
    n = _num_points(points)
    for leaf in jax.tree.leaves(points):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(f"points must be floating point, got dtype {jnp.result_type(leaf)}")
    if weights is None:
        weights = np.full((n,), 1.0 / n)
    elif _is_concrete(weights):
        weights = validate_weights(weights, n)
    elif jnp.shape(weights) != (n,):
        raise ValueError(f"weights must have shape ({n},), got {jnp.shape(weights)}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    from manifold_merge.solvers import gram  # noqa: PLC0415 (gram builds on this module)

    gram_ok = (
        gram.supports_gram(manifold)
        and init is None
        and metric_weights is None
        and not isinstance(points, (list, tuple, dict))
        and jnp.ndim(points) == 2
    )
    if algorithm == "gram" and not gram_ok:
        raise ValueError(
            "algorithm='gram' needs a Sphere or NormSphere, points as one (N, D) array, and no "
            f"init or metric_weights; got {manifold!r} with points of shape "
            f"{jax.tree.map(jnp.shape, points)}"
        )
    if algorithm == "gram" or (
        algorithm == "auto" and gram_ok and jnp.shape(points)[1] >= GRAM_MIN_RATIO * n
    ):
        return gram.gram_karcher_mean(manifold, points, weights, solver)
    return _karcher_mean(manifold, points, weights, init, metric_weights, solver)


def _masked_weighted_sum(weights, mask, logs):
    """sum_i w_i log_i over the leading axis, as w @ X, ignoring entries of zero weight."""

    def reduce(leaf):
        flat = leaf.reshape(leaf.shape[0], -1)
        flat = jnp.where(mask[:, None], flat, 0.0)
        return (weights.astype(flat.dtype) @ flat).reshape(leaf.shape[1:])

    return jax.tree.map(reduce, logs)


@functools.partial(jax.jit, static_argnames=("manifold", "solver"))
def _karcher_mean(manifold, points, weights, init, metric_weights, solver):
    in_dtypes = jax.tree.map(jnp.result_type, points)
    points = jax.tree.map(lambda p: p.astype(compute_dtype(p.dtype)), points)
    dtype = compute_dtype(jnp.result_type(*jax.tree.leaves(points)))
    weights = jnp.asarray(weights, dtype)
    total = jnp.sum(weights)
    weights_ok = jnp.all(jnp.isfinite(weights)) & jnp.all(weights >= 0) & (total > 0)
    weights = weights / jnp.where(total > 0, total, 1.0)
    mask = weights > 0

    if metric_weights is not None:
        metric_weights = jax.tree.map(lambda m, p: m.astype(p.dtype), metric_weights, points)
        metric_total = _masked_weighted_sum(weights, mask, metric_weights)

    def gradient(x):
        logs = jax.vmap(manifold.log, in_axes=(None, 0))(x, points)
        if metric_weights is None:
            g = _masked_weighted_sum(weights, mask, logs)
        else:
            scaled = jax.tree.map(jnp.multiply, metric_weights, logs)
            num = _masked_weighted_sum(weights, mask, scaled)
            g = manifold.proj(
                x, jax.tree.map(lambda a, b: a / jnp.where(b > 0, b, 1.0), num, metric_total)
            )
        return g, manifold.relative_norm(x, g)

    if init is None:
        x0 = manifold.init_mean(points, weights)
    else:
        x0 = jax.tree.map(lambda a, p: jnp.asarray(a).astype(p.dtype), init, points)
    g0, r0 = gradient(x0)

    def finite(tree):
        return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))

    floor = FLOOR_EPS * jnp.finfo(dtype).eps

    def small_enough(state):
        at_floor = (state.stalls >= FLOOR_PATIENCE) & (state.grad_norm <= floor)
        return (state.grad_norm <= solver.tol) | at_floor

    def cond(state):
        return (
            (state.num_steps < solver.max_steps)
            & ~small_enough(state)
            & jnp.isfinite(state.grad_norm)
            & weights_ok
        )

    def body(state):
        step = jax.tree.map(lambda g: solver.step_size * g, state.grad)
        x = manifold.exp(state.x, step)
        g, r = gradient(x)
        improved = r < state.best
        stalls = jnp.where(improved, 0, state.stalls + 1)
        return _State(x, g, r, state.num_steps + 1, jnp.minimum(r, state.best), stalls)

    zero = jnp.asarray(0, jnp.int32)
    state = jax.lax.while_loop(cond, body, _State(x0, g0, r0, zero, r0, zero))

    # Afsari (2011): if all inputs lie in an open ball of the manifold's uniqueness radius, the
    # weighted mean is unique for every weighting, and lies in that ball. Two centres are tried:
    # the result itself, and the unweighted centre of the inputs (which certifies e.g. two
    # points with very unequal weights, where the mean sits far from the lighter one).
    def all_in_ball(centre):
        inside = jax.vmap(manifold.within_uniqueness_radius, in_axes=(None, 0))(centre, points)
        return jnp.all(inside | ~mask)

    centre = manifold.init_mean(points, mask / jnp.maximum(jnp.sum(mask), 1))
    certified = all_in_ball(state.x) | all_in_ball(centre)
    converged = (
        weights_ok
        & small_enough(state)
        & jnp.isfinite(state.grad_norm)
        & finite(state.x)
        & certified
    )
    mean = jax.tree.map(lambda a, dt: a.astype(dt), state.x, in_dtypes)
    return KarcherResult(mean, state.num_steps, state.grad_norm, converged)
