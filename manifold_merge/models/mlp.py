"""A plain multilayer perceptron classifier, and helpers to swap its classifier head.

The backbone layers are ``Dense_0`` ... ``Dense_{L-1}`` and the classifier is ``head``, so
experts trained on different tasks can share (and merge) the backbone while keeping their own
heads: :func:`split_head` / :func:`join_head` take any params tree with a top-level ``head``
(:class:`MLP`, :class:`~manifold_merge.models.minilm.TextClassifier`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

#: The activations :class:`MLP` accepts by name (``"gelu"`` is the exact erf GELU).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "tanh": jnp.tanh,
    "silu": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
    "identity": lambda x: x,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called ``name`` (one of :data:`ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}"
        ) from None


class MLP(nn.Module):
    """``x -> act(Dense_0) -> ... -> act(Dense_{L-1}) -> head`` (logits, no softmax).

    Inputs of any shape ``(B, ...)`` are flattened to ``(B, d)`` first (images go in as is).

    Attributes:
        widths: the hidden layers' widths (layer ``i`` is ``Dense_i``).
        num_classes: the classifier ``head``'s outputs.
        activation: a name from :data:`ACTIVATIONS`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> model = MLP(widths=(8, 4), num_classes=3)
        >>> params = model.init(jax.random.key(0), jnp.zeros((1, 5)))["params"]
        >>> sorted(params)
        ['Dense_0', 'Dense_1', 'head']
        >>> logits, hidden = model.apply({"params": params}, jnp.ones((2, 5)), return_hidden=True)
        >>> logits.shape, [h.shape for h in hidden]
        ((2, 3), [(2, 8), (2, 4)])
    """

    widths: Sequence[int] = (256, 128)
    num_classes: int = 10
    activation: str = "relu"

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        get_activation(self.activation)  # fail at construction, not at the first call
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, return_hidden: bool = False):
        """Logits ``(B, num_classes)``; with ``return_hidden`` also ``[h_1, ..., h_L]``, each
        layer's post-activation output ``(B, widths[i])`` (for collapse diagnostics)."""
        act = get_activation(self.activation)
        if x.ndim < 2:
            raise ValueError(f"MLP expects a batch (B, ...) of inputs, got shape {x.shape}")
        h = x.reshape(x.shape[0], -1)
        hidden = []
        for i, width in enumerate(self.widths):
            h = act(nn.Dense(width, name=f"Dense_{i}")(h))
            hidden.append(h)
        logits = nn.Dense(self.num_classes, name="head")(h)
        return (logits, hidden) if return_hidden else logits


def _is_variables(tree: Mapping) -> bool:
    return isinstance(tree, Mapping) and set(tree) == {"params"}


def split_head(params: Mapping[str, Any]) -> tuple[dict, dict]:
    """``(backbone, head)``: ``params`` without its ``head`` entry, and that entry.

    Works on params (``variables["params"]``) and on whole variables ``{"params": ...}`` (then
    both parts come back wrapped the same way). The parts are new dicts sharing the arrays.

    Example:
        >>> backbone, head = split_head({"Dense_0": {"kernel": 1}, "head": {"kernel": 2}})
        >>> backbone, head
        ({'Dense_0': {'kernel': 1}}, {'kernel': 2})
        >>> join_head(backbone, head)
        {'Dense_0': {'kernel': 1}, 'head': {'kernel': 2}}
    """
    if _is_variables(params):
        backbone, head = split_head(params["params"])
        return {"params": backbone}, {"params": head}
    if not isinstance(params, Mapping) or "head" not in params:
        keys = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise KeyError(f"params have no 'head' entry to split off (top-level keys: {keys})")
    backbone = {k: v for k, v in params.items() if k != "head"}
    return backbone, params["head"]


def join_head(backbone: Mapping[str, Any], head: Any) -> dict:
    """The inverse of :func:`split_head`: ``backbone`` with ``head`` added under ``"head"``."""
    if _is_variables(backbone):
        if not _is_variables(head):
            raise ValueError("backbone is wrapped as {'params': ...} but head is not")
        return {"params": join_head(backbone["params"], head["params"])}
    if not isinstance(backbone, Mapping):
        raise TypeError(f"backbone must be a dict of params, got {type(backbone).__name__}")
    if "head" in backbone:
        raise ValueError("backbone already has a 'head' entry; split it off first")
    return {**backbone, "head": head}
