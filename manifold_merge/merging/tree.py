"""``merge``: apply a registered method leaf by leaf (block by block) to parameter pytrees."""

from __future__ import annotations

import difflib
import functools
import re
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from manifold_merge.manifolds.lora import LoraFactors, core_space
from manifold_merge.merging.registry import REQUIRED, get_method
from manifold_merge.sharding import (
    PARAM_AXIS,
    leaf_spec,
    make_mesh,
    mesh_size,
    place,
    split_parameter_axis,
)

GRANULARITIES = ("tensor", "row", "column")
#: Parameters every method accepts, handled here rather than by the block functions.
COMMON_DEFAULTS = {"granularity": "tensor", "seed": 0, "groups": None}
#: Parameters every LoRA method accepts in addition: ``dense=True`` returns m x n arrays;
#: ``scaling``: per-adapter LoRA scales s_i (alpha / r, or alpha / sqrt(r) for rsLoRA),
#: multiplied into b (a list of N numbers, or name-filter rules whose values are such lists).
LORA_DEFAULTS = {"dense": False, "scaling": None}


def _is_lora(x) -> bool:
    return isinstance(x, LoraFactors)


class LeafReport(NamedTuple):
    """What happened to one leaf.

    Attributes:
        method: the method applied, or ``"copy"`` for non-float leaves (copied unchanged).
        shape: the leaf's shape.
        blocks: number of independent blocks (1 per tensor, one per row or column).
        num_steps: iterations of the solver (largest over blocks; 0 for closed forms).
        grad_norm: final relative gradient norm (largest over blocks; 0 for closed forms).
        converged: every block converged (True for closed forms).
        norm_ratio: ||merged|| / mean_i ||theta_i|| over the vectors the method averaged
            (task vectors when a base is used, full weights otherwise).
        angle_spread: largest pairwise angle (rad) between those vectors, per tensor.
    """

    method: str
    shape: tuple
    blocks: int
    num_steps: int
    grad_norm: float
    converged: bool
    norm_ratio: float
    angle_spread: float


class MergeResult(NamedTuple):
    """``params``: the merged pytree; ``report``: leaf name -> :class:`LeafReport`."""

    params: Any
    report: dict


def leaf_name(path) -> str:
    """'/'-joined keys of a pytree path, e.g. ``Dense_0/kernel``."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _filter_matches(flt: str, name: str) -> bool:
    if flt.startswith("re:"):
        return re.search(flt[3:], name) is not None
    return flt in name


def resolve_param(value: Any, name: str, param: str) -> Any:
    """A parameter's value for leaf ``name``.

    ``value`` is a scalar, or mergekit's list of rules ``[{"filter": "mlp", "value": 0.5},
    {"value": 0.3}]``: the first rule whose filter matches wins (a substring of the leaf name,
    or a regular expression after ``re:``); a rule without a filter is the default.
    """
    if not isinstance(value, (list, tuple)) or not value or not isinstance(value[0], dict):
        return value
    for rule in value:
        if not isinstance(rule, dict) or "value" not in rule:
            raise ValueError(f"parameter {param!r}: each rule needs a 'value', got {rule!r}")
        flt = rule.get("filter")
        if flt is None or _filter_matches(str(flt), name):
            return rule["value"]
    raise ValueError(
        f"parameter {param!r} has no rule matching tensor {name!r} and no default rule "
        "(one without 'filter')"
    )


def _all_defaults(spec) -> dict:
    """Every parameter ``spec``'s method accepts, with its default."""
    return {**COMMON_DEFAULTS, **(LORA_DEFAULTS if spec.lora else {}), **spec.defaults}


def _check_params(spec, params: dict) -> None:
    known = _all_defaults(spec)
    for key in params:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(
                f"merge method {spec.name!r} has no parameter {key!r}; it takes "
                f"{sorted(known)}.{hint}"
            )
    for key, default in spec.defaults.items():
        if default is REQUIRED and key not in params:
            raise TypeError(f"merge method {spec.name!r} needs parameter {key!r}")


