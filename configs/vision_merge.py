"""Vision merging: an MLP backbone pretrained on Fashion-MNIST + MNIST + digits, N experts
fully fine-tuned on (rotated) tasks, merged with every full-weight method.

Commands (2-core CPU; the first run trains and caches the base and experts, later runs and
sweeps reuse them):

    python experiments/run.py --config=configs/vision_merge.py:smoke --workdir=runs/vm_smoke
        # 25 s measured: 2 experts, tiny data, 5 methods
    python experiments/run.py --config=configs/vision_merge.py --workdir=runs/vm
        # 119 s measured (2-core CPU, cold cache): 4 experts, 13 methods
    python experiments/run.py --config=configs/vision_merge.py --sweep --workdir=runs/vm_sweep
        # N in {2, 4, 6, 8} x 3 seeds: 12 runs, each about as long as one run above
    python experiments/make_tables.py --runs=runs/vm_sweep --out=results

Overrides: ``--config.num_experts=8``, ``--config.expert.steps=600``,
``--config.methods='("linear", "karcher(max_iter=200)")'``.
"""

import ml_collections

#: Every full-weight method, as method entries ("name" or "name(key=value, ...)").
METHODS = (
    "linear",
    "task_arithmetic(lambda=0.5)",
    "ties(density=0.3, lambda=1.0)",
    "dare_ties(density=0.3, lambda=1.0)",
    "model_stock",
    "multislerp",
    "nre",
    "fisher",
    "regmean",
    "karcher",
    "fisher_rao_karcher",
    "frechet(manifold=norm_sphere, approx=first_order)",
    "frechet(manifold=euclidean, approx=frozen_metric, metric=fisher)",
)

#: Tasks in the order experts are added: N experts take the first N.
TASKS = (
    "fashion_mnist",
    "fashion_mnist@90",
    "mnist",
    "digits",
    "mnist@90",
    "digits@90",
    "fashion_mnist@180",
    "mnist@180",
)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "vision"
    c.name = "vision_merge"
    c.seed = 0
    c.num_experts = 4
    c.tasks = TASKS
    c.data = ml_collections.ConfigDict(
        # per task: training examples, test examples, examples for Fisher / Gram statistics,
        # test examples per task in the probe set of the collapse diagnostics (the digits
        # split holds 1438 / 359 examples: every task gets the same amount)
        {"n_train": 1400, "n_test": 350, "n_stats": 512, "n_probe": 250}
    )
    c.model = ml_collections.ConfigDict({"widths": (256, 256), "activation": "relu"})
    c.base = ml_collections.ConfigDict(
        {
            "sources": ("fashion_mnist", "mnist", "digits"),
            "n_train": 1400,  # per source
            "steps": 600,
            "batch_size": 128,
            "learning_rate": 1e-3,
        }
    )
    c.expert = ml_collections.ConfigDict(
        {
            "steps": 400,
            "batch_size": 64,
            "learning_rate": 1e-3,
            # per-expert multipliers of steps / learning rate (heterogeneity); () = all 1
            "steps_scale": (),
            "lr_scale": (),
        }
    )
    c.methods = METHODS
    c.progress = True
    c.cache_dir = ""  # "" = $MM_CACHE_DIR or ~/.cache/manifold_merge/runs
    c.tables = [
        {
            "name": "vision_merge",
            "title": "Average normalised accuracy (merged / expert) by number of experts",
            "rows": "method",
            "columns": "num_experts",
            "value": "normalized_accuracy",
            "where": {"task": "avg"},
            "format": ".3f",
        },
    ]
    if arg == "smoke":
        c.num_experts = 2
        c.data.update({"n_train": 256, "n_test": 128, "n_stats": 64, "n_probe": 64})
        c.model.widths = (32, 32)
        c.base.update({"n_train": 256, "steps": 40})
        c.expert.steps = 30
        c.methods = ("linear", "ties(density=0.3)", "karcher", "fisher", "regmean")
    elif arg:
        raise ValueError(f"configs/vision_merge.py takes '' or 'smoke', got {arg!r}")
    return c


def get_sweep(arg: str = ""):
    """N in {2, 4, 6, 8} x seeds {0, 1, 2} (smoke: N in {2, 3}, one seed)."""
    if arg == "smoke":
        return [{"num_experts": n, "seed": 0} for n in (2, 3)]
    return [{"num_experts": n, "seed": s} for n in (2, 4, 6, 8) for s in (0, 1, 2)]
