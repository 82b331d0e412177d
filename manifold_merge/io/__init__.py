"""Checkpoint formats: safetensors files and PEFT LoRA adapter folders.

* :mod:`manifold_merge.io.safetensors` -- a dependency-free, lazy (memory-mapped) reader
  :class:`SafetensorsFile` with full header validation, :func:`read_safetensors` and an atomic
  :func:`write_safetensors`;
* :mod:`manifold_merge.io.peft` -- :class:`PeftAdapter`, :func:`read_peft_adapter`,
  :func:`write_peft_adapter` (atomic) and :func:`merge_peft_adapters`, which merges adapter
  folders with a LoRA merge method and writes a PEFT adapter that reconstructs the result.

Pickled checkpoints are never loaded.
"""

from manifold_merge.io.peft import (
    PeftAdapter,
    merge_peft_adapters,
    read_peft_adapter,
    write_peft_adapter,
)
from manifold_merge.io.safetensors import (
    SafetensorsFile,
    read_safetensors,
    write_safetensors,
)

__all__ = [
    "PeftAdapter",
    "SafetensorsFile",
    "merge_peft_adapters",
    "read_peft_adapter",
    "read_safetensors",
    "write_peft_adapter",
    "write_safetensors",
]
