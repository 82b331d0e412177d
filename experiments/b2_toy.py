"""Table B2: Paper B's toy problem, and Fisher merging as a Fréchet mean, as numbers.

1. **Toy** (``part="toy"``): f(x) = a b x with the GL(1) symmetry (a, b) ~ (l a, b / l); the
   experts (1, 2) and (-1, -2) are one function, w = a b = 2. Each rule merges the two experts
   with equal weights and reports the merged w, its error |w - 2| and whether w stays put
   when the experts are replaced by random gauge-equivalent representatives
   (l_1 a_1, b_1 / l_1), (l_2 a_2, b_2 / l_2), |l_i| log-uniform in [1/s, s] with a random
   sign, over ``toy.num_rescalings`` draws (``invariant``: max |w' - w| <= ``toy.invariance_tol``;
   each draw is also a ``part="toy_gl1"`` record). Rules: the Euclidean average, the
   diagonal and the full Fisher-weighted averages (the Gaussian-likelihood Fisher over (a, b)
   by autodiff, recomputed at each representative; the full one is (sum F_i)^+ sum F_i theta_i
   in float64, as in ``experiments/lora_toy.py``, whose pieces are repeated here), and LoRA
   methods on the 1 x 1 adapters ``LoraFactors(b=[[b]], a=[[a]])`` with ``normalize=True``
   (``geomerge``: the quotient Fréchet mean).
2. **Reductions** (``part="reduction"``): N = ``num_experts`` random experts (several
   tensors, theta_i = theta_0 + spread * noise) with random positive diagonal Fishers and
   random weights; the max abs difference, over every entry of every tensor, between two
   merges that ALGORITHMS.md sections 1 and 5 say are the same rule, against a float32
   tolerance of ``reduction.tol_ulps`` ulps of the largest |theta| (recorded as ``tol``), and
   the float32 ``fisher`` merge against an independent float64 NumPy closed form. A control
   row (fisher vs linear) must *differ* by more than the tolerance.

Random draws, so that ``notebooks/02_reproduce_b2.ipynb`` can repeat them: the Fisher's
inputs are ``jax.random.normal(jax.random.key(seed), (toy.num_samples,))`` (as in
``lora_toy.run_toy``); the rescalings come from ``np.random.default_rng([seed, 0])`` (signs
of shape (T, 2), then log-magnitudes of shape (T, 2)); the reduction problem from
``np.random.default_rng([seed, 1])`` (see :func:`reduction_problem`).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import check_keys, parse_method
from manifold_merge import merge
from manifold_merge.manifolds import LoraFactors

KEYS = ("experiment", "name", "seed", "num_experts", "toy", "reduction", "tables", "cache_dir")
TARGET_W = 2.0
EPS32 = float(np.finfo(np.float32).eps)
#: Labels of the toy rows that are not LoRA method entries.
EUCLIDEAN, DIAG_FISHER, FULL_FISHER = (
    "euclidean average",
    "diagonal Fisher average",
    "full Fisher average",
)
QUOTIENT = "geomerge (quotient mean)"
#: Paper B's experts (a, b), as in experiments/lora_toy.py. That module is not imported: it
#: defines an absl --workdir flag at import, which clashes with experiments/run.py's.
EXPERTS = ((1.0, 2.0), (-1.0, -2.0))

#: (claim, left merge, right merge): (method, params) pairs run on the same experts.
CLAIMS = (
    (
        "frechet(fisher, frozen_metric) == fisher",
        ("frechet", {"metric": "fisher", "approx": "frozen_metric"}),
        ("fisher", {}),
    ),
    (
        "frechet(fisher, first_order) == fisher",
        ("frechet", {"metric": "fisher", "approx": "first_order"}),
        ("fisher", {}),
    ),
    (
        "frechet(identity, frozen_metric) == linear",
        ("frechet", {"metric": "identity", "approx": "frozen_metric"}),
        ("linear", {}),
    ),
    (
        "frechet(euclidean, exact) == linear",
        ("frechet", {"manifold": "euclidean", "approx": "exact"}),
        ("linear", {}),
    ),
    (
        "frechet(norm_sphere, exact) == karcher",
        ("frechet", {"manifold": "norm_sphere", "approx": "exact"}),
        ("karcher", {}),
    ),
)
NUMPY_CLAIM = "fisher == float64 NumPy closed form"
CONTROL_CLAIM = "fisher != linear (control: must differ)"


# ------------------------------------------------------------------------------------ toy
def toy_model(params, x):
    return params["a"] * params["b"] * x


def toy_fisher(params, xs):
    """The Gaussian-likelihood Fisher E_x[grad f grad f^T] over (a, b), by autodiff (the same
    computation as ``experiments/lora_toy.fisher``)."""
    grads = jax.vmap(jax.grad(toy_model), in_axes=(None, 0))(params, xs)
    g = jnp.stack([grads["a"], grads["b"]], axis=1)
    return g.T @ g / xs.shape[0]


def toy_label(entry: str) -> str:
    return QUOTIENT if entry == "geomerge" else entry


def rescalings(rng: np.random.Generator, num: int, max_scale: float) -> np.ndarray:
    """(num, 2) random GL(1) elements l: a random sign times exp(U(-log s, log s))."""
    signs = rng.choice(np.array([-1.0, 1.0]), size=(num, 2))
    logs = rng.uniform(-np.log(max_scale), np.log(max_scale), size=(num, 2))
    return signs * np.exp(logs)


def rescale(experts, scales) -> list[tuple[float, float]]:
    """(a, b) -> (l a, b / l) per expert: the same functions, other representatives."""
    return [(float(lam * a), float(b / lam)) for (a, b), lam in zip(experts, scales)]


def toy_ws(experts, xs, lora_methods=("geomerge",)) -> dict[str, float]:
    """The merged w = a b of each rule (equal weights) for experts [(a, b), ...]."""
    params = [{"a": jnp.float32(a), "b": jnp.float32(b)} for a, b in experts]
    fishers = [toy_fisher(p, xs) for p in params]
    out = {}
    euclid = merge("linear", params).params
    out[EUCLIDEAN] = float(euclid["a"] * euclid["b"])
    diag = [{"a": f[0, 0], "b": f[1, 1]} for f in fishers]
    dfish = merge("fisher", params, fishers=diag).params
    out[DIAG_FISHER] = float(dfish["a"] * dfish["b"])
    thetas = [np.array([a, b], np.float64) for a, b in experts]
    f64 = [np.asarray(f, np.float64) for f in fishers]
    full = np.linalg.pinv(sum(f64)) @ sum(f @ t for f, t in zip(f64, thetas))
    out[FULL_FISHER] = float(full[0] * full[1])
    adapters = [
        LoraFactors(jnp.array([[b]], jnp.float32), jnp.array([[a]], jnp.float32))
        for a, b in experts
    ]
    for entry in lora_methods:
        label, name, kw = parse_method(entry)
        merged = merge(name, adapters, normalize=True, **kw).params
        out[toy_label(label)] = float((merged.b @ merged.a)[0, 0])
    return out


def run_toy_part(config) -> list[dict]:
    toy = config.toy
    check_keys(
        toy,
        ("num_samples", "num_rescalings", "max_scale", "invariance_tol", "lora_methods"),
        "b2_toy experiment: toy",
    )
    xs = jax.random.normal(jax.random.key(config.seed), (toy.num_samples,))
    base = toy_ws(EXPERTS, xs, toy.lora_methods)
    scales = rescalings(np.random.default_rng([config.seed, 0]), toy.num_rescalings, toy.max_scale)
    trials = [toy_ws(rescale(EXPERTS, ls), xs, toy.lora_methods) for ls in scales]
    records = []
    for method, w in base.items():
        change = max(abs(t[method] - w) for t in trials)
        records.append(
            {
                "part": "toy",
                "method": method,
                "w": w,
                "target_w": TARGET_W,
                "error": abs(w - TARGET_W),
                "max_w_change": change,
                "invariant": bool(change <= toy.invariance_tol),
                "invariance_tol": toy.invariance_tol,
                "num_rescalings": toy.num_rescalings,
                "seed": config.seed,
            }
        )
    for k, (ls, t) in enumerate(zip(scales, trials)):
        for method, w in t.items():
            records.append(
                {
                    "part": "toy_gl1",
                    "method": method,
                    "trial": k,
                    "l1": float(ls[0]),
                    "l2": float(ls[1]),
                    "w": w,
                    "w_change": abs(w - base[method]),
                    "seed": config.seed,
                }
            )
    return records


# ------------------------------------------------------------------------------ reduction
def reduction_problem(seed: int, tensors, num_experts: int, spread: float):
    """Experts, diagonal Fishers and weights, drawn from ``np.random.default_rng([seed, 1])``
    in this order: theta_0 per tensor; per expert, its noise per tensor; per expert, its
    Fisher per tensor (exp of a standard normal); the weights (U(0.5, 1.5), one per expert).
    Returned as float64 NumPy dicts {tensor name: array} and a float64 weight vector."""
    rng = np.random.default_rng([seed, 1])
    shapes = {name: tuple(shape) for name, shape in tensors}
    base = {k: rng.normal(size=s) for k, s in shapes.items()}
    experts = [
        {k: base[k] + spread * rng.normal(size=s) for k, s in shapes.items()}
        for _ in range(num_experts)
    ]
    fishers = [
        {k: np.exp(rng.normal(size=s)) for k, s in shapes.items()} for _ in range(num_experts)
    ]
    weights = rng.uniform(0.5, 1.5, size=num_experts)
    return experts, fishers, weights


def fisher_closed_form(experts, fishers, weights, floor: float = 1e-6) -> dict:
    """sum_i w_i F_i theta_i / sum_i w_i F_i element-wise in float64 (F_i floored as
    ``fisher`` does), independent of manifold_merge."""
    out = {}
    for k in experts[0]:
        f = [
            w * np.maximum(np.asarray(fi[k], np.float64), floor) for w, fi in zip(weights, fishers)
        ]
        num = sum(fi * np.asarray(e[k], np.float64) for fi, e in zip(f, experts))
        out[k] = num / sum(f)
    return out


def max_abs_diff(x: dict, y: dict) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x[k], np.float64) - np.asarray(y[k], np.float64))))
        for k in x
    )


def run_reduction_part(config) -> list[dict]:
    red = config.reduction
    check_keys(red, ("tensors", "spread", "tol_ulps"), "b2_toy experiment: reduction")
    experts64, fishers64, weights = reduction_problem(
        config.seed, red.tensors, config.num_experts, red.spread
    )
    as32 = [{k: jnp.asarray(v, jnp.float32) for k, v in d.items()} for d in experts64]
    fishers32 = [{k: jnp.asarray(v, jnp.float32) for k, v in d.items()} for d in fishers64]
    w = [float(x) for x in weights]
    scale = max(float(jnp.max(jnp.abs(v))) for d in as32 for v in d.values())
    tol = red.tol_ulps * EPS32 * max(1.0, scale)
    cache = {}

    def run(method, params):
        key = (method, tuple(sorted(params.items())))
        if key not in cache:
            kw = {"fishers": fishers32} if method in ("fisher", "frechet") else {}
            cache[key] = merge(method, as32, weights=w, **kw, **params).params
        return cache[key]

    common = {
        "part": "reduction",
        "tol": tol,
        "tol_rule": f"{red.tol_ulps} float32 ulps of max|theta| = {scale:.3g}",
        "dtype": "float32",
        "num_experts": config.num_experts,
        "num_tensors": len(red.tensors),
        "seed": config.seed,
    }
    records = []
    for claim, (lm, lp), (rm, rp) in CLAIMS:
        diff = max_abs_diff(run(lm, lp), run(rm, rp))
        records.append({**common, "claim": claim, "max_abs_diff": diff, "holds": diff <= tol})
    # the reference sees the float32-rounded inputs, so only the arithmetic differs
    ref = fisher_closed_form(
        [{k: np.asarray(v, np.float64) for k, v in d.items()} for d in as32],
        [{k: np.asarray(v, np.float64) for k, v in d.items()} for d in fishers32],
        np.asarray(np.float32(weights), np.float64),
    )
    diff = max_abs_diff(run("fisher", {}), ref)
    records.append({**common, "claim": NUMPY_CLAIM, "max_abs_diff": diff, "holds": diff <= tol})
    diff = max_abs_diff(run("fisher", {}), run("linear", {}))
    records.append({**common, "claim": CONTROL_CLAIM, "max_abs_diff": diff, "holds": diff > tol})
    return records


def run(config, workdir: str) -> dict:
    """Both parts of table B2; ``workdir`` is unused (run.py writes the records there)."""
    del workdir
    check_keys(config, KEYS, "b2_toy experiment")
    start = time.perf_counter()
    toy = run_toy_part(config)
    toy_s = time.perf_counter() - start
    reduction = run_reduction_part(config)
    return {
        "records": toy + reduction,
        "toy_runtime_s": toy_s,
        "reduction_runtime_s": time.perf_counter() - start - toy_s,
        "runtime_s": time.perf_counter() - start,
    }
