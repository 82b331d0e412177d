"""LoRA adapters for :class:`~manifold_merge.models.minilm.MiniLM`: initialisation, scaling,
folding into the weights, and conversion to / from PEFT adapters.

**Scaling convention.** Like PEFT, a trained adapter is stored *raw*: ``LoraFactors(b, a)``
with ``b`` = ``lora_B`` (out, r), ``a`` = ``lora_A`` (r, in), and the update it makes is
``Delta W = (alpha / r) * b @ a``. The models' ``lora=`` argument, :func:`fold_lora`, the
merge methods and :class:`~manifold_merge.manifolds.lora.LoraFactors` everywhere else take
*scaled* factors (``Delta W = b @ a`` exactly). So:

* :func:`init_lora` -> raw factors (PEFT's init: ``a`` Kaiming-uniform, ``b`` zeros);
* :func:`lora_scaled` (raw -> scaled, multiplies ``b`` by ``alpha / r``) before applying;
* :func:`lora_to_peft` takes raw factors (``scaled=True`` for scaled ones, e.g. a merge
  result) and writes PEFT's raw tensors plus ``r`` / ``lora_alpha``;
* :func:`peft_to_lora` returns scaled factors (``raw=True`` for the stored ones), ready for
  ``lora=`` or for merging.

Example::

    lora = init_lora(key, params, rank=8, alpha=16)                  # raw, trainable

    def loss(lora, batch):
        logits = clf.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                           lora=lora_scaled(lora, alpha=16, rank=8))
        ...

    write_peft_adapter("runs/sst2", lora_to_peft(lora, rank=8, alpha=16))
    delta = peft_to_lora(read_peft_adapter("runs/sst2"))               # scaled
    clf.apply({"params": params}, ids, mask, lora=delta)              # same model as trained
"""

from __future__ import annotations

import collections
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from manifold_merge.io.peft import (
    PREFIX,
    PeftAdapter,
    _rank_pattern,
    peft_module_name,
    read_peft_adapter,
)
from manifold_merge.manifolds.lora import LoraFactors
from manifold_merge.models.minilm import LAYER_LINEARS, MiniLMConfig, flax_path, linear_modules

DEFAULT_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _encoder_tree(params: Mapping) -> Mapping:
    """MiniLM params from MiniLM / TextClassifier params, optionally ``{"params": ...}``."""
    if set(params) == {"params"}:
        params = params["params"]
    if "bert" in params and "encoder" not in params:
        params = params["bert"]
    if "encoder" not in params:
        raise ValueError(
            f"expected MiniLM params (with 'encoder') or TextClassifier params (with 'bert'), "
            f"got top-level keys {sorted(params)}"
        )
    return params


