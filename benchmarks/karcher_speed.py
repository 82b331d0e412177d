"""Karcher means of N blocks of D float32 parameters, side by side in one run (issue 8).

For each (N, D) the same inputs (a shared random "pretrained" vector plus per-expert
deviations, about 0.3 rad apart) go to:

* ours, ``karcher_mean(NormSphere(D), X, w, algorithm="gram")`` (the two-pass Gram-space
  solver, float64 reduced iteration to 1e-10) and ``algorithm="iterative"`` (float32 fixed
  point to 1e-7), each jitted once and fed the NumPy array as ``merge`` does;
* the one-pass floors: NumPy ``w @ X`` on the stacked (N, D) array (BLAS) and a NumPy loop
  ``S += w_i X_i`` over the tensors;
* mergekit's ``karcher_merge_tensors`` (the PyPI package, torch CPU, its defaults
  max_iter=10, tol=1e-5) and geomstats' ``FrechetMean`` on the hypersphere, both in the
  benchmark-only environment (``compare_worker.py``);
* a float64 NumPy reference (plain fixed-point iteration to a 1e-13 rad gradient), against
  which every Karcher result's error is measured: the angle to the reference direction (rad)
  and the relative error of the norm.

Times are medians of ``--repeats`` runs after one warm-up run (compilation excluded, and
reported separately for ours).

    python benchmarks/karcher_speed.py --compare-python benchmarks/.venv-compare/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from manifold_merge.io.safetensors import aligned_empty

HERE = Path(__file__).resolve().parent
SPREAD = 0.3  # deviation scale of the experts from the shared vector (angles ~ 0.4 rad)


def make_inputs(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(d, dtype=np.float32)
    x = aligned_empty((n, d), np.float32)  # read in place by JAX, as the CLI stages inputs
    for i in range(n):
        x[i] = shared + SPREAD * rng.standard_normal(d, dtype=np.float32)
        x[i] *= np.float32(rng.uniform(0.8, 1.25))
    w = rng.uniform(0.5, 1.5, n)
    return x, w / w.sum()


def reference_karcher(x: np.ndarray, w: np.ndarray, tol: float = 1e-13, max_steps: int = 500):
    """Float64 NumPy spherical proxy: sphere Karcher mean of the directions (fixed-point
    iteration, atan2 angles) times the weighted mean norm. Independent of the package."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    u = x.astype(np.float64) / norms[:, None]
    m = w @ u
    m /= np.linalg.norm(m)
    for _ in range(max_steps):
        c = np.clip(u @ m, -1.0, 1.0)
        sq = np.maximum(1.0 - c * c, 0.0)
        theta = np.arctan2(np.sqrt(sq), c)
        f = np.where(theta > 0, theta / np.sin(np.where(theta > 0, theta, 1.0)), 1.0)
        g = (w * f) @ u - np.sum(w * f * c) * m  # sum_i w_i log_m(u_i)
        t = np.linalg.norm(g)
        if t < tol:
            break
        m = np.cos(t) * m + np.sin(t) * g / t
        m /= np.linalg.norm(m)
    return m * (w @ norms)


