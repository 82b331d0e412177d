"""Function-space diagnostics: accuracy, KL to the experts, Fisher–Rao barycenter distance.

ALGORITHMS.md sections 4 and 8. The inputs are model outputs (logits or probabilities over the
last axis) on the same inputs. Closed forms are computed on the host in float64 and returned as
Python floats or NumPy arrays; the Fisher–Rao barycenter is a Karcher mean on
:class:`~manifold_merge.manifolds.FisherRao` (JAX, vmapped over inputs), computed in the input
precision (float32 unless JAX's x64 mode is on and the inputs are float64).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from manifold_merge.manifolds.fisher_rao import FisherRao
from manifold_merge.solvers.karcher import KarcherSolver, karcher_mean, validate_weights

_BARYCENTER_CHUNK = 1024  # inputs per jitted call


def _valid(a: Any, mask: Any, lead: tuple) -> np.ndarray:
    """Keep the entries of ``a`` (leading axes ``lead``) where ``mask`` is True, flattened."""
    if mask is None:
        return a.reshape((-1,) + a.shape[len(lead) :])
    mask = np.asarray(mask, bool)
    if mask.shape != lead:
        raise ValueError(f"mask must have shape {lead}, got {mask.shape}")
    if not mask.any():
        raise ValueError("mask selects no inputs")
    return a[mask]


def accuracy(logits: Any, labels: Any) -> float:
    """Fraction of inputs whose arg-max class equals the label: mean(argmax_k logits_k == y).

    Args:
        logits: (num_examples[, ...], K) scores (logits or probabilities).
        labels: integer labels of shape ``logits.shape[:-1]``.

    Returns:
        The accuracy in [0, 1] as a float.

    Example:
        >>> accuracy(np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), np.array([0, 1, 1]))
        0.6666666666666666
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim < 1 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have the shape of logits without the class axis: logits "
            f"{logits.shape}, labels {labels.shape}"
        )
    if labels.size == 0:
        raise ValueError("accuracy of no examples")
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


class NormalizedAccuracyResult(NamedTuple):
    """Outcome of :func:`normalized_accuracy`.

    Attributes:
        per_task: merged_acc_i / expert_acc_i, a float64 array (or a dict for dict inputs).
        mean: the mean of the per-task ratios.
    """

    per_task: Any
    mean: float


def normalized_accuracy(
    merged_acc: Sequence[float] | Mapping[str, float],
    expert_acc: Sequence[float] | Mapping[str, float],
) -> NormalizedAccuracyResult:
    """Per-task normalised accuracy acc(merged on task i) / acc(expert i on task i), and its mean.

    Args:
        merged_acc: the merged model's accuracy on each task (a sequence, or ``{task: acc}``).
        expert_acc: each task's expert accuracy on its own task, in the same order (or a dict
            with the same tasks). All must be positive.

    Returns:
        A :class:`NormalizedAccuracyResult` ``(per_task, mean)``.

    Example:
        >>> res = normalized_accuracy({"a": 0.45, "b": 0.8}, {"a": 0.9, "b": 0.8})
        >>> res.per_task, res.mean
        ({'a': 0.5, 'b': 1.0}, 0.75)
    """
    if isinstance(merged_acc, Mapping) or isinstance(expert_acc, Mapping):
        if not (isinstance(merged_acc, Mapping) and isinstance(expert_acc, Mapping)):
            raise TypeError("pass both accuracies as dicts {task: acc}, or both as sequences")
        if set(merged_acc) != set(expert_acc):
            raise ValueError(
                f"the tasks differ: merged {sorted(merged_acc)}, experts {sorted(expert_acc)}"
            )
        names = list(merged_acc)
        m = np.array([merged_acc[k] for k in names], np.float64)
        e = np.array([expert_acc[k] for k in names], np.float64)
    else:
        names = None
        m, e = np.asarray(merged_acc, np.float64), np.asarray(expert_acc, np.float64)
        if m.ndim != 1 or m.shape != e.shape or m.size == 0:
            raise ValueError(
                f"need one merged and one expert accuracy per task, got shapes {m.shape} and "
                f"{e.shape}"
            )
    if not (np.all(np.isfinite(e)) and np.all(e > 0)):
        raise ValueError(f"expert accuracies must be positive, got {e.tolist()}")
    ratios = m / e
    per_task = dict(zip(names, ratios.tolist())) if names is not None else ratios
    return NormalizedAccuracyResult(per_task, float(np.mean(ratios)))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - np.max(z, axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def mean_kl(expert_logits: Any, merged_logits: Any, *, mask: Any = None) -> float:
    """Mean over inputs of KL(p_expert || p_merged), from logits, in float64.

    KL(p || q) = sum_k p_k (log p_k - log q_k) with log p = log_softmax(expert_logits) and
    log q = log_softmax(merged_logits) (max-shifted, so large logits do not overflow); terms
    with p_k = 0 are 0.

    Args:
        expert_logits: (num_examples[, tokens], K) logits of the expert.
        merged_logits: logits of the merged model on the same inputs, same shape.
        mask: optional bool array of shape ``logits.shape[:-1]`` selecting the inputs
            (padded tokens False).

    Returns:
        The mean KL divergence (>= 0) as a float.

    Example:
        >>> z = np.array([[1.0, 2.0, 3.0]])
        >>> mean_kl(z, z + 10.0)  # logits that differ by a constant give the same softmax
        0.0
    """
    a = np.asarray(expert_logits, np.float64)
    b = np.asarray(merged_logits, np.float64)
    if a.shape != b.shape or a.ndim < 1:
        raise ValueError(f"expert and merged logits must have one shape, got {a.shape}, {b.shape}")
    a, b = _valid(a, mask, a.shape[:-1]), _valid(b, mask, b.shape[:-1])
    if a.shape[0] == 0:
        raise ValueError("mean_kl of no inputs")
    lp, lq = _log_softmax(a), _log_softmax(b)
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (lp - lq), 0.0)
    kl = np.maximum(np.sum(terms, axis=-1), 0.0)  # rounding can give -1e-17
    return float(np.mean(kl))


