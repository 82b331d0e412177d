"""Metric-weighted merges: diagonal Fisher merging and Paper B's Fréchet mean."""

from __future__ import annotations

import jax.numpy as jnp

from manifold_merge.manifolds.approx import ExactLog, FirstOrder, FrozenMetric
from manifold_merge.manifolds.registry import get_manifold
from manifold_merge.merging.registry import register
from manifold_merge.solvers.karcher import KarcherSolver, karcher_mean


def fisher_weighted(points, weights, fishers, floor: float):
    """sum_i w_i F_i theta_i / sum_i w_i F_i element-wise, with F_i floored at ``floor``."""
    f = jnp.maximum(fishers, floor) * weights[:, None]
    return jnp.sum(f * points, 0) / jnp.sum(f, 0)


@register(
    "fisher",
    defaults={"fisher_floor": 1e-6},
    uses_base=False,
    stats=("fishers",),
    required_stats=("fishers",),
)
def fisher(points, base, weights, key, fishers=None, fisher_floor=1e-6):
    """Diagonal Fisher merging (Matena & Raffel 2022): theta* = sum_i w_i F_i theta_i /
    sum_i w_i F_i element-wise, F_i = max(diag Fisher_i, fisher_floor); pass the diagonals as
    ``fishers=[pytree, ...]`` shaped like the models (``manifold_merge.stats`` computes them)."""
    del base, key
    return fisher_weighted(points, weights, fishers, fisher_floor), {}


APPROXIMATIONS = tuple(a.name for a in (ExactLog, FirstOrder, FrozenMetric))
METRICS = ("identity", "fisher")


def _check_frechet(params, weights, n, has_base):
    if params["approx"] not in APPROXIMATIONS:
        raise ValueError(
            f"frechet approx must be one of {APPROXIMATIONS}, got {params['approx']!r}"
        )
    if params["metric"] not in METRICS:
        raise ValueError(f"frechet metric must be one of {METRICS}, got {params['metric']!r}")
    if params["approx"] == "frozen_metric" and params["manifold"] != "euclidean":
        raise ValueError(
            "frechet approx='frozen_metric' is a quadratic in the coordinates: it needs "
            f"manifold='euclidean', got {params['manifold']!r}"
        )
    if params["metric"] == "fisher" and params["approx"] == "exact":
        raise ValueError("frechet metric='fisher' needs approx='first_order' or 'frozen_metric'")