def _check_weights(spec, weights, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n, np.float64)
    w = np.asarray(weights, np.float64)
    if w.shape != (n,):
        raise ValueError(f"weights must have one entry per model ({n}), got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    if not spec.negative_weights and np.any(w < 0):
        raise ValueError(f"merge method {spec.name!r} needs non-negative weights, got {w.tolist()}")
    if np.sum(w) == 0 or (not spec.negative_weights and not np.sum(w) > 0):
        raise ValueError(f"weights must not sum to zero, got {w.tolist()}")
    return w


def _blocks(x: jax.Array, granularity: str) -> jax.Array:
    """(N, *shape) -> (B, N, D): one block per tensor, per row (axis 0) or per column (last)."""
    n = x.shape[0]
    if granularity == "tensor" or x.ndim < 3:  # vectors and scalars are always one block
        return x.reshape(1, n, -1)
    if granularity == "row":
        return jnp.moveaxis(x, 1, 0).reshape(x.shape[1], n, -1)
    moved = jnp.moveaxis(x, -1, 0)  # column: (C, N, ...)
    return moved.reshape(moved.shape[0], n, -1)


def _unblocks(blocks: jax.Array, shape: tuple, granularity: str) -> jax.Array:
    if granularity == "tensor" or len(shape) < 2:
        return blocks.reshape(shape)
    if granularity == "row":
        return blocks.reshape(shape)
    return jnp.moveaxis(blocks.reshape((shape[-1],) + shape[:-1]), 0, -1)


def _run_blocks(block_fn, points, base, weights, keys, stats, params):
    kwargs = dict(params)

    def one(p, b, k, st):
        return block_fn(p, b, weights, k, **st, **kwargs)

    in_axes = (0, None if base is None else 0, 0, 0)
    return jax.vmap(one, in_axes=in_axes)(points, base, keys, stats)


def _pair_angle_max(vectors, norms):
    """Largest pairwise angle between the vectors (a list of N arrays, or the rows of an
    (N, D) array) with the given norms (0 for a zero vector), in the atan2 form of
    :func:`sphere_angle`, 2 atan2(||u_a - u_b||, ||u_a + u_b||) for the unit vectors u.

    Each pair is one reduction over elementwise expressions of the inputs, which XLA fuses
    into a single pass: no unit-vector copies and no (N, N, D) temporary are materialised
    (a ``lax.map`` over pairs would copy the inputs into the loop, and ``safe_norm``'s double
    ``where`` materialises its operand)."""
    n = len(vectors)
    if n < 2:
        return jnp.zeros((), jnp.result_type(vectors[0]))
    inv = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
    angles = []
    for a, b in zip(*np.triu_indices(n, k=1)):
        ua, ub = vectors[a].reshape(-1) * inv[a], vectors[b].reshape(-1) * inv[b]
        diff = jnp.sqrt(jnp.sum(jnp.square(ua - ub)))
        total = jnp.sqrt(jnp.sum(jnp.square(ua + ub)))
        ok = (norms[a] > 0) & (norms[b] > 0)
        angles.append(jnp.where(ok, 2.0 * jnp.arctan2(diff, total), 0.0))
    return jnp.max(jnp.stack(angles))


@functools.partial(
    jax.jit,
    static_argnames=(
        "block_fn",
        "granularity",
        "params",
        "dtype",
        "out_dtype",
        "whole_stats",
        "mesh",
    ),
)
def _leaf_kernel(
    block_fn, granularity, params, dtype, out_dtype, whole_stats, mesh, xs, b, w, key, stats
):
    """One leaf, start to finish, as a single compiled computation: promote, check finiteness,
    split into blocks, run the method on every block (vmapped), reassemble and compute the
    report's figures. Compiled once per (method, parameters, shapes, dtypes) and reused by
    every leaf of that shape; XLA fuses the elementwise work, so the only full-size buffers are
    the stacked inputs, the method's own temporaries and the result.

    With a ``mesh`` the inputs are global arrays split along their leading axis
    (:func:`~manifold_merge.sharding.leaf_spec`); XLA partitions the computation, the block
    functions are told when their parameter axis is split (the Gram solver and TIES then use
    explicit collectives), and the result keeps the inputs' layout.

    Returns ``(merged, info, checks)``; ``checks`` holds the finiteness flags that the caller
    turns into errors (the result is discarded then) and the norm / angle figures.
    """
    shape = xs[0].shape
    xs = [x.astype(dtype) for x in xs]
    # Checks and report figures read each input directly (fused reductions, no temporaries).
    checks = {"finite": jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])}
    base_blocks = None
    if b is not None:
        b = b.astype(dtype)
        checks["base_finite"] = jnp.all(jnp.isfinite(b))
        base_blocks = _blocks(b[None], granularity)[:, 0]
    blocks = _blocks(jnp.stack(xs), granularity)
    keys = jax.random.split(key, blocks.shape[0])
    stat_blocks = {}
    for sname, arrs in stats.items():
        st = jnp.stack([a.astype(dtype) for a in arrs])
        checks[f"{sname}_finite"] = jnp.all(jnp.isfinite(st))
        if whole_stats:  # statistics of their own shape (RegMean's Grams) go whole to the block
            stat_blocks[sname] = st[None]
        else:
            stat_blocks[sname] = _blocks(st, granularity)
    spec = None if mesh is None else leaf_spec(shape, mesh)
    # Row blocks of a matrix split along axis 0 are whole on their device; otherwise a split
    # leading axis splits each block's parameter axis.
    split = spec is not None and spec != PartitionSpec()
    split = split and (granularity != "row" or len(shape) < 2)
    with split_parameter_axis(mesh if split else None, "block", (blocks.shape[-1],)):
        merged_blocks, info = _run_blocks(
            block_fn, blocks, base_blocks, w.astype(dtype), keys, stat_blocks, params
        )
    merged = _unblocks(merged_blocks, shape, granularity)
    if spec is not None:
        merged = jax.lax.with_sharding_constraint(merged, NamedSharding(mesh, spec))
    averaged, result = xs, merged
    if b is not None:  # the report is about what was averaged: the task vectors
        averaged, result = [x - b for x in xs], merged - b
    norms = jnp.stack([jnp.sqrt(jnp.sum(jnp.square(v))) for v in averaged])
    checks["mean_norm"] = jnp.mean(norms)
    checks["result_norm"] = jnp.sqrt(jnp.sum(jnp.square(result)))
    checks["spread"] = _pair_angle_max(averaged, norms)
    merged = merged.astype(out_dtype)
    return merged, info, checks


