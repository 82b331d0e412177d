"""Checkpoint formats: safetensors files and PEFT LoRA adapter folders.

* :mod:`manifold_merge.io.safetensors` -- a dependency-free, lazy (memory-mapped) reader
  :class:`SafetensorsFile` with full header validation, :func:`read_safetensors` and an atomic
  :func:`write_safetensors`;
* :mod:`manifold_merge.io.peft` -- :class:`PeftAdapter`, :func:`read_peft_adapter`,
  :func:`write_peft_adapter` (atomic) and :func:`merge_peft_adapters`, which merges adapter
  folders with a LoRA merge method and writes a PEFT adapter that reconstructs the result;
* :mod:`manifold_merge.io.hf` -- Hugging Face model folders streamed tensor by tensor:
  :func:`open_checkpoint` (single file or shards + index, memory-mapped),
  :class:`CheckpointWriter` (sharded output with ``model.safetensors.index.json``),
  :func:`copy_aux_files` (config/tokenizer files), :func:`parse_size`, :func:`parse_dtype` and
  :func:`to_dtype` (correctly rounded output dtypes);
* :mod:`manifold_merge.io.checkpoint` -- Flax params as Orbax checkpoints (:func:`save_params`,
  atomic; :func:`load_params`, as NumPy; :func:`is_orbax_checkpoint`) and
  :func:`flatten_params` / :func:`unflatten_params` (``"Dense_0/kernel"`` names).

Pickled checkpoints are never loaded.
"""

from manifold_merge.io.checkpoint import (
    flatten_params,
    is_orbax_checkpoint,
    load_params,
    save_params,
    unflatten_params,
)
from manifold_merge.io.hf import (
    CheckpointReader,
    CheckpointWriter,
    copy_aux_files,
    open_checkpoint,
    parse_dtype,
    parse_size,
    to_dtype,
)
from manifold_merge.io.peft import (
    PeftAdapter,
    merge_peft_adapters,
    read_peft_adapter,
    write_peft_adapter,
)
from manifold_merge.io.planned import PlannedCheckpointWriter
from manifold_merge.io.safetensors import (
    SafetensorsFile,
    read_safetensors,
    write_safetensors,
)

__all__ = [
    "CheckpointReader",
    "CheckpointWriter",
    "PeftAdapter",
    "PlannedCheckpointWriter",
    "SafetensorsFile",
    "copy_aux_files",
    "flatten_params",
    "is_orbax_checkpoint",
    "load_params",
    "merge_peft_adapters",
    "open_checkpoint",
    "parse_dtype",
    "parse_size",
    "read_peft_adapter",
    "read_safetensors",
    "save_params",
    "to_dtype",
    "unflatten_params",
    "write_peft_adapter",
    "write_safetensors",
]
