"""Flax parameter pytrees as Orbax checkpoints; the only module of the package importing orbax.

:func:`save_params` writes a nested dict of arrays with ``orbax.checkpoint.StandardCheckpointer``
(atomically: nothing appears at the path unless the whole checkpoint was written),
:func:`load_params` reads one back as NumPy arrays on the host (no devices, no sharding), and
:func:`is_orbax_checkpoint` tells such a folder from a Hugging Face one. :func:`flatten_params`
and :func:`unflatten_params` turn a pytree into ``{"Dense_0/kernel": array}`` and back, so that
Orbax parameters can be streamed by name like safetensors tensors.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from manifold_merge.io.safetensors import replace_folder

SEP = "/"
# Orbax names each array on disk by its keys joined with "."; two leaves whose joined names
# agree would overwrite each other.
_ORBAX_SEP = "."
_PYTREE_METADATA = "_METADATA"


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"parameter names must be str; got {key!r} ({type(key).__name__}) {where}")
    if not key or SEP in key or key in (".", ".."):
        raise ValueError(
            f"parameter name {key!r} {where} is empty, '.', '..' or contains {SEP!r} (which "
            "joins the names of nested parameters)"
        )
    return key


def flatten_params(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flatten a nested dict of arrays into ``{"Dense_0/kernel": array}`` (Flax-style names).

    Leaves are turned into NumPy arrays (JAX arrays are copied to the host; NumPy arrays are
    not copied), in the dicts' iteration order. Empty sub-dicts hold no arrays and vanish.

    Args:
        tree: nested ``Mapping`` (dict, Flax ``FrozenDict``) of str keys without ``/``, with
            array-like leaves.

    Returns:
        ``{"/"-joined path: array}``.

    Raises:
        TypeError: a non-str key, or a list/tuple/None where a dict or an array belongs.
        ValueError: a key that is empty or contains ``/``.

    Example:
        >>> flat = flatten_params({"Dense_0": {"kernel": np.ones((2, 3)), "bias": np.zeros(3)}})
        >>> {k: v.shape for k, v in flat.items()}
        {'Dense_0/kernel': (2, 3), 'Dense_0/bias': (3,)}
    """
    if not isinstance(tree, Mapping):
        raise TypeError(f"params must be a nested dict of arrays, got {type(tree).__name__}")
    out: dict[str, np.ndarray] = {}

    def walk(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            name = prefix + _check_key(key, f"under {prefix[:-1] or 'the root'!r}")
            if isinstance(value, Mapping):
                walk(value, name + SEP)
            elif value is None or isinstance(value, (list, tuple, set, str, bytes)):
                raise TypeError(
                    f"parameter {name!r} is a {type(value).__name__}; expected an array or a "
                    "dict of arrays"
                )
            else:
                out[name] = np.asarray(value)

    walk(tree, "")
    return out


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuild the nested dict from ``{"Dense_0/kernel": array}`` (inverse of flatten_params).

    Args:
        flat: ``{"/"-joined path: array}``; no name may be both a leaf and a prefix of another.

    Returns:
        Nested dicts with the leaves as given (not copied), in the order of ``flat``.

    Raises:
        ValueError: an empty path component (``"a//b"``, ``"/a"``) or a leaf/subtree clash.

    Example:
        >>> unflatten_params({"Dense_0/kernel": 1, "Dense_0/bias": 2, "scale": 3})
        {'Dense_0': {'kernel': 1, 'bias': 2}, 'scale': 3}
    """
    out: dict[str, Any] = {}
    for name, value in flat.items():
        if not isinstance(name, str):
            raise TypeError(f"parameter names must be str, got {name!r}")
        parts = name.split(SEP)
        if not all(parts):
            raise ValueError(f"parameter name {name!r} has an empty component")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(
                    f"parameter {name!r} lies under {SEP.join(parts[: i + 1])!r}, which is an "
                    "array, not a dict"
                )
            node = child
        if parts[-1] in node:
            raise ValueError(f"parameter {name!r} is given twice, or is also a dict of parameters")
        node[parts[-1]] = value
    return out


def _numpy_tree(params: Mapping[str, Any]) -> dict[str, Any]:
    flat = flatten_params(params)
    seen: dict[str, str] = {}
    for name, arr in flat.items():
        if arr.dtype.kind not in "biufcV" or arr.dtype.fields is not None:
            raise TypeError(f"parameter {name!r} has dtype {arr.dtype}, which Orbax cannot store")
        stored = name.replace(SEP, _ORBAX_SEP)
        if stored in seen:
            raise ValueError(
                f"parameters {seen[stored]!r} and {name!r} would be stored under the same Orbax "
                f"name {stored!r} (Orbax joins nested keys with {_ORBAX_SEP!r}); rename one"
            )
        seen[stored] = name
    return unflatten_params(flat)


def save_params(path: str | os.PathLike, params: Mapping[str, Any], *, force: bool = False) -> None:
    """Write a Flax params pytree as an Orbax checkpoint folder, atomically.

    The arrays are copied to the host and written with ``ocp.StandardCheckpointer`` into a
    temporary folder beside ``path``, which is renamed to ``path`` once Orbax has finished.
    On any error the temporary folder is removed: nothing appears at ``path`` and an existing
    checkpoint there is untouched.

    Args:
        path: the checkpoint folder to create.
        params: nested dicts (str keys without ``/``) of JAX/NumPy arrays of numeric dtypes
            (bfloat16 included); 0-d arrays and Python scalars are stored as 0-d arrays.
        force: replace an existing ``path`` (it is removed only after the new checkpoint is
            complete).

    Raises:
        FileExistsError: ``path`` exists and ``force`` is False.
        TypeError / ValueError: params that are not a nested dict of numeric arrays, or whose
            names collide in Orbax's ``.``-joined naming.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "params")
        >>> save_params(path, {"Dense_0": {"kernel": np.eye(2, dtype=np.float32)}})
        >>> load_params(path)["Dense_0"]["kernel"].dtype, is_orbax_checkpoint(path)
        (dtype('float32'), True)
    """
    path = Path(path).absolute()
    if os.path.lexists(path) and not force:
        raise FileExistsError(f"{str(path)!r} exists; pass force=True to replace it")
    tree = _numpy_tree(params)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        new = tmp / "params"
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(new, tree)
            ckptr.wait_until_finished()
        if not is_orbax_checkpoint(new):
            raise RuntimeError(f"Orbax did not finish writing the checkpoint for {str(path)!r}")
        replace_folder(new, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an Orbax PyTree checkpoint folder that :func:`load_params` reads.

    Args:
        path: any path (missing paths and files give False).

    Returns:
        True for a folder holding Orbax's PyTree ``_METADATA`` (as :func:`save_params` and
        ``StandardCheckpointer`` write it); False otherwise, e.g. for a Hugging Face folder.

    Example:
        >>> import tempfile
        >>> is_orbax_checkpoint(tempfile.mkdtemp()), is_orbax_checkpoint("/no/such/path")
        (False, False)
    """
    path = Path(path)
    return path.is_dir() and (path / _PYTREE_METADATA).is_file()


def _target(node: Any, keys: tuple[str, ...], path: Path) -> Any:
    """A restore target (ShapeDtypeStructs, restored as NumPy) from Orbax's tree metadata.

    Keys are checked: a name with a path separator could point Orbax's reads outside the
    checkpoint folder (a crafted ``_METADATA``).
    """
    where = f"in Orbax checkpoint {str(path)!r}"
    if isinstance(node, Mapping):
        return {
            _check_key(k, f"{where} (under {SEP.join(keys) or 'the root'!r})"): _target(
                v, (*keys, k), path
            )
            for k, v in node.items()
        }
    shape, dtype = getattr(node, "shape", None), getattr(node, "dtype", None)
    if shape is None or dtype is None:
        raise ValueError(
            f"parameter {SEP.join(keys)!r} {where} is a {type(node).__name__}, not an array; "
            "load_params reads nested dicts of arrays"
        )
    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))