def merge(method: str, models, *, base=None, weights=None, mesh=None, **params) -> MergeResult:
    """Merge the pytrees ``models`` with the registered ``method``, leaf by leaf.

    Args:
        method: a name from :func:`~manifold_merge.merging.list_methods`.
        models: a list of N pytrees with the same structure and leaf shapes (Flax params,
            dicts of arrays from checkpoints, ...).
        base: the base (pretrained) pytree, for methods on task vectors theta_i - base.
        weights: per-model weights (mergekit's ``weight``), default all 1. Each method
            normalises them as mergekit does (see the method's docstring).
        **params: the method's parameters (mergekit names: ``density``, ``lambda``, ``t``,
            ``normalize``, ...), each a scalar or a list of name-filter rules (see
            :func:`resolve_param`), plus ``granularity`` ("tensor", default; "row": one block
            per slice along axis 0; "column": along the last axis; vectors are always one
            block), ``groups`` ({name: filters}: the matching leaves form one block, flattened
            and concatenated, e.g. ``{"attn": "re:attention/(query|key|value)"}``; reported
            per leaf and as ``"group:<name>"``) and ``seed`` (for random methods such as DARE).
        mesh: shard the merge over devices (:mod:`manifold_merge.sharding`): a device count,
            or a ``jax.sharding.Mesh`` with an axis ``"params"``. Each floating-point leaf is
            split along its leading axis when that divides by the number of devices (else
            replicated), computed in place on the devices (reductions become collective sums)
            and returned as a global ``jax.Array`` split the same way; LoRA factors are split
            along m (``b``) and n (``a``). Results equal the unsharded merge to rounding.

    Leaves that are not floating point (integer buffers, position ids, masks) are copied from
    the base, or from the first model, and must be equal across models. Floating-point leaves
    must be finite.

    LoRA adapters: with a LoRA method (``lora_linear``, ``lora_cat``, ``lora_svd``,
    ``lora_ties_svd``, ``lora_dare_svd``, ``knots``, ``core_space``, ``geomerge``; see
    :mod:`manifold_merge.merging.lora`) each model is an adapter pytree whose LoRA leaves are
    :class:`~manifold_merge.manifolds.LoraFactors` (a bare ``LoraFactors`` is an adapter too),
    with any LoRA scaling folded into ``b`` (or given as ``scaling=[s_1, ..., s_N]``). Each
    ``LoraFactors`` is merged as one unit (ranks may differ across adapters; ``rank=`` sets
    the output rank) into ``LoraFactors``, or into the dense m x n update with ``dense=True``.
    Other floating-point leaves of an adapter (heads, ``modules_to_save``) get the normalised
    weighted average.

    Computation is in float32 (float64 stays float64); each merged leaf comes back in the
    dtype of the first model's leaf.

    Returns:
        :class:`MergeResult` ``(params, report)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from manifold_merge import merge
        >>> a, b = {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}
        >>> merge("linear", [a, b], weights=[3, 1]).params["w"]
        Array([0.75, 0.25], dtype=float32)
    """
    spec = get_method(method)
    stats = {name: params.pop(name) for name in spec.stats if params.get(name) is not None}
    for name in spec.stats:
        params.pop(name, None)
    missing = [name for name in spec.required_stats if name not in stats]
    if missing:
        raise TypeError(f"merge method {method!r} needs {missing[0]}=[one pytree per model]")
    if isinstance(models, dict) or not isinstance(models, (list, tuple)):
        raise TypeError(f"models must be a list of pytrees, got {type(models).__name__}")
    n = len(models)
    lo, hi = spec.num_models
    if n < lo or (hi is not None and n > hi):
        want = f"{lo}" if lo == hi else f"{lo}..{hi if hi is not None else 'any'}"
        raise ValueError(f"merge method {method!r} takes {want} models, got {n}")
    if spec.requires_base and base is None:
        raise ValueError(f"merge method {method!r} needs a base model (base=...)")
    _check_params(spec, params)
    w = _check_weights(spec, weights, n)
    merged_params = {**_all_defaults(spec), **params}
    if spec.check is not None:
        spec.check(merged_params, w if weights is not None else None, n, base is not None)
    use_base = base is not None and spec.uses_base

    flat0, treedef = jax.tree_util.tree_flatten_with_path(models[0], is_leaf=_is_lora)
    leaves = [[leaf for _, leaf in flat0]]
    for i, m in enumerate(models[1:], start=1):
        if jax.tree.structure(m, is_leaf=_is_lora) != treedef:
            raise ValueError(f"model {i} has a different tree structure from model 0")
        leaves.append(jax.tree.leaves(m, is_leaf=_is_lora))
    stat_leaves = {}
    for sname, trees in stats.items():
        if not isinstance(trees, (list, tuple)) or len(trees) != n:
            raise ValueError(f"{sname} must be a list of {n} pytrees (one per model)")
        stat_leaves[sname] = [
            _stat_lookup(t, treedef, flat0, sname, i) for i, t in enumerate(trees)
        ]
    base_leaves = None
    if base is not None:
        if jax.tree.structure(base) != treedef:
            raise ValueError("the base model has a different tree structure from the models")
        base_leaves = jax.tree.leaves(base)

    mesh = None if mesh is None else make_mesh(mesh)
    key = jax.random.key(int(merged_params["seed"]))
    groups = _check_groups(merged_params.pop("groups"))
    out, report = [None] * len(flat0), {}
    grouped: dict[str, list] = {}
    for j, (path, _) in enumerate(flat0):
        name = leaf_name(path) or "adapter"
        if any(_is_lora(lv[j]) for lv in leaves):
            out[j], report[name] = _merge_lora_leaf(
                spec,
                name,
                [lv[j] for lv in leaves],
                w,
                merged_params,
                jax.random.fold_in(key, j),
                mesh,
            )
            continue
        # Non-float leaves stay NumPy (int64 position ids must not become int32 without x64).
        is_float = jnp.issubdtype(jnp.result_type(leaves[0][j]), jnp.floating)
        xs = [_host_or_device(lv[j]) for lv in leaves]
        for i, x in enumerate(xs):
            if x.shape != xs[0].shape:
                raise ValueError(
                    f"tensor {name!r}: model {i} has shape {x.shape}, model 0 has {xs[0].shape}"
                )
        b = None if base_leaves is None else _host_or_device(base_leaves[j])
        if b is not None and b.shape != xs[0].shape:
            raise ValueError(f"tensor {name!r}: base has shape {b.shape}, models {xs[0].shape}")
        if not is_float:
            out[j] = _copy_leaf(name, xs, b)
            report[name] = LeafReport("copy", xs[0].shape, 0, 0, 0.0, True, 1.0, 0.0)
            continue
        if spec.lora:  # a plain leaf of an adapter (head, modules_to_save): weighted average
            merged, rep = _merge_leaf(
                get_method("linear"),
                name,
                xs,
                None,
                w,
                {"granularity": "tensor", "seed": 0, "normalize": True},
                jax.random.fold_in(key, j),
                {},
                mesh,
            )
            out[j], report[name] = merged, rep
            continue
        leaf_params = {k: resolve_param(v, name, k) for k, v in merged_params.items()}
        leaf_stats = {}
        for sname, per_model in stat_leaves.items():
            arrs = [t[j] for t in per_model]
            if all(a is None for a in arrs):
                continue  # no statistic for this leaf: the method's fallback applies
            if any(a is None for a in arrs):
                missing = [i for i, a in enumerate(arrs) if a is None]
                raise ValueError(f"tensor {name!r}: {sname} missing for models {missing}")
            arrs = [_host_or_device(a) for a in arrs]
            for i, a in enumerate(arrs):
                if a.shape != arrs[0].shape:
                    raise ValueError(
                        f"tensor {name!r}: {sname}[{i}] has shape {a.shape}, {sname}[0] has "
                        f"{arrs[0].shape}"
                    )
            if arrs[0].shape != xs[0].shape and not spec.stat_shapes_free:
                raise ValueError(
                    f"tensor {name!r}: {sname}[0] has shape {arrs[0].shape}, the models "
                    f"{xs[0].shape}"
                )
            leaf_stats[sname] = arrs
        group = next(
            (g for g, flts in groups.items() if any(_filter_matches(f, name) for f in flts)), None
        )
        if group is not None:
            grouped.setdefault(group, []).append((j, name, xs, b, leaf_stats))
            continue
        merged, rep = _merge_leaf(
            spec,
            name,
            xs,
            b if use_base else None,
            w,
            leaf_params,
            jax.random.fold_in(key, j),
            leaf_stats,
            mesh,
        )
        out[j] = merged
        report[name] = rep
    for group, members in grouped.items():
        _merge_group(
            spec,
            group,
            members,
            use_base,
            w,
            merged_params,
            jax.random.fold_in(key, len(flat0) + sorted(grouped).index(group)),
            out,
            report,
            mesh,
        )
    failed = [k for k, r in report.items() if not r.converged]
    if failed:
        warnings.warn(
            f"merge {method!r}: the solver did not converge on {len(failed)} tensor(s): "
            f"{failed[:5]}{' ...' if len(failed) > 5 else ''} (see result.report)",
            RuntimeWarning,
            stacklevel=2,
        )
    return MergeResult(jax.tree.unflatten(treedef, out), report)


