"""Merge random experts of a small MLP with several methods and print a per-tensor report.

The experts are a random base plus random task vectors (near-orthogonal, as for unrelated
tasks). Each method runs through ``manifold_merge.merge``; the report shows what the geometry
changes: the norm ratio ||merged|| / mean_i ||theta_i|| of what was averaged (Euclidean
averaging of near-orthogonal task vectors shrinks it towards 1/sqrt(N); the spherical proxy
keeps it at 1), and the Karcher solver's iterations and convergence.

    python experiments/demo.py --config=configs/demo.py [--config.num_experts=8] [--workdir=DIR]
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import manifold_merge as mm  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Demo configuration.")
_WORKDIR = flags.DEFINE_string("workdir", None, "If set, write report.json there.")


def random_mlp(key, widths, scale=1.0):
    """Parameters of an MLP as a Flax-style nested dict, with LeCun-normal kernels."""
    params = {}
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        kk, kb, key = jax.random.split(key, 3)
        params[f"Dense_{i}"] = {
            "kernel": scale * jax.random.normal(kk, (n_in, n_out)) / np.sqrt(n_in),
            "bias": scale * 0.1 * jax.random.normal(kb, (n_out,)),
        }
    return params


def method_params(method, config):
    if method == "task_arithmetic":
        return {"normalize": True}
    if method in ("ties", "dare_ties", "dare_linear"):
        return {"density": config.density}
    if method in ("karcher", "fisher_rao_karcher"):
        return config.karcher.to_dict()
    return {}


def run(config) -> dict:
    """Returns {method: {tensor: LeafReport as dict}}."""
    if config.mode not in ("task_vectors", "full"):
        raise ValueError(f"config.mode must be 'task_vectors' or 'full', got {config.mode!r}")
    unknown = sorted(set(config.methods) - set(mm.list_methods()))
    if unknown:
        raise ValueError(f"config.methods: unknown {unknown}; known: {mm.list_methods()}")
    kb, ke = jax.random.split(jax.random.key(config.seed))
    widths = tuple(config.widths)
    base = random_mlp(kb, widths)
    n = config.num_experts
    weights = list(config.weights) if len(config.weights) else None
    experts = [
        jax.tree.map(lambda b, t: b + t, base, random_mlp(k, widths, config.task_vector_scale))
        for k in jax.random.split(ke, n)
    ]
    reports = {}
    for method in config.methods:
        spec = mm.merging.get_method(method)
        use_base = config.mode == "task_vectors" or spec.requires_base
        with warnings.catch_warnings(record=True):  # non-convergence shows in the report
            warnings.simplefilter("always")
            res = mm.merge(
                method,
                experts,
                base=base if use_base else None,
                weights=weights,
                **method_params(method, config),
            )
        reports[method] = {k: r._asdict() for k, r in res.report.items()}
    return reports


def format_report(reports, config) -> str:
    methods = list(reports)
    tensors = list(next(iter(reports.values())))
    head = (
        f"manifold_merge demo: {config.num_experts} experts, mode={config.mode}\n"
        "norm ratio ||merged|| / mean_i ||theta_i|| per method"
        + (" (of task vectors)" if config.mode == "task_vectors" else "")
        + "\n\n"
    )
    cols = ["tensor", "shape", "spread"] + methods
    if "karcher" in reports:
        cols += ["karcher steps", "converged"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for t in tensors:
        first = reports[methods[0]][t]
        row = [t, "x".join(map(str, first["shape"])), f"{first['angle_spread']:.3f}"]
        row += [f"{reports[m][t]['norm_ratio']:.3f}" for m in methods]
        if "karcher" in reports:
            k = reports["karcher"][t]
            row += [str(k["num_steps"]), "yes" if k["converged"] else "NO"]
        lines.append(" | ".join(row))
    foot = "\nspread = largest pairwise angle (rad) between the averaged vectors."
    return head + "\n".join(lines) + foot


def main(argv):
    del argv
    config = _CONFIG.value
    reports = run(config)
    print(format_report(reports, config))
    if _WORKDIR.value:
        os.makedirs(_WORKDIR.value, exist_ok=True)
        out = Path(_WORKDIR.value) / "report.json"
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"config": config.to_dict(), "reports": reports}, indent=2))
        os.replace(tmp, out)  # never leave a half-written report
        print(f"wrote {out}")
    bad = [t for m in reports.values() for t, r in m.items() if not r["converged"]]
    if bad:
        print(f"WARNING: the solver did not converge on {sorted(set(bad))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