def module_shapes(params_or_shapes: Any) -> dict[str, tuple[int, int]]:
    """``{module name: (out, in)}`` of the Linear layers LoRA can target.

    Args:
        params_or_shapes: MiniLM or TextClassifier params (arrays or ``jax.ShapeDtypeStruct``
            leaves, e.g. from ``jax.eval_shape``), a :class:`MiniLMConfig`, or already a
            ``{module name: (out, in)}`` dict.
    """
    if isinstance(params_or_shapes, MiniLMConfig):
        return linear_modules(params_or_shapes)
    if isinstance(params_or_shapes, Mapping) and all(
        isinstance(v, tuple) and len(v) == 2 and all(isinstance(d, int) for d in v)
        for v in params_or_shapes.values()
    ):
        return dict(params_or_shapes)
    tree = _encoder_tree(params_or_shapes)
    layers = sorted(
        (int(m.group(1)) for k in tree["encoder"] if (m := re.fullmatch(r"layer_(\d+)", k))),
    )
    out = {}
    for k in layers:
        for suffix in LAYER_LINEARS:
            name = f"encoder.layer.{k}.{suffix}"
            node = tree
            for part in flax_path(name):
                node = node[part]
            n, m = node["kernel"].shape
            out[name] = (int(m), int(n))
    return out


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    """PEFT's target rule: a str is a regex matching the whole name; a list entry matches a
    name equal to it or ending with ``"." + entry``."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def select_modules(
    params_or_shapes: Any,
    targets: str | Sequence[str] = ("query", "value"),
    layers: Iterable[int] | None = None,
) -> dict[str, tuple[int, int]]:
    """``{module name: (out, in)}`` of the Linear layers ``targets`` selects (PEFT's rule, see
    :func:`init_lora`) in ``layers`` (None: all).

    Example:
        >>> sorted(select_modules(MiniLMConfig(), ("query", "value"), layers=[1]))
        ['encoder.layer.1.attention.self.query', 'encoder.layer.1.attention.self.value']
    """
    shapes = module_shapes(params_or_shapes)
    n_layers = len({int(name.split(".")[2]) for name in shapes})
    if layers is not None:
        layers = sorted({int(k) for k in layers})
        bad = [k for k in layers if not 0 <= k < n_layers]
        if bad:
            raise ValueError(f"layer {bad[0]} does not exist (the model has {n_layers} layers)")
    if not isinstance(targets, str):
        targets = list(targets)
        for t in targets:
            if not any(_matches(name, [t]) for name in shapes):
                raise ValueError(
                    f"LoRA target {t!r} matches no Linear layer; use module names or endings "
                    f"such as 'query', 'key', 'value', 'attention.output.dense', "
                    f"'intermediate.dense', 'output.dense' or 'dense'"
                )
    chosen = {
        name: shape
        for name, shape in shapes.items()
        if _matches(name, targets) and (layers is None or int(name.split(".")[2]) in layers)
    }
    if not chosen:
        raise ValueError(f"targets {targets!r} with layers {layers} select no Linear layer")
    return chosen


def init_lora(
    key: jax.Array,
    params_or_shapes: Any,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: str | Sequence[str] = ("query", "value"),
    layers: Iterable[int] | None = None,
    dtype: Any = jnp.float32,
) -> dict[str, LoraFactors]:
    """Fresh, *raw* LoRA factors ``{module name: LoraFactors(b, a)}``, initialised as PEFT
    does: ``a`` (r, in) Kaiming-uniform with ``a = sqrt(5)``, i.e. uniform on
    ``[-1/sqrt(in), 1/sqrt(in)]``, and ``b`` (out, r) zeros, so the model starts unchanged.

    Apply them as ``lora=lora_scaled(lora, alpha, rank)`` (scaling ``alpha / rank``).

    Args:
        key: PRNG key (one subkey per module, in module order).
        params_or_shapes: MiniLM / TextClassifier params, a config or ``{module: (out, in)}``
            (see :func:`module_shapes`).
        rank: r.
        alpha: ``lora_alpha``; it does not change the raw factors (PEFT's init ignores it) and
            is checked and accepted only so that one ``(rank, alpha)`` can be passed around.
        targets: which Linear layers: names or endings (``"query"``, ``"value"``, ``"key"``,
            ``"attention.output.dense"``, ``"intermediate.dense"``, ``"output.dense"``,
            ``"dense"`` = the last three) as PEFT's ``target_modules`` list, or a str regex
            matching whole module names.
        layers: layer indices to adapt (None: all), like PEFT's ``layers_to_transform``.
        dtype: the factors' dtype.

    Example:
        >>> import jax
        >>> lora = init_lora(jax.random.key(0), MiniLMConfig(), rank=4, layers=[0])
        >>> {k: (f.b.shape, f.a.shape) for k, f in lora.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'encoder.layer.0.attention.self.query': ((384, 4), (4, 384)),
         'encoder.layer.0.attention.self.value': ((384, 4), (4, 384))}
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    chosen = select_modules(params_or_shapes, targets, layers)
    keys = jax.random.split(key, len(chosen))
    lora = {}
    for k, (name, (m, n)) in zip(keys, chosen.items()):
        bound = 1.0 / math.sqrt(n)
        a = jax.random.uniform(k, (rank, n), dtype, minval=-bound, maxval=bound)
        lora[name] = LoraFactors(jnp.zeros((m, rank), dtype), a)
    return lora


def lora_scaled(
    lora: Mapping[str, LoraFactors], alpha: float, rank: int | None = None
) -> dict[str, LoraFactors]:
    """Raw -> scaled factors: ``b`` times ``alpha / rank`` (``rank`` None: each module's own
    factor rank), so that ``Delta W = b @ a``. Differentiable; use it inside the loss.

    Example:
        >>> import numpy as np
        >>> f = LoraFactors(np.ones((2, 4)), np.ones((4, 3)))
        >>> lora_scaled({"q": f}, alpha=8)["q"].b[0, 0]
        np.float64(2.0)
    """
    return {
        name: LoraFactors(f.b * (alpha / (rank if rank is not None else f.b.shape[-1])), f.a)
        for name, f in lora.items()
    }


def fold_lora(params: Mapping, lora: Mapping[str, LoraFactors]) -> dict:
    """``params`` with each scaled LoRA update merged into its Linear: ``kernel + (b @ a)^T``
    (forms the dense matrices; for export or a merged model). Works on MiniLM and
    TextClassifier params (optionally ``{"params": ...}``); the input is not modified."""
    wrapped = set(params) == {"params"}
    tree = params["params"] if wrapped else params
    prefix = ("bert",) if "bert" in tree and "encoder" not in tree else ()
    shapes = module_shapes(tree)

    def replace(node: Mapping, path: tuple[str, ...], value: Any) -> dict:
        out = dict(node)
        out[path[0]] = value if len(path) == 1 else replace(node[path[0]], path[1:], value)
        return out

    for name, f in lora.items():
        if name not in shapes:
            raise ValueError(f"lora module {name!r} is not a Linear layer of these params")
        path = prefix + flax_path(name) + ("kernel",)
        node = tree
        for part in path:
            node = node[part]
        delta = jnp.asarray(f.b) @ jnp.asarray(f.a)
        if delta.shape != shapes[name]:
            raise ValueError(
                f"lora[{name!r}] gives an update of shape {delta.shape}, expected {shapes[name]}"
            )
        tree = replace(tree, path, node + delta.T.astype(node.dtype))
    return {"params": tree} if wrapped else tree


def lora_to_peft(
    lora: Mapping[str, LoraFactors],
    *,
    rank: int | None = None,
    alpha: float,
    base_model_name: str = DEFAULT_BASE_MODEL,
    scaled: bool = False,
    task_type: str | None = None,
) -> PeftAdapter:
    """A PEFT LoRA adapter (write it with :func:`~manifold_merge.io.write_peft_adapter`).

    Tensors are keyed ``base_model.model.<module>.lora_{A,B}.weight`` (PEFT on a
    ``BertModel``); the config is a complete ``LoraConfig`` dict with ``peft_type`` "LORA",
    ``r``, ``lora_alpha``, ``target_modules`` = the exact module names, ``task_type``.

    Args:
        lora: ``{module name: LoraFactors}``, raw (PEFT's stored tensors) unless ``scaled``.
        rank: the config's ``r`` (default: the most common factor rank); modules of another
            rank get ``rank_pattern`` entries.
        alpha: ``lora_alpha``.
        base_model_name: ``base_model_name_or_path``.
        scaled: the factors include the scaling (``Delta W = b @ a``, e.g. from
            :func:`peft_to_lora` or a merge); ``b`` is divided by ``alpha / r_module``.
        task_type: PEFT's ``task_type`` (None, or e.g. ``"FEATURE_EXTRACTION"``).

    Example:
        >>> import jax
        >>> lora = init_lora(jax.random.key(0), MiniLMConfig(), rank=4, layers=[0])
        >>> ad = lora_to_peft(lora, rank=4, alpha=8)
        >>> ad.config["r"], ad.config["lora_alpha"], sorted(ad.lora)[0]
        (4, 8, 'base_model.model.encoder.layer.0.attention.self.query')
    """
    if not lora:
        raise ValueError("lora_to_peft needs at least one LoRA module")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ValueError(f"alpha must be a number, got {alpha!r}")
    factors = {}
    for name, f in lora.items():
        if not isinstance(name, str) or not name or name.startswith(PREFIX):
            raise ValueError(
                f"module name {name!r} must be a module path without {PREFIX!r}, e.g. "
                "'encoder.layer.0.attention.self.query'"
            )
        b, a = np.asarray(f[0]), np.asarray(f[1])
        if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(
                f"lora[{name!r}] has b {b.shape} and a {a.shape}; expected b (m, r), a (r, n)"
            )
        factors[PREFIX + name] = (b, a)
    ranks = {m: int(a.shape[0]) for m, (_, a) in factors.items()}
    r = rank if rank is not None else collections.Counter(ranks.values()).most_common(1)[0][0]
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"rank must be a positive int, got {r!r}")
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(peft_module_name(m) for m in factors),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": _rank_pattern(ranks, r),
        "alpha_pattern": {},
        "modules_to_save": None,
    }
    out = {}
    for m, (b, a) in factors.items():
        if scaled:
            b = (b.astype(np.float64) * (ranks[m] / alpha)).astype(b.dtype)
        out[m] = LoraFactors(b, a)
    return PeftAdapter(config, out, {})


def peft_to_lora(
    adapter: PeftAdapter | str | os.PathLike, *, raw: bool = False
) -> dict[str, LoraFactors]:
    """``{module name: LoraFactors}`` (NumPy) from a PEFT adapter (or its folder), module
    names without ``base_model.model.``, with the scaling folded in (``Delta W = b @ a``,
    PEFT's ``lora_alpha / r``, patterns and rsLoRA included), or the stored factors with
    ``raw=True``.

    Raises:
        ValueError: the adapter has embedding (not Linear) LoRA modules.
    """
    if isinstance(adapter, (str, os.PathLike)):
        adapter = read_peft_adapter(adapter)
    out = {}
    for module in adapter.lora:
        if adapter.kind(module) != "linear":
            raise ValueError(f"adapter module {module!r} is an embedding LoRA; only Linear")
        f = adapter.lora[module] if raw else adapter.delta_factors(module)
        out[peft_module_name(module)] = LoraFactors(np.asarray(f.b), np.asarray(f.a))
    return out
