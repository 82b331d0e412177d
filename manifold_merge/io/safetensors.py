"""A small, dependency-free, lazy reader and an atomic writer of the safetensors format.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian unsigned
header length ``N``, then ``N`` bytes of UTF-8 JSON ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}`` (optional metadata), then the data
area: the tensors' raw little-endian, C-ordered bytes, ``data_offsets`` relative to its start.
The offsets must tile the data area exactly: no gap, no overlap, nothing left over.

:class:`SafetensorsFile` reads and checks only the header when opened; tensors are read-only
views into one memory map of the data area, so a multi-GB checkpoint can be walked tensor by
tensor without loading it.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

#: safetensors dtype name -> NumPy dtype (explicitly little-endian where byte order matters).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_METADATA = "__metadata__"
_LENGTH_BYTES = 8


def dtype_name(dtype: Any, *, tensor: str = "?") -> str:
    """The safetensors name (``"F32"``, ``"BF16"``, ...) of a NumPy dtype.

    Args:
        dtype: anything ``np.dtype`` accepts (``np.float32``, ``ml_dtypes.bfloat16``, ...).
        tensor: the tensor's name, for the error message.

    Returns:
        The dtype's name in a safetensors header.

    Raises:
        ValueError: the dtype has no safetensors name supported here.

    Example:
        >>> import ml_dtypes
        >>> dtype_name(np.float32), dtype_name(ml_dtypes.bfloat16)
        ('F32', 'BF16')
    """
    dt = np.dtype(dtype)
    for name, ref in DTYPES.items():
        # kind + size, so that byte order does not matter (writing converts to little-endian)
        if dt == ref or (name != "BF16" and (dt.kind, dt.itemsize) == (ref.kind, ref.itemsize)):
            return name
    raise ValueError(
        f"tensor {tensor!r} has dtype {dt}, which safetensors files written here do not "
        f"support (supported: {', '.join(DTYPES)})"
    )


class SafetensorsFile:
    """A safetensors file opened lazily: the header is read and checked, the data memory-mapped.

    Arrays from :meth:`get` are read-only views into the map (no copy); they stay valid after
    :meth:`close` (each holds a reference to the map).

    Args:
        path: the ``.safetensors`` file.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the header is malformed (message names the file and the tensor).

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> write_safetensors(path, {"w": np.eye(2, dtype=np.float32)}, {"format": "np"})
        >>> with SafetensorsFile(path) as f:
        ...     f.keys(), f.info("w"), f.metadata, f.get("w").flags.writeable
        (['w'], ('F32', (2, 2)), {'format': 'np'}, False)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._map: np.ndarray | None = None
        self._closed = False
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise FileNotFoundError(f"no safetensors file at {str(self.path)!r}") from None
        if self.path.is_dir():
            raise IsADirectoryError(f"{str(self.path)!r} is a folder, not a safetensors file")
        with open(self.path, "rb") as fh:
            head = fh.read(_LENGTH_BYTES)
            if len(head) < _LENGTH_BYTES:
                raise self._error(
                    f"is {size} bytes long, shorter than the {_LENGTH_BYTES}-byte header length"
                )
            n = int.from_bytes(head, "little")
            if n > size - _LENGTH_BYTES:
                raise self._error(
                    f"declares a {n}-byte header but only {size - _LENGTH_BYTES} bytes follow "
                    "the header length (truncated, or not a safetensors file)"
                )
            raw = fh.read(n)
        self._data_start = _LENGTH_BYTES + n
        self._data_len = size - self._data_start
        self._entries, self._metadata = self._parse_header(raw)
        if self._data_len > 0:
            self._map = np.memmap(
                self.path, dtype=np.uint8, mode="r", offset=self._data_start, shape=self._data_len
            )

    # -- header ---------------------------------------------------------------------------

    def _error(self, what: str) -> ValueError:
        return ValueError(f"safetensors file {str(self.path)!r} {what}")

    def _parse_header(self, raw: bytes) -> tuple[dict, dict]:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._error(f"has a header that is not valid UTF-8 ({e})") from None
        try:
            header = json.loads(text, object_pairs_hook=_no_duplicates)
        except (json.JSONDecodeError, _DuplicateKey) as e:
            raise self._error(f"has a header that is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._error(
                f"has a JSON header that is a {type(header).__name__}, expected an object "
                "{name: {dtype, shape, data_offsets}}"
            )
        metadata = header.pop(_METADATA, None) or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise self._error(f"has {_METADATA} {metadata!r}; expected an object of str -> str")
        entries = {name: self._parse_entry(name, info) for name, info in header.items()}
        self._check_layout(entries)
        # File order: by position in the data area (equal to the header's order for files
        # written by the reference implementation and by write_safetensors).
        order = sorted(entries, key=lambda k: entries[k][2])
        return {k: entries[k] for k in order}, metadata

    def _parse_entry(self, name: str, info: Any) -> tuple[str, tuple[int, ...], tuple[int, int]]:
        where = f"tensor {name!r}"
        if not isinstance(info, dict):
            raise self._error(f"has {where} described by {info!r}; expected an object")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if missing:
            raise self._error(f"has {where} without {missing} in its header entry {info!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise self._error(
                f"has {where} of dtype {dtype!r}, which this reader does not support "
                f"(supported: {', '.join(DTYPES)})"
            )
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise self._error(f"has {where} with shape {shape!r}; expected a list of ints >= 0")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise self._error(
                f"has {where} with data_offsets {offsets!r}; expected [begin, end], "
                "0 <= begin <= end"
            )
        expected = DTYPES[dtype].itemsize * math.prod(shape)
        if offsets[1] - offsets[0] != expected:
            raise self._error(
                f"has {where} ({dtype}, shape {shape}) spanning {offsets[1] - offsets[0]} bytes "
                f"(data_offsets {offsets}); its dtype and shape need {expected}"
            )
        return dtype, tuple(shape), (offsets[0], offsets[1])

    def _check_layout(self, entries: dict) -> None:
        """The spec's rule: the tensors tile the data area, in some order, without gaps."""
        position = 0
        for name in sorted(entries, key=lambda k: entries[k][2]):
            begin, end = entries[name][2]
            if begin != position:
                kind = "overlaps the previous tensor" if begin < position else "leaves a gap"
                raise self._error(
                    f"has tensor {name!r} at data_offsets [{begin}, {end}], which {kind} "
                    f"(expected it to begin at byte {position} of the data area)"
                )
            position = end
        if position > self._data_len:
            raise self._error(
                f"is truncated: its header describes {position} bytes of tensor data but only "
                f"{self._data_len} bytes follow the header"
            )
        if position < self._data_len:
            raise self._error(
                f"has {self._data_len - position} bytes after the last tensor that no tensor "
                f"covers (the header describes {position} bytes of data, the file holds "
                f"{self._data_len})"
            )

    # -- access ---------------------------------------------------------------------------

    def _entry(self, name: str):
        if self._closed:
            raise ValueError(f"safetensors file {str(self.path)!r} is closed")
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in safetensors file {str(self.path)!r}") from None

    def keys(self) -> list[str]:
        """Tensor names in file order (their order in the data area)."""
        return list(self._entries)

    @property
    def metadata(self) -> dict[str, str]:
        """The header's ``__metadata__`` ({} when absent)."""
        return dict(self._metadata)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """``(dtype name, shape)`` of tensor ``name``, e.g. ``("BF16", (768, 8))``."""
        dtype, shape, _ = self._entry(name)
        return dtype, shape

    def nbytes(self, name: str) -> int:
        """Size in bytes of tensor ``name``'s data."""
        begin, end = self._entry(name)[2]
        return end - begin

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only NumPy view into the memory map (nothing is copied).

        Args:
            name: a name from :meth:`keys`.

        Returns:
            An array of the stored dtype (``ml_dtypes.bfloat16`` for BF16) and shape.
        """
        dtype, shape, (begin, end) = self._entry(name)
        if begin == end:  # nothing to map (empty tensor, or an empty data area)
            out = np.empty(shape, DTYPES[dtype])
            out.flags.writeable = False
            return out
        return self._map[begin:end].view(np.ndarray).view(DTYPES[dtype]).reshape(shape)

    def close(self) -> None:
        """Drop this object's reference to the map (arrays already returned stay valid)."""
        self._map = None
        self._closed = True

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self)} tensors)"


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised array whose data start on an ``align``-byte boundary. On the CPU, JAX
    reads such NumPy arrays in place; others (safetensors' memory maps are 8-byte aligned) it
    copies on every call."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(nbytes + align, np.uint8)
    off = (-buf.ctypes.data) % align
    return buf[off : off + nbytes].view(dtype).reshape(shape)


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, copied into ordinary (writable) NumPy arrays.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        ``{name: array}`` in file order.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> write_safetensors(path, {"b": np.arange(3, dtype=np.int8)})
        >>> read_safetensors(path)
        {'b': array([0, 1, 2], dtype=int8)}
    """
    with SafetensorsFile(path) as f:
        return {name: np.array(f.get(name)) for name in f.keys()}


def _header(tensors: dict[str, np.ndarray], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header[_METADATA] = dict(metadata)
    offset = 0
    for name, arr in tensors.items():
        header[name] = {
            "dtype": dtype_name(arr.dtype, tensor=name),
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    # As the reference implementation does: pad with spaces so the data area starts 8-aligned.
    return raw + b" " * (-len(raw) % _LENGTH_BYTES)


def _as_array(name: Any, value: Any) -> np.ndarray:
    if not isinstance(name, str):
        raise TypeError(f"tensor names must be str, got {name!r} ({type(name).__name__})")
    if name == _METADATA:
        raise ValueError(f"{_METADATA!r} is reserved in safetensors headers; not a tensor name")
    arr = np.asarray(value)
    dtype_name(arr.dtype, tensor=name)  # reject unsupported dtypes before writing anything
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not np.little_endian):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr if arr.flags.c_contiguous else arr.copy(order="C")  # (ascontiguousarray: 0-d -> 1-d)


def _check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of str -> str, got {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(
                f"safetensors metadata must map str -> str; entry {k!r}: {v!r} "
                f"({type(v).__name__}) is not (convert values with str() or json.dumps())"
            )
    return dict(metadata)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write, *, mode: str = "wb") -> None:
    """Write a file atomically: ``write(file)`` fills a temporary file beside ``path``, which is
    flushed, fsynced and renamed over ``path``. On any error the temporary file is removed and
    an existing file at ``path`` is left untouched.

    Args:
        path: the file to create or replace.
        write: a function taking the open temporary file.
        mode: ``"wb"`` or ``"w"`` (text, UTF-8).

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "a.txt")
        >>> atomic_write(path, lambda f: f.write("hi"), mode="w")
        >>> open(path).read()
        'hi'
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 is wrong for a shared checkpoint
        kwargs = {"encoding": "utf-8"} if "b" not in mode else {}
        with open(fd, mode, **kwargs) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` to a safetensors file, atomically.

    Each array keeps its dtype (JAX arrays go through ``np.asarray``; bfloat16 stays bfloat16)
    and is stored as C-ordered little-endian bytes, in the order given. The header is padded
    with spaces to a multiple of 8 bytes, as the reference implementation does. The file is
    written to a temporary file in the same folder, fsynced and renamed into place: on any
    error nothing is left behind and an existing file at ``path`` is unchanged.

    Args:
        path: the file to write.
        tensors: ``{name: array-like}``, of dtype F64, F32, F16, BF16, I64, I32, I16, I8, U8 or
            BOOL (see :data:`DTYPES`).
        metadata: optional ``{str: str}`` stored as the header's ``__metadata__``.

    Raises:
        ValueError: a tensor has an unsupported dtype, or a reserved name.
        TypeError: a name or a metadata key/value is not a str.

    Example:
        >>> import os, tempfile, ml_dtypes
        >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> write_safetensors(path, {"w": np.ones((2, 3), ml_dtypes.bfloat16)})
        >>> read_safetensors(path)["w"].dtype
        dtype(bfloat16)
    """
    meta = _check_metadata(metadata)
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict {{name: array}}, got {type(tensors).__name__}")
    arrays = {name: _as_array(name, value) for name, value in tensors.items()}
    header = _header(arrays, meta)

    def write(fh) -> None:
        fh.write(len(header).to_bytes(_LENGTH_BYTES, "little"))
        fh.write(header)
        for arr in arrays.values():
            if arr.size:
                fh.write(arr.reshape(-1).view(np.uint8).data)

    atomic_write(path, write)


def replace_folder(tmp: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Rename the complete folder ``tmp`` onto ``folder`` (on the same file system).

    An existing ``folder`` is set aside first, restored if the rename fails and removed once it
    succeeded, so ``folder`` is always either the old or the complete new one.
    """
    tmp, folder = Path(tmp), Path(folder)
    if not os.path.lexists(folder):
        os.rename(tmp, folder)
        return
    old = folder.parent / f".{folder.name}.old-{secrets.token_hex(4)}"
    os.rename(folder, old)
    try:
        os.rename(tmp, folder)
    except BaseException:
        os.rename(old, folder)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()
