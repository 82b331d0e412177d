"""Experts derived from the real all-MiniLM-L6-v2 checkpoint, for the end-to-end CLI tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from manifold_merge.io import CheckpointWriter, copy_aux_files, open_checkpoint


def write_experts(minilm: str, root: Path, rng, n: int = 3, shard_sizes=None) -> list[str]:
    """``n`` fine-tune-like experts in ``root/expert{i}``: MiniLM plus small random task vectors
    (0.01 N(0, 1) on the float tensors), with its config and tokenizer files; expert i is
    sharded into files of at most ``shard_sizes[i]`` (default: one file each)."""
    paths = []
    with open_checkpoint(minilm) as base:
        for i in range(n):
            folder = Path(root) / f"expert{i}"
            folder.mkdir()
            size = None if shard_sizes is None else shard_sizes[i]
            with CheckpointWriter(folder, out_shard_size=size) as w:
                for name in base.keys():
                    x = np.asarray(base.get(name))
                    if x.dtype.kind == "f":
                        x = x + (0.01 * rng.standard_normal(x.shape)).astype(x.dtype)
                    w.add(name, x)
            copy_aux_files(minilm, folder)
            paths.append(str(folder))
    return paths
