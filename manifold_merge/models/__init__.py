"""Flax models for the experiments; params are plain nested dicts (merge as pytrees, save
with Orbax).

* :mod:`manifold_merge.models.mlp` -- :class:`MLP` (backbone ``Dense_<i>`` + ``head``),
  :func:`split_head` / :func:`join_head`;
* :mod:`manifold_merge.models.minilm` -- all-MiniLM-L6-v2: :class:`MiniLMConfig`,
  :class:`MiniLM`, :class:`TextClassifier`, :func:`load_minilm` / :func:`save_minilm`,
  :func:`hf_to_params` / :func:`params_to_hf`, :class:`Tokenizer`, :func:`mean_pool`,
  :func:`embed`, :func:`sentence_embedding`;
* :mod:`manifold_merge.models.lora` -- :func:`init_lora` (raw PEFT-style factors),
  :func:`lora_scaled`, :func:`fold_lora`, :func:`lora_to_peft` / :func:`peft_to_lora`; the
  scaling convention is described there.
"""

from manifold_merge.models.lora import (
    fold_lora,
    init_lora,
    lora_scaled,
    lora_to_peft,
    module_shapes,
    peft_to_lora,
    select_modules,
)
from manifold_merge.models.minilm import (
    MiniLM,
    MiniLMConfig,
    TextClassifier,
    Tokenizer,
    default_model_path,
    embed,
    hf_to_params,
    init_text_classifier,
    l2_normalize,
    linear_modules,
    load_minilm,
    mean_pool,
    params_to_hf,
    save_minilm,
    sentence_embedding,
)
from manifold_merge.models.mlp import MLP, join_head, split_head

__all__ = [
    "MLP",
    "MiniLM",
    "MiniLMConfig",
    "TextClassifier",
    "Tokenizer",
    "default_model_path",
    "embed",
    "fold_lora",
    "hf_to_params",
    "init_lora",
    "init_text_classifier",
    "join_head",
    "l2_normalize",
    "linear_modules",
    "load_minilm",
    "lora_scaled",
    "lora_to_peft",
    "mean_pool",
    "module_shapes",
    "params_to_hf",
    "peft_to_lora",
    "save_minilm",
    "select_modules",
    "sentence_embedding",
    "split_head",
]
