"""Data-dependent statistics for merge methods: diagonal Fisher and RegMean input Grams.

Both take an ``apply_fn(params, inputs) -> logits`` and arrays, not model classes, and run in
fixed-size batches (the last one padded and masked), so memory stays bounded and nothing
recompiles per batch.
"""

from manifold_merge.stats.fisher import diagonal_fisher
from manifold_merge.stats.gram import input_grams

__all__ = ["diagonal_fisher", "input_grams"]
