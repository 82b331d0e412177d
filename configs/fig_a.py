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
        _per_layer(
            "FigA_variance",
            "Figure A: activation variance per layer (linear vs karcher vs experts)",
            "activation_variance",
            ".4f",
            where,
        ),
        _per_layer(
            "FigA_rank",
            "Figure A: effective rank of the activation covariance per layer",
            "effective_rank",
            ".1f",
            where,
        ),
    ]
    return c


def _per_layer(name: str, title: str, value: str, fmt: str, where: dict) -> dict:
    """A table of ``value`` by (method, layer) x N, drawn as lines over the layers."""
    return {
        "name": name,
        "title": title,
        "rows": ["method", "layer"],
        "columns": "num_experts",
        "value": value,
        "where": where,
        "format": fmt,
        "figure": {"kind": "line", "x": "layer", "y": value, "hue": "method",
                   "facet": "num_experts"},
    }  # fmt: skip


get_sweep = a1_vision.get_sweep
