"""PEFT LoRA adapter folders: read, write (atomically) and merge.

A PEFT LoRA adapter is a folder holding ``adapter_config.json`` and
``adapter_model.safetensors``. The tensors are keyed by module path with PEFT's
``base_model.model.`` prefix: ``<module>.lora_A.weight`` (r, n) and ``<module>.lora_B.weight``
(m, r) for linear layers, ``<module>.lora_embedding_A`` / ``<module>.lora_embedding_B`` for
embeddings; PEFT adds ``scale * B @ A`` to the module's weight, with scale ``lora_alpha / r``
(``lora_alpha / sqrt(r)`` with ``use_rslora``), ``r`` and ``lora_alpha`` taken from
``rank_pattern`` / ``alpha_pattern`` where a pattern matches the module.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from manifold_merge.io.safetensors import (
    SafetensorsFile,
    _umask,
    atomic_write,
    dtype_name,
    replace_folder,
    write_safetensors,
)
from manifold_merge.manifolds.lora import LoraFactors
from manifold_merge.merging import MergeResult, merge

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
#: PEFT's prefix of module paths in adapter files (PeftModel.base_model.model).
PREFIX = "base_model.model."
#: (kind, factor) -> the end of the tensor's key in the file.
SUFFIXES = {
    ("linear", "a"): ".lora_A.weight",
    ("linear", "b"): ".lora_B.weight",
    ("embedding", "a"): ".lora_embedding_A",
    ("embedding", "b"): ".lora_embedding_B",
}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def peft_module_name(module: str) -> str:
    """The name PEFT matches patterns against: the module path without ``base_model.model.``.

    Example:
        >>> peft_module_name("base_model.model.encoder.layer.0.attention.self.query")
        'encoder.layer.0.attention.self.query'
    """
    return module[len(PREFIX) :] if module.startswith(PREFIX) else module


def match_pattern(patterns: Mapping[str, Any], module: str) -> str | None:
    """The first key of a ``rank_pattern`` / ``alpha_pattern`` that matches ``module``, or None.

    PEFT's rule (``peft.utils.other.get_pattern_key``): keys are tried in order, and key ``p``
    (a regular expression) matches when ``re.match(rf"(.*\\.)?({p})$", name)`` does, i.e. the
    module name equals ``p`` or ends with ``"." + p``. ``name`` is the module path without
    ``base_model.model.``; a key that itself starts with that prefix is matched against the
    full path instead.

    Args:
        patterns: ``{pattern: value}`` from the adapter config.
        module: the module path, with or without ``base_model.model.``.

    Returns:
        The matching key, or None.

    Example:
        >>> m = "base_model.model.encoder.layer.1.attention.self.query"
        >>> match_pattern({"layer.0.attention.self.query": 2, "layer.1.attention.self.query": 4}, m)
        'layer.1.attention.self.query'
        >>> match_pattern({"self.que": 2}, m) is None
        True
    """
    name = peft_module_name(module)
    full = module if module.startswith(PREFIX) else PREFIX + module
    for key in patterns:
        target = full if key.startswith(PREFIX) else name
        try:
            if re.match(rf"(.*\.)?({key})$", target):
                return key
        except re.error as e:
            raise ValueError(f"pattern {key!r} is not a valid regular expression ({e})") from None
    return None


def _config_rank_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """(r, lora_alpha) for ``module`` under ``config``, patterns applied as PEFT does."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r_key = match_pattern(rank_pattern, module)
    a_key = match_pattern(alpha_pattern, module)
    r = rank_pattern[r_key] if r_key is not None else config["r"]
    alpha = alpha_pattern[a_key] if a_key is not None else config["lora_alpha"]
    return r, alpha


def _config_scale(config: Mapping[str, Any], module: str) -> float:
    r, alpha = _config_rank_alpha(config, module)
    return alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r


