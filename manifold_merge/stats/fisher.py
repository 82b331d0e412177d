"""Diagonal Fisher information of a classifier, from per-example gradients (vmap)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from manifold_merge.stats._batching import padded_batches

KINDS = ("true", "empirical")


def diagonal_fisher(
    apply_fn,
    params,
    inputs,
    labels=None,
    *,
    kind: str = "true",
    key=None,
    num_samples: int = 1,
    batch_size: int = 64,
    progress: bool = False,
):
    """Diagonal Fisher E_x E_y [(d/dtheta log p_theta(y|x))^2] of a classifier.

    ``kind="true"``: y drawn from the model's own predictive p_theta(.|x) (``num_samples``
    draws per example, seeded by ``key``); ``kind="empirical"``: y the data label. Gradients
    are per example (``vmap`` of ``grad``), squared and averaged over examples.

    Args:
        apply_fn: ``apply_fn(params, x) -> logits`` for a batch x of shape (B, ...).
        params: the pytree of parameters (the result has the same structure).
        inputs: (num_examples, ...) array.
        labels: (num_examples,) int labels, needed for ``kind="empirical"``.
        batch_size: examples per jitted step (memory is O(batch_size x params)).
        progress: show a progress bar.

    Returns:
        A pytree like ``params`` of non-negative float32 diagonals.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> params = {"w": jnp.ones((3, 2))}
        >>> f = diagonal_fisher(lambda p, x: x @ p["w"], params, jnp.ones((5, 3)),
        ...                     key=jax.random.key(0))
        >>> f["w"].shape
        (3, 2)
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "empirical" and labels is None:
        raise ValueError("kind='empirical' needs labels")
    if kind == "true" and key is None:
        raise ValueError("kind='true' samples labels from the model: pass key=jax.random.key(...)")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    labels_arr = jnp.zeros(len(inputs), jnp.int32) if labels is None else labels
    total = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    count = 0
    key = jax.random.key(0) if key is None else key
    for i, (x, y, mask) in enumerate(
        padded_batches((inputs, labels_arr), batch_size, "diagonal Fisher", progress)
    ):
        sums = _fisher_batch(
            apply_fn, kind, num_samples, params, x, y, mask, jax.random.fold_in(key, i)
        )
        total = jax.tree.map(jnp.add, total, sums)
        count += int(mask.sum())
    return jax.tree.map(lambda t: t / count, total)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _fisher_batch(apply_fn, kind, num_samples, params, x, y, mask, key):
    def log_prob(p, xi, yi):
        logits = apply_fn(p, xi[None])[0]
        return jax.nn.log_softmax(logits.astype(jnp.float32))[yi]

    per_example_grad = jax.vmap(jax.grad(log_prob), in_axes=(None, 0, 0))
    if kind == "empirical":
        draws = y[None]
    else:
        logits = jax.lax.stop_gradient(apply_fn(params, x)).astype(jnp.float32)
        keys = jax.random.split(key, num_samples)
        draws = jax.vmap(lambda k: jax.random.categorical(k, logits))(keys)  # (S, B)
    m = mask.astype(jnp.float32)

    def add_draw(acc, yy):  # one label draw per example; a scan keeps the program small
        g = per_example_grad(params, x, yy)
        sq = jax.tree.map(lambda gi: jnp.tensordot(m, jnp.square(gi.astype(jnp.float32)), 1), g)
        return jax.tree.map(jnp.add, acc, sq), None

    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    out, _ = jax.lax.scan(add_draw, zeros, draws)
    return jax.tree.map(lambda o: o / draws.shape[0], out)
