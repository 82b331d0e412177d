"""Model-agnostic training with optax: seeded fixed-size minibatches, one jitted step, freezing.

:func:`train` minimises any ``loss_fn(params, batch, key) -> scalar`` over a pytree of
parameters; :func:`cross_entropy_loss` builds that loss for a classifier
``apply_fn(params, x) -> logits``, and :func:`evaluate` measures its accuracy in fixed-size
padded batches. Nothing here knows a model class.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from manifold_merge.stats._batching import padded_batches

OPTIMIZERS = ("adamw", "adam", "sgd")


def leaf_names(tree: Any) -> list[str]:
    """The "/"-joined key paths of a pytree's leaves, in leaf order (``"Dense_0/kernel"``)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in flat]


def _make_optimizer(optimizer, learning_rate, weight_decay) -> optax.GradientTransformation:
    if isinstance(optimizer, optax.GradientTransformation):
        if learning_rate is not None or weight_decay:
            raise ValueError(
                "optimizer is an optax transformation: set its learning rate and weight decay "
                "there, and leave learning_rate=None and weight_decay=0"
            )
        return optimizer
    if not isinstance(optimizer, str) or optimizer.lower() not in OPTIMIZERS:
        raise ValueError(
            f"optimizer must be one of {OPTIMIZERS} or an optax.GradientTransformation, got "
            f"{optimizer!r}"
        )
    if learning_rate is None:
        raise ValueError(f"optimizer {optimizer!r} needs a learning_rate (a float or schedule)")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    name = optimizer.lower()
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=weight_decay)
    tx = optax.adam(learning_rate) if name == "adam" else optax.sgd(learning_rate)
    if weight_decay:  # L2 penalty on the gradient (coupled), as torch's Adam/SGD do
        tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
    return tx


def _trainable_mask(trainable, params, names: list[str], leaves: list) -> list[bool]:
    if trainable is None:
        mask = [True] * len(leaves)
    elif callable(trainable):
        mask = [bool(trainable(name)) for name in names]
    else:
        try:
            full = jax.tree.map(
                lambda flag, sub: jax.tree.map(lambda _: bool(flag), sub), trainable, params
            )
        except (ValueError, TypeError) as e:
            raise ValueError(
                "trainable must be a pytree of bools with the structure of params (or a prefix "
                f"of it), or a predicate on leaf names: {e}"
            ) from None
        mask = jax.tree.leaves(full)
    # Integer and bool leaves (counters, buffers) have no gradient: always frozen.
    return [m and jnp.issubdtype(jnp.result_type(x), jnp.inexact) for m, x in zip(mask, leaves)]