class PeftAdapter(NamedTuple):
    """A PEFT LoRA adapter in memory.

    Attributes:
        config: the full ``adapter_config.json``, unchanged.
        lora: ``{module path: LoraFactors(b, a)}``, ``b`` = lora_B (m, r), ``a`` = lora_A (r, n),
            NumPy arrays in their stored dtype, without the LoRA scaling.
        other: every other tensor of the file (modules_to_save, biases, ...), by file key.
        kinds: ``{module path: "linear" | "embedding"}`` (None: all linear), which decides the
            tensors' key names (``.lora_A.weight`` or ``.lora_embedding_A``).
        keys: the file's tensor keys in order, reproduced on write (None: module by module, A
            then B, then ``other``).
        metadata: the safetensors ``__metadata__`` (None: PEFT's ``{"format": "pt"}``).

    Example:
        >>> import numpy as np
        >>> cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 8, "target_modules": ["q"]}
        >>> f = LoraFactors(np.ones((3, 2), np.float32), np.ones((2, 4), np.float32))
        >>> ad = PeftAdapter(cfg, {"base_model.model.q": f}, {})
        >>> ad.scale("base_model.model.q"), ad.delta_factors("base_model.model.q").b[0, 0]
        (4.0, np.float32(4.0))
    """

    config: dict
    lora: dict
    other: dict
    kinds: dict | None = None
    keys: tuple | None = None
    metadata: dict | None = None

    def _factors(self, module: str) -> LoraFactors:
        try:
            return self.lora[module]
        except KeyError:
            close = [m for m in self.lora if m.endswith(module) or module.endswith(m)]
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"the adapter has no LoRA module {module!r}.{hint}") from None

    def kind(self, module: str) -> str:
        """``"linear"`` or ``"embedding"``: how the module's tensors are named in the file."""
        self._factors(module)
        return (self.kinds or {}).get(module, "linear")

    def scale(self, module: str) -> float:
        """The LoRA scaling PEFT applies to ``module``: ``lora_alpha / r`` (``lora_alpha /
        sqrt(r)`` with ``use_rslora``), ``r`` and ``lora_alpha`` from ``rank_pattern`` /
        ``alpha_pattern`` when a pattern matches (see :func:`match_pattern`)."""
        self._factors(module)
        return float(_config_scale(self.config, module))

    def delta_factors(self, module: str) -> LoraFactors:
        """``module``'s update with the scaling folded into ``b``: Delta W = b @ a, in float32
        (float64 when stored as float64)."""
        f = self._factors(module)
        dtype = np.float64 if np.asarray(f.b).dtype == np.float64 else np.float32
        b = np.asarray(f.b, dtype) * dtype(self.scale(module))
        return LoraFactors(b, np.asarray(f.a, dtype))

    def tensors(self) -> dict[str, np.ndarray]:
        """Every tensor under its file key, in file order (``keys``), as written to disk."""
        out: dict[str, np.ndarray] = {}
        for module, f in self.lora.items():
            kind = self.kind(module)
            out[module + SUFFIXES[kind, "a"]] = np.asarray(f.a)
            out[module + SUFFIXES[kind, "b"]] = np.asarray(f.b)
        for key, value in self.other.items():
            if key in out:
                raise ValueError(f"tensor {key!r} is both in other and a LoRA factor")
            out[key] = np.asarray(value)
        known = [k for k in (self.keys or ()) if k in out]
        rest = [k for k in out if k not in set(known)]
        return {k: out[k] for k in known + rest}


# -- checks -------------------------------------------------------------------------------


def _check_config(config: Any, where: str) -> None:
    if not isinstance(config, dict):
        raise ValueError(f"{where}: the config is a {type(config).__name__}, expected an object")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{where}: peft_type is {config.get('peft_type')!r}; only LoRA adapters "
            "(peft_type 'LORA') are supported"
        )
    if config.get("use_dora"):
        raise ValueError(f"{where}: DoRA adapters (use_dora: true) are not supported")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"{where}: the config's r is {r!r}, expected a positive int")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ValueError(f"{where}: the config's lora_alpha is {alpha!r}, expected a number")
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            raise ValueError(f"{where}: {field} is {pattern!r}, expected an object")
        for key, value in pattern.items():
            ok_rank = isinstance(value, int) and not isinstance(value, bool) and value > 0
            ok_alpha = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (ok_rank if field == "rank_pattern" else ok_alpha):
                raise ValueError(f"{where}: {field}[{key!r}] = {value!r} is not a valid value")


