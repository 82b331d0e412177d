"""A Hugging Face safetensors checkpoint laid out before its data exist, then filled in pieces.

For sharded and distributed merges the output tensors' names, dtypes and shapes are known before
any of their data: :class:`PlannedCheckpointWriter` lays the files out up front (headers written,
each file sized to its final length) and then takes each tensor's data in pieces, written with
``os.pwrite`` at their byte offsets. No tensor, let alone a shard, is ever held whole in memory,
and several processes can write their own pieces into the same files (one creates them, the
others open them with ``create=False``).

Once every tensor is written, the files are byte for byte those that
:class:`~manifold_merge.io.hf.CheckpointWriter` writes for the same tensors added in the planned
order: same shard split, headers (``{"format": "pt"}`` metadata included), padding and index.
"""

from __future__ import annotations

import json
import math
import operator
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from manifold_merge.io.hf import (
    _SHARD_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    refuse_weights_in,
    shard_limit,
)
from manifold_merge.io.safetensors import (
    _LENGTH_BYTES,
    _METADATA,
    DTYPES,
    _as_array,
    _check_metadata,
    _fsync_dir,
    _header,
    atomic_write,
    dtype_name,
)


def plan_shards(sizes: Iterable[tuple[str, int]], out_shard_size: int | None) -> list[list[str]]:
    """The tensor names of each shard, split as :class:`~manifold_merge.io.hf.CheckpointWriter`
    splits them.

    Tensors go to the current shard in order; a shard is closed before a tensor that would take
    its data past ``out_shard_size`` bytes; a tensor larger than the limit gets a shard of its
    own. No tensors give one empty shard.

    Args:
        sizes: ``(name, nbytes)`` in file order.
        out_shard_size: the most tensor bytes per shard (bytes, > 0), or ``None`` for one shard.

    Returns:
        One list of names per shard, in order.

    Example:
        >>> plan_shards([("a", 600), ("b", 600), ("c", 2000), ("d", 0)], 1000)
        [['a'], ['b'], ['c'], ['d']]
        >>> plan_shards([("a", 600), ("b", 400)], 1000), plan_shards([], None)
        ([['a', 'b']], [[]])
    """
    shards: list[list[str]] = []
    buffer: list[str] = []
    buffered = 0
    for name, nbytes in sizes:
        if out_shard_size is not None and buffer and buffered + nbytes > out_shard_size:
            shards.append(buffer)
            buffer, buffered = [], 0
        buffer.append(name)
        buffered += nbytes
        if out_shard_size is not None and buffered > out_shard_size:
            shards.append(buffer)
            buffer, buffered = [], 0
    if buffer or not shards:
        shards.append(buffer)
    return shards


class _Spec(NamedTuple):
    """What :func:`~manifold_merge.io.safetensors._header` reads of an array."""

    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int


class _Slot(NamedTuple):
    """Where a planned tensor lives."""

    dtype: str
    shape: tuple[int, ...]
    numel: int
    itemsize: int
    shard: int  # index into the shard files
    offset: int  # absolute byte offset of its first element in the shard file


def _is_dim(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) and x >= 0


def _safetensors_name(dtype: np.dtype) -> str | None:
    try:
        return dtype_name(dtype)
    except ValueError:
        return None


def _pwrite_all(fd: int, view: memoryview, offset: int, path: Path) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        if n <= 0:  # pragma: no cover - pwrite raises on errors
            raise OSError(f"could not write to {str(path)!r} at byte {offset}")
        view = view[n:]
        offset += n


