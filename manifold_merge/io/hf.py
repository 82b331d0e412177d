"""Hugging Face checkpoint folders, streamed tensor by tensor.

A model folder as ``transformers`` writes it holds either one ``model.safetensors`` or shards
``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``, whose
``weight_map`` maps every tensor name to its shard file, beside config, tokenizer and
sentence-transformers files.

* :func:`open_checkpoint` -> :class:`CheckpointReader`: one name space over all shards; tensors
  are read-only views into memory maps (nothing is loaded);
* :class:`CheckpointWriter`: writes tensors in the order given, holding at most one shard in
  memory, and the index ``transformers`` expects;
* :func:`copy_aux_files`: copies everything of a model folder except its weights;
* :func:`parse_size` (``"5GB"`` -> bytes) and :func:`to_dtype` (compute results -> output dtype,
  correctly rounded).

Pickled weights (``pytorch_model.bin``, ``*.pt``, ...) are never loaded: unpickling runs code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from manifold_merge.io.safetensors import (
    SafetensorsFile,
    _as_array,
    atomic_write,
    write_safetensors,
)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_SHARD_NAME = "model-{k:05d}-of-{n:05d}.safetensors"
_TMP_SHARD_NAME = ".tmp-model-{k:05d}.safetensors"

#: File endings of pickled (code-executing) weight files, never loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Weight files of any framework: never copied as "auxiliary" files.
_WEIGHT_SUFFIXES = PICKLE_SUFFIXES + (
    ".safetensors",
    ".h5",
    ".msgpack",
    ".onnx",
    ".onnx_data",
    ".gguf",
    ".ggml",
    ".npz",
    ".npy",
    ".ot",
    ".tflite",
    ".pb",
    ".mlmodel",
    ".joblib",
)
_WEIGHT_NAME = re.compile(r".*(\.index\.json|\.index|\.data-\d+-of-\d+)$")

_CONVERT_HINT = (
    "Pickled weights are never loaded here: unpickling can execute arbitrary code. Convert "
    "them to safetensors once, in an environment you trust, e.g.\n"
    "  python -c \"import torch, safetensors.torch; sd = torch.load('pytorch_model.bin', "
    "map_location='cpu', weights_only=True); safetensors.torch.save_file({k: v.contiguous()"
    ".clone() for k, v in sd.items()}, 'model.safetensors', metadata={'format': 'pt'})\"\n"
    "or with transformers: AutoModel.from_pretrained(folder).save_pretrained(out_folder, "
    "safe_serialization=True)."
)


def _is_pickle(path: Path) -> bool:
    return path.name.endswith(PICKLE_SUFFIXES) or path.name.endswith(".bin.index.json")


def _is_weight_file(path: Path) -> bool:
    return path.name.endswith(_WEIGHT_SUFFIXES) or bool(_WEIGHT_NAME.match(path.name))


# -- reading ------------------------------------------------------------------------------


class CheckpointReader:
    """All tensors of a safetensors checkpoint (one file, or shards plus an index).

    Every shard's header is read and cross-checked against the index when the reader is made
    (a few KB per shard), so an inconsistent checkpoint fails before any work starts. A shard's
    data is memory-mapped only when one of its tensors is first requested; :meth:`get` returns
    read-only views into that map, so a checkpoint larger than memory can be walked tensor by
    tensor. Build it with :func:`open_checkpoint`.

    Attributes:
        path: what was opened (the folder, the index file or the ``.safetensors`` file).
        files: the shard files, in key order.

    Example:
        >>> import os, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> with CheckpointWriter(folder) as w:
        ...     w.add("w", np.eye(2, dtype=np.float32))
        >>> with open_checkpoint(folder) as ckpt:
        ...     ckpt.keys(), ckpt.info("w"), ckpt.get("w").flags.writeable
        (['w'], ('F32', (2, 2)), False)
    """

    def __init__(
        self,
        path: Path,
        shards: dict[str, list[str]],
        headers: dict[str, tuple[str, tuple[int, ...], int, str]],
    ):
        # shards: shard file (relative to the folder) -> tensor names in file order;
        # headers: name -> (dtype, shape, nbytes, shard)
        self.path = path
        self._root = path if path.is_dir() else path.parent
        self._names: dict[str, tuple[str, tuple[int, ...], int, str]] = headers
        self._order = [name for names in shards.values() for name in names]
        self.files = [self._root / shard for shard in shards]
        self._open: dict[str, SafetensorsFile] = {}
        self._closed = False

    def _entry(self, name: str) -> tuple[str, tuple[int, ...], int, str]:
        if self._closed:
            raise ValueError(f"checkpoint {str(self.path)!r} is closed")
        try:
            return self._names[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in checkpoint {str(self.path)!r}") from None

    def keys(self) -> list[str]:
        """Tensor names, shard by shard (shards sorted by file name), in file order within."""
        return list(self._order)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """``(safetensors dtype name, shape)`` of tensor ``name``, e.g. ``("BF16", (768, 8))``."""
        dtype, shape, _, _ = self._entry(name)
        return dtype, shape

    def nbytes(self, name: str) -> int:
        """Size in bytes of tensor ``name``'s data."""
        return self._entry(name)[2]

    def shard_of(self, name: str) -> str:
        """The file (relative to the folder) that holds tensor ``name``."""
        return self._entry(name)[3]

    @property
    def total_size(self) -> int:
        """Bytes of tensor data over all shards (the index's ``total_size``)."""
        return sum(entry[2] for entry in self._names.values())

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only view into its shard's memory map (nothing is copied).

        Args:
            name: a name from :meth:`keys`.

        Returns:
            An array of the stored dtype (``ml_dtypes.bfloat16`` for BF16) and shape; it stays
            valid after :meth:`close`.
        """
        shard = self._entry(name)[3]
        f = self._open.get(shard)
        if f is None:
            f = self._open[shard] = SafetensorsFile(self._root / shard)
        return f.get(name)

    def close(self) -> None:
        """Drop the shards' memory maps (arrays already returned stay valid)."""
        for f in self._open.values():
            f.close()
        self._open.clear()
        self._closed = True

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"CheckpointReader({str(self.path)!r}, {len(self)} tensors in "
            f"{len(self.files)} file{'s' * (len(self.files) != 1)})"
        )


