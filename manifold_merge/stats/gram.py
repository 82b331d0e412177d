"""Per-layer input Gram matrices X^T X of the Dense layers, for RegMean."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from manifold_merge.stats._batching import padded_batches


def input_grams(apply_fn, params, inputs, *, batch_size: int = 64, progress: bool = False):
    """Input Gram matrices G = X^T X of every ``flax.linen.Dense`` layer run by ``apply_fn``.

    The inputs of each Dense call are captured with ``nn.intercept_methods`` (leading axes
    flattened: tokens count as examples), accumulated in float32 over fixed-size batches.

    Args:
        apply_fn: ``apply_fn(params, x)`` running a Flax linen model on a batch.
        params: its parameters.
        inputs: (num_examples, ...) array.

    Returns:
        ``{leaf name of the layer's kernel (e.g. "Dense_0/kernel"): (d_in, d_in) Gram}``, the
        form ``merge("regmean", ..., grams=[...])`` takes; sums over examples, not means.
    """
    total = None
    for x, mask in padded_batches((inputs,), batch_size, "input Grams", progress):
        grams = _gram_batch(apply_fn, params, x, mask)
        total = grams if total is None else jax.tree.map(jnp.add, total, grams)
    if not total:
        raise ValueError("input_grams: apply_fn ran no flax.linen.Dense layer")
    return total


@functools.partial(jax.jit, static_argnums=(0,))
def _gram_batch(apply_fn, params, x, mask):
    captured = {}

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            name = "/".join(context.module.scope.path) + "/kernel"
            h = args[0]
            rows = h.reshape(mask.shape[0], -1, h.shape[-1]).astype(jnp.float32)
            rows = rows * mask[:, None, None]
            rows = rows.reshape(-1, h.shape[-1])
            g = rows.T @ rows
            captured[name] = captured[name] + g if name in captured else g
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        apply_fn(params, x)
    return captured
