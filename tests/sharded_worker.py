"""Run by tests/test_sharding.py in a subprocess with 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``): merges random models with and without
``mesh=8`` and prints one JSON object per case, which the test checks. Not a test module."""

from __future__ import annotations

import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from manifold_merge import merge
from manifold_merge.manifolds import LoraFactors
from manifold_merge.merging import get_method
from manifold_merge.merging import tree as tree_mod
from manifold_merge.sharding import leaf_spec, make_mesh, place

SEED = int(os.environ.get("MM_TEST_SEED", "0"))


def models(rng, n=4):
    """N fine-tuned models around a base: a kernel split along its rows (D = 196608: 24576
    per device, so the Gram solver's pass 1 loops over 3 column blocks on each), a bias split
    too, and an embedding whose leading axis does not divide by 8 (replicated). Task vectors
    hold ties: half of the kernel's entries are rounded to one decimal."""
    base = {
        "kernel": rng.normal(size=(512, 384)).astype(np.float32),
        "bias": rng.normal(size=(48,)).astype(np.float32),
        "emb": rng.normal(size=(30, 16)).astype(np.float32),
    }
    out = []
    for _ in range(n):
        m = {k: v + 0.3 * rng.normal(size=np.shape(v)).astype(np.float32) for k, v in base.items()}
        tv = m["kernel"] - base["kernel"]
        tv[:256] = np.round(tv[:256], 1)
        m["kernel"] = base["kernel"] + tv
        out.append(m)
    return base, out


def layout(arr):
    return {
        "spec": str(arr.sharding.spec) if hasattr(arr.sharding, "spec") else "",
        "shards": sorted({tuple(s.data.shape) for s in arr.addressable_shards}),
        "devices": len({s.device for s in arr.addressable_shards}),
    }


def gathers(method, params, xs, b, stats, granularity="tensor"):
    """Largest array (elements) any all-gather of the compiled sharded leaf kernel produces."""
    mesh = make_mesh(8)
    spec = get_method(method)
    lay = leaf_spec(xs[0].shape, mesh)
    full = {**{k: v for k, v in spec.defaults.items()}, **params}
    kernel_params = tuple(sorted(full.items()))
    args = (
        spec.block_fn,
        granularity,
        kernel_params,
        jnp.dtype(jnp.float32),
        jnp.dtype(jnp.float32),
        False,
        mesh,
        tuple(place(x, mesh, lay) for x in xs),
        None if b is None else place(b, mesh, lay),
        jnp.ones(len(xs)),
        jax.random.key(0),
        {k: [place(a, mesh, lay) for a in v] for k, v in stats.items()},
    )
    text = tree_mod._leaf_kernel.lower(*args).compile().as_text()
    sizes = [0]
    for m in re.finditer(r"= [a-z0-9]+\[([0-9,]*)\][^=\n]* all-gather\(", text):
        dims = [int(d) for d in m.group(1).split(",") if d]
        sizes.append(int(np.prod(dims)) if dims else 1)
    return max(sizes)


def lora_cases(rng):
    m_, n_, r_ = 256, 192, 4
    adapters = [
        {
            "q": LoraFactors(
                rng.normal(size=(m_, r_)) * 0.1,
                rng.normal(size=(r_, n_)),
            ),
            "head": rng.normal(size=(16,)),
        }
        for _ in range(3)
    ]
    for method, kw in [("lora_svd", {}), ("geomerge", {}), ("knots", {"density": 0.5})]:
        ref = merge(method, adapters, **kw)
        out = merge(method, adapters, mesh=8, **kw)
        update = {}
        for tag, res in (("ref", ref), ("out", out)):
            q = res.params["q"]
            update[tag] = np.asarray(q.b, np.float64) @ np.asarray(q.a, np.float64)
        heads = [np.asarray(res.params["head"], np.float64) for res in (ref, out)]
        row = {
            "case": f"lora:{method}",
            "dtype": str(out.params["q"].b.dtype),
            "diff": {
                "update": float(np.max(np.abs(update["ref"] - update["out"]))),
                "head": float(np.max(np.abs(heads[0] - heads[1]))),
            },
            "scale": {
                "update": float(np.max(np.abs(update["ref"]))),
                "head": float(np.max(np.abs(heads[0]))),
            },
            "layout": {"b": layout(out.params["q"].b), "a": layout(out.params["q"].a)},
            "converged": all(v.converged for v in out.report.values()),
        }
        print(json.dumps(row), flush=True)


