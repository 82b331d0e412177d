"""manifold_merge: merge fine-tuned models by geometric (Karcher / Fréchet) averaging.

The public API, re-exported from the subpackages:

* :mod:`manifold_merge.manifolds` -- ``Euclidean``, ``Sphere``, ``FisherRao``, ``NormSphere``,
  ``ProductManifold`` and the ``AbstractManifold`` interface;
* :mod:`manifold_merge.solvers` -- ``karcher_mean``, ``KarcherSolver``, ``KarcherResult``;
* :mod:`manifold_merge.merging` -- ``merge(method, models, ...)`` and the method registry;
* :mod:`manifold_merge.testing` -- the manifold axiom suite for new manifolds.
"""

from manifold_merge.manifolds import (
    AbstractManifold,
    Euclidean,
    FisherRao,
    NormSphere,
    ProductManifold,
    Sphere,
    get_manifold,
    list_manifolds,
    register_manifold,
)
from manifold_merge.merging import MergeResult, list_methods, merge
from manifold_merge.solvers import KarcherResult, KarcherSolver, karcher_mean

__version__ = "0.1.0"

__all__ = [
    "AbstractManifold",
    "Euclidean",
    "FisherRao",
    "KarcherResult",
    "KarcherSolver",
    "MergeResult",
    "NormSphere",
    "ProductManifold",
    "Sphere",
    "get_manifold",
    "karcher_mean",
    "list_manifolds",
    "list_methods",
    "merge",
    "register_manifold",
]
