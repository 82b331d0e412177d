"""Demo: merge random experts of a small MLP with several methods and compare the reports.

Command (about 10 s on a 2-core CPU, most of it JIT compilation):

    python experiments/demo.py --config=configs/demo.py
    python experiments/demo.py --config=configs/demo.py:smoke --config.num_experts=8

Every field can be overridden with ``--config.<field>=<value>``.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_experts = 4
    # Layer widths of the MLP whose parameters are merged: [in, hidden..., out].
    config.widths = (784, 256, 128, 10)
    # Size of each expert's task vector relative to the base weights' scale.
    config.task_vector_scale = 0.3
    # "task_vectors": average the experts' task vectors and add them to the base (needs a base);
    # "full": average the full expert weights.
    config.mode = "task_vectors"
    # Merge methods to compare (manifold_merge.list_methods()); ties/dare get `density`,
    # task_arithmetic averages (normalize=True): the Euclidean mean of the task vectors.
    config.methods = ("task_arithmetic", "nre", "multislerp", "ties", "karcher")
    config.density = 0.3
    # Parameters of the karcher solver and its norm rule ("arithmetic" | "geometric").
    config.karcher = ml_collections.ConfigDict(
        {"max_iter": 100, "tol": 1e-7, "step_size": 1.0, "norm_mean": "arithmetic"}
    )
    # Unnormalised per-expert weights; empty means uniform.
    config.weights = ()
    if arg == "smoke":
        config.widths = (16, 8, 4)
        config.num_experts = 3
    elif arg:
        raise ValueError(f"configs/demo.py takes '' or 'smoke', got {arg!r}")
    return config