def _probs(p: Any, what: str) -> np.ndarray:
    """Float64 probability vectors over the last axis: clipped at 0 and renormalised."""
    p = np.asarray(p, np.float64)
    if p.ndim < 1 or p.shape[-1] < 2:
        raise ValueError(f"{what} must have at least 2 classes on the last axis, got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{what} has NaN or Inf entries")
    p = np.maximum(p, 0.0)
    total = p.sum(axis=-1, keepdims=True)
    if not np.all(total > 0):
        raise ValueError(f"{what} has a row that sums to 0")
    return p / total


def fisher_rao_distance(p: Any, q: Any) -> float | np.ndarray:
    """Fisher–Rao distance d(p, q) = 2 arccos(sum_k sqrt(p_k q_k)) of categorical distributions.

    Computed in float64 in the stable form d = 4 atan2(||a - b||, ||a + b||) with a = sqrt(p),
    b = sqrt(q) (the arccos form loses all precision for close p and q). It lies in [0, pi]:
    0 for p = q, pi for disjoint supports. Rows are clipped at 0 and renormalised first.

    Args:
        p, q: probabilities over the last axis, shapes broadcastable to each other.

    Returns:
        A float for 1-D inputs, else an array of the broadcast leading shape.

    Example:
        >>> round(fisher_rao_distance([0.5, 0.5], [1.0, 0.0]), 6)  # pi / 2
        1.570796
    """
    a, b = np.sqrt(_probs(p, "p")), np.sqrt(_probs(q, "q"))
    a, b = np.broadcast_arrays(a, b)
    d = 4.0 * np.arctan2(np.linalg.norm(a - b, axis=-1), np.linalg.norm(a + b, axis=-1))
    return float(d) if d.ndim == 0 else d


@functools.partial(jax.jit, static_argnames=("num_classes", "solver"))
def _barycenters(points, weights, num_classes, solver):
    manifold = FisherRao(num_classes)
    res = jax.vmap(lambda pts: karcher_mean(manifold, pts, weights, solver=solver), in_axes=1)(
        points
    )
    return res.mean, res.converged