def open_checkpoint(path: str | os.PathLike) -> CheckpointReader:
    """Open a Hugging Face safetensors checkpoint (folder, index file or single file) lazily.

    A folder is read as ``transformers`` reads it: ``model.safetensors`` if present, else
    ``model.safetensors.index.json`` and the shards it names; failing those, a single
    ``*.safetensors.index.json`` or a single ``*.safetensors`` file in the folder.

    Args:
        path: a model folder, a ``*.safetensors.index.json`` file or a ``.safetensors`` file.

    Returns:
        A :class:`CheckpointReader` (a context manager).

    Raises:
        FileNotFoundError: nothing at ``path``, a folder without weights, or an index naming a
            shard that is missing.
        ValueError: only pickled weights (``pytorch_model.bin``, ``*.pt``, ...), which are never
            loaded (the message says how to convert them); an index that is malformed, lists a
            tensor its shard does not hold, or misses a tensor a shard holds; a tensor stored in
            two shards; a malformed safetensors file. Messages name the file and the tensor.

    Example:
        >>> import os, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> with CheckpointWriter(folder, out_shard_size=8) as w:
        ...     w.add("a", np.zeros(2, np.float32))
        ...     w.add("b", np.ones(3, np.int64))
        >>> with open_checkpoint(folder) as ckpt:
        ...     [(k, ckpt.shard_of(k)) for k in ckpt.keys()]
        [('a', 'model-00001-of-00002.safetensors'), ('b', 'model-00002-of-00002.safetensors')]
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    if path.is_dir():
        weights = _find_weights(path)
        if weights.name.endswith(".index.json"):
            return _open_sharded(path, weights)
        return _open_single(path, weights)
    if path.name.endswith(".index.json"):
        if _is_pickle(path):
            raise ValueError(f"{str(path)!r} indexes pickled weights. {_CONVERT_HINT}")
        return _open_sharded(path, path)
    if _is_pickle(path):
        raise ValueError(f"{str(path)!r} holds pickled weights. {_CONVERT_HINT}")
    return _open_single(path, path)


def _find_weights(folder: Path) -> Path:
    for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME):
        if (folder / name).is_file():
            return folder / name
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for pattern in (".safetensors.index.json", ".safetensors"):
        found = [p for p in files if p.name.endswith(pattern)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(
                f"folder {str(folder)!r} holds several {pattern} files "
                f"({', '.join(p.name for p in found)}) and no {SAFE_WEIGHTS_NAME} or "
                f"{SAFE_WEIGHTS_INDEX_NAME}; pass the file to open"
            )
    pickles = [p.name for p in files if _is_pickle(p)]
    if pickles:
        raise ValueError(
            f"folder {str(folder)!r} holds only pickled weights ({', '.join(pickles)}). "
            f"{_CONVERT_HINT}"
        )
    raise FileNotFoundError(
        f"folder {str(folder)!r} holds no weights: expected {SAFE_WEIGHTS_NAME} or "
        f"{SAFE_WEIGHTS_INDEX_NAME} (found: {', '.join(p.name for p in files) or 'nothing'})"
    )


def _open_single(path: Path, file: Path) -> CheckpointReader:
    with SafetensorsFile(file) as f:
        headers = {k: (*f.info(k), f.nbytes(k), file.name) for k in f.keys()}
        return CheckpointReader(path, {file.name: f.keys()}, headers)


class _DuplicateEntry(ValueError):
    pass


def _no_duplicates(pairs: list) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateEntry(k, out[k], v)
        out[k] = v
    return out


def _read_index(index: Path) -> dict[str, str]:
    where = f"index {str(index)!r}"
    try:
        data = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateEntry as e:
        key, first, second = e.args
        raise ValueError(
            f"{where} lists tensor {key!r} twice (in {first!r} and in {second!r})"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is not valid JSON ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(
            f"{where} has no 'weight_map' object {{tensor name: shard file}} (as transformers "
            "writes it)"
        )
    for name, shard in weight_map.items():
        parts = Path(shard).parts if isinstance(shard, str) else ()
        if not parts or Path(shard).is_absolute() or ".." in parts:
            raise ValueError(
                f"{where} maps tensor {name!r} to {shard!r}; expected the name of a shard file "
                "in the index's folder"
            )
    return weight_map


def _open_sharded(path: Path, index: Path) -> CheckpointReader:
    weight_map = _read_index(index)
    folder = index.parent
    listed: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        listed.setdefault(shard, []).append(name)
    for shard, names in listed.items():
        if not (folder / shard).is_file():
            raise FileNotFoundError(
                f"index {str(index)!r} names shard {shard!r} (holding {len(names)} tensors, "
                f"e.g. {names[0]!r}), which is missing from {str(folder)!r}"
            )
    headers: dict[str, tuple] = {}
    shards: dict[str, list[str]] = {}
    for shard in sorted(listed):
        with SafetensorsFile(folder / shard) as f:
            for name in f.keys():
                if name in headers:
                    raise ValueError(
                        f"tensor {name!r} is stored in two shards, {headers[name][3]!r} and "
                        f"{shard!r} (index {str(index)!r} maps it to {weight_map.get(name)!r})"
                    )
                if name not in weight_map:
                    raise ValueError(
                        f"shard {str(folder / shard)!r} holds tensor {name!r}, which index "
                        f"{str(index)!r} does not list"
                    )
                headers[name] = (*f.info(name), f.nbytes(name), shard)
            shards[shard] = f.keys()
    for name, shard in weight_map.items():
        stored = headers.get(name)
        if stored is None:
            raise ValueError(
                f"index {str(index)!r} lists tensor {name!r} in shard {shard!r}, but "
                f"{str(folder / shard)!r} does not hold it"
            )
        if stored[3] != shard:
            raise ValueError(
                f"index {str(index)!r} maps tensor {name!r} to shard {shard!r}, but it is "
                f"stored in {stored[3]!r}"
            )
    return CheckpointReader(path, shards, headers)


# -- writing ------------------------------------------------------------------------------


def parse_size(size: str | int) -> int:
    """A byte count from ``"5GB"``, ``"500MB"``, ``"1.5G"``, ``"2000000"``, ``"2GiB"`` or an int.

    Units (case-insensitive, optional space): ``K``/``KB`` = 1e3, ``M``/``MB`` = 1e6,
    ``G``/``GB`` = 1e9, ``T``/``TB`` = 1e12; ``KiB``, ``MiB``, ``GiB``, ``TiB`` are powers of 1024.
    A bare ``"B"`` suffix is refused: mergekit reads ``"5B"`` as five billion.

    Args:
        size: a non-negative int, or a number with an optional unit.

    Returns:
        The size in bytes.

    Raises:
        ValueError: anything else (the message shows the value), or a fractional byte count.

    Example:
        >>> parse_size("5GB"), parse_size("1.5G"), parse_size("2KiB"), parse_size(7)
        (5000000000, 1500000000, 2048, 7)
    """
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
    units |= {f"{u}b": v for u, v in units.items() if u}
    units |= {f"{u}ib": 1024 ** (i + 1) for i, u in enumerate("kmgt")}
    help_ = "expected e.g. 5GB, 500MB, 1.5G, 2GiB or a byte count such as 2000000"
    if isinstance(size, bool):
        raise ValueError(f"size {size!r} is not a size; {help_}")
    if isinstance(size, (int, np.integer)):
        number, unit = Decimal(int(size)), ""
    elif isinstance(size, float) and size.is_integer():
        number, unit = Decimal(int(size)), ""
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", size)
        if m is None:
            raise ValueError(f"cannot read size {size!r}; {help_}")
        unit = m.group(2).lower()
        if unit == "b":
            raise ValueError(
                f"size {size!r} is ambiguous (mergekit reads a 'B' suffix as billions); write "
                f"it with a unit such as GB or as a plain byte count"
            )
        if unit not in units:
            raise ValueError(f"size {size!r} has unknown unit {m.group(2)!r}; {help_}")
        try:
            number = Decimal(m.group(1))
        except InvalidOperation:  # pragma: no cover - the pattern admits only numbers
            raise ValueError(f"cannot read size {size!r}; {help_}") from None
    else:
        raise ValueError(f"size {size!r} ({type(size).__name__}) is not a size; {help_}")
    total = number * units[unit]
    if total < 0:
        raise ValueError(f"size {size!r} is negative")
    if total != total.to_integral_value():
        raise ValueError(f"size {size!r} is not a whole number of bytes ({total})")
    return int(total)


def shard_limit(out_shard_size: int | str | None) -> int | None:
    """An output shard size in bytes (an int, or a size for :func:`parse_size`), or None;
    ValueError unless positive."""
    if out_shard_size is None:
        return None
    size = parse_size(out_shard_size)
    if size <= 0:
        raise ValueError(f"out_shard_size must be positive, got {size}")
    return size


def refuse_weights_in(folder: Path) -> None:
    """Create ``folder`` if missing; raise FileExistsError if it already holds weights
    (``*.safetensors`` or ``*.index.json``), naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(
        p.name for p in folder.iterdir() if p.name.endswith((".safetensors", ".index.json"))
    )
    if existing:
        raise FileExistsError(
            f"output folder {str(folder)!r} already holds weights "
            f"({', '.join(existing)}); write into an empty folder"
        )


