"""Merge methods over parameter pytrees: ``merge(method, models, base=..., weights=..., **params)``.

Each method is a block function registered by name (mergekit's names where they exist);
:func:`merge` walks the pytree, splits each leaf into blocks (tensor, rows or columns),
resolves per-name parameter filters and runs the jitted, vmapped block function.
"""

from manifold_merge.merging import fisher, linear, lora, sparse, spherical  # noqa: F401 (registers)
from manifold_merge.merging.registry import REQUIRED, MethodSpec, get_method, list_methods, register
from manifold_merge.merging.tree import LeafReport, MergeResult, merge, resolve_param

__all__ = [
    "REQUIRED",
    "LeafReport",
    "MergeResult",
    "MethodSpec",
    "get_method",
    "list_methods",
    "merge",
    "register",
    "resolve_param",
]
