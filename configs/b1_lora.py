"""Table B1: LoRA merging on the real all-MiniLM-L6-v2 with >= 3 text tasks at rank 8: every
LoRA method's normalised accuracy per task and on average, the function-space columns, and
whether the merge changes under random GL(r) reparametrisation of the input adapters.

    python experiments/run.py --config=configs/b1_lora.py:reduced --sweep --workdir=runs/b1
    python experiments/make_tables.py --runs=runs/b1 --out=results

The experiment is ``configs/text_lora.py``'s (see there).
"""

from configs import text_lora


def get_config(arg: str = ""):
    c = text_lora.get_config("smoke" if arg == "smoke" else "")
    c.name = "b1_lora"
    if arg == "reduced":
        c.data.update({"n_train": 400, "n_test": 160})
        c.train.steps = 80
    elif arg not in ("", "smoke"):
        raise ValueError(f"configs/b1_lora.py takes '', 'reduced' or 'smoke', got {arg!r}")
    order = ["expert", "base", *c.methods]
    c.tables = [
        {
            "name": "B1",
            "title": "B1: LoRA merges of MiniLM experts (rank 8), normalised accuracy per task",
            "rows": "method",
            "columns": "task",
            "value": "normalized_accuracy",
            "row_order": order,
            "column_order": [*c.tasks, "avg"],
            "format": ".3f",
        },
        {
            "name": "B1_summary",
            "title": "B1: average over tasks, function space, GL(r) invariance",
            "rows": "method",
            "values": ["normalized_accuracy", "kl", "fr_distance", "gl_invariant"],
            "where": {"task": "avg"},
            "row_order": ["base", *c.methods],
            "format": ".3f",
            "formats": {"gl_invariant": "yes/no"},
        },
    ]
    return c


def get_sweep(arg: str = ""):
    return [{"seed": s} for s in ((0,) if arg == "smoke" else (0, 1, 2))]
