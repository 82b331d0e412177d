"""LoRA merges in core space vs the same merge on the dense m x n updates (issue 8).

N random rank-r adapters (b_i: m x r, a_i: r x n, float32) are merged by

* ours: ``merge("lora_svd", ...)`` (truncated SVD of sum_i w_i b_i a_i at rank r) and
  ``merge("core_space", ...)`` (the sum kept exactly, at rank N r), both of which work on the
  R x R core (R = N r) and never form an m x n matrix;
* the dense equivalent, as peft's ``svd`` combination does it: form sum_i w_i b_i a_i
  (m x n) and take its SVD (NumPy/LAPACK, float32), truncated to the same rank.

The two give the same update up to float32 rounding (the relative difference of the merged
b a is reported). Times are medians of ``--repeats`` runs after a warm-up (compilation).

    python benchmarks/lora_speed.py [--m 4096 --n 4096 --r 16 --ns 2,8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import karcher_speed  # noqa: E402


def make_adapters(n: int, m: int, k: int, r: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    bs = [rng.standard_normal((m, r), dtype=np.float32) / np.sqrt(r) for _ in range(n)]
    as_ = [rng.standard_normal((r, k), dtype=np.float32) / np.sqrt(k) for _ in range(n)]
    w = rng.uniform(0.5, 1.5, n).astype(np.float32)
    return bs, as_, w


def dense_merge(bs, as_, w, rank: int):
    total = np.zeros((bs[0].shape[0], as_[0].shape[1]), np.float32)
    for wi, b, a in zip(w, bs, as_):
        total += (wi * b) @ a
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def ours_merge(method: str, bs, as_, w, rank: int):
    import jax  # noqa: PLC0415

    import manifold_merge as mm  # noqa: PLC0415
    from manifold_merge.manifolds import LoraFactors  # noqa: PLC0415

    factors = [LoraFactors(b, a) for b, a in zip(bs, as_)]

    def run():
        out = mm.merge(method, factors, weights=list(map(float, w)), rank=rank).params
        return jax.block_until_ready(out)

    return run


def rel_diff(f1, f2) -> float:
    """||b1 a1 - b2 a2|| / ||b2 a2||, without forming m x n products (traces of small Grams)."""
    (b1, a1), (b2, a2) = [
        (np.asarray(b, np.float64), np.asarray(a, np.float64)) for b, a in (f1, f2)
    ]

    def inner(ba, ab, bb, aa):  # <b a, B A>_F = tr(a^T b^T B A) = tr((b^T B)(A a^T))
        return float(np.trace((ba.T @ bb) @ (aa @ ab.T)))

    d2 = inner(b1, a1, b1, a1) - 2 * inner(b1, a1, b2, a2) + inner(b2, a2, b2, a2)
    return float(np.sqrt(max(d2, 0.0) / inner(b2, a2, b2, a2)))


def timed(fn, repeats):
    fn()  # warm-up: compilation
    return karcher_speed.timed(fn, repeats)


def run(ns, m: int, k: int, r: int, repeats: int) -> list:
    rows = []
    for n in ns:
        bs, as_, w = make_adapters(n, m, k, r)
        for method, rank in (("lora_svd", r), ("core_space", n * r)):
            print(f"lora_speed: {method} N={n} m={m} n={k} r={r}", flush=True)
            t_ours, out = timed(ours_merge(method, bs, as_, w, rank), repeats)
            t_dense, ref = timed(lambda: dense_merge(bs, as_, w, rank), repeats)
            med_o, med_d = float(np.median(t_ours)), float(np.median(t_dense))
            rows.append(
                {
                    "method": method,
                    "N": n,
                    "m": m,
                    "n": k,
                    "r": r,
                    "out_rank": rank,
                    "ours_median_s": med_o,
                    "dense_median_s": med_d,
                    "speedup": med_d / med_o,
                    "runs": repeats,
                    "rel_diff": rel_diff((out.b, out.a), ref),
                }
            )
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--ns", default="2,8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(HERE / "results_lora.json"))
    a = p.parse_args()
    rows = run([int(v) for v in a.ns.split(",")], a.m, a.n, a.r, a.repeats)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
