"""Merge random experts of a small MLP two ways and print a per-tensor report.

Each tensor is one block: the Karcher mean on the chosen manifold (by default Paper A's
spherical proxy, NormSphere: directions averaged on the sphere, norms by their weighted mean)
against the weighted Euclidean average. The report shows what the geometry changes: the norm
ratio ||merged|| / mean_i ||theta_i|| (Euclidean averaging of near-orthogonal task vectors
shrinks it towards 1/sqrt(N)), the solver's iterations and convergence.

    python experiments/demo.py --config=configs/demo.py [--config.num_experts=8] [--workdir=DIR]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
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


def merge_leaf(manifold_name, manifold_kwargs, solver, stacked, weights):
    """Karcher mean of one stacked leaf (N, *shape), each expert's tensor being one point."""
    flat = stacked.reshape(stacked.shape[0], -1)
    manifold = mm.get_manifold(manifold_name, dim=flat.shape[1], **manifold_kwargs)
    res = mm.karcher_mean(manifold, flat, weights, solver=solver)
    return res._replace(mean=res.mean.reshape(stacked.shape[1:]))


def spread(flat):
    """Largest pairwise angle (rad) between the rows of ``flat``."""
    n = flat.shape[0]
    s = mm.Sphere(flat.shape[1] - 1)
    units = flat / jnp.linalg.norm(flat, axis=1, keepdims=True)
    return max(float(s.dist(units[i], units[j])) for i in range(n) for j in range(i + 1, n))


def run(config) -> list[dict]:
    if config.mode not in ("task_vectors", "full"):
        raise ValueError(f"config.mode must be 'task_vectors' or 'full', got {config.mode!r}")
    key = jax.random.key(config.seed)
    kb, ke = jax.random.split(key)
    base = random_mlp(kb, tuple(config.widths))
    n = config.num_experts
    weights = np.asarray(config.weights, np.float64) if len(config.weights) else np.ones(n)
    weights = mm.solvers.validate_weights(weights, n)
    widths, scale = tuple(config.widths), config.task_vector_scale
    experts = [
        jax.tree.map(lambda b, t: b + t, base, random_mlp(k, widths, scale))
        for k in jax.random.split(ke, n)
    ]
    solver = mm.KarcherSolver(**config.solver.to_dict())
    rows = []
    base_leaves = jax.tree_util.tree_flatten_with_path(base)[0]
    expert_leaves = [jax.tree.leaves(e) for e in experts]
    for i, (path, b) in enumerate(base_leaves):
        name = jax.tree_util.keystr(path)
        stacked = jnp.stack([leaves[i] for leaves in expert_leaves])
        points = stacked - b if config.mode == "task_vectors" else stacked
        res = merge_leaf(config.manifold, config.manifold_kwargs.to_dict(), solver, points, weights)
        linear = jnp.tensordot(jnp.asarray(weights, points.dtype), points, axes=1)
        mean_norm = float(jnp.mean(jnp.linalg.norm(points.reshape(n, -1), axis=1)))
        rows.append(
            {
                "tensor": name,
                "shape": list(b.shape),
                "karcher_steps": int(res.num_steps),
                "karcher_grad_norm": float(res.grad_norm),
                "converged": bool(res.converged),
                "norm_ratio_karcher": float(jnp.linalg.norm(res.mean)) / mean_norm,
                "norm_ratio_linear": float(jnp.linalg.norm(linear)) / mean_norm,
                "angle_spread_rad": spread(points.reshape(n, -1)),
            }
        )
    return rows


def format_report(rows, config) -> str:
    head = (
        f"manifold_merge demo: {config.num_experts} experts, mode={config.mode}, "
        f"manifold={config.manifold} {config.manifold_kwargs.to_dict()}\n"
    )
    cols = ["tensor", "shape", "steps", "grad", "conv", "norm_karcher", "norm_linear", "spread"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        lines.append(
            " | ".join(
                [
                    r["tensor"],
                    "x".join(map(str, r["shape"])),
                    str(r["karcher_steps"]),
                    f"{r['karcher_grad_norm']:.1e}",
                    "yes" if r["converged"] else "NO",
                    f"{r['norm_ratio_karcher']:.3f}",
                    f"{r['norm_ratio_linear']:.3f}",
                    f"{r['angle_spread_rad']:.3f}",
                ]
            )
        )
    foot = (
        "\nnorm_* = ||merged|| / mean_i ||theta_i||; spread = largest pairwise angle (rad) of the"
        " merged blocks."
    )
    return head + "\n".join(lines) + foot


def main(argv):
    del argv
    config = _CONFIG.value
    rows = run(config)
    print(format_report(rows, config))
    if _WORKDIR.value:
        os.makedirs(_WORKDIR.value, exist_ok=True)
        out = Path(_WORKDIR.value) / "report.json"
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"config": config.to_dict(), "tensors": rows}, indent=2))
        os.replace(tmp, out)  # never leave a half-written report
        print(f"wrote {out}")
    if not all(r["converged"] for r in rows):
        print("WARNING: some tensors did not converge", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
