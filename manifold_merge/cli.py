"""The ``manifold-merge`` command: merge checkpoints from a mergekit-style YAML config.

::

    manifold-merge merge CONFIG.yaml OUT_DIR [--out-shard-size 5GB] [--force] [--dry-run]
        [--report FILE.json] [--tensor-policy error|intersection|union] [--no-progress]

(also ``python -m manifold_merge merge ...``). The config is read by
:func:`manifold_merge.io.merge_config.load_merge_config`. Models are Hugging Face safetensors
folders (sharded or not), bare ``.safetensors`` files or Orbax checkpoints; when every model is
a PEFT adapter folder the adapters are merged with
:func:`manifold_merge.io.peft.merge_peft_adapters` instead.

The merge streams: for each tensor name (in the base's order, else the first model's), that
tensor is read from every model (memory-mapped), merged by :func:`manifold_merge.merge` on its
own (filter rules resolve by its name), converted to the output dtype and handed to a
:class:`~manifold_merge.io.hf.CheckpointWriter`, so peak memory is about N times the largest
tensor plus one output shard. Tensors named by a ``groups`` parameter are read and merged
together. DARE's random masks are drawn from ``seed`` and the tensor's name.

Output is atomic: everything is written into ``.OUT_DIR.tmp-*`` beside ``OUT_DIR`` (weights,
the config and tokenizer files of ``tokenizer_source`` / the base / the first model, the
report when asked) and renamed onto ``OUT_DIR`` at the end; on any failure the temporary
folder is removed and ``OUT_DIR`` is absent, or unchanged if it existed (``--force`` replaces
it only after success).

Exit status: 0 on success, 2 for usage and config errors (unknown method or parameter, missing
path, existing ``OUT_DIR``), 1 when the merge fails (shape mismatch, missing tensor, corrupt
file, NaN/Inf input, ...); errors are one line ``manifold-merge: error: ...`` on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
import warnings
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from manifold_merge.compilation import enable_compilation_cache
from manifold_merge.io.hf import CheckpointWriter, copy_aux_files, open_checkpoint, parse_size
from manifold_merge.io.hf import to_dtype as _to_dtype
from manifold_merge.io.merge_config import ConfigError, MergePlan, load_merge_config
from manifold_merge.io.planned import PlannedCheckpointWriter, plan_shards
from manifold_merge.io.safetensors import (
    DTYPES,
    _umask,
    aligned_empty,
    atomic_write,
    dtype_name,
    replace_folder,
)
from manifold_merge.merging import merge, resolve_param
from manifold_merge.sharding import leaf_spec

PROG = "manifold-merge"
POLICIES = ("error", "intersection", "union")
_FLOAT_NAMES = ("F64", "F32", "F16", "BF16")
_ADAPTER_CONFIG = "adapter_config.json"


class UsageError(Exception):
    """A usage or config problem (exit status 2)."""


class MergeFailure(Exception):
    """The merge could not be carried out (exit status 1)."""


# -- readers ------------------------------------------------------------------------------


class _FlatReader:
    """The reader interface over ``{name: array}`` (an Orbax checkpoint, fully loaded)."""

    def __init__(self, path: str, flat: dict[str, np.ndarray]):
        self.path = path
        self._flat = flat

    def keys(self) -> list[str]:
        return list(self._flat)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        arr = self._flat[name]
        return dtype_name(arr.dtype, tensor=name), tuple(arr.shape)

    def nbytes(self, name: str) -> int:
        return int(self._flat[name].nbytes)

    def get(self, name: str) -> np.ndarray:
        return self._flat[name]

    def close(self) -> None:
        pass

    def __contains__(self, name: object) -> bool:
        return name in self._flat

    def __len__(self) -> int:
        return len(self._flat)


def _open(path: str, where: str):
    from manifold_merge.io import checkpoint  # orbax is imported only when needed

    try:
        if checkpoint.is_orbax_checkpoint(path):
            return _FlatReader(path, checkpoint.flatten_params(checkpoint.load_params(path)))
        return open_checkpoint(path)
    except (ValueError, TypeError, OSError, KeyError) as e:
        raise MergeFailure(f"{where} {path!r}: {_message(e)}") from None


def _is_adapter(path: str) -> bool:
    return Path(path, _ADAPTER_CONFIG).is_file()


# -- helpers ------------------------------------------------------------------------------


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    return str(e) or type(e).__name__


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def _itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize if dtype in DTYPES else np.dtype(dtype.lower()).itemsize


def _np_dtype_name(dtype: str) -> str:
    return str(DTYPES[dtype]) if dtype in DTYPES else dtype.lower()


def _tensor_seed(seed: Any, key: str) -> int:
    """A per-tensor seed: DARE's masks must differ between tensors merged in separate calls."""
    return zlib.crc32(f"{seed}/{key}".encode()) & 0x7FFFFFFF


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _leaf_json(rep) -> dict:
    return {
        "method": rep.method,
        "shape": list(rep.shape),
        "blocks": int(rep.blocks),
        "num_steps": int(rep.num_steps),
        "grad_norm": _finite(float(rep.grad_norm)),
        "converged": bool(rep.converged),
        "norm_ratio": _finite(float(rep.norm_ratio)),
        "angle_spread": _finite(float(rep.angle_spread)),
    }


def _inside(a: Path, b: Path) -> bool:
    """a == b or a is inside b."""
    return a == b or b in a.parents