def errors(y: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(angle between y and ref in rad, atan2 form; relative norm error), float64."""
    y = np.asarray(y, np.float64)
    ny, nr = np.linalg.norm(y), np.linalg.norm(ref)
    a, b = y / ny, ref / nr
    angle = 2.0 * np.arctan2(np.linalg.norm(a - b), np.linalg.norm(a + b))
    return float(angle), float(abs(ny - nr) / nr)


def timed(fn, repeats: int) -> tuple[list[float], object]:
    out = None
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def ours(x: np.ndarray, w: np.ndarray, algorithm: str, repeats: int) -> dict:
    import jax  # noqa: PLC0415

    import manifold_merge as mm  # noqa: PLC0415

    m = mm.NormSphere(x.shape[1])
    fn = jax.jit(lambda a, b: mm.karcher_mean(m, a, b, algorithm=algorithm))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x, w.astype(np.float32)))
    compile_s = time.perf_counter() - t0
    times, res = timed(lambda: jax.block_until_ready(fn(x, w.astype(np.float32))), repeats)
    return {
        "times": times,
        "first_call_s": compile_s,
        "out": np.asarray(res.mean),
        "steps": int(res.num_steps),
        "converged": bool(res.converged),
    }


def gram_passes(x: np.ndarray, repeats: int) -> dict:
    """The Gram solver's two passes over the data timed alone: pass 1 (the float64 Gram from
    float32 block dots) and pass 2 (the weighted sum of the inputs)."""
    import jax  # noqa: PLC0415

    from manifold_merge.solvers import gram  # noqa: PLC0415

    c = np.full(x.shape[0], 1.0 / x.shape[0], np.float32)
    with jax.enable_x64(True):
        p1 = jax.jit(gram.span_gram)
        jax.block_until_ready(p1(x))
        t1, _ = timed(lambda: jax.block_until_ready(p1(x)), repeats)
    p2 = jax.jit(gram._weighted_sum)
    jax.block_until_ready(p2(c, x))
    t2, _ = timed(lambda: jax.block_until_ready(p2(c, x)), repeats)
    return {"ours_gram_pass1": {"times": t1}, "ours_gram_pass2": {"times": t2}}


def numpy_floor(x: np.ndarray, w: np.ndarray, repeats: int) -> dict:
    w32 = w.astype(np.float32)
    w32 @ x  # warm-up
    times, _ = timed(lambda: w32 @ x, repeats)
    return {"times": times}


def numpy_loop(x: np.ndarray, w: np.ndarray, repeats: int) -> dict:
    def run():
        s = x[0] * np.float32(w[0])
        tmp = np.empty_like(s)
        for wi, xi in zip(w[1:], x[1:]):
            np.multiply(xi, np.float32(wi), out=tmp)
            s += tmp
        return s

    run()
    times, _ = timed(run, repeats)
    return {"times": times}


def other_tool(python: str, tool: str, x_path: Path, w_path: Path, repeats: int, timeout: int):
    out = x_path.with_name(f"{tool}_out.npy")
    cmd = [python, str(HERE / "compare_worker.py"), tool, str(x_path), str(w_path), str(out)]
    try:
        proc = subprocess.run(
            [*cmd, str(repeats + 1)], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish {repeats + 1} runs in {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": f"worker failed (rc {proc.returncode}): {proc.stderr.strip()[-300:]}"}
    res = json.loads(lines[-1])
    if res.get("error"):
        return {"error": res["error"], "version": res.get("version")}
    return {"times": res["times"][1:], "version": res["version"], "out": np.load(out)}


def run(
    ns,
    ds,
    repeats: int,
    compare_python: str | None,
    tools_timeout: int = 900,
    include_ours: bool = True,
    others=("mergekit_karcher", "geomstats_frechet"),
) -> list:
    """One row per (N, D, implementation). ``include_ours=False`` keeps only ours_gram and
    ``others`` (the small-D geomstats rows: where geomstats runs at all)."""
    rows = []
    for d in ds:
        for n in ns:
            print(f"karcher_speed: N={n} D={d:.2e}", flush=True)
            x, w = make_inputs(n, d)
            ref = reference_karcher(x, w)
            entries = {
                "ours_gram": ours(x, w, "gram", repeats),
                "ours_iterative": ours(x, w, "iterative", repeats),
                "numpy_w@X": numpy_floor(x, w, repeats),
                "numpy_loop": numpy_loop(x, w, repeats),
            }
            if include_ours and n == max(ns) and d == max(ds):
                entries.update(gram_passes(x, repeats))
            if compare_python:
                with tempfile.TemporaryDirectory(dir=os.environ.get("MM_BENCH_TMP")) as tmp:
                    xp, wp = Path(tmp) / "x.npy", Path(tmp) / "w.npy"
                    np.save(xp, x)
                    np.save(wp, w)
                    entries["mergekit_karcher"] = other_tool(
                        compare_python, "mergekit", xp, wp, repeats, tools_timeout
                    )
                    if d <= 2_000_000:  # geomstats at D = 1.6e7: see RESULTS.md
                        entries["geomstats_frechet"] = other_tool(
                            compare_python, "geomstats", xp, wp, min(repeats, 2), tools_timeout
                        )
                    else:
                        entries["geomstats_frechet"] = {"error": "not run at this D (see D=1e6)"}
            if not include_ours:
                entries = {
                    k: v for k, v in entries.items() if k in ("ours_gram", "numpy_w@X", *others)
                }
            for name, e in entries.items():
                row = {"N": n, "D": d, "impl": name}
                if "times" in e:
                    row["median_s"] = float(np.median(e["times"]))
                    row["runs"] = len(e["times"])
                for k in ("first_call_s", "steps", "converged", "version", "error"):
                    if k in e:
                        row[k] = e[k]
                if "out" in e:
                    row["angle_err"], row["norm_err"] = errors(e["out"], ref)
                rows.append(row)
            del x, ref
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ns", default="2,4,8")
    p.add_argument("--ds", default="1000000,16000000")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compare-python", default=None, help="python of the comparison env")
    p.add_argument(
        "--geomstats-ds",
        default="1000,10000",
        help="extra small D (at the largest N) where geomstats' FrechetMean fits in memory",
    )
    p.add_argument("--out", default=str(HERE / "results_karcher.json"))
    a = p.parse_args()
    ns = [int(v) for v in a.ns.split(",")]
    rows = run(ns, [int(v) for v in a.ds.split(",")], a.repeats, a.compare_python)
    if a.compare_python and a.geomstats_ds:
        small = [int(v) for v in a.geomstats_ds.split(",")]
        rows += run([max(ns)], small, a.repeats, a.compare_python, include_ours=False,
                    others=("geomstats_frechet",))  # fmt: skip
    Path(a.out).write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
