"""Table A1: every full-weight method x number of experts N in {2, 4, 6, 8}, average
normalised accuracy (merged / expert), with the function-space columns (KL from the experts,
Fisher–Rao distance to the barycenter of their predictions). Mean ± std over 3 seeds.

    python experiments/run.py --config=configs/a1_vision.py:reduced --sweep --workdir=runs/a1
    python experiments/run.py --config=configs/a1_vision.py --sweep --workdir=runs/a1_full
    python experiments/make_tables.py --runs=runs/a1 --out=results

``reduced`` (the main job's size) trains on fewer examples with fewer steps; ``smoke`` is two
points of a tiny model. The experiment is ``configs/vision_merge.py``'s (see there).
"""

from configs import vision_merge


def get_config(arg: str = ""):
    c = vision_merge.get_config("smoke" if arg == "smoke" else "")
    c.name = "a1_vision"
    if arg == "reduced":
        c.data.update({"n_train": 700, "n_test": 350, "n_stats": 256, "n_probe": 150})
        c.base.update({"n_train": 1000, "steps": 400})
        c.expert.steps = 250
    elif arg not in ("", "smoke"):
        raise ValueError(f"configs/a1_vision.py takes '', 'reduced' or 'smoke', got {arg!r}")
    common = {"rows": "method", "columns": "num_experts", "where": {"task": "avg"}}
    c.tables = [
        {"name": "A1", "title": "A1: average normalised accuracy by number of experts N",
         "value": "normalized_accuracy", "row_order": _order(c), **common},
        {"name": "A1_kl", "title": "A1: mean KL(expert || merged) on the experts' tasks",
         "value": "kl", "row_order": _order(c, reference=False), **common},
        {"name": "A1_fr", "title": "A1: Fisher–Rao distance to the barycenter of the experts'"
         " predictions", "value": "fr_distance", "row_order": _order(c, reference=False),
         **common},
    ]  # fmt: skip
    return c


def _order(c, reference=True):
    methods = list(c.methods)
    return (["expert", "base"] if reference else ["base"]) + methods


def get_sweep(arg: str = ""):
    if arg == "smoke":
        return [{"num_experts": n, "seed": 0} for n in (2, 3)]
    return [{"num_experts": n, "seed": s} for n in (2, 4, 6, 8) for s in (0, 1, 2)]