class CheckpointWriter:
    """Write a Hugging Face safetensors checkpoint tensor by tensor, sharded as transformers does.

    Tensors go to the current shard in the order given; when adding the next tensor would take
    the shard's tensor data past ``out_shard_size`` bytes, the shard is written first, so at
    most one shard is held in memory (a tensor larger than the limit gets a shard of its own).
    Shards are written with :func:`~manifold_merge.io.safetensors.write_safetensors` under
    temporary names while their number is unknown; :meth:`close` renames them to
    ``model-0000k-of-0000n.safetensors`` and writes ``model.safetensors.index.json`` last, or,
    with a single shard, names it ``model.safetensors`` (no index). Leaving a ``with`` block by
    an exception removes the shards written so far. For an atomic result, write into a
    temporary folder and rename it.

    Arrays are kept by reference until their shard is written: do not modify them after
    :meth:`add`.

    Args:
        folder: the output folder (created if missing; must hold no safetensors files).
        out_shard_size: the most tensor bytes per shard (an int, or a size for
            :func:`parse_size` such as ``"5GB"``); ``None`` writes one file.
        metadata: ``{str: str}`` added to each shard's header on top of ``{"format": "pt"}``
            (which ``transformers`` checks).

    Raises:
        FileExistsError: ``folder`` already holds safetensors weights.
        ValueError: ``out_shard_size`` is not a positive size.

    Example:
        >>> import os, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> w = CheckpointWriter(folder, out_shard_size="1KB")
        >>> for i in range(3):
        ...     w.add(f"layer{i}.weight", np.zeros((10, 20), np.float32))  # 800 bytes each
        >>> w.close()
        ['model-00001-of-00003.safetensors', 'model-00002-of-00003.safetensors', \
'model-00003-of-00003.safetensors', 'model.safetensors.index.json']
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        out_shard_size: int | str | None = None,
        metadata: Mapping[str, str] | None = None,
    ):
        self.folder = Path(folder)
        self.out_shard_size = shard_limit(out_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        refuse_weights_in(self.folder)
        self._buffer: dict[str, np.ndarray] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []  # names per written shard
        self._nbytes: dict[str, int] = {}
        self._files: list[str] | None = None
        self._closed = False

    @property
    def buffered_bytes(self) -> int:
        """Tensor bytes held in memory for the shard not yet written."""
        return self._buffer_bytes

    @property
    def total_size(self) -> int:
        """Tensor bytes added so far."""
        return sum(self._nbytes.values())

    def add(self, name: str, array: Any) -> None:
        """Append tensor ``name`` (its dtype kept; JAX arrays are copied to host memory).

        Args:
            name: the tensor's name, new to this checkpoint.
            array: array-like of a safetensors dtype (F64, F32, F16, BF16, I64, ..., BOOL).

        Raises:
            ValueError: a duplicate or reserved name, an unsupported dtype, or a closed writer.
        """
        if self._closed:
            raise ValueError(f"checkpoint writer for {str(self.folder)!r} is closed")
        if name in self._nbytes:
            raise ValueError(f"tensor {name!r} was already added to {str(self.folder)!r}")
        arr = _as_array(name, array)
        if (
            self.out_shard_size is not None
            and self._buffer
            and self._buffer_bytes + arr.nbytes > self.out_shard_size
        ):
            self._flush()
        self._buffer[name] = arr
        self._buffer_bytes += arr.nbytes
        self._nbytes[name] = arr.nbytes
        if self.out_shard_size is not None and self._buffer_bytes > self.out_shard_size:
            self._flush()  # a tensor over the limit: nothing can join it, free it now

    def _flush(self) -> None:
        k = len(self._shards) + 1
        write_safetensors(self.folder / _TMP_SHARD_NAME.format(k=k), self._buffer, self.metadata)
        self._shards.append(list(self._buffer))
        self._buffer = {}
        self._buffer_bytes = 0

    def close(self) -> list[str]:
        """Write the last shard, name the shards and write the index.

        Returns:
            The files written, relative to the folder: ``["model.safetensors"]``, or the shards
            in order followed by ``"model.safetensors.index.json"``. Calling it again returns
            the same list.
        """
        if self._files is not None:
            return list(self._files)
        if self._closed:
            raise ValueError(f"checkpoint writer for {str(self.folder)!r} was aborted")
        try:
            if self._buffer or not self._shards:
                self._flush()
            n = len(self._shards)
            names = (
                [SAFE_WEIGHTS_NAME]
                if n == 1
                else [_SHARD_NAME.format(k=k, n=n) for k in range(1, n + 1)]
            )
            for k, final in enumerate(names, start=1):
                os.replace(self.folder / _TMP_SHARD_NAME.format(k=k), self.folder / final)
            files = list(names)
            if n > 1:
                index = {
                    "metadata": {"total_size": self.total_size},
                    "weight_map": {t: f for f, ts in zip(names, self._shards) for t in ts},
                }
                text = json.dumps(index, indent=2, sort_keys=True) + "\n"
                atomic_write(
                    self.folder / SAFE_WEIGHTS_INDEX_NAME, lambda fh: fh.write(text), mode="w"
                )
                files.append(SAFE_WEIGHTS_INDEX_NAME)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._files = files
        return list(files)

    @property
    def weight_map(self) -> dict[str, str]:
        """``{tensor: file}`` of the written checkpoint (after :meth:`close`)."""
        if self._files is None:
            raise ValueError("the weight map is known once the writer is closed")
        shards = self._files if len(self._shards) > 1 else [SAFE_WEIGHTS_NAME]
        return {t: f for f, ts in zip(shards, self._shards) for t in ts}

    def abort(self) -> None:
        """Discard everything: remove the shards written so far and drop the buffer."""
        self._closed = True
        self._buffer = {}
        self._buffer_bytes = 0
        n = len(self._shards)
        candidates = [_TMP_SHARD_NAME.format(k=k) for k in range(1, n + 2)]
        candidates += [_SHARD_NAME.format(k=k, n=n) for k in range(1, n + 1)]
        candidates += [SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME]
        if self._files is None:
            for name in candidates:
                (self.folder / name).unlink(missing_ok=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._files is None:
            self.abort()

    def __repr__(self) -> str:
        return (
            f"CheckpointWriter({str(self.folder)!r}, out_shard_size={self.out_shard_size}, "
            f"{len(self._nbytes)} tensors)"
        )


def copy_aux_files(
    src_folder: str | os.PathLike, dst_folder: str | os.PathLike, *, overwrite: bool = True
) -> list[str]:
    """Copy everything of a model folder except its weights (config, tokenizer, ...).

    Copied: every file, in subfolders too (``1_Pooling/config.json``), such as ``config.json``,
    ``generation_config.json``, ``tokenizer*.json``, ``vocab.txt``, ``merges.txt``, ``*.model``,
    ``special_tokens_map.json``, ``README.md`` and sentence-transformers' ``modules.json``.
    Never copied: weight files of any framework (``*.safetensors``, ``*.index.json``,
    ``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``, ``*.h5``, ``*.msgpack``, ``*.onnx``, ``*.gguf``,
    ...) and hidden entries (``.git``, ``.gitattributes``, ``.cache``). Symbolic links (as in
    the Hugging Face cache) are followed. A weight file in a subfolder (e.g.
    ``2_Dense/model.safetensors``) is skipped with a warning: the copy lacks it.

    Args:
        src_folder: the model folder to copy from.
        dst_folder: the folder to copy into (created if missing).
        overwrite: replace files already in ``dst_folder``; if False they are kept and not
            listed.

    Returns:
        The copied files' paths relative to the folders (``/``-separated), sorted.

    Raises:
        FileNotFoundError / NotADirectoryError: ``src_folder`` is not a folder.

    Example:
        >>> import os, tempfile
        >>> src, dst = tempfile.mkdtemp(), tempfile.mkdtemp()
        >>> for name in ("config.json", "model.safetensors"):
        ...     _ = open(os.path.join(src, name), "w").write("{}")
        >>> copy_aux_files(src, dst)
        ['config.json']
    """
    src, dst = Path(src_folder), Path(dst_folder)
    if not src.exists():
        raise FileNotFoundError(f"no model folder at {str(src)!r}")
    if not src.is_dir():
        raise NotADirectoryError(f"{str(src)!r} is not a model folder")
    copied, skipped = [], []
    dst_real = os.path.realpath(dst)
    for root, dirs, files in os.walk(src):
        # hidden entries (.git, .cache) are no part of the model; never walk into the copy
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".") and os.path.realpath(Path(root) / d) != dst_real
        )
        rel_root = Path(root).relative_to(src)
        for name in sorted(files):
            rel = rel_root / name
            if name.startswith("."):
                continue
            if _is_weight_file(rel):
                if rel_root != Path("."):
                    skipped.append(rel.as_posix())
                continue
            target = dst / rel
            if target.exists() and not overwrite:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(root) / name, target)
            copied.append(rel.as_posix())
    if skipped:
        warnings.warn(
            f"copy_aux_files did not copy weight files in subfolders of {str(src)!r} "
            f"({', '.join(skipped)}); the copy in {str(dst)!r} lacks them",
            stacklevel=2,
        )
    return sorted(copied)


# -- output dtypes ------------------------------------------------------------------------

_OUT_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "fp32": np.dtype(np.float32),
    "f32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "fp16": np.dtype(np.float16),
    "f16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "float64": np.dtype(np.float64),
    "fp64": np.dtype(np.float64),
    "f64": np.dtype(np.float64),
    "double": np.dtype(np.float64),
}


def parse_dtype(name: str) -> np.dtype:
    """The NumPy dtype of an output dtype name (case-insensitive, ``torch.`` prefix allowed).

    Args:
        name: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"float64"`` or mergekit's
            ``"fp32"``, ``"bf16"``, ``"fp16"`` (also ``"f32"``, ``"half"``, ...).

    Returns:
        The dtype (``ml_dtypes.bfloat16`` for bfloat16).

    Raises:
        ValueError: an unknown name (the message lists the known ones).

    Example:
        >>> parse_dtype("bf16"), parse_dtype("float32")
        (dtype(bfloat16), dtype('float32'))
    """
    key = name.strip().lower().removeprefix("torch.") if isinstance(name, str) else None
    if key not in _OUT_DTYPES:
        raise ValueError(f"unknown output dtype {name!r}; expected one of {', '.join(_OUT_DTYPES)}")
    return _OUT_DTYPES[key]


def _f64_to_f32_round_to_odd(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounding to odd: truncate, then set the last bit if inexact.

    Rounding to odd keeps enough information for a second, round-to-nearest-even step to a
    format at least two bits narrower (bfloat16: 8 bits vs 24) to round as a single correctly
    rounded step would; plain float64 -> float32 -> bfloat16 (what ``astype`` does) rounds
    twice and is off by one ulp next to ties.
    """
    with np.errstate(over="ignore"):  # overflow is decided by the second rounding
        f = x.astype(np.float32)
    back = f.astype(np.float64)
    finite = np.isfinite(x)
    away = finite & (np.abs(back) > np.abs(x))  # rounded away from zero (overflow included)
    inexact = finite & (back != x)
    bits = f.view(np.uint32) - away.astype(np.uint32)  # one step towards zero: truncation
    return (bits | inexact.astype(np.uint32)).view(np.float32)


