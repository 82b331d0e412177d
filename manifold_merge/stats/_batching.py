"""Fixed-size batches with a validity mask (the last batch is padded, never a new shape)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from tqdm.auto import tqdm


def padded_batches(arrays, batch_size: int, desc: str, progress: bool) -> Iterator[tuple]:
    """Yield ``(*batch_arrays, mask)`` with every batch of exactly ``batch_size`` rows."""
    n = len(arrays[0])
    if n == 0:
        raise ValueError(f"{desc}: no examples")
    for a in arrays:
        if len(a) != n:
            raise ValueError(f"{desc}: inputs and labels have {n} and {len(a)} rows")
    if batch_size < 1:
        raise ValueError(f"{desc}: batch_size must be >= 1, got {batch_size}")
    starts = range(0, n, batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
        e = min(s + batch_size, n)
        mask = np.zeros(batch_size, bool)
        mask[: e - s] = True
        out = []
        for a in arrays:
            chunk = np.asarray(a[s:e])
            if e - s < batch_size:
                pad = np.zeros((batch_size - (e - s),) + chunk.shape[1:], chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            out.append(chunk)
        yield (*out, mask)