@functools.partial(jax.jit, static_argnames=("block_fn", "params", "mesh"))
def _run_lora(block_fn, factors, weights, key, params, mesh):
    """A LoRA method on one module; with a ``mesh``, the factors' m and n axes are split over
    it (b along m, a along n) and so is the result."""
    lengths = (factors[0].b.shape[0], factors[0].a.shape[1])
    with split_parameter_axis(mesh, "lora", lengths):
        merged, info = block_fn(factors, weights, key, **dict(params))
        # Report figures from the cores (Frobenius products of the updates, never m x n).
        cores = jnp.stack([c.reshape(-1) for c in core_space(factors).cores()])
    norms = jnp.linalg.norm(cores, axis=1)
    figures = {
        "mean_norm": jnp.mean(norms),
        "out_norm": jnp.sqrt(jnp.sum((merged.b.T @ merged.b) * (merged.a @ merged.a.T))),
        "spread": _pair_angle_max(cores, norms),
    }
    if mesh is not None and merged.b.ndim == 2:
        merged = LoraFactors(
            jax.lax.with_sharding_constraint(merged.b, NamedSharding(mesh, _LORA_B)),
            jax.lax.with_sharding_constraint(merged.a, NamedSharding(mesh, _LORA_A)),
        )
    return merged, info, figures


