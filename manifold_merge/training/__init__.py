"""Generic training with optax and a config-keyed cache of the results.

* :mod:`~manifold_merge.training.trainer` -- :func:`train` (any ``loss_fn(params, batch, key)``
  on seeded fixed-size minibatches, one jitted step, optional freezing), the classification
  helpers :func:`cross_entropy_loss` and :func:`evaluate`;
* :mod:`~manifold_merge.training.cache` -- :func:`config_hash`, :func:`cached` (params as Orbax
  checkpoints keyed by the config's hash) and :func:`cached_folder` (any folder, e.g. a PEFT
  adapter).

Model-agnostic: everything takes apply/loss functions and pytrees, never model classes.

Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from manifold_merge.training import cross_entropy_loss, evaluate, train
    >>> x = np.array([[1.0], [-1.0]] * 8, np.float32)
    >>> y = np.array([0, 1] * 8)
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> params, _ = train(cross_entropy_loss(apply_fn), {"w": jnp.zeros((1, 2))}, (x, y),
    ...                   steps=20, batch_size=4, learning_rate=0.1, progress=False)
    >>> evaluate(apply_fn, params, x, y).accuracy
    1.0
"""

from manifold_merge.training.cache import cached, cached_folder, config_hash
from manifold_merge.training.trainer import (
    EvalResult,
    cross_entropy_loss,
    evaluate,
    leaf_names,
    train,
)

__all__ = [
    "EvalResult",
    "cached",
    "cached_folder",
    "config_hash",
    "cross_entropy_loss",
    "evaluate",
    "leaf_names",
    "train",
]