def load_params(path: str | os.PathLike) -> dict[str, Any]:
    """Read an Orbax checkpoint of a params pytree as nested dicts of NumPy arrays (on host).

    Args:
        path: a folder written by :func:`save_params` or ``ocp.StandardCheckpointer`` (for a
            ``CheckpointManager`` step, pass the item folder, e.g. ``step/default``).

    Returns:
        Nested dicts of ``np.ndarray`` with the stored dtypes (bfloat16 as
        ``ml_dtypes.bfloat16``) and shapes.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: ``path`` is not an Orbax PyTree checkpoint, or holds something other than
            nested dicts of arrays.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "params")
        >>> save_params(path, {"w": np.arange(3, dtype=np.int32)})
        >>> load_params(path)
        {'w': array([0, 1, 2], dtype=int32)}
    """
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"no Orbax checkpoint at {str(path)!r}")
    if not is_orbax_checkpoint(path):
        subdirs = sorted(p.name for p in path.iterdir() if is_orbax_checkpoint(p))
        hint = f"; it holds checkpoints in {subdirs} (pass one of them)" if subdirs else ""
        raise ValueError(
            f"{str(path)!r} is not an Orbax PyTree checkpoint (no {_PYTREE_METADATA}){hint}"
        )
    with ocp.StandardCheckpointer() as ckptr:
        metadata = ckptr.metadata(path)
        tree = getattr(getattr(metadata, "item_metadata", None), "tree", None)
        if not isinstance(tree, Mapping):
            raise ValueError(
                f"Orbax checkpoint {str(path)!r} does not hold a dict of arrays (its tree "
                f"metadata is {type(tree).__name__})"
            )
        restored = ckptr.restore(path, _target(tree, (), path))
    return unflatten_params({k: np.asarray(v) for k, v in flatten_params(restored).items()})