@contextlib.contextmanager
def _printed_warnings(sink: list[str]):
    """Print UserWarning / RuntimeWarning (e.g. non-convergence) as one line each, and keep
    them for the report."""
    from tqdm import tqdm

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        sink.append(text)
        tqdm.write(f"{PROG}: warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.simplefilter("always", RuntimeWarning)
        warnings.showwarning = show
        yield


# -- planning -----------------------------------------------------------------------------


class _Item:
    """One unit of work: a tensor (or a group of tensors) and how it is produced."""

    def __init__(self, names, holders, action, source=None, group=None):
        self.names = names  # tensor names (one, or a group's members)
        self.holders = holders  # indices of the models taking part
        self.action = action  # "merge" | "copy"
        self.source = source  # for "copy": ("model", i) or ("base", None)
        self.group = group


class _Job:
    """Everything opened and checked before anything is written."""

    def __init__(self, plan: MergePlan, policy: str):
        self.plan = plan
        self.policy = policy
        self.readers: list = []
        self.base = None  # base reader when the method uses the base
        self.stats: list[dict[str, Any]] = []  # per model: stat name -> reader
        self.items: list[_Item] = []
        self.skipped: list[dict] = []
        self.copied: dict[str, str] = {}
        self.in_bytes = 0
        self.out_bytes: list[int] = []

    def label(self, i: int) -> str:
        m = self.plan.models[i]
        return f"{m.where} ({m.path!r})"

    def source(self, item: _Item):
        """The reader an item's output tensors are sized and (for copies) read from: the
        copy's source, else the first model taking part."""
        src = item.source or ("model", item.holders[0])
        return self.base if src[0] == "base" else self.readers[src[1]]

    def info(self, i: int | None, name: str) -> tuple[str, tuple[int, ...]]:
        reader = self.base if i is None else self.readers[i]
        return reader.info(name)


def _check_paths(plan: MergePlan) -> None:
    def check(path: str, where: str) -> None:
        if not os.path.exists(path):
            hint = ""
            if "+" in path:
                hint = " (mergekit's model+lora references are not supported)"
            elif not os.path.isabs(path) and path.count("/") == 1:
                hint = (
                    " (manifold-merge reads local checkpoints only; download Hugging Face Hub "
                    "models first, e.g. with huggingface-cli download)"
                )
            raise UsageError(f"{where}: {path!r} does not exist{hint}")

    for m in plan.models:
        check(m.path, f"{m.where}.model")
        for sname, p in m.stats.items():
            check(p, f"{m.where}.manifold_merge.{sname}")
    if plan.base_model is not None:
        check(plan.base_model, "base_model")
    if plan.tokenizer_source not in (None, "base", "union"):
        check(plan.tokenizer_source, "tokenizer_source")


def _aux_source(plan: MergePlan) -> str:
    if plan.tokenizer_source not in (None, "base", "union"):
        return plan.tokenizer_source
    return plan.base_model if plan.base_model is not None else plan.models[0].path


def _group_of(name: str, groups: dict) -> str | None:
    for g, flts in groups.items():
        flts = [flts] if isinstance(flts, str) else list(flts)
        rules = [{"filter": f, "value": True} for f in flts] + [{"value": False}]
        if resolve_param(rules, name, "groups"):
            return g
    return None


def _prepare(job: _Job) -> None:
    """Open every checkpoint (headers only) and plan every tensor; raise before writing."""
    plan = job.plan
    for m in plan.models:
        job.readers.append(_open(m.path, f"{m.where}.model"))
        job.stats.append({s: _open(p, f"{m.where}.manifold_merge.{s}") for s, p in m.stats.items()})
    if plan.uses_base:
        job.base = _open(plan.base_model, "base_model")
    n = len(plan.models)
    spec = plan.spec
    order = list(job.base.keys()) if job.base is not None else []
    seen = set(order)
    for r in job.readers:
        for k in r.keys():
            if k not in seen:
                seen.add(k)
                order.append(k)
    if not order:
        raise MergeFailure(f"{job.label(0)} holds no tensors")

    incomplete = []
    plans: dict[str, _Item] = {}
    for name in order:
        holders = [i for i in range(n) if name in job.readers[i]]
        base_has = job.base is not None and name in job.base
        complete = len(holders) == n and (job.base is None or base_has)
        if not complete:
            lacking = [job.label(i) for i in range(n) if i not in holders]
            if job.base is not None and not base_has:
                lacking.append(f"base_model ({plan.base_model!r})")
            incomplete.append((name, lacking))
            if job.policy == "intersection":
                job.skipped.append({"tensor": name, "missing_in": lacking})
                continue
            if job.policy == "error":
                continue
        _check_shapes(job, name, holders, base_has)
        if complete:
            plans[name] = _Item([name], holders, "merge")
        elif job.base is not None and not base_has:
            plans[name] = _Item([name], holders, "copy", ("model", holders[0]))
            job.copied[name] = f"the base lacks it: copied from {job.label(holders[0])}"
        elif not holders:
            plans[name] = _Item([name], holders, "copy", ("base", None))
            job.copied[name] = "only the base has it: copied from the base"
        else:
            lo, hi = spec.num_models
            want = 1 if spec.name == "slerp" and job.base is not None else None
            k = len(holders)
            ok = (k == want) if want else (k >= lo and (hi is None or k <= hi))
            if spec.name == "slerp" and job.base is None:
                ok = k == 2
            if ok:
                plans[name] = _Item([name], holders, "merge")
            else:
                plans[name] = _Item([name], holders, "copy", ("model", holders[0]))
                job.copied[name] = (
                    f"only {k} model(s) have it, too few for {spec.name!r}: copied from "
                    f"{job.label(holders[0])}"
                )
    if incomplete and job.policy == "error":
        shown = "; ".join(f"tensor {t!r} is missing in {', '.join(m)}" for t, m in incomplete[:5])
        more = f" (and {len(incomplete) - 5} more)" if len(incomplete) > 5 else ""
        raise MergeFailure(
            f"{shown}{more}. Use --tensor-policy intersection to skip such tensors, or union to "
            "merge each over the models that have it"
        )

    # groups: members merged together, at the position of the first member
    groups = plan.parameters.get("groups") or {}
    grouped: dict[str, _Item] = {}
    for name in order:
        item = plans.get(name)
        if item is None:
            continue
        g = _group_of(name, groups) if groups and _is_float_tensor(job, item, name) else None
        if g is None:
            job.items.append(item)
            continue
        if item.action != "merge" or len(item.holders) != n:
            raise MergeFailure(
                f"tensor {name!r} of group {g!r} is not in every model (and the base); a group "
                "is merged as one block, so each member must be in all of them"
            )
        if g not in grouped:
            grouped[g] = _Item([], item.holders, "merge", group=g)
            job.items.append(grouped[g])
        grouped[g].names.append(name)

    out_dtype = plan.output_dtype
    for item in job.items:
        for name in item.names:
            reader = job.source(item)
            dtype, shape = reader.info(name)
            size = math.prod(shape)
            job.in_bytes += reader.nbytes(name)
            if dtype in _FLOAT_NAMES and out_dtype is not None:
                job.out_bytes.append(size * np.dtype(_out_np(out_dtype)).itemsize)
            else:
                job.out_bytes.append(size * _itemsize(dtype))
    _check_stats(job)


def _out_np(name: str):
    from manifold_merge.io.hf import parse_dtype

    return parse_dtype(name)


def _check_shapes(job: _Job, name: str, holders: list[int], base_has: bool) -> None:
    refs = [(job.label(i), *job.info(i, name)) for i in holders]
    if base_has:
        refs.insert(0, (f"base_model ({job.plan.base_model!r})", *job.base.info(name)))
    first = refs[0]
    for label, dtype, shape in refs[1:]:
        if tuple(shape) != tuple(first[2]):
            raise MergeFailure(
                f"tensor {name!r}: {label} has shape {tuple(shape)}, {first[0]} has "
                f"{tuple(first[2])}"
            )
        if (dtype in _FLOAT_NAMES) != (first[1] in _FLOAT_NAMES):
            raise MergeFailure(
                f"tensor {name!r}: {label} stores it as {dtype}, {first[0]} as {first[1]} "
                "(one floating point, one not)"
            )


def _check_stats(job: _Job) -> None:
    spec = job.plan.spec
    for item in job.items:
        if item.action != "merge":
            continue
        for name in item.names:
            for sname in spec.stats:
                having = [i for i in item.holders if sname in job.stats[i]]
                if not having:
                    continue
                has = [i for i in item.holders if name in job.stats[i][sname]]
                if has and len(has) != len(item.holders):
                    lacking = [job.label(i) for i in item.holders if i not in has]
                    raise MergeFailure(
                        f"tensor {name!r}: the {sname} of {', '.join(lacking)} lack it, those "
                        "of the other models have it"
                    )
                if not has and sname in spec.required_stats and _is_float_tensor(job, item, name):
                    raise MergeFailure(
                        f"tensor {name!r}: the {sname} of {job.label(item.holders[0])} "
                        f"({job.plan.models[item.holders[0]].stats[sname]!r}) lack it; method "
                        f"{spec.name!r} needs {sname} for every floating-point tensor"
                    )


def _is_float_tensor(job: _Job, item: _Item, name: str) -> bool:
    return job.info(item.holders[0], name)[0] in _FLOAT_NAMES


# -- merging ------------------------------------------------------------------------------


def _read(reader, name: str, out_dtype: str | None) -> np.ndarray:
    """The stored tensor, memory-mapped and uncopied: merge computes in float32 or better and
    rounds its result once, to the first model's dtype. Only when the output dtype is wider
    than the storage dtype (bf16 in, float32 out) is the input widened here, so that the
    float32 result is not rounded to bf16 on the way."""
    arr = np.asarray(reader.get(name))
    dtype = _read_dtype(arr, out_dtype)
    return arr if dtype == arr.dtype else arr.astype(dtype)


def _read_dtype(arr: np.ndarray, out_dtype: str | None):
    """The dtype an input is read in (see :func:`_read`)."""
    if out_dtype is not None and (arr.dtype.kind == "f" or str(arr.dtype) == "bfloat16"):
        if np.dtype(_np_dtype_name(out_dtype)).itemsize > arr.dtype.itemsize:
            return np.dtype(np.float32 if arr.dtype.itemsize < 4 else np.float64)
    return arr.dtype


def _copy_exact(job: _Job, name: str, holders: list[int]) -> tuple[np.ndarray, dict]:
    """A tensor that is not floating point (position ids, masks) is copied, as merge does,
    but here in NumPy, so int64 stays int64 whatever JAX's x64 setting; all must agree."""
    refs = [(job.label(i), np.asarray(job.readers[i].get(name))) for i in holders]
    if job.base is not None:
        refs.insert(0, (f"base_model ({job.plan.base_model!r})", np.asarray(job.base.get(name))))
    ref_label, ref = refs[0]
    for label, arr in refs[1:]:
        if arr.dtype != ref.dtype or not np.array_equal(arr, ref):
            raise MergeFailure(
                f"tensor {name!r} ({arr.dtype}) is not floating point, so it is copied, but "
                f"{label} differs from {ref_label}"
            )
    entry = {"method": "copy", "shape": list(ref.shape), "blocks": 0, "num_steps": 0}
    entry.update(grad_norm=0.0, converged=True, norm_ratio=1.0, angle_spread=0.0)
    return ref, entry


def _name_models(message: str, job: _Job, holders: list[int]) -> str:
    """Turn merge's "model 1" (an index into this call's models) into the config entry."""

    def sub(m: re.Match) -> str:
        k = int(m.group(1))
        return f"model {job.label(holders[k])}" if k < len(holders) else m.group(0)

    text = re.sub(r"\bmodel (\d+)\b", sub, message)
    if job.plan.base_model is not None:
        text = text.replace("the base", f"the base ({job.plan.base_model!r})")
    return text


def _input_views(job: _Job, item: _Item) -> dict:
    """The memory-mapped inputs a merge item will read, ``{(source, name): view}`` with source
    a model index or ``"base"`` (views: nothing is read yet). Empty for copied tensors."""
    key = item.group or item.names[0]
    if item.action == "copy" or (item.group is None and not _is_float_tensor(job, item, key)):
        return {}
    views = {(i, nm): job.readers[i].get(nm) for i in item.holders for nm in item.names}
    if job.base is not None:
        views.update({("base", nm): job.base.get(nm) for nm in item.names})
    return views


def _stage(views: dict, out_dtype: str | None) -> dict:
    """Read a merge item's inputs into 64-byte-aligned memory (in the prefetch thread, while
    the previous item is merged): the disk reads overlap that merge, and JAX then reads the
    staged arrays in place instead of copying each misaligned memory-mapped input itself."""
    staged = {}
    for k, view in views.items():
        arr = np.asarray(view)
        dtype = _read_dtype(arr, out_dtype)
        out = aligned_empty(arr.shape, dtype)
        np.copyto(out, arr, casting="unsafe" if dtype != arr.dtype else "no")
        staged[k] = out
    return staged


def _global_input(view, mesh, out_dtype: str | None, flat: bool):
    """A memory-mapped input as a global array on ``mesh`` (flattened with ``flat``), split by
    :func:`~manifold_merge.sharding.leaf_spec`: each process reads from the file only the
    slices its own devices hold (a slice of a memory map touches only its pages)."""
    import jax
    from jax.sharding import NamedSharding

    arr = np.asarray(view)
    arr = arr.reshape(-1) if flat else arr
    dtype = _read_dtype(arr, out_dtype)
    sharding = NamedSharding(mesh, leaf_spec(arr.shape, mesh))
    return jax.make_array_from_callback(
        arr.shape, sharding, lambda index: np.ascontiguousarray(arr[index], dtype=dtype)
    )


def _run_item(job: _Job, item: _Item, staged: dict | None = None, mesh=None) -> dict:
    """Produce the output tensors of one item: ``{name: (array, report entry)}``; ``staged``
    holds its inputs already read by :func:`_stage` (else they are read here). With a
    ``mesh`` the inputs are global arrays split over it (a tensor merged whole is flattened,
    so that any tensor whose size divides by the devices is split) and so are the results:
    nothing is gathered, :func:`_write_parts` writes each process's slices."""
    plan = job.plan
    out_dtype = plan.output_dtype
    if item.action == "copy":
        name = item.names[0]
        reader = job.source(item)
        arr = np.asarray(reader.get(name))
        dtype, shape = reader.info(name)
        entry = {"method": "copy", "shape": list(shape), "reason": job.copied[name]}
        if dtype in _FLOAT_NAMES and out_dtype is not None:
            arr = _to_dtype(arr, out_dtype)
        if arr.dtype.kind == "f" or str(arr.dtype) == "bfloat16":
            if not np.all(np.isfinite(arr.astype(np.float32))):
                raise MergeFailure(f"tensor {name!r}: the copied tensor has NaN or Inf values")
        return {name: (arr, entry)}

    names, holders = item.names, item.holders
    key = item.group or names[0]
    if item.group is None and not _is_float_tensor(job, item, key):
        return {key: _copy_exact(job, key, holders)}
    staged = staged or {}
    granularity = resolve_param(plan.parameters.get("granularity", "tensor"), key, "granularity")
    flat = granularity == "tensor" and not plan.spec.stat_shapes_free

    def read(src, nm):
        reader = job.base if src == "base" else job.readers[src]
        if mesh is not None:
            return _global_input(reader.get(nm), mesh, out_dtype, flat)
        if (src, nm) in staged:
            return staged[src, nm]
        return _read(reader, nm, out_dtype)

    def read_stat(reader, nm):
        if mesh is not None and not plan.spec.stat_shapes_free:
            return _global_input(reader.get(nm), mesh, None, flat)
        return np.asarray(reader.get(nm))

    models = [{nm: read(i, nm) for nm in names} for i in holders]
    first_dtype = {nm: _np_dtype_name(job.info(holders[0], nm)[0]) for nm in names}
    base = None
    if job.base is not None:
        base = {nm: read("base", nm) for nm in names}
    weights = plan.weights_for(names[0], holders)
    for nm in names[1:]:
        if plan.weights_for(nm, holders) != weights:
            raise MergeFailure(
                f"group {item.group!r}: the models' weights differ between its tensors "
                f"{names[0]!r} and {nm!r}; a group is merged with one weight per model"
            )
    params = {k: v for k, v in plan.parameters.items() if k != "groups"}
    params["seed"] = _tensor_seed(resolve_param(params.get("seed", 0), key, "seed"), key)
    if item.group is not None:
        params["groups"] = {item.group: list(names)}
    for sname in plan.spec.stats:
        if sname in job.stats[holders[0]]:
            params[sname] = [
                {
                    nm: read_stat(job.stats[i][sname], nm)
                    for nm in names
                    if nm in job.stats[i][sname]
                }
                for i in holders
            ]
    try:
        result = merge(plan.method, models, base=base, weights=weights, mesh=mesh, **params)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        msg = _name_models(_message(e), job, holders)
        if not any(repr(nm) in msg for nm in names):
            msg = f"tensor {key!r}: {msg}"
        raise MergeFailure(msg) from None
    out = {}
    for nm in names:
        arr = result.params[nm]
        if mesh is None:
            arr = np.asarray(arr)
            if arr.dtype.kind == "f" or str(arr.dtype) == "bfloat16":
                arr = _to_dtype(arr, out_dtype or first_dtype[nm])
        entry = _leaf_json(result.report[nm])
        entry["shape"] = list(job.info(holders[0], nm)[1])  # (a flattened input has (size,))
        if item.group is not None:
            entry["group"] = item.group
        if len(holders) != len(plan.models):
            entry["models"] = [plan.models[i].path for i in holders]
        out[nm] = (arr, entry)
    return out


# -- output -------------------------------------------------------------------------------


def _write_report(path: Path, out: Path, tmp: Path, report: dict) -> None:
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    target = path.absolute()
    if _inside(target, out):  # inside OUT_DIR: goes into the temporary folder, renamed with it
        target = tmp / target.relative_to(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda fh: fh.write(text), mode="w")


def _check_out(out: Path, plan: MergePlan, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise UsageError(
                f"output folder {str(out)!r} already exists; pass --force to replace it"
            )
        if out.is_symlink() or not out.is_dir():
            raise UsageError(f"{str(out)!r} exists and is not a folder; not replacing it")
    inputs = [(m.where + ".model", m.path) for m in plan.models]
    inputs += [
        (f"{m.where}.manifold_merge.{s}", p) for m in plan.models for s, p in m.stats.items()
    ]
    if plan.base_model is not None:
        inputs.append(("base_model", plan.base_model))
    real_out = Path(os.path.realpath(out))
    for where, p in inputs:
        real = Path(os.path.realpath(p))
        if _inside(real, real_out) or _inside(real_out, real):
            raise UsageError(
                f"output folder {str(out)!r} overlaps {where} {p!r}; write the merge elsewhere"
            )


def _report_base(plan: MergePlan, config: str, policy: str) -> dict:
    return {
        "config": str(config),
        "method": plan.method,
        "mergekit_method": plan.mergekit_method,
        "parameters": plan.parameters,
        "base_model": plan.base_model,
        "models": [{"path": m.path, "weight": m.weight} for m in plan.models],
        "out_dtype": plan.output_dtype,
        "tensor_policy": policy,
    }


def _shard_size(args) -> int | None:
    if args.out_shard_size is None:
        return None
    try:
        size = parse_size(args.out_shard_size)
    except ValueError as e:
        raise UsageError(f"--out-shard-size: {_message(e)}") from None
    if size <= 0:
        raise UsageError(f"--out-shard-size: must be positive, got {args.out_shard_size!r}")
    return size


def _merge_checkpoints(args, plan: MergePlan, out: Path, notes: list[str]) -> int:
    from tqdm import tqdm

    shard_size = _shard_size(args)
    job = _Job(plan, args.tensor_policy)
    with contextlib.ExitStack() as stack:
        stack.callback(_close_all, job)
        _prepare(job)
        n_tensors = sum(len(it.names) for it in job.items)
        shards = len(plan_shards(enumerate(job.out_bytes), shard_size))
        if args.dry_run:
            _print_plan(args, plan, job, out, n_tensors, shards)
            return 0
        mesh = _mesh(args)
        if mesh is not None:
            return _merge_sharded(args, plan, job, out, notes, mesh, shard_size, n_tensors)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())
            entries: dict[str, dict] = {}
            writer = CheckpointWriter(tmp, out_shard_size=shard_size)
            disable = args.no_progress or not sys.stderr.isatty()
            with tqdm(
                total=job.in_bytes,
                unit="B",
                unit_scale=True,
                desc="merging",
                disable=disable,
                file=sys.stderr,
            ) as bar:
                pool = (
                    contextlib.nullcontext()
                    if args.no_prefetch
                    else ThreadPoolExecutor(1, thread_name_prefix="prefetch")
                )
                with pool as prefetch:
                    ahead = None  # the next item's inputs, being read by the prefetch thread
                    for k, item in enumerate(job.items):
                        bar.set_postfix_str(item.group or item.names[0], refresh=False)
                        staged = ahead.result() if ahead is not None else None
                        ahead = None
                        if prefetch is not None and k + 1 < len(job.items):  # I/O under compute
                            views = _input_views(job, job.items[k + 1])
                            ahead = prefetch.submit(_stage, views, plan.output_dtype)
                        produced = _run_item(job, item, staged)
                        del staged
                        for nm, (arr, entry) in produced.items():
                            writer.add(nm, arr)
                            entry["dtype"] = str(arr.dtype)
                            entries[nm] = entry
                            bar.update(job.source(item).nbytes(nm))
            files = writer.close()
            _finish_folder(args, plan, job, tmp, out, entries, files, notes)
            replace_folder(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    size = sum(job.out_bytes)
    print(
        f"{PROG}: merged {n_tensors} tensors ({_human(size)}) with {plan.method} into "
        f"{str(out)!r} ({len(files)} file(s)"
        + (f", {len(job.skipped)} skipped" if job.skipped else "")
        + ")"
    )
    return 0


def _mesh(args):
    """The device mesh of ``--devices`` (joining a multi-host job first when asked), or None
    for the single-device path."""
    distributed = args.distributed or any(
        v is not None for v in (args.coordinator_address, args.num_processes, args.process_id)
    )
    if args.devices is None and not distributed:
        return None
    import jax

    from manifold_merge import sharding

    if distributed:
        sharding.initialize(args.coordinator_address, args.num_processes, args.process_id)
    if args.devices in (None, "all"):
        count = None
    else:
        try:
            count = int(args.devices)
        except ValueError:
            raise UsageError(f"--devices: a number or 'all', got {args.devices!r}") from None
        if count < 1:
            raise UsageError(f"--devices: must be at least 1, got {count}")
    if count == 1 and jax.process_count() == 1:
        return None
    try:
        return sharding.make_mesh(count)
    except ValueError as e:
        raise UsageError(f"--devices: {_message(e)}") from None


def _planned_outputs(job: _Job) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of every output tensor in writing order: what the
    single-device path writes (merged floats in the output dtype or the first model's)."""
    out_dtype = job.plan.output_dtype
    target = None if out_dtype is None else dtype_name(_out_np(out_dtype))
    tensors = []
    for item in job.items:
        for name in item.names:
            reader = job.source(item)
            dtype, shape = reader.info(name)
            tensors.append((name, target if target and dtype in _FLOAT_NAMES else dtype, shape))
    return tensors


def _write_parts(writer: PlannedCheckpointWriter, name: str, arr, lead: bool) -> None:
    """Write this process's part of output tensor ``name``: each slice of a global array held
    by one of its devices (once: replica 0), converted to the planned dtype; a host array
    (copies, integer tensors) only from the lead process."""
    import jax

    dtype = str(DTYPES[writer.info(name)[0]])
    if not isinstance(arr, jax.Array):
        if lead:
            arr = np.asarray(arr)
            floating = arr.dtype.kind == "f" or str(arr.dtype) == "bfloat16"
            writer.write(name, _to_dtype(arr, dtype) if floating else arr)
        return
    row = math.prod(arr.shape[1:])
    for shard in arr.addressable_shards:
        if shard.replica_id != 0:
            continue
        index = shard.index
        if any(ix != slice(None) and ix != slice(0, n) for ix, n in zip(index[1:], arr.shape[1:])):
            raise MergeFailure(f"tensor {name!r}: only splits of the leading axis are written")
        start = (index[0].start or 0) * row if arr.ndim else 0
        writer.write(name, _to_dtype(np.asarray(shard.data), dtype), start)


def _merge_sharded(args, plan, job, out: Path, notes, mesh, shard_size, n_tensors) -> int:
    """``merge`` with ``--devices``: every tensor split over the mesh, read and written in
    slices by the processes that hold them. The output folder is assembled under a temporary
    name that every process derives alike, filled in place by all of them
    (:class:`~manifold_merge.io.planned.PlannedCheckpointWriter`) and renamed by process 0
    once all have finished."""
    import jax
    from jax.experimental.multihost_utils import sync_global_devices
    from tqdm import tqdm

    lead = jax.process_index() == 0
    multi = jax.process_count() > 1
    tensors = _planned_outputs(job)
    tag = zlib.crc32(f"{os.path.abspath(args.config)}|{out.absolute()}".encode())
    tmp = out.parent / f".{out.name}.tmp-sharded-{tag:08x}"
    writer = None
    try:
        if lead:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed run's leftovers
            tmp.mkdir()
            os.chmod(tmp, 0o777 & ~_umask())
            writer = PlannedCheckpointWriter(tmp, tensors, out_shard_size=shard_size)
        if multi:
            sync_global_devices("manifold_merge: output files created")
        if not lead:
            writer = PlannedCheckpointWriter(tmp, tensors, out_shard_size=shard_size, create=False)
        entries: dict[str, dict] = {}
        disable = args.no_progress or not sys.stderr.isatty() or not lead
        with tqdm(total=job.in_bytes, unit="B", unit_scale=True, desc="merging",
                  disable=disable, file=sys.stderr) as bar:  # fmt: skip
            for item in job.items:
                bar.set_postfix_str(item.group or item.names[0], refresh=False)
                for nm, (arr, entry) in _run_item(job, item, mesh=mesh).items():
                    _write_parts(writer, nm, arr, lead)
                    entry["dtype"] = str(DTYPES[writer.info(nm)[0]])
                    entries[nm] = entry
                    bar.update(job.source(item).nbytes(nm))
        if not multi and writer.missing():  # one process writes everything
            raise MergeFailure(f"internal error: tensors left unwritten: {writer.missing()[:5]}")
        files = writer.close()
        if multi:
            sync_global_devices("manifold_merge: output written")
        if lead:
            extra = {"devices": int(mesh.devices.size), "processes": jax.process_count()}
            _finish_folder(args, plan, job, tmp, out, entries, files, notes, extra)
            replace_folder(tmp, out)
        if multi:
            sync_global_devices("manifold_merge: output in place")
    except BaseException:
        if writer is not None:
            writer.abort()
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if lead:
        size = sum(job.out_bytes)
        print(
            f"{PROG}: merged {n_tensors} tensors ({_human(size)}) with {plan.method} into "
            f"{str(out)!r} ({len(files)} file(s), {mesh.devices.size} devices"
            + (f", {jax.process_count()} processes" if multi else "")
            + (f", {len(job.skipped)} skipped" if job.skipped else "")
            + ")"
        )
    return 0


def _finish_folder(args, plan, job, tmp: Path, out: Path, entries, files, notes, extra=None):
    """Complete the temporary output folder: the config and tokenizer files, the report."""
    src = _aux_source(plan)
    aux = copy_aux_files(src, tmp) if os.path.isdir(src) else []
    if args.report is not None:
        report = _report_base(plan, args.config, args.tensor_policy)
        report.update(
            tensors=entries,
            skipped=job.skipped,
            not_converged=[k for k, e in entries.items() if e.get("converged") is False],
            files=files,
            aux_files=aux,
            warnings=list(notes),
            **(extra or {}),
        )
        _write_report(Path(args.report), out.absolute(), tmp, report)


def _close_all(job: _Job) -> None:
    for r in [*job.readers, job.base, *(s for d in job.stats for s in d.values())]:
        if r is not None:
            r.close()


def _print_plan(args, plan: MergePlan, job: _Job, out: Path, n_tensors: int, shards: int) -> None:
    lines = [
        f"{PROG}: dry run of {args.config!r} (nothing is written)",
        f"method: {plan.method}"
        + (f" (mergekit: {plan.mergekit_method})" if plan.mergekit_method != plan.method else ""),
        f"parameters: {json.dumps(plan.parameters)}",
        f"base model: {plan.base_model}"
        + ("" if plan.base_model is None or plan.uses_base else " (tokenizer/config files only)"),
        "models:",
    ]
    for m in plan.models:
        w = "1 (default)" if m.weight is None else json.dumps(m.weight)
        lines.append(f"  {m.where}: {m.path}  weight {w}")
    merged = sum(len(it.names) for it in job.items if it.action == "merge")
    lines.append(
        f"tensors: {n_tensors} to write ({merged} merged, {len(job.copied)} copied, "
        f"{len(job.skipped)} skipped; tensor policy {job.policy})"
    )
    for t in job.skipped[:10]:
        lines.append(f"  skipped {t['tensor']!r}: missing in {', '.join(t['missing_in'])}")
    for name, why in list(job.copied.items())[:10]:
        lines.append(f"  copied {name!r}: {why}")
    size = sum(job.out_bytes)
    limit = f" of at most {_human(parse_size(args.out_shard_size))}" if args.out_shard_size else ""
    lines.append(
        f"bytes: {_human(job.in_bytes)} per model in, {_human(size)} out "
        f"({plan.output_dtype or 'dtypes of the first model'}), in {shards} shard(s){limit}"
    )
    lines.append(f"output: {str(out)!r}; aux files from {_aux_source(plan)!r}")
    print("\n".join(lines))


def _merge_adapters(args, plan: MergePlan, out: Path, notes: list[str]) -> int:
    from manifold_merge.io.peft import merge_peft_adapters, read_peft_adapter

    if not plan.spec.lora:
        raise UsageError(
            f"merge_method: the models are PEFT adapters, but {plan.method!r} merges full "
            "weights; use a LoRA method (lora_svd, lora_cat, lora_ties_svd, knots, core_space, "
            "geomerge, ...)"
        )
    try:
        weights = plan.weights()
    except ConfigError:
        raise UsageError(
            "models[].parameters.weight: filter rules are not supported for PEFT adapters; give "
            "one number per adapter"
        ) from None
    if plan.base_model is not None:
        warnings.warn(
            "base_model is not used when merging PEFT adapters", UserWarning, stacklevel=2
        )
    params = dict(plan.parameters)
    paths = [m.path for m in plan.models]
    mesh = None if args.dry_run else _mesh(args)
    if mesh is not None:
        import jax

        if jax.process_count() > 1:
            raise UsageError(
                "PEFT adapters are merged by one process (one small adapter file): run the "
                "merge without the multi-host flags, with --devices N on one host"
            )
        params["mesh"] = mesh  # b split along m, a along n (see manifold_merge.sharding)
    if args.dry_run:
        adapters = [read_peft_adapter(p) for p in paths]
        print(f"{PROG}: dry run of {args.config!r} (nothing is written)")
        print(f"method: {plan.method}; parameters: {json.dumps(params)}")
        for m, ad in zip(plan.models, adapters):
            ranks = sorted({int(np.shape(f.b)[1]) for f in ad.lora.values()})
            w = "1 (default)" if m.weight is None else m.weight
            print(f"  {m.where}: {m.path}  weight {w}  {len(ad.lora)} LoRA modules, ranks {ranks}")
        print(f"output: {str(out)!r} (a PEFT adapter folder)")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    try:
        result = merge_peft_adapters(
            paths, tmp, plan.method, weights=weights, out_dtype=plan.output_dtype, **params
        )
        if args.report is not None:
            report = _report_base(plan, args.config, args.tensor_policy)
            report.update(
                tensors={k: _leaf_json(r) for k, r in result.report.items()},
                skipped=[],
                not_converged=[k for k, r in result.report.items() if not r.converged],
                warnings=list(notes),
            )
            _write_report(Path(args.report), out.absolute(), tmp, report)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"{PROG}: merged {len(paths)} PEFT adapters with {plan.method} into {str(out)!r}")
    return 0


def _cmd_merge(args) -> int:
    if not (args.no_compile_cache or args.dry_run or os.environ.get("MM_COMPILE_CACHE") == "0"):
        enable_compilation_cache(args.compile_cache)
    notes: list[str] = []
    with _printed_warnings(notes):
        plan = load_merge_config(args.config)
        _check_paths(plan)
        out = Path(args.out_dir)
        if not args.dry_run or out.exists():
            _check_out(out, plan, args.force or args.dry_run)
        _shard_size(args)  # a bad size is refused before any work
        adapters = [_is_adapter(m.path) for m in plan.models]
        if all(adapters):
            if args.out_shard_size is not None:
                warnings.warn(
                    "--out-shard-size is ignored for PEFT adapters (one adapter file)",
                    UserWarning,
                    stacklevel=2,
                )
            return _merge_adapters(args, plan, out, notes)
        if any(adapters):
            which = [m.where for m, a in zip(plan.models, adapters) if a]
            raise UsageError(
                f"{which[0]}.model is a PEFT adapter folder but not every model is; merge "
                "adapters with adapters, full checkpoints with full checkpoints"
            )
        if plan.spec.lora:
            raise UsageError(
                f"merge_method: {plan.method!r} merges PEFT LoRA adapters, but "
                f"{plan.models[0].where}.model {plan.models[0].path!r} is not an adapter folder "
                f"(no {_ADAPTER_CONFIG})"
            )
        return _merge_checkpoints(args, plan, out, notes)


# -- entry point --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Merge fine-tuned models by geometric averaging (mergekit-style configs).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    m = sub.add_parser(
        "merge",
        help="merge the models of a mergekit-style YAML config into OUT_DIR",
        description=(
            "Merge the models of CONFIG (mergekit's models: form, plus a manifold_merge: key "
            "for our parameters) tensor by tensor into the Hugging Face folder OUT_DIR."
        ),
    )
    m.add_argument("config", metavar="CONFIG.yaml", help="the merge configuration")
    m.add_argument("out_dir", metavar="OUT_DIR", help="the output folder (written atomically)")
    m.add_argument(
        "--out-shard-size",
        metavar="SIZE",
        default=None,
        help="shard the output into files of at most SIZE (e.g. 5GB, 500MB); default one file",
    )
    m.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    m.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config and the checkpoints' headers, print the plan, write nothing",
    )
    m.add_argument(
        "--report", metavar="FILE.json", default=None, help="write a per-tensor JSON report"
    )
    m.add_argument(
        "--tensor-policy",
        choices=POLICIES,
        default="error",
        help=(
            "a tensor missing in some models: error (default), intersection (skip it) or "
            "union (merge it over the models that have it)"
        ),
    )
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.add_argument(
        "--no-prefetch",
        action="store_true",
        help=(
            "read each tensor only when it is merged (default: the next tensor's inputs are "
            "read into aligned memory by a helper thread while the current one is merged)"
        ),
    )
    m.add_argument(
        "--compile-cache",
        metavar="DIR",
        default=None,
        help=(
            "keep compiled XLA programs in DIR, so later merges with the same tensor shapes "
            "skip compilation (default $MM_CACHE_DIR/xla or ~/.cache/manifold_merge/xla)"
        ),
    )
    m.add_argument(
        "--devices",
        metavar="N",
        default=None,
        help=(
            "shard the merge over N devices (or 'all'): each tensor is split along its leading "
            "axis (a tensor merged whole: its flattened elements), each host reads and writes "
            "only its devices' slices; the output equals the single-device merge. On a CPU, "
            "simulate devices with XLA_FLAGS=--xla_force_host_platform_device_count=N"
        ),
    )
    m.add_argument(
        "--distributed",
        action="store_true",
        help=(
            "join a multi-host job with jax.distributed.initialize() (auto-detected on Cloud "
            "TPU, SLURM, Open MPI; or give the three flags below, or MM_COORDINATOR_ADDRESS, "
            "MM_NUM_PROCESSES, MM_PROCESS_ID); run the same command on every host"
        ),
    )
    m.add_argument("--coordinator-address", metavar="HOST:PORT", default=None,
                   help="multi-host: address of process 0's coordinator")  # fmt: skip
    m.add_argument("--num-processes", metavar="P", type=int, default=None,
                   help="multi-host: number of processes (hosts)")  # fmt: skip
    m.add_argument("--process-id", metavar="I", type=int, default=None,
                   help="multi-host: this process's index, 0..P-1")  # fmt: skip
    m.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="compile everything afresh, store nothing (also: MM_COMPILE_CACHE=0)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``manifold-merge`` with ``argv`` (default ``sys.argv[1:]``).

    Args:
        argv: the command line without the program name, e.g.
            ``["merge", "config.yaml", "out", "--dry-run"]``.

    Returns:
        The exit status: 0 on success, 2 for usage and config errors, 1 when the merge fails
        (the error is printed as ``manifold-merge: error: ...`` on stderr, without traceback).

    Example::

        from manifold_merge.cli import main
        status = main(["merge", "ties.yaml", "runs/merged", "--out-shard-size", "2GB"])
    """
    parser = _parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as e:  # argparse printed the usage error (status 2) or the help (0)
        return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return _cmd_merge(args)
    except (ConfigError, UsageError) as e:
        print(f"{PROG}: error: {_message(e)}", file=sys.stderr)
        return 2
    except (MergeFailure, ValueError, TypeError, KeyError, OSError, RuntimeError) as e:
        print(f"{PROG}: error: {_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
