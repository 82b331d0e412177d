"""Collapse and function-space diagnostics of merged models (ALGORITHMS.md section 8).

Functions take arrays (activations, logits, probabilities) or parameter pytrees, never model
classes, and return Python floats or NumPy arrays computed in float64 on the host:

* representation collapse (:mod:`~manifold_merge.diagnostics.collapse`):
  :func:`activation_variance`, :func:`variance_ratio`, :func:`effective_rank` and their
  per-layer forms, and the per-tensor :func:`norm_ratio`;
* function space (:mod:`~manifold_merge.diagnostics.function_space`): :func:`accuracy`,
  :func:`normalized_accuracy`, :func:`mean_kl`, :func:`fisher_rao_distance`,
  :func:`fisher_rao_barycenter` (a Karcher mean on ``FisherRao``) and
  :func:`distance_to_barycenter`.

Example:
    >>> import numpy as np
    >>> from manifold_merge import diagnostics
    >>> h = np.random.default_rng(0).standard_normal((100, 4))
    >>> diagnostics.variance_ratio(0.5 * h, [h, h])
    0.25
"""

from manifold_merge.diagnostics.collapse import (
    activation_variance,
    effective_rank,
    layer_activation_variances,
    layer_effective_ranks,
    layer_variance_ratios,
    norm_ratio,
    variance_ratio,
)
from manifold_merge.diagnostics.function_space import (
    NormalizedAccuracyResult,
    accuracy,
    distance_to_barycenter,
    fisher_rao_barycenter,
    fisher_rao_distance,
    mean_kl,
    normalized_accuracy,
)

__all__ = [
    "NormalizedAccuracyResult",
    "accuracy",
    "activation_variance",
    "distance_to_barycenter",
    "effective_rank",
    "fisher_rao_barycenter",
    "fisher_rao_distance",
    "layer_activation_variances",
    "layer_effective_ranks",
    "layer_variance_ratios",
    "mean_kl",
    "norm_ratio",
    "normalized_accuracy",
    "variance_ratio",
]
