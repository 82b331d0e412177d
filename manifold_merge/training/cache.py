"""A content-addressed cache of trained parameters (and folders), keyed by a config hash.

An entry is a folder ``cache_dir/<config_hash(cfg)>/`` holding

* ``config.json`` -- the normalised config (checked on every hit, so a hash collision or a
  hand-edited entry is never returned for the wrong config);
* ``params/`` -- an Orbax checkpoint of the params written by :func:`cached`
  (through :mod:`manifold_merge.io.checkpoint`, the only module importing Orbax);
* ``folder/`` -- the folder written by :func:`cached_folder` (e.g. a PEFT adapter).

Entries are built in a temporary folder inside ``cache_dir`` and renamed into place, so an
interrupted build leaves no half-written entry. An unreadable entry is rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from manifold_merge.io.checkpoint import load_params, save_params
from manifold_merge.io.safetensors import replace_folder

CONFIG_FILE = "config.json"
PARAMS_ITEM = "params"
FOLDER_ITEM = "folder"
HASH_LENGTH = 16


def _normalise(obj: Any, where: str) -> Any:
    """JSON-ready copy: ConfigDicts and Mappings as dicts, tuples as lists, NumPy scalars as
    Python numbers, paths as str."""
    if hasattr(obj, "to_dict") and callable(obj.to_dict) and not isinstance(obj, Mapping):
        obj = obj.to_dict()  # ml_collections ConfigDict / FrozenConfigDict
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"config keys must be str; {where} has key {k!r}")
            out[k] = _normalise(v, f"{where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_normalise(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return _normalise(obj.tolist(), where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(
        f"config value {where} = {obj!r} ({type(obj).__name__}) is not JSON-like: use dicts, "
        "lists/tuples, str, int, float, bool, None (or ConfigDicts of them)"
    )


def _to_dict(cfg: Any) -> dict:
    norm = _normalise(cfg, "cfg")
    if not isinstance(norm, dict):
        raise TypeError(f"cfg must be a Mapping or ConfigDict, got {type(cfg).__name__}")
    return norm


def _canonical(norm: Any) -> str:
    return json.dumps(norm, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_hash(cfg: Mapping[str, Any] | Any) -> str:
    """A short, stable hash of a config: sha256 of its canonical JSON, first 16 hex digits.

    The canonical JSON has sorted keys and no whitespace; ``ml_collections.ConfigDict`` goes
    through ``to_dict()``; tuples and lists are the same; NumPy scalars count as Python
    numbers. ``1`` and ``1.0`` (JSON ``1`` and ``1.0``) hash differently.

    Args:
        cfg: a Mapping (or ConfigDict) of str keys with JSON-like values.

    Returns:
        16 lowercase hex digits.

    Raises:
        TypeError: a non-str key or a value that is not JSON-like.

    Example:
        >>> config_hash({"lr": 0.1, "layers": (2, 3)}) == config_hash({"layers": [2, 3], "lr": 0.1})
        True
        >>> len(config_hash({}))
        16
    """
    text = _canonical(_to_dict(cfg))
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:HASH_LENGTH]


def _stored_config_matches(entry: Path, canonical: str) -> bool:
    """Whether ``entry/config.json`` holds this config (raises if it is unreadable)."""
    with open(entry / CONFIG_FILE, encoding="utf-8") as f:
        stored = json.load(f)
    return _canonical(stored) == canonical


def _lookup(entry: Path, item: str, canonical: str) -> str | None:
    """None when ``entry/item`` may be used; otherwise why not ("" for a plain miss)."""
    if not entry.exists():
        return ""
    try:
        if not _stored_config_matches(entry, canonical):
            return f"its {CONFIG_FILE} holds a different config"
    except (OSError, ValueError) as e:
        return f"its {CONFIG_FILE} is unreadable ({type(e).__name__}: {e})"
    return None if (entry / item).exists() else ""


def _install(entry: Path, item: str, norm: dict, write: Callable[[Path], None]) -> None:
    """Build ``item`` (and the config file) in a temporary folder and rename it into place.

    If ``entry`` already holds this config (with other items, or a corrupt ``item``), only
    ``item`` is replaced; otherwise the whole entry is.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.", suffix=".tmp"))
    try:
        write(tmp / item)
        if not (tmp / item).is_dir():
            raise RuntimeError(f"the cache writer did not create the folder {str(tmp / item)!r}")
        with open(tmp / CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(norm, f, indent=2, sort_keys=True)
            f.write("\n")
        try:
            keep = entry.is_dir() and _stored_config_matches(entry, _canonical(norm))
        except (OSError, ValueError):
            keep = False
        if keep:
            replace_folder(tmp / item, entry / item)
        else:
            replace_folder(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _warn_rebuild(entry: Path, why: str) -> None:
    warnings.warn(f"cache entry {str(entry)!r}: {why}; rebuilding it", stacklevel=3)


def cached(
    cache_dir: str | os.PathLike,
    cfg: Mapping[str, Any] | Any,
    build_fn: Callable[[], Mapping[str, Any]],
    *,
    force: bool = False,
) -> dict[str, Any]:
    """Params for ``cfg`` from the cache, or from ``build_fn()`` (then cached).

    On a hit (``cache_dir/<config_hash(cfg)>/`` holds this config and a readable checkpoint)
    the params are loaded and ``build_fn`` is not called. Otherwise ``build_fn()`` runs, its
    params are saved with :func:`manifold_merge.io.save_params` next to ``config.json``
    (atomically), and read back. An entry that cannot be read (a corrupt checkpoint or config
    file) is rebuilt with a warning.

    Args:
        cache_dir: the cache folder (created if missing).
        cfg: the config the params are a function of (a Mapping or ConfigDict; see
            :func:`config_hash`). Put in it everything that changes the result.
        build_fn: ``() -> params``, a nested dict of arrays (as ``save_params`` takes).
        force: rebuild and replace the entry even if it is valid.

    Returns:
        The params as nested dicts of NumPy arrays (host memory, the dtypes saved), the same on
        a hit and a miss (a miss returns what was written, read back).

    Example:
        >>> import tempfile
        >>> cache = tempfile.mkdtemp()
        >>> p = cached(cache, {"seed": 0}, lambda: {"w": np.arange(3.0)})
        >>> cached(cache, {"seed": 0}, lambda: 1 / 0)["w"]  # a hit: build_fn is not called
        array([0., 1., 2.])
    """
    norm = _to_dict(cfg)
    entry = Path(cache_dir) / config_hash(norm)
    if not force:
        why = _lookup(entry, PARAMS_ITEM, _canonical(norm))
        if why is None:
            try:
                return load_params(entry / PARAMS_ITEM)
            except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint is rebuilt
                why = f"its checkpoint is unreadable ({type(e).__name__}: {e})"
        if why:
            _warn_rebuild(entry, why)
    params = build_fn()
    if not isinstance(params, Mapping):
        raise TypeError(f"build_fn must return a nested dict of arrays, got {type(params)}")
    _install(entry, PARAMS_ITEM, norm, lambda path: save_params(path, params))
    return load_params(entry / PARAMS_ITEM)


def cached_folder(
    cache_dir: str | os.PathLike,
    cfg: Mapping[str, Any] | Any,
    write_fn: Callable[[Path], Any],
    *,
    force: bool = False,
) -> Path:
    """The path of a cached folder for ``cfg`` (e.g. a PEFT adapter), written on a miss.

    On a miss ``write_fn(path)`` is called with a path that does not exist yet, inside a
    temporary folder in ``cache_dir``; it must create the folder ``path`` and fill it (e.g.
    ``lambda p: write_peft_adapter(p, adapter)``, or ``os.makedirs(p)`` first). The folder is
    then renamed into place atomically. The folder's contents are not validated on a hit.

    Args:
        cache_dir: the cache folder (created if missing).
        cfg: the config (see :func:`config_hash`); it may be the same as a :func:`cached`
            entry's, which then holds both.
        write_fn: ``write_fn(path)`` creating the folder ``path``.
        force: rewrite the folder even if it is cached.

    Returns:
        ``cache_dir/<config_hash(cfg)>/folder``.

    Example:
        >>> import tempfile
        >>> def write(path):
        ...     os.makedirs(path)
        ...     Path(path, "note.txt").write_text("hi")
        >>> folder = cached_folder(tempfile.mkdtemp(), {"task": "a"}, write)
        >>> (folder / "note.txt").read_text(), folder.name
        ('hi', 'folder')
    """
    norm = _to_dict(cfg)
    entry = Path(cache_dir) / config_hash(norm)
    if not force:
        why = _lookup(entry, FOLDER_ITEM, _canonical(norm))
        if why is None:
            return entry / FOLDER_ITEM
        if why:
            _warn_rebuild(entry, why)
    _install(entry, FOLDER_ITEM, norm, write_fn)
    return entry / FOLDER_ITEM
