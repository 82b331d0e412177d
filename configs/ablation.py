"""Ablation: manifold x distance approximation x granularity x norm rule, on the A1 experts at
N = 4 (Fréchet means through ``frechet`` / ``karcher``; mean ± std over 3 seeds).

* manifold: ``euclidean`` (Paper B's flat case) or ``norm_sphere`` (Paper A's spherical proxy);
* distance approximation: ``exact`` (the Karcher mean of the geodesic distance) or
  ``first_order`` (one tangent-space average at the extrinsic mean);
* granularity: one block per ``tensor`` or per ``row``;
* norm rule (sphere only): ``arithmetic`` or ``geometric`` mean of the norms.

    python experiments/run.py --config=configs/ablation.py:reduced --sweep --workdir=runs/abl
    python experiments/make_tables.py --runs=runs/abl --out=results
"""

from configs import a1_vision


def variants():
    """The ablation's method entries (a frechet call each)."""
    out = []
    for gran in ("tensor", "row"):
        for approx in ("exact", "first_order"):
            out.append(f"frechet(manifold=euclidean, approx={approx}, granularity={gran})")
            for norm in ("arithmetic", "geometric"):
                out.append(
                    f"frechet(manifold=norm_sphere, approx={approx}, norm_mean={norm}, "
                    f"granularity={gran})"
                )
    return tuple(out)


def get_config(arg: str = ""):
    c = a1_vision.get_config(arg)
    c.name = "ablation"
    c.num_experts = 4 if arg != "smoke" else 2
    c.methods = variants() if arg != "smoke" else variants()[:3]
    c.tables = [
        {
            "name": "ablation",
            "title": "Ablation at N = 4: manifold x approximation x granularity x norm rule",
            "rows": "method",
            "values": ["normalized_accuracy", "variance_ratio", "norm_ratio", "kl",
                       "fr_distance"],
            "where": {"task": "avg"},
            "row_order": ["base", *c.methods],
            "format": ".3f",
        },
    ]  # fmt: skip
    return c


def get_sweep(arg: str = ""):
    return [{"seed": s} for s in ((0,) if arg == "smoke" else (0, 1, 2))]