def _check_module(adapter: PeftAdapter, module: str, where: str) -> None:
    f = adapter.lora[module]
    if not isinstance(f, tuple) or len(f) != 2:
        raise TypeError(f"{where}: lora[{module!r}] must be LoraFactors(b, a), got {type(f)}")
    b, a = (np.asarray(x) for x in f)
    for name, x in (("A", a), ("B", b)):
        if x.ndim != 2:
            raise ValueError(
                f"{where}: module {module!r} has a {x.ndim}-D lora_{name} of shape {x.shape}; "
                "only 2-D LoRA factors (linear and embedding layers) are supported"
            )
        if dtype_name(x.dtype, tensor=f"{module} lora_{name}") not in _FLOAT_DTYPES:
            raise ValueError(f"{where}: module {module!r} has lora_{name} of dtype {x.dtype}")
    if a.shape[0] != b.shape[1]:
        raise ValueError(
            f"{where}: module {module!r} has lora_A of shape {a.shape} and lora_B of shape "
            f"{b.shape}; expected A (r, n) and B (m, r) with the same r"
        )
    r, _ = _config_rank_alpha(adapter.config, module)
    if a.shape[0] != r:
        key = match_pattern(adapter.config.get("rank_pattern") or {}, module)
        source = f"rank_pattern[{key!r}]" if key is not None else "r"
        raise ValueError(
            f"{where}: module {module!r} has rank {a.shape[0]} (lora_A {a.shape}, lora_B "
            f"{b.shape}) but the config's {source} gives rank {r}"
        )


def _check_adapter(adapter: PeftAdapter, where: str) -> None:
    _check_config(adapter.config, where)
    kinds = adapter.kinds or {}
    unknown = sorted(set(kinds) - set(adapter.lora))
    if unknown or any(k not in ("linear", "embedding") for k in kinds.values()):
        raise ValueError(
            f"{where}: kinds must map LoRA modules to 'linear' or 'embedding', got {kinds!r}"
        )
    for module in adapter.lora:
        _check_module(adapter, module, where)
    for key in adapter.other:
        if "lora_magnitude_vector" in key:
            raise ValueError(f"{where}: DoRA adapters ({key!r}) are not supported")


