"""Reading the next tensor while the current one is merged: ``manifold-merge merge`` with and
without ``--no-prefetch``, on checkpoints evicted from the page cache before every run.

4 synthetic float32 checkpoints of ``--size-mb`` (default 500 MB, 40 tensors each, written by
``io_memory.make_checkpoints``) are merged with ``--method`` (default karcher, whose compute
is long enough to hide reads under). Before each run every input file is dropped from the
page cache (``posix_fadvise(DONTNEED)``; ``fincore`` confirms it where installed), so the
merge reads from disk. The two modes alternate; medians of ``--repeats`` runs, each a fresh
process with a warm compilation cache (one unmeasured run first).

    python benchmarks/io_overlap.py [--size-mb 500] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from io_memory import make_checkpoints  # noqa: E402


def evict(paths) -> int:
    """Drop the files from the page cache; returns the pages still cached (fincore), or -1."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if shutil.which("fincore") is None:
        return -1
    out = subprocess.run(["fincore", "-bn", "-o", "PAGES", *map(str, paths)],
                         capture_output=True, text=True).stdout  # fmt: skip
    return sum(int(v) for v in out.split())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--method", default="karcher")
    p.add_argument("--out", default=str(HERE / "results_io_overlap.json"))
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mm_overlap_"))
    models = make_checkpoints(work, 4, a.size_mb, 40)
    files = [Path(m) / "model.safetensors" for m in models]
    cfg = work / "merge.yaml"
    cfg.write_text(
        f"merge_method: {a.method}\nmodels:\n" + "".join(f"  - model: {m}\n" for m in models)
    )
    env = dict(os.environ, MM_CACHE_DIR=str(work / "cache"))
    base = [sys.executable, "-m", "manifold_merge", "merge", str(cfg), str(work / "out"),
            "--force", "--no-progress"]  # fmt: skip
    subprocess.run(base, check=True, env=env, capture_output=True)  # compile once, unmeasured
    times = {"prefetch": [], "no_prefetch": []}
    cached_pages = []
    for i in range(a.repeats):
        for mode in ("prefetch", "no_prefetch") if i % 2 == 0 else ("no_prefetch", "prefetch"):
            cached_pages.append(evict(files))
            t0 = time.perf_counter()
            subprocess.run(base + (["--no-prefetch"] if mode == "no_prefetch" else []),
                           check=True, env=env, capture_output=True)  # fmt: skip
            times[mode].append(time.perf_counter() - t0)
            print(f"io_overlap: {mode} {times[mode][-1]:.2f} s", flush=True)
    row = {
        "size_mb_per_model": a.size_mb,
        "method": a.method,
        "median_s": {k: float(np.median(v)) for k, v in times.items()},
        "times_s": times,
        "runs": a.repeats,
        "pages_cached_after_evict_max": max(cached_pages),
    }
    Path(a.out).write_text(json.dumps(row, indent=1))
    print(json.dumps(row, indent=1))
    shutil.rmtree(work)


if __name__ == "__main__":
    sys.exit(main())