def _is_float(dtype: np.dtype) -> bool:
    try:
        ml_dtypes.finfo(dtype)
    except (TypeError, ValueError):
        return False
    return dtype.kind != "c"


def to_dtype(array: Any, dtype: str | None) -> np.ndarray:
    """Convert a floating-point result to an output dtype, rounding to nearest (ties to even).

    The conversion is correctly rounded from any floating input: float64 -> bfloat16 goes
    through float32 with rounding to odd, so it rounds as a direct cast would (``astype`` to
    ``ml_dtypes.bfloat16`` rounds twice, via float32). Integer and boolean arrays (e.g.
    ``position_ids``) are returned unchanged: an output dtype applies to floating-point weights.

    Args:
        array: array-like (NumPy or JAX) of any shape.
        dtype: an output dtype name for :func:`parse_dtype`, or ``None`` to keep the dtype.

    Returns:
        A NumPy array of the requested dtype (the input itself when nothing changes).

    Raises:
        ValueError: an unknown dtype name.
        TypeError: an array that is neither floating-point, integer nor boolean.

    Example:
        >>> to_dtype(np.array([1 + 2**-8 + 2**-30]), "bf16").astype(np.float64)  # up, not 1.0
        array([1.0078125])
    """
    arr = np.asarray(array)
    target = None if dtype is None else parse_dtype(dtype)
    if target is None or arr.dtype.kind in "biu" or arr.dtype == target:
        return arr
    if not _is_float(arr.dtype):
        raise TypeError(f"cannot convert an array of dtype {arr.dtype} to {target}")
    with np.errstate(invalid="ignore"):  # NaN stays NaN; overflow to inf still warns
        if target == np.dtype(ml_dtypes.bfloat16) and arr.dtype.itemsize > 4:
            return _f64_to_f32_round_to_odd(arr.astype(np.float64)).astype(target)
        return arr.astype(target)