def fisher_rao_barycenter(
    probs_list: Sequence[Any], weights: Any = None, *, solver: KarcherSolver | None = None
) -> np.ndarray:
    """Per-input Fisher–Rao barycenter argmin_q sum_i w_i d_FR(q, p_i(.|x))^2 of N predictions.

    For each input x, the weighted Karcher mean of the experts' predictive distributions on the
    :class:`~manifold_merge.manifolds.FisherRao` manifold (the normalised square of the sphere
    mean of the sqrt(p_i); ALGORITHMS.md section 4), by :func:`~manifold_merge.karcher_mean`
    vmapped over the inputs. Inputs whose iteration does not converge are reported with a
    warning (the predictions of the positive orthant always have a unique mean).

    Args:
        probs_list: the N experts' probabilities on the same inputs, a sequence of arrays of
            shape (num_examples[, ...], K) (or one array with the expert axis first).
        weights: (N,) non-negative weights with positive sum; default uniform.
        solver: a :class:`~manifold_merge.KarcherSolver`; default 500 steps to tolerance 1e-7
            (1e-12 when computing in float64).

    Returns:
        The barycenters, shape (num_examples[, ...], K), rows on the simplex, as a NumPy array
        in the computation dtype.

    Example:
        >>> bary = fisher_rao_barycenter([np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])])
        >>> np.round(bary, 6).tolist()  # the sphere midpoint of (1, 0) and (0, 1)
        [[0.5, 0.5]]
    """
    if len(probs_list) == 0:
        raise ValueError("fisher_rao_barycenter needs at least one expert's predictions")
    shapes = {np.shape(p) for p in probs_list}
    if len(shapes) != 1:
        raise ValueError(f"the experts' predictions have different shapes: {sorted(shapes)}")
    (shape,) = shapes
    stacked = np.stack([_probs(p, f"expert {i}'s predictions") for i, p in enumerate(probs_list)])
    n = stacked.shape[0]
    w = validate_weights(np.full(n, 1.0 / n) if weights is None else weights, n)
    in_dtype = np.result_type(*[np.asarray(p).dtype for p in probs_list])
    # float64 only where JAX's x64 mode allows it; never below float32
    dtype = jax.dtypes.canonicalize_dtype(in_dtype if in_dtype == np.float64 else np.float32)
    if solver is None:
        solver = KarcherSolver(max_steps=500, tol=1e-12 if dtype == jnp.float64 else 1e-7)
    points = stacked.reshape(n, -1, shape[-1])
    rows = points.shape[1]
    # Fixed-size chunks of inputs (a power of two up to _BARYCENTER_CHUNK, the last one padded
    # with copies of a real row): one compilation serves many input counts, memory is bounded.
    size = min(_BARYCENTER_CHUNK, 1 << max(0, rows - 1).bit_length())
    means, converged = [], []
    for s in range(0, rows, size):
        chunk = points[:, s : s + size]
        valid = chunk.shape[1]
        if valid < size:
            chunk = np.concatenate([chunk, np.repeat(chunk[:, :1], size - valid, axis=1)], 1)
        m, c = _barycenters(jnp.asarray(chunk, dtype), jnp.asarray(w, dtype), shape[-1], solver)
        means.append(np.asarray(m)[:valid])
        converged.append(np.asarray(c)[:valid])
    mean, converged = np.concatenate(means), np.concatenate(converged)
    bad = int(np.sum(~converged))
    if bad:
        warnings.warn(
            f"fisher_rao_barycenter: the Karcher iteration did not converge for {bad} of "
            f"{converged.size} inputs (solver {solver})",
            RuntimeWarning,
            stacklevel=2,
        )
    return mean.reshape(shape)


def distance_to_barycenter(
    expert_probs_list: Sequence[Any], merged_probs: Any, *, weights: Any = None
) -> float:
    """Mean over inputs of d_FR(p_merged(.|x), barycenter of the experts' p_i(.|x)).

    The "functionality" target of Paper A: how far the merged model's predictions are from the
    Fisher–Rao barycenter (:func:`fisher_rao_barycenter`) of the experts' predictions on the
    same inputs. 0 when the merge predicts the barycenter everywhere; at most pi.

    Args:
        expert_probs_list: the N experts' probabilities, each (num_examples[, ...], K).
        merged_probs: the merged model's probabilities on the same inputs, same shape.
        weights: optional (N,) barycenter weights.

    Returns:
        The mean Fisher–Rao distance as a float.

    Example:
        >>> experts = [np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])]
        >>> round(distance_to_barycenter(experts, np.array([[1.0, 0.0]])), 6)  # pi / 2
        1.570796
    """
    merged = np.asarray(merged_probs)
    if len(expert_probs_list) and merged.shape != np.shape(expert_probs_list[0]):
        raise ValueError(
            f"merged predictions have shape {merged.shape}, the experts' "
            f"{np.shape(expert_probs_list[0])}"
        )
    bary = fisher_rao_barycenter(expert_probs_list, weights)
    return float(np.mean(fisher_rao_distance(merged, bary)))