#: Layouts of LoRA factors on a mesh: b (m, r) split along m, a (r, n) along n.
_LORA_B = PartitionSpec(PARAM_AXIS, None)
_LORA_A = PartitionSpec(None, PARAM_AXIS)


def _merge_lora_leaf(spec, name, fs, w, merged_params, key, mesh=None):
    """Merge one module's adapters (a list of LoraFactors) with a LoRA method."""
    if not spec.lora:
        raise ValueError(
            f"tensor {name!r} is a LoRA adapter (LoraFactors) but {spec.name!r} merges full "
            "weights; use a LoRA method (lora_svd, geomerge, ...) or merge the dense updates"
        )
    bad = [i for i, f in enumerate(fs) if not _is_lora(f)]
    if bad:
        raise ValueError(f"tensor {name!r}: LoraFactors in some adapters, not in {bad}")
    params = {k: resolve_param(v, name, k) for k, v in merged_params.items()}
    params.pop("seed")
    params.pop("groups", None)
    dense = params.pop("dense")
    scaling = params.pop("scaling")
    if params.pop("granularity") != "tensor":
        raise ValueError(f"tensor {name!r}: a LoRA adapter is merged whole (granularity 'tensor')")
    m, n = jnp.shape(fs[0].b)[0], jnp.shape(fs[0].a)[-1]
    for i, f in enumerate(fs):
        bs, as_ = jnp.shape(f.b), jnp.shape(f.a)
        if len(bs) != 2 or len(as_) != 2 or bs[1] != as_[0]:
            raise ValueError(
                f"tensor {name!r}: adapter {i} has b {bs} and a {as_}; expected b (m, r), a (r, n)"
            )
        if (bs[0], as_[1]) != (m, n):
            raise ValueError(
                f"tensor {name!r}: adapter {i} updates a {bs[0]}x{as_[1]} matrix, adapter 0 a "
                f"{m}x{n} one"
            )
    out_dtype = jnp.result_type(fs[0].b)
    dtype = jnp.promote_types(jnp.result_type(*[f.b for f in fs], *[f.a for f in fs]), jnp.float32)
    fs = [LoraFactors(jnp.asarray(f.b, dtype), jnp.asarray(f.a, dtype)) for f in fs]
    if scaling is not None:
        s = np.asarray(scaling, np.float64)
        if s.shape != (len(fs),) or not np.all(np.isfinite(s)):
            raise ValueError(
                f"tensor {name!r}: scaling must be {len(fs)} finite numbers (one LoRA scale "
                f"per adapter), got {scaling!r}"
            )
        fs = [LoraFactors(f.b * float(si), f.a) for f, si in zip(fs, s)]
    for i, f in enumerate(fs):
        if not bool(jnp.all(jnp.isfinite(f.b)) & jnp.all(jnp.isfinite(f.a))):
            raise ValueError(f"tensor {name!r}: adapter {i} has NaN or Inf values")
    split = None
    if mesh is not None:  # the TSQR of the core space needs >= R rows per device
        size, total_rank = mesh_size(mesh), sum(int(f.b.shape[1]) for f in fs)
        if m % size == 0 and n % size == 0 and min(m, n) // size >= total_rank:
            split = mesh
            fs = [LoraFactors(place(f.b, mesh, _LORA_B), place(f.a, mesh, _LORA_A)) for f in fs]
    merged, info, figures = _run_lora(
        spec.block_fn, fs, jnp.asarray(w, dtype), key, tuple(sorted(params.items())), split
    )
    mean_norm, out_norm = float(figures["mean_norm"]), float(figures["out_norm"])
    rep = LeafReport(
        method=spec.name,
        shape=(int(m), int(n)),
        blocks=1,
        num_steps=int(info["num_steps"]) if "num_steps" in info else 0,
        grad_norm=float(info["grad_norm"]) if "grad_norm" in info else 0.0,
        converged=bool(info["converged"]) if "converged" in info else True,
        norm_ratio=out_norm / mean_norm if mean_norm > 0 else 1.0,
        angle_spread=float(figures["spread"]),
    )
    if dense:
        return (merged.b @ merged.a).astype(out_dtype), rep
    return LoraFactors(merged.b.astype(out_dtype), merged.a.astype(out_dtype)), rep


