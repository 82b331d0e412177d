"""Pieces every experiment shares: method specs, caches, run folders, function-space metrics.

* :func:`parse_method` turns a config's method entry -- ``"ties"``, ``"ties(density=0.3)"``,
  ``"frechet(manifold=norm_sphere, approx=first_order)"`` -- into ``(label, name, params)``;
  the label is the entry itself, so tables show exactly what ran.
* :func:`cache_dir` is where trained bases and experts are kept (by config hash, see
  :func:`manifold_merge.training.cached`), shared across run folders so that sweeps and table
  re-renders never retrain.
* :func:`write_json` writes a file atomically (run folders are never half written).
* :func:`function_space` computes the KL and Fisher–Rao columns of ALGORITHMS.md section 8.
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from manifold_merge import diagnostics
from manifold_merge.io.safetensors import atomic_write
from manifold_merge.merging import list_methods

_METHOD = re.compile(r"^\s*([A-Za-z_][\w]*)\s*(?:\((.*)\))?\s*$")


def _value(text: str) -> Any:
    text = text.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string value (manifold=norm_sphere)


def parse_method(entry: str) -> tuple[str, str, dict]:
    """``"name(k=v, ...)"`` -> ``(entry, name, {k: v})``; values are Python literals or words.

    >>> parse_method("ties(density=0.3, lambda=1.0)")
    ('ties(density=0.3, lambda=1.0)', 'ties', {'density': 0.3, 'lambda': 1.0})
    >>> parse_method("frechet(manifold=norm_sphere, approx=first_order)")[2]
    {'manifold': 'norm_sphere', 'approx': 'first_order'}
    """
    m = _METHOD.match(entry)
    if not m:
        raise ValueError(f"method entry {entry!r} is not 'name' or 'name(key=value, ...)'")
    name, args = m.group(1), m.group(2)
    if name not in list_methods():
        raise ValueError(f"method entry {entry!r}: unknown method {name!r}; see list_methods()")
    params = {}
    for part in filter(None, (p.strip() for p in (args or "").split(","))):
        if "=" not in part:
            raise ValueError(f"method entry {entry!r}: {part!r} is not key=value")
        k, v = part.split("=", 1)
        params[k.strip()] = _value(v)
    return entry.strip(), name, params


def cache_dir(config) -> Path:
    """``config.cache_dir``, else ``$MM_CACHE_DIR``, else ``~/.cache/manifold_merge/runs``."""
    path = config.get("cache_dir") or os.environ.get("MM_CACHE_DIR")
    return Path(path or Path.home() / ".cache" / "manifold_merge" / "runs").expanduser()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (temporary file + rename)."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n"
    atomic_write(path, lambda f: f.write(text), mode="w")


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, set)):
        return list(x)
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def function_space(expert_logits: Sequence[np.ndarray], merged_logits: np.ndarray) -> dict:
    """KL from each expert to the merged model, and the Fisher–Rao distance of the merged
    predictions to the barycenter of the experts', on the same inputs.

    Args:
        expert_logits: N arrays (num_examples, K), the experts' logits on shared inputs.
        merged_logits: (num_examples, K), the merged model's logits on those inputs.

    Returns:
        ``{"kl": mean_i KL(p_i || p_merged), "fr_distance": mean_x d_FR(p_merged, barycenter)}``.
    """
    kl = float(np.mean([diagnostics.mean_kl(e, merged_logits) for e in expert_logits]))
    probs = [softmax(e) for e in expert_logits]
    fr = diagnostics.distance_to_barycenter(probs, softmax(merged_logits))
    return {"kl": kl, "fr_distance": fr}


def mean_norm_ratio(merged: Any, experts: Sequence[Any], base: Any) -> float:
    """Mean over tensors of ||merged - base|| / mean_i ||theta_i - base|| (task vectors)."""
    ratios = diagnostics.norm_ratio(merged, list(experts), base=base)
    finite = [r for r in ratios.values() if np.isfinite(r)]
    return float(np.mean(finite)) if finite else float("nan")


def check_keys(config: Mapping, allowed: Sequence[str], where: str) -> None:
    """Refuse config keys an experiment does not read (a typo would silently do nothing)."""
    import difflib

    for k in config:
        if k not in allowed:
            close = difflib.get_close_matches(k, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{where}: unknown config key {k!r}{hint}")


def task_records(label, names, accs, expert_accs, kls, frs=None) -> tuple[list, dict]:
    """Per-task records of one model and its ``task="avg"`` summary: accuracy, normalised
    accuracy (model / expert; 0 when the expert scores 0), KL from the expert, and the
    Fisher–Rao distance to the experts' barycenter when ``frs`` gives it per task."""
    norm = [a / e if e > 0 else 0.0 for a, e in zip(accs, expert_accs)]
    rows = []
    for i, name in enumerate(names):
        row = {"method": label, "task": name, "accuracy": accs[i]}
        row.update(normalized_accuracy=norm[i], kl=kls[i])
        if frs is not None:
            row["fr_distance"] = frs[i]
        rows.append(row)
    avg = {"method": label, "task": "avg", "accuracy": float(np.mean(accs))}
    avg.update(normalized_accuracy=float(np.mean(norm)), kl=float(np.mean(kls)))
    if frs is not None:
        avg["fr_distance"] = float(np.mean(frs))
    return rows, avg


def quiet_logs() -> None:
    """Progress bars and the runner's own lines only: library INFO logs (Orbax's checkpoint
    chatter, JAX's backend probing) are raised to WARNING. Called by the scripts' mains."""
    from absl import logging as absl_logging  # noqa: PLC0415

    absl_logging.set_verbosity(absl_logging.WARNING)