def _targets(target_modules: Any, name: str) -> bool:
    """PEFT's ``check_target_module_exists``: a regex matching the whole name, or a list of
    names the module name equals or ends with after a dot."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _check_targets(adapter: PeftAdapter, where: str) -> None:
    target_modules = adapter.config.get("target_modules")
    if target_modules is None or target_modules == "all-linear":
        return  # PEFT resolves these from the base model, which this file does not have
    missed = [m for m in adapter.lora if not _targets(target_modules, peft_module_name(m))]
    if missed:
        raise ValueError(
            f"{where}: target_modules {target_modules!r} does not select module "
            f"{peft_module_name(missed[0])!r} (and {len(missed) - 1} more), so PEFT would not "
            "load its LoRA tensors"
        )


# -- reading ------------------------------------------------------------------------------


def _split_key(key: str, where: str) -> tuple[str, str, str] | None:
    """``(module, kind, factor)`` for a LoRA factor key, None for any other tensor."""
    if "lora_magnitude_vector" in key:
        raise ValueError(f"{where}: DoRA adapters ({key!r}) are not supported")
    for (kind, factor), suffix in SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], kind, factor
    if re.search(r"\.lora_(A|B|embedding_A|embedding_B)\.", key) and not key.endswith(
        ".lora_B.bias"
    ):
        raise ValueError(
            f"{where}: tensor {key!r} looks like a LoRA factor but is not named as PEFT saves "
            "them (<module>.lora_A.weight, <module>.lora_embedding_A, ...; PEFT drops the "
            "adapter name when saving)"
        )
    return None


def read_peft_adapter(path: str | os.PathLike) -> PeftAdapter:
    """Read a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Pickled adapters (``adapter_model.bin``) are refused: pickles are never loaded.

    Args:
        path: the adapter folder.

    Returns:
        A :class:`PeftAdapter`; factors in their stored dtype (bf16 stays bf16).

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: not a LoRA adapter, DoRA, a pickled adapter, a module with only one factor,
            factor shapes that disagree, or ranks that disagree with ``r`` / ``rank_pattern``.

    Example:
        >>> import os, tempfile
        >>> import numpy as np
        >>> cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 8, "target_modules": ["q"]}
        >>> f = LoraFactors(np.ones((3, 2), np.float32), np.ones((2, 4), np.float32))
        >>> path = os.path.join(tempfile.mkdtemp(), "adapter")
        >>> write_peft_adapter(path, PeftAdapter(cfg, {"base_model.model.q": f}, {}))
        >>> ad = read_peft_adapter(path)
        >>> list(ad.lora), ad.kinds, len(ad.keys), ad.scale("base_model.model.q")
        (['base_model.model.q'], {'base_model.model.q': 'linear'}, 2, 4.0)
    """
    folder = Path(path)
    where = f"PEFT adapter {str(folder)!r}"
    if not folder.exists():
        raise FileNotFoundError(f"no PEFT adapter folder at {str(folder)!r}")
    if not folder.is_dir():
        raise NotADirectoryError(
            f"{where} is a file; expected a folder holding {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    weights_path, config_path = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not weights_path.is_file():
        if (folder / PICKLE_FILE).exists():
            raise ValueError(
                f"{where} holds {PICKLE_FILE}, a pickled adapter, and no {WEIGHTS_FILE}. "
                "Pickles are never loaded (they can run arbitrary code); convert it to "
                "safetensors first (e.g. load it with PEFT and save_pretrained("
                "safe_serialization=True))"
            )
        raise FileNotFoundError(f"{where} has no {WEIGHTS_FILE}")
    if not config_path.is_file():
        raise FileNotFoundError(f"{where} has no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: {CONFIG_FILE} is not valid JSON ({e})") from None
    _check_config(config, where)

    with SafetensorsFile(weights_path) as f:
        keys, metadata = tuple(f.keys()), f.metadata
        tensors = {k: np.array(f.get(k)) for k in keys}  # adapters are small: copy, free the map
    parts: dict[str, dict[str, np.ndarray]] = {}
    kinds: dict[str, str] = {}
    other: dict[str, np.ndarray] = {}
    for key in keys:
        split = _split_key(key, where)
        if split is None:
            other[key] = tensors[key]
            continue
        module, kind, factor = split
        if kinds.setdefault(module, kind) != kind:
            raise ValueError(f"{where}: module {module!r} has both linear and embedding factors")
        parts.setdefault(module, {})[factor] = tensors[key]
    lora = {}
    for module, factors in parts.items():
        for have, lacks in (("a", "b"), ("b", "a")):
            if lacks not in factors:
                kind = kinds[module]
                raise ValueError(
                    f"{where}: module {module!r} has {module + SUFFIXES[kind, have]!r} but no "
                    f"{module + SUFFIXES[kind, lacks]!r}"
                )
        lora[module] = LoraFactors(factors["b"], factors["a"])
    adapter = PeftAdapter(config, lora, other, kinds, keys, metadata)
    _check_adapter(adapter, where)
    return adapter


# -- writing ------------------------------------------------------------------------------


def _config_json(config: dict, where: str) -> str:
    try:
        return json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: the config is not JSON-serialisable ({e})") from None


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; return those created (outermost first)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):
        d.mkdir()
    return list(reversed(missing))


def write_peft_adapter(
    path: str | os.PathLike, adapter: PeftAdapter, *, overwrite: bool = False
) -> None:
    """Write ``adapter`` as a PEFT adapter folder, atomically.

    The folder is built beside ``path`` under a temporary name and renamed into place once
    complete; on any failure nothing is left behind and an existing folder is unchanged. The
    config is checked against the tensors first (``peft_type``, ``r`` / ``rank_pattern`` against
    each module's rank, ``target_modules`` selecting every module) and written as JSON.

    Args:
        path: the adapter folder to create (missing parent folders are created).
        adapter: the adapter; its tensor keys and order are reproduced (see :class:`PeftAdapter`).
        overwrite: replace an existing folder at ``path`` (only after the new one is complete).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False, or it is not a folder.
        ValueError: the config does not describe the tensors.

    Example:
        >>> import os, tempfile
        >>> import numpy as np
        >>> cfg = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["q"]}
        >>> f = LoraFactors(np.ones((3, 1), np.float32), np.ones((1, 4), np.float32))
        >>> path = os.path.join(tempfile.mkdtemp(), "adapter")
        >>> write_peft_adapter(path, PeftAdapter(cfg, {"base_model.model.q": f}, {}))
        >>> sorted(os.listdir(path))
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    folder = Path(path)
    where = f"adapter to write to {str(folder)!r}"
    _check_adapter(adapter, where)
    _check_targets(adapter, where)
    tensors = adapter.tensors()
    config_text = _config_json(adapter.config, where)
    metadata = {"format": "pt"} if adapter.metadata is None else adapter.metadata
    if folder.exists() or folder.is_symlink():
        if not overwrite:
            raise FileExistsError(
                f"{str(folder)!r} already exists; pass overwrite=True to replace it"
            )
        if not folder.is_dir() or folder.is_symlink():
            raise FileExistsError(f"{str(folder)!r} exists and is not a folder; not replacing it")
    created = _make_parents(folder.parent)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        atomic_write(tmp / CONFIG_FILE, lambda fh: fh.write(config_text), mode="w")
        write_safetensors(tmp / WEIGHTS_FILE, tensors, metadata)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 is wrong for a shared adapter
        replace_folder(tmp, folder)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass
        raise