def _stat_lookup(tree, treedef, flat0, sname, i):
    """Per-leaf list of a model's statistic: from a pytree shaped like the models, or from a
    flat ``{leaf name: array}`` dict (leaves it does not name get None)."""
    if isinstance(tree, dict) and all(isinstance(k, str) and "/" in k for k in tree):
        names = {leaf_name(p) for p, _ in flat0}
        unknown = sorted(set(tree) - names)
        if unknown:
            raise ValueError(f"{sname}[{i}] names tensors the models do not have: {unknown[:5]}")
        return [tree.get(leaf_name(p)) for p, _ in flat0]
    if jax.tree.structure(tree) != treedef:
        raise ValueError(f"{sname}[{i}] has a different tree structure from the models")
    return jax.tree.leaves(tree)


def _check_groups(groups):
    """``groups``: {group name: filter or list of filters} -> {name: [filters]}."""
    if groups is None:
        return {}
    if not isinstance(groups, dict):
        raise TypeError(f"groups must be a dict {{name: filters}}, got {type(groups).__name__}")
    return {g: [f] if isinstance(f, str) else list(f) for g, f in groups.items()}


def _merge_group(spec, group, members, use_base, w, merged_params, key, out, report, mesh):
    """Merge the leaves of one named group as a single block (flattened and concatenated)."""
    gname = f"group:{group}"
    n = len(members[0][2])
    xs = [jnp.concatenate([m[2][i].reshape(-1) for m in members]) for i in range(n)]
    has_base = use_base and members[0][3] is not None
    b = jnp.concatenate([m[3].reshape(-1) for m in members]) if has_base else None
    stats = {}
    for sname in members[0][4]:
        if any(sname not in m[4] or m[4][sname][0].shape != m[2][0].shape for m in members):
            raise ValueError(f"{gname}: {sname} must be given, shaped like the tensors, for all")
        stats[sname] = [
            jnp.concatenate([m[4][sname][i].reshape(-1) for m in members]) for i in range(n)
        ]
    params = {k: resolve_param(v, gname, k) for k, v in merged_params.items()}
    if params["granularity"] != "tensor":
        raise ValueError(f"{gname}: a group is one block; it needs granularity='tensor'")
    merged, rep = _merge_leaf(spec, gname, xs, b, w, params, key, stats, mesh)
    offset = 0
    for j, name, mxs, _, _ in members:
        size = mxs[0].size
        out[j] = merged[offset : offset + size].reshape(mxs[0].shape).astype(mxs[0].dtype)
        report[name] = rep._replace(shape=tuple(mxs[0].shape))
        offset += size
    report[gname] = rep