@register(
    "frechet",
    defaults={
        "manifold": "euclidean",
        "approx": "exact",
        "metric": "identity",
        "norm_mean": "arithmetic",
        "fisher_floor": 1e-6,
        "max_iter": 100,
        "tol": KarcherSolver.tol,
        "step_size": 1.0,
        "algorithm": "auto",
    },
    stats=("fishers",),
    check=_check_frechet,
)
def frechet(
    points,
    base,
    weights,
    key,
    fishers=None,
    manifold="euclidean",
    approx="exact",
    metric="identity",
    norm_mean="arithmetic",
    fisher_floor=1e-6,
    max_iter=100,
    tol=1e-7,
    step_size=1.0,
    algorithm="auto",
):
    """Paper B's Fréchet mean argmin_theta sum_i w_i d(theta, theta_i)^2 with a chosen manifold,
    metric and distance approximation (on task vectors when a base is given):

    * ``approx="exact"``: the Karcher mean with the manifold's geodesic distance
      (``manifold="euclidean"``: the weighted average; ``"norm_sphere"``: Paper A's ``karcher``;
      ``algorithm`` picks its solver, see :func:`~manifold_merge.solvers.karcher_mean`);
    * ``approx="first_order"``: one tangent-space average at the reference point x_0 (the base,
      or the manifold's extrinsic mean): exp_x0(sum_i w_i M_i log_x0(theta_i) / sum_i w_i M_i)
      with M_i the metric (identity, or the diagonal Fisher ``fishers``);
    * ``approx="frozen_metric"`` (Euclidean coordinates): d^2 ~ (theta - theta_i)^T F_i
      (theta - theta_i), minimised in closed form by (sum w_i F_i)^-1 sum w_i F_i theta_i. With
      ``metric="fisher"`` this is Fisher merging, with ``"identity"`` the linear average.
    """
    del key
    vecs = points if base is None else points - base
    dim = vecs.shape[1]
    w = weights / jnp.sum(weights)
    empty = jnp.zeros((), bool)
    if manifold == "norm_sphere":
        # A zero vector has no direction (its log is undefined): left out of the mean, as in
        # ``karcher``; a block whose vectors are all zero merges to zero (the base). Real task
        # vectors have such blocks: the kernel rows of input pixels that are always 0.
        norms = jnp.sqrt(jnp.sum(jnp.square(vecs), axis=1))
        w = jnp.where(norms > 0, w, 0.0)
        empty = jnp.sum(w) == 0
        w = jnp.where(empty, 1.0 / w.shape[0], w / jnp.where(empty, 1.0, jnp.sum(w)))
        vecs = jnp.where(empty, jnp.ones_like(vecs), vecs)
    if metric == "fisher":
        if fishers is None:
            raise ValueError("frechet metric='fisher' needs fishers=[one pytree per model]")
        metric_w = jnp.maximum(fishers, fisher_floor) * w[:, None]
    else:
        metric_w = jnp.broadcast_to(w[:, None], vecs.shape)
    info = {}
    kwargs = {"norm_mean": norm_mean} if manifold == "norm_sphere" else {}
    m = get_manifold(manifold, dim=dim, **kwargs)
    if approx == "frozen_metric":
        out = jnp.sum(metric_w * vecs, 0) / jnp.sum(metric_w, 0)
    elif approx == "first_order":
        x0 = jnp.zeros(dim, vecs.dtype) if base is not None and manifold == "euclidean" else None
        if x0 is None:
            x0 = m.init_mean(vecs, w)
        logs = jnp.stack([m.log(x0, v) for v in vecs])
        # Left-out points (weight 0) may have non-finite logs (a zero vector with the geometric
        # norm rule sits at log-norm -inf): 0 x inf must not reach the average.
        logs = jnp.where(metric_w > 0, logs, 0.0)
        out = m.exp(x0, jnp.sum(metric_w * logs, 0) / jnp.sum(metric_w, 0))
    else:
        solver = KarcherSolver(max_steps=int(max_iter), tol=float(tol), step_size=float(step_size))
        res = karcher_mean(m, vecs, w, solver=solver, algorithm=algorithm)
        out = res.mean
        info = {"num_steps": res.num_steps, "grad_norm": res.grad_norm, "converged": res.converged}
    out = jnp.where(empty, 0.0, out)
    if "converged" in info:
        info["converged"] = info["converged"] | empty
    return (out if base is None else base + out), info


@register(
    "regmean",
    defaults={"alpha": 0.9, "ridge": 1e-6},
    uses_base=False,
    stats=("grams",),
    required_stats=("grams",),
    stat_shapes_free=True,
)
def regmean(points, base, weights, key, grams=None, alpha=0.9, ridge=1e-6):
    """RegMean (Jin et al. 2023), per linear layer: W* = (sum_i w_i G~_i)^-1 sum_i w_i G~_i W_i
    with G~_i the input Gram X_i^T X_i whose off-diagonal entries are scaled by ``alpha``.

    Pass ``grams=[{kernel leaf name: (d_in, d_in)}, ...]`` (``manifold_merge.stats.input_grams``
    computes them); kernels are (d_in, d_out) as in Flax. Leaves without a Gram (biases, norms,
    embeddings) get the weighted average, as in the paper. Weights scale the Grams (uniform
    weights give the paper's rule).

    ``ridge``: real inputs have dead features (image pixels that are always 0), whose Gram rows
    and columns are 0, so the system is singular. The solve adds lambda I to the left and
    lambda W_avg to the right, lambda = ``ridge`` x mean diagonal entry: directions no expert's
    data excites get the weighted average W_avg, and the rest change by O(ridge). ``ridge=0``
    is the paper's rule exactly (NaN or Inf when the Grams are singular).
    """
    del base, key
    avg = weights @ points / jnp.sum(weights)
    if grams is None:
        return avg, {}
    n, d_in = grams.shape[0], grams.shape[1]
    kernels = points.reshape(n, d_in, -1)
    diag = jnp.eye(d_in, dtype=grams.dtype)
    scaled = grams * (alpha + (1.0 - alpha) * diag)
    scaled = scaled * weights[:, None, None]
    lhs = jnp.sum(scaled, 0)
    lam = ridge * jnp.trace(lhs) / d_in
    rhs = jnp.einsum("nij,njk->ik", scaled, kernels) + lam * avg.reshape(d_in, -1)
    return jnp.linalg.solve(lhs + lam * diag, rhs).reshape(-1), {}