class PlannedCheckpointWriter:
    """A safetensors checkpoint laid out from its tensor list, then written piece by piece.

    With ``create=True`` the folder (created if missing; it must hold no ``*.safetensors`` or
    ``*.index.json``) gets each shard under its final name (``model.safetensors``, or
    ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``): its header is
    written and the file sized to its final length; tensor data read as zeros until written.
    With ``create=False`` the files made by another writer with the same arguments (typically
    in another process, after it finished its constructor) are opened for writing; their sizes
    and headers must be the planned ones.

    :meth:`write` puts a flat C-order element range of one tensor at its place in its file.
    Each writer remembers the ranges it wrote (:meth:`missing`), but :meth:`close` does not
    check coverage: in multi-process use each process writes only its part, and the caller
    checks that the parts add up. Once every element is written, the files are identical to
    those of :class:`~manifold_merge.io.hf.CheckpointWriter` for the same tensors added in the
    planned order.

    Leaving a ``with`` block normally closes the writer; leaving it by an exception aborts it
    (removing the files if this writer created them).

    Args:
        folder: the output folder.
        tensors: ``[(name, dtype, shape)]`` in file order; ``dtype`` a safetensors name
            (``"F32"``, ``"BF16"``, ``"I64"``, ... see
            :data:`~manifold_merge.io.safetensors.DTYPES`), ``shape`` a tuple of ints >= 0.
        out_shard_size: the most tensor bytes per shard (an int, or a size for
            :func:`~manifold_merge.io.hf.parse_size` such as ``"5GB"``); ``None`` writes one
            file.
        metadata: ``{str: str}`` added to each shard's header on top of ``{"format": "pt"}``.
        create: lay the files out (``True``), or open files laid out by another writer.

    Raises:
        FileExistsError: ``create=True`` and ``folder`` already holds weights.
        FileNotFoundError: ``create=False`` and a planned file is missing.
        ValueError: an invalid plan (duplicate or reserved name, unknown dtype, bad shape),
            ``out_shard_size`` not a positive size, or (``create=False``) a file whose size or
            header differs from the plan.
        TypeError: a tensor name, or a metadata key or value, is not a str.

    Example:
        >>> import tempfile
        >>> from manifold_merge.io.hf import open_checkpoint
        >>> folder = tempfile.mkdtemp()
        >>> plan = [("a", "F32", (2, 3)), ("b", "I64", (4,))]
        >>> with PlannedCheckpointWriter(folder, plan, out_shard_size=24) as w:
        ...     w.write("a", np.arange(3, 6, dtype=np.float32), start=3)
        ...     w.write("a", np.arange(3, dtype=np.float32))
        ...     w.write("b", np.arange(4))
        ...     w.missing(), w.weight_map["b"]
        ([], 'model-00002-of-00002.safetensors')
        >>> open_checkpoint(folder).get("a")
        array([[0., 1., 2.],
               [3., 4., 5.]], dtype=float32)
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        tensors: Iterable[tuple[str, str, tuple[int, ...]]],
        *,
        out_shard_size: int | str | None = None,
        metadata: Mapping[str, str] | None = None,
        create: bool = True,
    ):
        self.folder = Path(folder)
        self.out_shard_size = shard_limit(out_shard_size)
        self.metadata = {"format": "pt", **(_check_metadata(metadata) or {})}
        self.create = bool(create)
        self._fds: list[int] = []
        self._created: list[Path] = []
        self._closed = False
        self._aborted = False

        specs = self._check_plan(tensors)
        self._shards = plan_shards(((k, s.nbytes) for k, s in specs.items()), self.out_shard_size)
        n = len(self._shards)
        self._shard_files = (
            [SAFE_WEIGHTS_NAME]
            if n == 1
            else [_SHARD_NAME.format(k=k, n=n) for k in range(1, n + 1)]
        )
        self._files = list(self._shard_files) + ([SAFE_WEIGHTS_INDEX_NAME] if n > 1 else [])
        self._slots: dict[str, _Slot] = {}
        self._heads: list[bytes] = []  # length + header of each shard
        self._sizes: list[int] = []  # final file sizes
        for k, names in enumerate(self._shards):
            header = _header({t: specs[t] for t in names}, self.metadata)
            head = len(header).to_bytes(_LENGTH_BYTES, "little") + header
            position = len(head)
            for t in names:
                s = specs[t]
                self._slots[t] = _Slot(
                    dtype=dtype_name(s.dtype),
                    shape=s.shape,
                    numel=math.prod(s.shape),
                    itemsize=s.dtype.itemsize,
                    shard=k,
                    offset=position,
                )
                position += s.nbytes
            self._heads.append(head)
            self._sizes.append(position)
        self.total_size = sum(s.nbytes for s in specs.values())
        self._index_text: str | None = None
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": self.weight_map,
            }
            self._index_text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        self._ranges: dict[str, list[tuple[int, int]]] = {t: [] for t in self._slots}

        if self.create:
            self._lay_out()
        else:
            self._open_existing()

    # -- the plan ---------------------------------------------------------------------------

    @staticmethod
    def _check_plan(tensors: Iterable) -> dict[str, _Spec]:
        if isinstance(tensors, (str, bytes, Mapping)):
            raise TypeError(
                f"tensors must be a list of (name, dtype, shape), got {type(tensors).__name__}"
            )
        specs: dict[str, _Spec] = {}
        for entry in tensors:
            try:
                name, dtype, shape = entry
            except (TypeError, ValueError):
                raise TypeError(
                    f"each planned tensor must be a (name, dtype, shape) tuple, got {entry!r}"
                ) from None
            if not isinstance(name, str):
                raise TypeError(f"tensor names must be str, got {name!r} ({type(name).__name__})")
            if name == _METADATA:
                raise ValueError(
                    f"{_METADATA!r} is reserved in safetensors headers; not a tensor name"
                )
            if name in specs:
                raise ValueError(f"tensor {name!r} appears more than once in the plan")
            if not isinstance(dtype, str) or dtype not in DTYPES:
                raise ValueError(
                    f"tensor {name!r} has dtype {dtype!r}; expected a safetensors dtype name "
                    f"({', '.join(DTYPES)})"
                )
            try:
                dims = tuple(shape)
            except TypeError:
                dims = None
            if dims is None or not all(_is_dim(d) for d in dims):
                raise ValueError(
                    f"tensor {name!r} has shape {shape!r}; expected a tuple of ints >= 0"
                )
            dims = tuple(int(d) for d in dims)
            dt = DTYPES[dtype]
            specs[name] = _Spec(dt, dims, dt.itemsize * math.prod(dims))
        return specs

    # -- the files --------------------------------------------------------------------------

    def _lay_out(self) -> None:
        refuse_weights_in(self.folder)
        try:
            for file, head, size in zip(self._shard_files, self._heads, self._sizes):
                path = self.folder / file
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                self._created.append(path)
                self._fds.append(fd)
                _pwrite_all(fd, memoryview(head), 0, path)
                os.ftruncate(fd, size)
                # Durable before another process (possibly on another host) opens it.
                os.fsync(fd)
            if self._index_text is not None:
                text = self._index_text
                path = self.folder / SAFE_WEIGHTS_INDEX_NAME
                atomic_write(path, lambda fh: fh.write(text), mode="w")
                self._created.append(path)
            _fsync_dir(self.folder)
        except BaseException:
            self.abort()
            raise

    def _open_existing(self) -> None:
        try:
            for file, head, size in zip(self._shard_files, self._heads, self._sizes):
                path = self.folder / file
                try:
                    actual = path.stat().st_size
                except FileNotFoundError:
                    raise FileNotFoundError(
                        f"planned checkpoint file {str(path)!r} does not exist (create=False "
                        "opens files laid out by a writer with create=True)"
                    ) from None
                if actual != size:
                    raise ValueError(
                        f"planned checkpoint file {str(path)!r} is {actual} bytes long, but the "
                        f"plan makes it {size} bytes (laid out for a different plan, or not yet)"
                    )
                with open(path, "rb") as fh:
                    found = fh.read(len(head))
                if found != head:
                    raise ValueError(
                        f"planned checkpoint file {str(path)!r} has a different header than the "
                        "plan gives it (laid out with other tensors, shard size or metadata)"
                    )
                self._fds.append(os.open(path, os.O_WRONLY))
            if self._index_text is not None:
                path = self.folder / SAFE_WEIGHTS_INDEX_NAME
                try:
                    text = path.read_text(encoding="utf-8")
                except FileNotFoundError:
                    raise FileNotFoundError(
                        f"planned checkpoint index {str(path)!r} does not exist (create=False "
                        "opens files laid out by a writer with create=True)"
                    ) from None
                if text != self._index_text:
                    raise ValueError(
                        f"planned checkpoint index {str(path)!r} differs from the plan's index "
                        "(laid out for a different plan)"
                    )
        except BaseException:
            self.abort()
            raise

    # -- the layout -------------------------------------------------------------------------

    @property
    def files(self) -> list[str]:
        """The checkpoint's files relative to the folder: ``["model.safetensors"]``, or the
        shards in order followed by ``"model.safetensors.index.json"``."""
        return list(self._files)

    @property
    def weight_map(self) -> dict[str, str]:
        """``{tensor: file}``, in planned order."""
        return {t: self._shard_files[s.shard] for t, s in self._slots.items()}

    def keys(self) -> list[str]:
        """The planned tensor names, in file order."""
        return list(self._slots)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """``(dtype name, shape)`` of planned tensor ``name``."""
        slot = self._slot(name)
        return slot.dtype, slot.shape

    def _slot(self, name: str) -> _Slot:
        try:
            return self._slots[name]
        except KeyError:
            raise KeyError(
                f"tensor {name!r} is not in the plan of the checkpoint in {str(self.folder)!r}"
            ) from None

    # -- writing ----------------------------------------------------------------------------

    def write(self, name: str, data: Any, start: int = 0) -> None:
        """Write elements ``[start, start + data.size)`` of tensor ``name`` (flat, C order).

        Args:
            name: a planned tensor.
            data: array-like (NumPy, JAX, ...) of exactly the planned dtype (nothing is cast);
                any shape, read in C order.
            start: the flat index of its first element in the tensor.

        Raises:
            KeyError: ``name`` is not planned.
            ValueError: the dtype differs from the planned one, the range is out of the
                tensor's bounds, or the writer is closed.
        """
        if self._closed:
            raise ValueError(f"planned checkpoint writer for {str(self.folder)!r} is closed")
        slot = self._slot(name)
        arr = np.asarray(data)
        got = _safetensors_name(arr.dtype)
        if got != slot.dtype:
            raise ValueError(
                f"tensor {name!r} is planned as {slot.dtype} ({DTYPES[slot.dtype]}), got data "
                f"of dtype {arr.dtype}; convert it first (e.g. with to_dtype)"
            )
        if not _is_dim(start):
            raise ValueError(f"start {start!r} for tensor {name!r} must be an int >= 0")
        start = operator.index(start)
        stop = start + arr.size
        if stop > slot.numel:
            raise ValueError(
                f"elements [{start}, {stop}) are out of bounds for tensor {name!r} of shape "
                f"{slot.shape} ({slot.numel} elements)"
            )
        if arr.size == 0:
            return
        flat = _as_array(name, arr).reshape(-1)  # little-endian, C order
        path = self.folder / self._shard_files[slot.shard]
        offset = slot.offset + start * slot.itemsize
        _pwrite_all(self._fds[slot.shard], memoryview(flat.view(np.uint8)), offset, path)
        self._ranges[name].append((start, stop))

    def missing(self) -> list[str]:
        """Planned tensors whose elements written *by this writer* do not cover the tensor
        (empty tensors are always covered), in planned order."""
        out = []
        for name, slot in self._slots.items():
            merged: list[tuple[int, int]] = []
            for a, b in sorted(self._ranges[name]):
                if merged and a <= merged[-1][1]:
                    if b > merged[-1][1]:
                        merged[-1] = (merged[-1][0], b)
                else:
                    merged.append((a, b))
            self._ranges[name] = merged
            if slot.numel and merged != [(0, slot.numel)]:
                out.append(name)
        return out

    def _close_fds(self, *, sync: bool) -> None:
        fds, self._fds = self._fds, []
        error: BaseException | None = None
        for fd in fds:
            try:
                if sync:
                    os.fsync(fd)
            except BaseException as e:  # close the rest anyway
                error = error or e
            finally:
                os.close(fd)
        if error is not None:
            raise error

    def close(self) -> list[str]:
        """Flush (fsync) and close the files. Coverage is not checked: see :meth:`missing`.

        Returns:
            :attr:`files`. Calling it again returns the same list.
        """
        if self._aborted:
            raise ValueError(f"planned checkpoint writer for {str(self.folder)!r} was aborted")
        if not self._closed:
            self._closed = True
            self._close_fds(sync=True)
        return self.files

    def abort(self) -> None:
        """Close the files and, if this writer created them, remove them (even after
        :meth:`close`)."""
        self._closed = True
        self._aborted = True
        try:
            self._close_fds(sync=False)
        finally:
            created, self._created = self._created, []
            for path in reversed(created):
                path.unlink(missing_ok=True)

    def __enter__(self) -> PlannedCheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:
            self.abort()

    def __repr__(self) -> str:
        return (
            f"PlannedCheckpointWriter({str(self.folder)!r}, {len(self._slots)} tensors, "
            f"{len(self._shard_files)} shards, create={self.create})"
        )