def main():
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(SEED)
    base, ms = models(rng)
    fishers = [
        {k: rng.uniform(0.1, 2.0, size=np.shape(v)).astype(np.float32) for k, v in base.items()}
        for _ in ms
    ]
    karcher_free = {"max_iter": 200}
    cases = {
        "linear": dict(method="linear", kw={}),
        "ties": dict(method="ties", kw={"density": 0.3}, base=True),
        "ties_dense": dict(method="ties", kw={"density": 0.9, "consensus": "count"}, base=True),
        "dare_ties": dict(method="dare_ties", kw={"density": 0.5, "seed": 3}, base=True),
        "karcher_gram": dict(method="karcher", kw={"algorithm": "gram"}, base=True),
        "karcher_iterative": dict(
            method="karcher", kw={"algorithm": "iterative", **karcher_free}, base=True
        ),
        "karcher_row": dict(method="karcher", kw={"granularity": "row", "max_iter": 300}),
        "fisher": dict(method="fisher", kw={}, stats=True),
        "karcher_group": dict(
            method="karcher", kw={"groups": {"g": ["kernel", "bias"]}}, base=True
        ),
        "fisher_rao_karcher": dict(
            method="fisher_rao_karcher", kw={"max_iter": 300}, base=True, stats=True
        ),
        "frechet_first_order": dict(
            method="frechet", kw={"manifold": "norm_sphere", "approx": "first_order"}, base=True
        ),
    }
    weights = rng.uniform(0.5, 2.0, size=len(ms)).tolist()
    only = sys.argv[1].split(",") if len(sys.argv) > 1 else None
    for name, case in cases.items():
        if only is not None and name not in only:
            continue
        start = time.perf_counter()
        # The solvers compile slowly: they merge the kernel alone (the other methods show the
        # layouts of the split bias and the replicated embedding).
        leaves = ["kernel"] if "karcher" in case["method"] else list(base)
        sub = [{k: m[k] for k in leaves} for m in ms]
        b = {k: base[k] for k in leaves} if case.get("base") else None
        kw = dict(case["kw"])
        if case.get("stats"):
            kw["fishers"] = [{k: f[k] for k in leaves} for f in fishers]
        ref = merge(case["method"], sub, base=b, weights=weights, **kw)
        out = merge(case["method"], sub, base=b, weights=weights, mesh=8, **kw)
        diffs, scales, layouts = {}, {}, {}
        for leaf in leaves:
            r = np.asarray(ref.params[leaf], np.float64)
            o = np.asarray(out.params[leaf], np.float64)
            diffs[leaf] = float(np.max(np.abs(r - o))) if r.size else 0.0
            scales[leaf] = float(np.max(np.abs(r))) if r.size else 0.0
            layouts[leaf] = layout(out.params[leaf])
        row = {"case": name, "diff": diffs, "scale": scales, "layout": layouts}
        row["converged"] = all(v.converged for v in out.report.values())
        tensor_blocks = kw.get("granularity", "tensor") == "tensor"
        if name in ("linear", "ties", "ties_dense", "karcher_gram", "fisher") and tensor_blocks:
            xs = [m["kernel"] for m in ms]
            st = {"fishers": [f["kernel"] for f in fishers]} if case.get("stats") else {}
            row["max_gather"] = gathers(
                case["method"], case["kw"], xs, base["kernel"] if b is not None else None, st
            )
            row["leaf_size"] = int(np.prod(base["kernel"].shape))
        row["seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps(row), flush=True)

    # LoRA: b (m, r) split along m, a (r, n) along n. In float64: in float32 the core-space
    # pipeline (QR, SVD truncation, TIES thresholds in knots) rounds differently with a TSQR
    # than with one QR, by ~1e-6 of the update; float64 shows that the algorithms agree.
    if only is None or "lora" in only:
        with jax.enable_x64(True):
            lora_cases(rng)
    return 0


if __name__ == "__main__":
    sys.exit(main())