# -- merging ------------------------------------------------------------------------------


def _output_dtype(out_dtype: Any, default: np.dtype) -> np.dtype:
    if out_dtype is None:
        return default
    if isinstance(out_dtype, str) and out_dtype.lower() in ("bf16", "bfloat16"):
        return np.dtype(ml_dtypes.bfloat16)
    dt = np.dtype(out_dtype)
    if dtype_name(dt, tensor="out_dtype") not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be a floating-point dtype (F16/BF16/F32/F64), got {dt}")
    return dt


def _rank_pattern(ranks: dict[str, int], r: int) -> dict[str, int]:
    """``rank_pattern`` entries (keyed by the PEFT module name) under which PEFT gives each
    module its rank: modules whose rank differs from ``r``, plus any module another entry would
    otherwise catch; longest (most specific) keys first, since PEFT takes the first match."""
    pattern: dict[str, int] = {}
    while True:
        ordered = dict(sorted(pattern.items(), key=lambda kv: -len(kv[0])))
        config = {"r": r, "lora_alpha": 1, "rank_pattern": ordered}
        wrong = [m for m in ranks if _config_rank_alpha(config, m)[0] != ranks[m]]
        if not wrong:
            return ordered
        if all(peft_module_name(m) in pattern for m in wrong):
            raise ValueError(
                f"cannot express the merged ranks as a PEFT rank_pattern: module {wrong[0]!r} "
                "is matched by another module's pattern"
            )
        pattern.update({peft_module_name(m): ranks[m] for m in wrong})


def _check_same_targets(adapters: list[PeftAdapter], paths: list[str]) -> None:
    ref = adapters[0]
    for ad, p in zip(adapters[1:], paths[1:]):
        missing = [m for m in ref.lora if m not in ad.lora]
        extra = [m for m in ad.lora if m not in ref.lora]
        if missing or extra:
            m, what = (missing[0], "lacks") if missing else (extra[0], "has the extra")
            raise ValueError(
                f"adapter {p!r} {what} LoRA module {m!r} (adapter {paths[0]!r} targets "
                f"{len(ref.lora)} modules, it {len(ad.lora)}); adapters must target the same "
                "modules to be merged"
            )
        for m in ref.lora:
            shape0 = (np.shape(ref.lora[m].b)[0], np.shape(ref.lora[m].a)[1])
            shape = (np.shape(ad.lora[m].b)[0], np.shape(ad.lora[m].a)[1])
            if shape != shape0 or ad.kind(m) != ref.kind(m):
                raise ValueError(
                    f"module {m!r}: adapter {p!r} updates a {ad.kind(m)} weight of shape {shape}, "
                    f"adapter {paths[0]!r} a {ref.kind(m)} weight of shape {shape0}"
                )


def _check_same_other(adapters: list[PeftAdapter], paths: list[str]) -> None:
    ref = adapters[0]
    for key in ref.other:
        if key.endswith(".lora_B.bias"):
            raise ValueError(
                f"adapter {paths[0]!r} has a LoRA bias ({key!r}, lora_bias: true); merging "
                "such adapters is not supported"
            )
    for ad, p in zip(adapters[1:], paths[1:]):
        if set(ad.other) != set(ref.other):
            diff = sorted(set(ad.other) ^ set(ref.other))
            raise ValueError(
                f"adapter {p!r} and adapter {paths[0]!r} differ in their non-LoRA tensors "
                f"(e.g. {diff[0]!r}); those are copied, so they must be the same"
            )
        for key, x in ref.other.items():
            y = ad.other[key]
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                raise ValueError(
                    f"tensor {key!r} (not a LoRA factor, so copied unchanged) differs between "
                    f"adapter {p!r} and adapter {paths[0]!r}"
                )