def _host_or_device(x):
    """A leaf as an array without copying it here: JAX arrays stay on their device; anything
    else becomes a NumPy array, handed to the compiled leaf kernel as it is. On the CPU, JAX
    reads a NumPy array in place when its data start on a 64-byte boundary and otherwise
    copies it once per call (tensors memory-mapped from safetensors files are 8-byte aligned,
    so each input of a leaf is copied while that leaf is merged: O(N x largest tensor), see
    benchmarks/RESULTS_io.md). Non-float leaves stay NumPy: int64 position ids must not become
    int32 without x64."""
    return x if isinstance(x, jax.Array) else np.asarray(x)


def _copy_leaf(name, xs, b):
    ref = xs[0] if b is None else b
    for i, x in enumerate(xs):
        if not np.array_equal(x, ref):
            raise ValueError(
                f"tensor {name!r} ({x.dtype}) is not floating point, so it is copied, but "
                f"model {i} differs from the {'base' if b is not None else 'first model'}"
            )
    return ref


def _merge_leaf(spec, name, xs, b, w, leaf_params, key, leaf_stats, mesh=None):
    granularity = leaf_params.pop("granularity")
    leaf_params.pop("seed")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    shape = tuple(xs[0].shape)
    dtype = jnp.promote_types(jnp.result_type(*xs), jnp.float32)
    n_blocks = (
        1
        if granularity == "tensor" or len(shape) < 2
        else (shape[0] if granularity == "row" else shape[-1])
    )
    # Statistics shaped like the leaf are blocked with it; a method whose statistics have
    # their own shapes (stat_shapes_free: RegMean's (d_in, d_in) Grams, even for a square
    # kernel) gets them whole, which needs a single block.
    whole_stats = bool(spec.stat_shapes_free)
    for sname, arrs in leaf_stats.items():
        if whole_stats and n_blocks != 1:
            raise ValueError(
                f"tensor {name!r}: {sname} of shape {tuple(arrs[0].shape)} needs "
                "granularity='tensor'"
            )
    if mesh is not None:  # global arrays, each device holding its slice
        layout = leaf_spec(shape, mesh)
        xs = [place(x, mesh, layout) for x in xs]
        b = None if b is None else place(b, mesh, layout)
        leaf_stats = {
            sname: [place(a, mesh, PartitionSpec() if whole_stats else layout) for a in arrs]
            for sname, arrs in leaf_stats.items()
        }
    merged, info, checks = _leaf_kernel(
        spec.block_fn,
        granularity,
        tuple(sorted(leaf_params.items())),
        jnp.dtype(dtype),
        jnp.dtype(xs[0].dtype),
        whole_stats,
        mesh,
        tuple(xs),
        b,
        jnp.asarray(w),
        key,
        leaf_stats,
    )
    finite = np.asarray(checks["finite"])
    if not finite.all():
        raise ValueError(f"tensor {name!r}: model {int(np.argmin(finite))} has NaN or Inf values")
    if b is not None and not bool(checks["base_finite"]):
        raise ValueError(f"tensor {name!r}: the base has NaN or Inf values")
    for sname in leaf_stats:
        if not bool(checks[f"{sname}_finite"]):
            raise ValueError(f"tensor {name!r}: {sname} has NaN or Inf values")
    mean_norm = float(checks["mean_norm"])
    rep = LeafReport(
        method=spec.name,
        shape=shape,
        blocks=n_blocks,
        num_steps=int(jnp.max(info["num_steps"])) if "num_steps" in info else 0,
        grad_norm=float(jnp.max(info["grad_norm"])) if "grad_norm" in info else 0.0,
        converged=bool(jnp.all(info["converged"])) if "converged" in info else True,
        norm_ratio=float(checks["result_norm"]) / mean_norm if mean_norm > 0 else 1.0,
        angle_spread=float(checks["spread"]),
    )
    return merged, rep
