"""Paper B's toy problem: why LoRA merging must respect the GL(r) symmetry.

The model f(x) = a * b * x has the symmetry (a, b) ~ (l a, b / l); only w = a * b matters. Two
experts (a, b) = (1, 2) and (-1, -2) are the same function (w = 2). Averaging coordinates gives
(0, 0), so w = 0; Fisher-weighted averaging also gives w = 0 (the Fisher
F = E[x^2] [[b^2, a b], [a b, a^2]] is singular along the orbit and weights both experts alike);
the quotient Fréchet mean (``geomerge``, a 1 x 1 LoRA adapter with b and a as its factors)
returns w = 2.

    python experiments/lora_toy.py [--workdir=DIR]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import manifold_merge as mm  # noqa: E402
from manifold_merge.manifolds import LoraFactors  # noqa: E402

EXPERTS = ((1.0, 2.0), (-1.0, -2.0))  # (a, b)


def model(params, x):
    return params["a"] * params["b"] * x


def fisher(params, xs):
    """The Gaussian-likelihood Fisher E_x[grad f grad f^T] over (a, b), by autodiff."""
    grads = jax.vmap(jax.grad(model), in_axes=(None, 0))(params, xs)
    g = jnp.stack([grads["a"], grads["b"]], axis=1)
    return g.T @ g / xs.shape[0]


def run_toy(num_samples: int = 4096, seed: int = 0) -> dict:
    """The merged predictor w = a * b under each rule, and the quantities behind it."""
    xs = jax.random.normal(jax.random.key(seed), (num_samples,))
    experts = [{"a": jnp.asarray(a), "b": jnp.asarray(b)} for a, b in EXPERTS]
    fishers = [fisher(p, xs) for p in experts]

    euclid = mm.merge("linear", experts).params
    diag = [{"a": f[0, 0], "b": f[1, 1]} for f in fishers]
    diag_fisher = mm.merge("fisher", experts, fishers=diag).params
    # Full Fisher-weighted average (sum F_i)^+ sum F_i theta_i: F_1 + F_2 is singular here.
    thetas = [np.array([float(p["a"]), float(p["b"])]) for p in experts]
    f_sum = sum(np.asarray(f, np.float64) for f in fishers)
    full = np.linalg.pinv(f_sum) @ sum(np.asarray(f) @ t for f, t in zip(fishers, thetas))

    adapters = [LoraFactors(jnp.array([[b]]), jnp.array([[a]])) for a, b in EXPERTS]
    quotient = mm.merge("geomerge", adapters, normalize=True).params
    return {
        "experts_w": [a * b for a, b in EXPERTS],
        "euclidean_w": float(euclid["a"] * euclid["b"]),
        "fisher_diagonal_w": float(diag_fisher["a"] * diag_fisher["b"]),
        "fisher_full_w": float(full[0] * full[1]),
        "fisher_sum_rank": int(np.linalg.matrix_rank(f_sum)),
        "quotient_w": float((quotient.b @ quotient.a)[0, 0]),
    }


def main(argv):
    del argv
    out = run_toy()
    print("Paper B toy problem: f(x) = a b x, experts (1, 2) and (-1, -2), both w = 2")
    print(f"{'rule':<28}{'merged w':>10}")
    for label, k in [
        ("Euclidean average", "euclidean_w"),
        ("Fisher-weighted (diagonal)", "fisher_diagonal_w"),
        ("Fisher-weighted (full)", "fisher_full_w"),
        ("quotient Fréchet mean", "quotient_w"),
    ]:
        print(f"{label:<28}{out[k]:>10.4f}")
    workdir = flags.FLAGS.workdir
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "toy.json")
        with open(path + ".tmp", "w") as f:
            json.dump(out, f, indent=2)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    # Defined here, not at import: importing this module (b2_toy does) defines no flags.
    flags.DEFINE_string("workdir", None, "If set, write toy.json there.")
    app.run(main)
