"""Runs inside the benchmark-only environment (torch CPU, mergekit, geomstats): times the
other tools' Karcher means on inputs written by ``karcher_speed.py`` and saves their results.

Never imported by the project; ``karcher_speed.py`` calls it as

    <compare-env>/bin/python benchmarks/compare_worker.py TOOL INPUT.npy WEIGHTS.npy OUT.npy REPEATS

and reads one JSON line from stdout: {"times": [...], "version": ..., "error": null | "..."}.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def mergekit_karcher(x: np.ndarray, w: np.ndarray):
    """mergekit's own karcher routine with its defaults (max_iter=10, tol=1e-5), on the float32
    tensors as torch tensors (mergekit merges tensors in their stored dtype)."""
    import mergekit  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from mergekit.merge_methods.karcher import karcher_merge_tensors  # noqa: PLC0415

    torch.set_num_threads(torch.get_num_threads())
    tensors = [torch.from_numpy(np.ascontiguousarray(row)) for row in x]
    alphas = [float(a) for a in w / w.sum()]

    def run():
        return karcher_merge_tensors(tensors, alphas).numpy()

    return run, getattr(mergekit, "__version__", _dist_version("mergekit"))


def geomstats_frechet(x: np.ndarray, w: np.ndarray):
    """geomstats' FrechetMean on the unit hypersphere of the directions, times the weighted mean
    norm (the same spherical proxy); numpy backend, float64 as geomstats computes."""
    import geomstats  # noqa: PLC0415
    from geomstats.geometry.hypersphere import Hypersphere  # noqa: PLC0415
    from geomstats.learning.frechet_mean import FrechetMean  # noqa: PLC0415

    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    units = x.astype(np.float64) / norms[:, None]
    space = Hypersphere(dim=x.shape[1] - 1)
    wn = w / w.sum()

    def run():
        est = FrechetMean(space)
        est.fit(units, weights=wn)
        return (est.estimate_ * (wn @ norms)).astype(np.float32)

    return run, geomstats.__version__


def _dist_version(name: str) -> str:
    from importlib.metadata import version  # noqa: PLC0415

    return version(name)


def main(argv):
    tool, inp, weights, out, repeats = argv[1:6]
    x = np.load(inp, mmap_mode="r")
    w = np.load(weights)
    result = {"times": [], "version": None, "error": None}
    try:
        run, result["version"] = {"mergekit": mergekit_karcher, "geomstats": geomstats_frechet}[
            tool
        ](x, w)
        for _ in range(int(repeats)):
            t0 = time.perf_counter()
            y = run()
            result["times"].append(time.perf_counter() - t0)
        np.save(out, np.asarray(y, np.float32))
    except Exception as e:  # report, do not crash the whole benchmark
        result["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv)
