"""Table A2: heterogeneity at fixed N = 4. Experts farther from the base -- more fine-tuning
steps, a higher learning rate, more distant tasks (rotations) -- and what each merge does to
accuracy, the activation-variance ratio (merged / experts), the effective rank, the
task-vector norm ratio and the function-space distances. Mean ± std over 3 seeds.

    python experiments/run.py --config=configs/a2_heterogeneity.py:reduced --sweep \\
        --workdir=runs/a2
    python experiments/make_tables.py --runs=runs/a2 --out=results
"""

from configs import a1_vision

#: heterogeneity level -> (expert steps, learning rate, tasks)
LEVELS = {
    "low": (100, 3e-4, ("fashion_mnist", "mnist", "digits", "fashion_mnist@90")),
    "mid": (300, 1e-3, ("fashion_mnist@90", "mnist@90", "digits@90", "fashion_mnist")),
    "high": (900, 3e-3, ("fashion_mnist@90", "mnist@180", "digits@270", "fashion_mnist@180")),
}
METHODS = (
    "linear",
    "task_arithmetic(lambda=0.5)",
    "ties(density=0.3, lambda=1.0)",
    "nre",
    "multislerp",
    "fisher",
    "regmean",
    "karcher",
    "fisher_rao_karcher",
)


def get_config(arg: str = ""):
    c = a1_vision.get_config(arg)
    c.name = "a2_heterogeneity"
    c.num_experts = 4
    c.heterogeneity = "mid"
    steps, lr, tasks = LEVELS["mid"]
    c.expert.update({"steps": steps, "learning_rate": lr})
    c.tasks = tasks
    if arg != "smoke":
        c.methods = METHODS
    else:
        c.num_experts = 2
    c.tables = [
        {
            "name": "A2",
            "title": "A2: heterogeneity at fixed N (columns: metrics; rows: method, level)",
            "rows": ["method", "heterogeneity"],
            "values": ["normalized_accuracy", "variance_ratio", "effective_rank", "norm_ratio",
                       "kl", "fr_distance"],
            "where": {"task": "avg"},
            "row_order": [(m, h) for m in ("expert", "base", *c.methods) for h in _levels(arg)],
            "format": ".3f",
        },
    ]  # fmt: skip
    return c


def _levels(arg: str) -> list[str]:
    return ["low", "high"] if arg == "smoke" else list(LEVELS)


def get_sweep(arg: str = ""):
    levels = _levels(arg)
    seeds = (0,) if arg == "smoke" else (0, 1, 2)
    points = []
    for level in levels:
        steps, lr, tasks = LEVELS[level]
        if arg == "smoke":
            steps = max(10, steps // 20)
        for s in seeds:
            points.append({"heterogeneity": level, "expert.steps": steps,
                           "expert.learning_rate": lr, "tasks": tasks, "seed": s})  # fmt: skip
    return points
