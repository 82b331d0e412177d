"""Table B2: Paper B's toy problem (f(x) = a b x, experts (1, 2) and (-1, -2), target w = 2)
under every averaging rule, with a GL(1) reparametrisation check, and the reductions of
Fisher merging / linear / karcher to Paper B's ``frechet`` (see experiments/b2_toy.py).

Commands (2-core CPU, no data, no training; the time is almost all XLA compilation):

    python experiments/run.py --config=configs/b2_toy.py:smoke --workdir=runs/b2_smoke
        # 19 s measured: 3 rescalings, 3 experts x 2 tensors
    python experiments/run.py --config=configs/b2_toy.py --workdir=runs/b2
        # 32-38 s measured (toy 5 s, reductions 33 s): 8 rescalings, 4 experts x 3 tensors
    python experiments/run.py --config=configs/b2_toy.py --sweep --workdir=runs/b2_sweep
        # seeds {0, 1, 2}: 34 s in all (later seeds reuse the compiled code: 0.2 s each)
    python experiments/make_tables.py --runs=runs/b2_sweep --out=results

The same numbers for seed 0 come from the public API alone in notebooks/02_reproduce_b2.ipynb.
Overrides: ``--config.num_experts=8``, ``--config.toy.num_rescalings=32``,
``--config.toy.lora_methods='("geomerge(metric=induced)", "lora_linear")'``.
"""

import ml_collections

TOY_ROWS = [
    "euclidean average",
    "diagonal Fisher average",
    "full Fisher average",
    "geomerge (quotient mean)",
    "lora_linear",
    "lora_svd",
    "lora_cat",
]
REDUCTION_ROWS = [
    "frechet(fisher, frozen_metric) == fisher",
    "frechet(fisher, first_order) == fisher",
    "frechet(identity, frozen_metric) == linear",
    "frechet(euclidean, exact) == linear",
    "frechet(norm_sphere, exact) == karcher",
    "fisher == float64 NumPy closed form",
    "fisher != linear (control: must differ)",
]


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "b2_toy"
    c.name = "b2_toy"
    c.seed = 0
    c.num_experts = 4  # of the reduction problem (the toy has its two)
    c.toy = ml_collections.ConfigDict(
        {
            "num_samples": 4096,  # inputs x ~ N(0, 1) of the Fisher E_x[grad f grad f^T]
            "num_rescalings": 8,  # random GL(1) representatives of the two experts
            "max_scale": 4.0,  # |l| log-uniform in [1/4, 4], random sign
            # |w' - w| allowed for "invariant": float32 at |w| = 2 (ulp 2.4e-7), ~40 ulps
            "invariance_tol": 1e-5,
            # LoRA methods on the 1 x 1 adapters (normalize=True); "geomerge" is the quotient
            # Fréchet mean (row "geomerge (quotient mean)")
            "lora_methods": ("geomerge", "lora_linear", "lora_svd", "lora_cat"),
        }
    )
    c.reduction = ml_collections.ConfigDict(
        {
            # (name, shape) of each tensor of the random experts
            "tensors": (("dense/kernel", (32, 16)), ("dense/bias", (16,)), ("head", (16, 4))),
            "spread": 0.5,  # theta_i = theta_0 + spread * N(0, 1)
            # tolerance = tol_ulps float32 ulps (eps = 1.19e-7) of max |theta|: the rounding of
            # an N-term weighted mean in two summation orders, with a wide margin
            "tol_ulps": 64,
        }
    )
    c.tables = [
        {
            "name": "B2_toy",
            "title": (
                "Paper B toy problem f(x) = a b x, experts (1, 2) and (-1, -2): merged w = a b "
                "(target 2) and invariance under random GL(1) rescalings (l a, b / l)"
            ),
            "rows": "method",
            "values": ["w", "error", "max_w_change", "invariant"],
            "where": {"part": "toy"},
            "row_order": TOY_ROWS,
            "format": ".4f",
            "formats": {"error": ".2e", "max_w_change": ".2e", "invariant": "yes/no"},
        },
        {
            "name": "B2_reduction",
            "title": (
                "Fisher merging, linear and karcher as Paper B's frechet: max abs difference "
                "on random experts (float32)"
            ),
            "rows": "claim",
            "values": ["max_abs_diff", "tol", "holds"],
            "where": {"part": "reduction"},
            "row_order": REDUCTION_ROWS,
            "format": ".2e",
            "formats": {"holds": "yes/no"},
        },
    ]
    if arg == "smoke":
        c.num_experts = 3
        c.toy.num_samples = 512
        c.toy.num_rescalings = 3
        c.reduction.tensors = (("kernel", (8, 4)), ("bias", (4,)))
    elif arg:
        raise ValueError(f"configs/b2_toy.py takes '' or 'smoke', got {arg!r}")
    return c


def get_sweep(arg: str = ""):
    """Seeds {0, 1, 2} (smoke: one)."""
    return [{"seed": s} for s in ((0,) if arg == "smoke" else (0, 1, 2))]
