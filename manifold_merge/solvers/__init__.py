"""Solvers that compose the manifold layer: weighted Karcher / Fréchet means."""

from manifold_merge.solvers.gram import gram_karcher_mean
from manifold_merge.solvers.karcher import (
    KarcherResult,
    KarcherSolver,
    karcher_mean,
    validate_weights,
)

__all__ = [
    "KarcherResult",
    "KarcherSolver",
    "gram_karcher_mean",
    "karcher_mean",
    "validate_weights",
]
