"""Figure A: activation variance and effective rank per hidden layer, linear vs karcher vs the
experts, as the number of experts N grows (PNG), with the numbers as a table. The experts are
those of A1 (same configs: the cache makes them free once A1 ran).

    python experiments/run.py --config=configs/fig_a.py:reduced --sweep --workdir=runs/fig_a
    python experiments/make_tables.py --runs=runs/fig_a --out=results
"""

from configs import a1_vision


def get_config(arg: str = ""):
    c = a1_vision.get_config(arg)
    c.name = "fig_a"
    c.methods = ("linear", "task_arithmetic(lambda=0.5)", "karcher")
    where = {"method": ["expert", "linear", "task_arithmetic(lambda=0.5)", "karcher"]}
    c.tables = [
        {
            "name": "FigA_variance",
            "title": "Figure A: activation variance per layer (linear vs karcher vs experts)",
            "rows": ["method", "layer"],
            "columns": "num_experts",
            "value": "activation_variance",
            "where": where,
            "format": ".4f",
            "figure": {"kind": "line", "x": "layer", "y": "activation_variance",
                       "hue": "method", "facet": "num_experts"},
        },
        {
            "name": "FigA_rank",
            "title": "Figure A: effective rank of the activation covariance per layer",
            "rows": ["method", "layer"],
            "columns": "num_experts",
            "value": "effective_rank",
            "where": where,
            "format": ".1f",
            "figure": {"kind": "line", "x": "layer", "y": "effective_rank",
                       "hue": "method", "facet": "num_experts"},
        },
    ]  # fmt: skip
    return c


get_sweep = a1_vision.get_sweep
