"""The manifold layer: geometries with ``inner, norm, proj, exp, log, dist, retr, transp``.

Every manifold subclasses :class:`AbstractManifold`, is a static pytree (safe to pass through
``jit``/``vmap``), and is registered by name for configs (:func:`get_manifold`).
"""

from manifold_merge.manifolds.base import (
    AbstractManifold,
    compute_dtype,
    safe_norm,
    sphere_angle,
    static_dataclass,
)
from manifold_merge.manifolds.euclidean import Euclidean
from manifold_merge.manifolds.fisher_rao import FisherRao
from manifold_merge.manifolds.lora import LoraFactors, LoraQuotient
from manifold_merge.manifolds.norm_sphere import NormSphere
from manifold_merge.manifolds.product import ProductManifold
from manifold_merge.manifolds.registry import get_manifold, list_manifolds, register_manifold
from manifold_merge.manifolds.sphere import Sphere

register_manifold("euclidean")(Euclidean)
register_manifold("sphere")(Sphere)
register_manifold("fisher_rao")(FisherRao)
register_manifold("norm_sphere")(NormSphere)
register_manifold("product")(ProductManifold)
register_manifold("lora_quotient")(LoraQuotient)

__all__ = [
    "AbstractManifold",
    "Euclidean",
    "FisherRao",
    "LoraFactors",
    "LoraQuotient",
    "NormSphere",
    "ProductManifold",
    "Sphere",
    "compute_dtype",
    "get_manifold",
    "list_manifolds",
    "register_manifold",
    "safe_norm",
    "sphere_angle",
    "static_dataclass",
]