def merge_peft_adapters(
    paths: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    method: str,
    *,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    out_dtype: Any = None,
    overwrite: bool = False,
    **params: Any,
) -> MergeResult:
    """Merge PEFT LoRA adapters of one base model into a new PEFT adapter folder.

    Each adapter i contributes ``{module: LoraFactors(s_i B_i, A_i)}`` (its scaling folded in,
    so Delta W_i = s_i B_i A_i); these go to ``merge(method, ..., weights=weights, rank=rank,
    **params)``, whose result ``(b, a)`` per module is the merged Delta W = b @ a. The output
    adapter has per-module rank ``r_m = b.shape[1]``, ``r`` = the most common ``r_m``,
    ``rank_pattern`` entries for the others, the first adapter's ``lora_alpha`` and
    ``use_rslora`` (no ``alpha_pattern``), and ``b`` divided by its scale (``lora_alpha / r_m``,
    or ``lora_alpha / sqrt(r_m)``) so that PEFT reconstructs the merged Delta W exactly. The
    other config fields come from the first adapter; non-LoRA tensors are copied (they must be
    identical across adapters).

    Args:
        paths: the adapter folders (different ranks are fine; the same modules and shapes).
        out_path: the output folder, written atomically (see :func:`write_peft_adapter`).
        method: a LoRA merge method (``"lora_cat"``, ``"lora_svd"``, ``"lora_linear"``,
            ``"geomerge"``, ...).
        weights: one weight per adapter.
        rank: the output rank, for methods that take one (passed only when given).
        out_dtype: dtype of the written factors (default: the first adapter's).
        overwrite: replace an existing ``out_path``.
        **params: the method's other parameters.

    Returns:
        The :class:`~manifold_merge.merging.MergeResult` of ``merge``: ``params`` maps each
        module to the merged ``LoraFactors`` with all scaling included.

    Raises:
        ValueError: the adapters target different modules or shapes, or their non-LoRA tensors
            differ (the message names the module or tensor and the adapter).

    Example::

        merge_peft_adapters(["runs/sst2", "runs/mnli"], "runs/merged", "lora_svd",
                            weights=[0.5, 0.5], rank=16, out_dtype="bfloat16")
    """
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError("paths must be a list of adapter folders, not a single path")
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("merge_peft_adapters needs at least one adapter folder")
    adapters = [read_peft_adapter(p) for p in paths]
    if not adapters[0].lora:
        raise ValueError(f"adapter {paths[0]!r} has no LoRA modules to merge")
    _check_same_targets(adapters, paths)
    _check_same_other(adapters, paths)
    ref = adapters[0]
    bases = {ad.config.get("base_model_name_or_path") for ad in adapters}
    if len(bases) > 1:
        warnings.warn(
            f"merging adapters trained on different base models: {sorted(map(str, bases))}",
            UserWarning,
            stacklevel=2,
        )

    models = [{m: ad.delta_factors(m) for m in ref.lora} for ad in adapters]
    kwargs = dict(params)
    if rank is not None:
        kwargs["rank"] = rank
    result = merge(method, models, weights=weights, **kwargs)

    missing = [m for m in ref.lora if m not in result.params]
    if missing:
        raise ValueError(f"merge method {method!r} returned no factors for module {missing[0]!r}")
    ranks = {}
    for m in ref.lora:
        b, a = (np.asarray(x, np.float64) for x in result.params[m])
        shape = (np.shape(ref.lora[m].b)[0], np.shape(ref.lora[m].a)[1])
        if b.ndim != 2 or a.ndim != 2 or (b.shape[0], a.shape[1]) != shape or b.shape[1] == 0:
            raise ValueError(
                f"merge method {method!r} returned factors b {b.shape}, a {a.shape} for module "
                f"{m!r}; expected b (m, r), a (r, n) with (m, n) = {shape} and r >= 1"
            )
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"module {m!r}: merged b {b.shape} and a {a.shape} disagree on r")
        ranks[m] = int(b.shape[1])
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    config = copy.deepcopy(ref.config)
    config.update(
        r=r,
        lora_alpha=ref.config["lora_alpha"],
        use_rslora=bool(ref.config.get("use_rslora", False)),
        rank_pattern=_rank_pattern(ranks, r),
        alpha_pattern={},
    )
    dtype = _output_dtype(out_dtype, np.asarray(next(iter(ref.lora.values())).a).dtype)
    lora = {}
    for m in ref.lora:
        b, a = (np.asarray(x, np.float64) for x in result.params[m])
        lora[m] = LoraFactors((b / _config_scale(config, m)).astype(dtype), a.astype(dtype))
    out = PeftAdapter(config, lora, dict(ref.other), ref.kinds, ref.keys, ref.metadata)
    write_peft_adapter(out_path, out, overwrite=overwrite)
    return result
