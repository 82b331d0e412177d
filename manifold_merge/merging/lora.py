"""LoRA merge methods, all in the shared core space (ALGORITHMS.md section 7).

Every method takes the adapters of one module as a list of :class:`LoraFactors` (LoRA scaling
already folded into ``b``, so Delta W_i = b_i @ a_i; ranks may differ), raw per-adapter weights
w_i and the output ``rank``, and returns merged ``LoraFactors``. Inputs are reduced to R x R
cores by one QR of the stacked factors (R = sum_i r_i), so the cost is O((m + n) R^2 + R^3) and
no m x n matrix is formed. Weights are not normalised unless ``normalize=True``: the linear
family approximates sum_i w_i Delta W_i (task arithmetic on the updates, as peft's
``add_weighted_adapter``), and ``geomerge`` returns (sum_i w_i) x the weighted quotient mean.

Except ``lora_linear`` (the factor-wise baseline, which depends on the representatives), every
method depends on the Delta W_i alone: invariant under (b_i, a_i) -> (b_i M_i, M_i^-1 a_i).
Methods that sparsify or elect signs coordinate-wise do so in bases taken from the Delta W_i
(singular vectors of their concatenations), never from the stored factors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from manifold_merge.manifolds.approx import Chordal, get_approx
from manifold_merge.manifolds.lora import LoraFactors, LoraQuotient, core_space, truncated_svd
from manifold_merge.merging.registry import register
from manifold_merge.merging.sparse import CONSENSUS, dare_drop, magnitude_prune, sign_consensus
from manifold_merge.solvers.karcher import KarcherSolver, karcher_mean

BASE_METHODS = ("linear", "ties", "dare")
_SPARSE = {"density": None, "consensus": "sum", "rescale": True}


def _total_weights(weights, normalize):
    return weights / jnp.sum(weights) if normalize else weights


def _ranks(factors):
    return [int(f.b.shape[1]) for f in factors]


def _out_rank(rank, default, limit, method):
    r = default if rank is None else rank
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{method}: rank must be a positive int, got {rank!r}")
    if r > limit:
        raise ValueError(f"{method}: rank {r} exceeds what the inputs span ({limit})")
    return r


def _check_lora(params, weights, n, has_base):
    base = params.get("base_method")
    if base is not None and base not in BASE_METHODS:
        raise ValueError(f"base_method must be one of {BASE_METHODS}, got {base!r}")
    if base in ("ties", "dare"):
        d = params.get("density")
        if d is None:
            raise ValueError("this merge needs density=(0, 1], the fraction of entries kept")
        if not isinstance(d, (int, float)) or not 0 < d <= 1:
            raise ValueError(f"density must be a number in (0, 1], got {d!r}")
    c = params.get("consensus")
    if c is not None and c not in CONSENSUS:
        raise ValueError(f"consensus must be one of {CONSENSUS} or None, got {c!r}")


def _sparse_merge(vectors, weights, key, base_method, density, consensus, normalize, rescale):
    """Merge (N, D) vectors given in a canonical basis: weighted sum, TIES or DARE."""
    if base_method == "linear":
        return _total_weights(weights, normalize) @ vectors
    if base_method == "ties":
        trimmed = magnitude_prune(vectors, float(density))
        return sign_consensus(trimmed, weights, consensus or "sum", True)
    keys = jax.random.split(key, vectors.shape[0])
    dropped = jax.vmap(lambda v, k: dare_drop(v, float(density), k, rescale))(vectors, keys)
    if consensus is None:
        return _total_weights(weights, normalize) @ dropped
    return sign_consensus(dropped, weights, consensus, True)


# ----------------------------------------------------------------------------- baselines
@register(
    "lora_linear",
    defaults={"rank": None, "normalize": False},
    lora=True,
    negative_weights=True,
)
def lora_linear(factors, weights, key, rank=None, normalize=False):
    """Factor-wise averaging, the baseline (peft's "linear"): b = W sum_i a_i b_i,
    a = sum_i a_i a_i with a_i = w_i / sum w and W = sum_i w_i (1 with ``normalize``).

    NOT invariant: it depends on the representatives (b_i, a_i), not only on Delta W_i, which is
    why the quotient methods exist. peft puts sqrt(w_i) on both factors; we put the normalised
    weights on each factor and the total once, so equal adapters merge to W Delta W as every
    other method does. Needs equal ranks.
    """
    del key
    ranks = _ranks(factors)
    if len(set(ranks)) != 1:
        raise ValueError(f"lora_linear needs adapters of one rank, got ranks {ranks}")
    if rank is not None and rank != ranks[0]:
        raise ValueError(f"lora_linear keeps the input rank {ranks[0]}; got rank={rank}")
    a_w = weights / jnp.sum(weights)
    total = 1.0 if normalize else jnp.sum(weights)
    b = total * sum(w * f.b for w, f in zip(a_w, factors))
    a = sum(w * f.a for w, f in zip(a_w, factors))
    return LoraFactors(b, a), {}


@register("lora_cat", defaults={"rank": None, "normalize": False}, lora=True, negative_weights=True)
def lora_cat(factors, weights, key, rank=None, normalize=False):
    """Concatenation: b = [w_1 b_1 ... w_N b_N], a = [a_1; ...; a_N], so b @ a is exactly
    sum_i w_i Delta W_i, at rank R = sum_i r_i (peft's "cat"). ``rank`` must be R or None."""
    del key
    total_rank = sum(_ranks(factors))
    if rank is not None and rank != total_rank:
        raise ValueError(
            f"lora_cat is exact at rank sum(r_i) = {total_rank}; got rank={rank} (use lora_svd "
            "or geomerge for a lower rank)"
        )
    w = _total_weights(weights, normalize)
    b = jnp.concatenate([wi * f.b for wi, f in zip(w, factors)], axis=1)
    return LoraFactors(b, jnp.concatenate([f.a for f in factors], axis=0)), {}


@register("lora_svd", defaults={"rank": None, "normalize": False}, lora=True, negative_weights=True)
def lora_svd(factors, weights, key, rank=None, normalize=False):
    """The truncated SVD of sum_i w_i Delta W_i at ``rank`` (default max r_i), computed on the
    R x R core (peft's "svd" without forming the dense sum); balanced output factors."""
    del key
    w = _total_weights(weights, normalize)
    cs = core_space([LoraFactors(wi * f.b, f.a) for wi, f in zip(w, factors)])
    total = sum(cs.cores())
    r = _out_rank(rank, max(_ranks(factors)), min(total.shape), "lora_svd")
    return cs.lift(truncated_svd(total, r)), {}


# ------------------------------------------------------------------ canonical core space
def canonical_cores(factors):
    """The adapters' cores in bases taken from the Delta W_i alone.

    Left basis: the left singular vectors of [Delta W_1 ... Delta W_N]; right basis: those of
    [Delta W_1^T ... Delta W_N^T] (both from R x NR core matrices). A sign flip of a basis
    vector flips a whole row or column of every core, to which TIES, DARE and sums are
    equivariant, so results do not depend on the sign convention.

    Returns:
        (cs, u, v, cores): the :class:`CoreSpace`, the (k_b, k_b) and (k_a, k_a) rotations to
        the canonical bases, and the (N, k_b, k_a) canonical cores u^T C_i v.
    """
    cs = core_space(factors)
    cores = jnp.stack(cs.cores())
    u, _, _ = jnp.linalg.svd(jnp.concatenate(list(cores), axis=1), full_matrices=False)
    v, _, _ = jnp.linalg.svd(jnp.concatenate([c.T for c in cores], axis=1), full_matrices=False)
    return cs, u, v, jnp.einsum("ij,njk,kl->nil", u.T, cores, v)


def _core_merge(
    factors,
    weights,
    key,
    rank,
    default_rank,
    method,
    base_method,
    density,
    consensus,
    normalize,
    rescale,
):
    if base_method == "linear":
        w = _total_weights(weights, normalize)
        cs = core_space([LoraFactors(wi * f.b, f.a) for wi, f in zip(w, factors)])
        total = sum(cs.cores())
    else:
        cs, u, v, cores = canonical_cores(factors)
        n, kb, ka = cores.shape
        merged = _sparse_merge(
            cores.reshape(n, kb * ka),
            weights,
            key,
            base_method,
            density,
            consensus,
            normalize,
            rescale,
        )
        total = u @ merged.reshape(kb, ka) @ v.T
    r = _out_rank(rank, default_rank, min(total.shape), method)
    return cs.lift(truncated_svd(total, r)), {}


_CORE_DEFAULTS = {"rank": None, "normalize": False, **_SPARSE}


@register(
    "core_space",
    defaults={**_CORE_DEFAULTS, "base_method": "linear"},
    lora=True,
    negative_weights=True,
    check=_check_lora,
)
def core_space_merge(
    factors,
    weights,
    key,
    rank=None,
    base_method="linear",
    density=None,
    consensus="sum",
    normalize=False,
    rescale=True,
):
    """Core Space merging (Panariello et al. 2025): merge the R x R cores with ``base_method``
    ("linear": sum_i w_i C_i; "ties" / "dare" with ``density``, ``consensus``, ``rescale``, in
    the canonical bases of :func:`canonical_cores`) and lift back at ``rank`` (default R, the
    full core: with "linear" exactly sum_i w_i Delta W_i)."""
    return _core_merge(
        factors,
        weights,
        key,
        rank,
        sum(_ranks(factors)),
        "core_space",
        base_method,
        density,
        consensus,
        normalize,
        rescale,
    )


@register(
    "lora_ties_svd",
    defaults={**_CORE_DEFAULTS, "density": None},
    lora=True,
    negative_weights=True,
    check=lambda p, w, n, b: _check_lora({**p, "base_method": "ties"}, w, n, b),
)
def lora_ties_svd(
    factors, weights, key, rank=None, density=None, consensus="sum", normalize=False, rescale=True
):
    """TIES on the updates, then the truncated SVD at ``rank`` (default max r_i): trim each
    canonical core to its top ``density`` entries, elect signs, disjoint mean (mergekit's TIES
    rules), in bases from the Delta W_i (peft's "ties_svd" does this on the dense m x n
    matrices in the standard basis; the canonical bases make it O(R^3) and invariant)."""
    del rescale, normalize
    return _core_merge(
        factors,
        weights,
        key,
        rank,
        max(_ranks(factors)),
        "lora_ties_svd",
        "ties",
        density,
        consensus,
        True,
        True,
    )


@register(
    "lora_dare_svd",
    defaults={**_CORE_DEFAULTS, "consensus": None},
    lora=True,
    negative_weights=True,
    check=lambda p, w, n, b: _check_lora({**p, "base_method": "dare"}, w, n, b),
)
def lora_dare_svd(
    factors, weights, key, rank=None, density=None, consensus=None, normalize=False, rescale=True
):
    """DARE on the updates, then the truncated SVD at ``rank`` (default max r_i): drop each
    canonical-core entry with probability 1 - ``density`` (reproducible from ``seed``), rescale
    by 1/density, then the weighted sum (``consensus=None``: peft's "dare_linear_svd") or
    TIES' sign election (``consensus="sum"``: "dare_ties_svd")."""
    return _core_merge(
        factors,
        weights,
        key,
        rank,
        max(_ranks(factors)),
        "lora_dare_svd",
        "dare",
        density,
        consensus,
        normalize,
        rescale,
    )


@register(
    "knots",
    defaults={**_CORE_DEFAULTS, "base_method": "ties"},
    lora=True,
    negative_weights=True,
    check=_check_lora,
)
def knots(
    factors,
    weights,
    key,
    rank=None,
    base_method="ties",
    density=None,
    consensus="sum",
    normalize=False,
    rescale=True,
):
    """KnOTS (Stoica et al. 2025): the SVD of the concatenation [Delta W_1 ... Delta W_N] =
    U S [V_1^T ... V_N^T] aligns the adapters; the per-adapter right factors V_i^T (k x n) are
    merged with ``base_method`` (TIES / DARE coordinate-wise in R^n, or the weighted sum) into
    V*, and U S V*^T is truncated to ``rank`` (default max r_i). The SVD runs on the
    R x NR core matrix; V_i^T is lifted to (k, n), never an m x n matrix."""
    cs = core_space(factors)
    cores = cs.cores()
    u, s, vt = jnp.linalg.svd(jnp.concatenate(cores, axis=1), full_matrices=False)
    ka = cs.u_a.shape[1]
    k = s.shape[0]
    blocks = jnp.stack([vt[:, i * ka : (i + 1) * ka] @ cs.u_a.T for i in range(len(cores))])
    n_out = blocks.shape[2]
    if base_method == "ties":  # KnOTS-TIES: TIES' rules with its normalised disjoint mean
        normalize = True
    merged = _sparse_merge(
        blocks.reshape(len(cores), k * n_out),
        weights,
        key,
        base_method,
        density,
        consensus,
        normalize,
        rescale,
    ).reshape(k, n_out)
    r = _out_rank(rank, max(_ranks(factors)), k, "knots")
    u2, s2, vt2 = jnp.linalg.svd(s[:, None] * merged, full_matrices=False)
    root = jnp.sqrt(s2[:r])
    return LoraFactors(cs.u_b @ (u @ (u2[:, :r] * root)), root[:, None] * vt2[:r]), {}


# ----------------------------------------------------------------------------- GeoMerge
GEOMERGE_DEFAULTS = {
    "rank": None,
    "high_rank": False,
    "normalize": False,
    "metric": "scaled",
    "approx": None,
    "max_iter": 1000,
    "tol": KarcherSolver.tol,
    "step_size": 1.0,
}


def _check_geomerge(params, weights, n, has_base):
    if params["metric"] not in ("scaled", "induced", "embedded"):
        raise ValueError(
            f"geomerge metric must be scaled, induced or embedded, got {params['metric']!r}"
        )
    if params["approx"] is not None:
        get_approx(params["approx"])
    if weights is not None and (weights < 0).any():
        raise ValueError(f"geomerge needs non-negative weights, got {weights.tolist()}")


@register("geomerge", defaults=GEOMERGE_DEFAULTS, lora=True, check=_check_geomerge)
def geomerge(
    factors,
    weights,
    key,
    rank=None,
    high_rank=False,
    normalize=False,
    metric="scaled",
    approx=None,
    max_iter=1000,
    tol=1e-7,
    step_size=1.0,
):
    """Paper B's quotient Fréchet mean: argmin over rank-r X of sum_i a_i d(X, Delta W_i)^2 on
    :class:`~manifold_merge.manifolds.LoraQuotient` (a = w / sum w), times sum_i w_i (1 with
    ``normalize``).

    Runs the Karcher iteration x <- retr_x(eta sum_i a_i log_x(p_i)) on the R x R cores, from
    the balanced truncated SVD of sum_i a_i Delta W_i, until the relative gradient is below
    ``tol``. ``rank`` defaults to max r_i, or to R = sum_i r_i with ``high_rank=True`` (the
    high-rank variant, which keeps every adapter's directions). Except with the chordal
    distance, adapters of higher rank than the output are first projected onto it (their
    truncated SVD), since the alignments need equal ranks; adapters of lower rank are
    accepted by the embedded metric only (the scaled and induced metrics put rank-deficient
    updates at infinite distance), so the high-rank variant needs ``metric="embedded"``.

    ``approx=None`` picks "chordal" for the embedded metric (then the mean is the truncated SVD
    of sum_i a_i Delta W_i, Eckart-Young, and at rank R exactly that sum) and "procrustes"
    otherwise: balanced factors rotated onto the iterate, which stays well conditioned for
    adapters far apart (measured: "horizontal" and "lstsq" can diverge there; they remain
    available).
    """
    del key
    ranks = _ranks(factors)
    total_rank = sum(ranks)
    cs = core_space(factors)
    kb, ka = cs.u_b.shape[1], cs.u_a.shape[1]
    r = _out_rank(rank, total_rank if high_rank else max(ranks), min(kb, ka), "geomerge")
    if approx is None:
        approx = "chordal" if metric == "embedded" else "procrustes"
    approx = get_approx(approx)
    low = [i for i, ri in enumerate(ranks) if ri < r]
    if low and metric != "embedded":
        raise ValueError(
            f"geomerge at rank {r} with metric={metric!r}: adapters {low} have lower rank "
            f"(ranks {ranks}); this metric puts rank-deficient updates at infinite distance. "
            "Use metric='embedded' (chordal: the high-rank mean), a lower rank, or lora_svd."
        )
    chordal = isinstance(approx, Chordal)
    width = max(r, *ranks) if chordal else r  # chordal logs take inputs of any rank
    core_b, core_a = [], []
    for cb, ca in zip(cs.core_b, cs.core_a):
        if cb.shape[1] > width:  # an input of higher rank is first projected onto rank r
            cb, ca = truncated_svd(cb @ ca, r)
        pad = width - cb.shape[1]  # lower-rank inputs: zero columns
        core_b.append(jnp.pad(cb, ((0, 0), (0, pad))))
        core_a.append(jnp.pad(ca, ((0, pad), (0, 0))))
    manifold = LoraQuotient(kb, ka, r, metric=metric, approx=approx)
    points = LoraFactors(jnp.stack(core_b), jnp.stack(core_a))
    alpha = weights / jnp.sum(weights)
    solver = KarcherSolver(max_steps=int(max_iter), tol=float(tol), step_size=float(step_size))
    res = karcher_mean(manifold, points, alpha, solver=solver)
    scale = 1.0 if normalize else jnp.sum(weights)
    out = cs.lift(LoraFactors(res.mean.b * scale, res.mean.a))
    return out, {"num_steps": res.num_steps, "grad_norm": res.grad_norm, "converged": res.converged}