def _index_stream(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Shuffled epochs, concatenated and cut into batches of exactly ``batch_size`` indices.

    The last batch of an epoch wraps into the next epoch's permutation, so every batch has the
    same shape (one compilation) and every example is seen once per epoch.
    """
    rng = np.random.default_rng(seed)
    buf = np.empty(0, np.int32)
    while True:
        while len(buf) < batch_size:
            buf = np.concatenate([buf, rng.permutation(n).astype(np.int32)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


def train(
    loss_fn: Callable[[Any, Any, jax.Array], jax.Array],
    params: Any,
    data: Any,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float | optax.Schedule | None = None,
    optimizer: str | optax.GradientTransformation = "adamw",
    weight_decay: float = 0.0,
    seed: int = 0,
    trainable: Any = None,
    progress: bool = True,
    desc: str = "train",
    log_every: int = 10,
) -> tuple[Any, list[tuple[int, float]]]:
    """Minimise ``loss_fn`` over ``params`` with optax, on seeded shuffled minibatches.

    Each step draws ``batch_size`` rows of every array in ``data`` (epochs of a permutation
    seeded by ``seed``, wrapping across epoch ends so that all batches have one shape and the
    step compiles once), calls ``loss_fn(params, batch, key)`` with ``key =
    fold_in(key(seed), step)`` (for dropout), and applies the optimizer's update to the
    trainable leaves only. Frozen leaves get no gradient and no optimizer state, and come back
    as the very objects passed in (bit-identical).

    Args:
        loss_fn: ``loss_fn(params, batch, key) -> scalar``, jit-compatible; ``batch`` has the
            structure of ``data`` with ``batch_size`` rows per array.
        params: the initial pytree of parameters (not modified).
        data: a pytree of arrays with a common leading axis, usually ``(x, y)``; ``x`` may be a
            dict of arrays (e.g. ``{"input_ids": ..., "attention_mask": ...}``). It is put on
            the device once and indexed there.
        steps: number of optimizer steps (0 returns ``params`` unchanged).
        batch_size: rows per step (may exceed the number of examples).
        learning_rate: a float or an optax schedule; required for a named ``optimizer``.
        optimizer: ``"adamw"`` (decoupled weight decay), ``"adam"``, ``"sgd"``, or an
            ``optax.GradientTransformation`` (then ``learning_rate=None``, ``weight_decay=0``).
        weight_decay: for ``"adamw"`` the decoupled decay; for ``"adam"``/``"sgd"`` an L2 term
            added to the gradient.
        seed: seeds the minibatch order and the per-step keys.
        trainable: which leaves to train: None (all), a pytree of bools with the structure of
            ``params`` (or a prefix of it, e.g. ``{"Dense_0": False, "Dense_1": True}``), or a
            predicate ``fn(name) -> bool`` on "/"-joined leaf names (``"Dense_0/kernel"``).
            Integer leaves are always frozen.
        progress: show a tqdm bar with the running loss.
        desc: the bar's label (and the prefix of error messages).
        log_every: record the mean loss of every ``log_every`` steps (and of the last ones).

    Returns:
        ``(params, history)``: the trained pytree (trained leaves as JAX arrays) and a list of
        ``(step, mean loss over the steps since the previous entry)``, steps counted from 1.

    Raises:
        ValueError: inconsistent arguments (no trainable leaf, data of different lengths, ...).
        FloatingPointError: the loss became NaN or infinite.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> x = np.linspace(-1, 1, 32, dtype=np.float32)[:, None]
        >>> loss = lambda p, batch, key: jnp.mean((batch[0] @ p["w"] - batch[1]) ** 2)
        >>> params, hist = train(loss, {"w": jnp.zeros((1, 1))}, (x, 3 * x), steps=200,
        ...                      batch_size=8, learning_rate=0.1, progress=False)
        >>> round(float(params["w"][0, 0]), 2), hist[-1][0]
        (3.0, 200)
    """
    if not (isinstance(steps, (int, np.integer)) and steps >= 0):
        raise ValueError(f"{desc}: steps must be an int >= 0, got {steps!r}")
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"{desc}: batch_size must be an int >= 1, got {batch_size!r}")
    if not (isinstance(log_every, (int, np.integer)) and log_every >= 1):
        raise ValueError(f"{desc}: log_every must be an int >= 1, got {log_every!r}")
    tx = _make_optimizer(optimizer, learning_rate, weight_decay)

    leaves, treedef = jax.tree.flatten(params)
    mask = _trainable_mask(trainable, params, leaf_names(params), leaves)
    if not any(mask):
        raise ValueError(f"{desc}: no trainable (floating-point) parameter")
    frozen = [x for x, m in zip(leaves, mask) if not m]  # returned as they are
    frozen_dev = [jnp.asarray(x) for x in frozen]  # on the device once, not every step

    data_leaves, data_def = jax.tree.flatten(data)
    if not data_leaves:
        raise ValueError(f"{desc}: data holds no arrays")
    lengths = {int(np.shape(a)[0]) if np.ndim(a) else -1 for a in data_leaves}
    if len(lengths) != 1 or -1 in lengths:
        raise ValueError(
            f"{desc}: every array in data needs the same leading (example) axis; got shapes "
            f"{[np.shape(a) for a in data_leaves]}"
        )
    (n,) = lengths
    if n == 0:
        raise ValueError(f"{desc}: data has no examples")
    data_leaves = [jnp.asarray(a) for a in data_leaves]

    def combine(train_leaves, frozen_leaves):
        it_t, it_f = iter(train_leaves), iter(frozen_leaves)
        return treedef.unflatten([next(it_t) if m else next(it_f) for m in mask])

    def step_fn(train_leaves, opt_state, frozen_leaves, data_leaves, idx, base_key, step):
        batch = data_def.unflatten([jnp.take(a, idx, axis=0) for a in data_leaves])
        key = jax.random.fold_in(base_key, step)

        def objective(tl):
            loss = loss_fn(combine(tl, frozen_leaves), batch, key)
            if jnp.shape(loss) != ():
                raise TypeError(f"{desc}: loss_fn must return a scalar, got shape {loss.shape}")
            return loss

        loss, grads = jax.value_and_grad(objective)(train_leaves)
        updates, opt_state = tx.update(grads, opt_state, train_leaves)
        return optax.apply_updates(train_leaves, updates), opt_state, loss

    # Donation reuses the parameter and optimizer buffers in place; the caller's arrays are
    # copied first so that they stay valid.
    step_jit = jax.jit(step_fn, donate_argnums=(0, 1))
    train_leaves = [jnp.array(x, copy=True) for x, m in zip(leaves, mask) if m]
    opt_state = tx.init(train_leaves)
    base_key = jax.random.key(seed)
    indices = _index_stream(n, int(batch_size), seed)

    history: list[tuple[int, float]] = []
    pending: list[jax.Array] = []
    with tqdm(total=steps, desc=desc, disable=not progress, unit="step") as bar:
        for s in range(1, steps + 1):
            train_leaves, opt_state, loss = step_jit(
                train_leaves,
                opt_state,
                frozen_dev,
                data_leaves,
                next(indices),
                base_key,
                jnp.asarray(s, jnp.int32),
            )
            pending.append(loss)
            if s % log_every == 0 or s == steps:
                mean = float(np.mean(np.asarray(jax.device_get(pending), np.float64)))
                if not np.isfinite(mean):
                    raise FloatingPointError(f"{desc}: the loss is {mean} by step {s}")
                history.append((s, mean))
                bar.update(len(pending))
                bar.set_postfix(loss=f"{mean:.4g}")
                pending = []
    return combine(train_leaves, frozen), history


def cross_entropy_loss(apply_fn: Callable[[Any, Any], jax.Array]) -> Callable:
    """A :func:`train` loss: mean softmax cross-entropy of ``apply_fn(params, x)`` against y.

    loss = mean_b [logsumexp(z_b) - z_{b, y_b}] with z = apply_fn(params, x) in float32.

    Args:
        apply_fn: ``apply_fn(params, x) -> logits`` of shape (B, K) (or (B, ..., K) with
            labels (B, ...)).

    Returns:
        ``loss_fn(params, batch, key)`` for ``batch = (x, y)`` with integer labels y (the key
        is unused).

    Example:
        >>> import jax.numpy as jnp
        >>> loss_fn = cross_entropy_loss(lambda p, x: x @ p)
        >>> x, y = jnp.ones((4, 2)), jnp.zeros(4, jnp.int32)
        >>> round(float(loss_fn(jnp.zeros((2, 3)), (x, y), None)), 4)  # log 3
        1.0986
    """

    def loss_fn(params, batch, key):
        del key
        x, y = batch
        logits = apply_fn(params, x).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss_fn


class EvalResult(NamedTuple):
    """Outcome of :func:`evaluate`: ``accuracy`` (a float) and ``logits`` (NumPy, (n, ..., K))."""

    accuracy: float
    logits: np.ndarray


@functools.partial(jax.jit, static_argnums=0)
def _predict(apply_fn, params, x):
    return apply_fn(params, x)


def evaluate(
    apply_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    x: Any,
    y: Any,
    batch_size: int = 256,
    *,
    progress: bool = False,
    desc: str = "evaluate",
) -> EvalResult:
    """Accuracy and logits of a classifier, in fixed-size batches (the last one padded).

    Every batch has exactly ``batch_size`` rows (padding rows are dropped from the result), so
    ``apply_fn`` compiles once per shape of ``params``/``x``.

    Args:
        apply_fn: ``apply_fn(params, x) -> logits`` for a batch x; must be hashable (a plain
            function, or the same ``functools.partial`` object between calls, to reuse the
            compilation).
        params: the parameter pytree.
        x: (num_examples, ...) inputs, or a dict of such arrays.
        y: (num_examples[, ...]) integer labels matching ``logits.shape[:-1]``.
        batch_size: rows per jitted call.
        progress: show a progress bar.

    Returns:
        :class:`EvalResult` ``(accuracy, logits)``.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> x = np.array([[1.0], [-1.0], [2.0]], np.float32)
        >>> res = evaluate(lambda p, x: x * p, jnp.array([1.0, -1.0]), x, np.array([0, 1, 1]),
        ...                batch_size=2)
        >>> res.accuracy, res.logits.shape
        (0.6666666666666666, (3, 2))
    """
    x_leaves, x_def = jax.tree.flatten(x)
    if not x_leaves:
        raise ValueError(f"{desc}: x holds no arrays")
    chunks = []
    for *xb, _, mask in padded_batches((*x_leaves, y), batch_size, desc, progress):
        logits = _predict(apply_fn, params, x_def.unflatten(xb))
        chunks.append(np.asarray(logits)[mask])
    logits = np.concatenate(chunks)
    y = np.asarray(y)
    if logits.shape[:-1] != y.shape:
        raise ValueError(
            f"{desc}: logits have shape {logits.shape}; labels {y.shape} should match all but "
            "the class axis"
        )
    return EvalResult(float(np.mean(np.argmax(logits, axis=-1) == y)), logits)
