"""Peak memory of a streamed checkpoint merge, side by side with a load-everything baseline.

Issue 5's target: a merge of N checkpoints holds O(N x largest tensor) + one output shard,
whatever the model size and the number of tensors. This script writes 4 synthetic float32
checkpoints of ``--size-mb`` each (default 500 MB), then runs each measurement in a fresh
subprocess and records its peak memory:

* ``merge_<T>_tensors``: ``manifold-merge merge`` (linear, 4 models, ``--out-shard-size``
  100MB) on checkpoints of T tensors each, for two values of T with the same total size;
* ``load_all``: the baseline of reading the 4 checkpoints fully into memory (what a merge
  that does not stream needs at least);
* ``import_only``: Python + JAX + manifold_merge imported and the checkpoints opened.

Peak anonymous memory (heap: what a process really needs) is sampled from /proc every 5 ms;
the peak resident set (VmHWM) also counts file pages of the memory-mapped inputs, which the
kernel can reclaim at any time, and is reported for completeness.

    python benchmarks/io_memory.py [--size-mb 500] [--workdir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MONITOR = textwrap.dedent(
    """
    import threading, time, json, sys
    peak = {"anon_kb": 0}
    def field(name):
        for line in open("/proc/self/status"):
            if line.startswith(name + ":"):
                return int(line.split()[1])
        return 0
    def watch():
        while True:
            peak["anon_kb"] = max(peak["anon_kb"], field("RssAnon"))
            time.sleep(0.005)
    threading.Thread(target=watch, daemon=True).start()
    def report():
        peak["anon_kb"] = max(peak["anon_kb"], field("RssAnon"))
        print("MEASURED " + json.dumps({"peak_anon_mb": peak["anon_kb"] / 1024,
                                        "peak_rss_mb": field("VmHWM") / 1024}))
    """
)


def make_checkpoints(workdir: Path, num_models: int, size_mb: int, num_tensors: int) -> list:
    code = textwrap.dedent(
        f"""
        import numpy as np, os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from manifold_merge.io import CheckpointWriter
        per = {size_mb} * 1_000_000 // 4 // {num_tensors}
        cols = 1024
        rows = max(1, per // cols)
        for i in range({num_models}):
            folder = os.path.join({str(workdir)!r}, "t{num_tensors}", f"model{{i}}")
            if os.path.exists(os.path.join(folder, "model.safetensors")):
                continue
            os.makedirs(folder, exist_ok=True)
            rng = np.random.default_rng(i)
            w = CheckpointWriter(folder)
            for j in range({num_tensors}):
                w.add(f"layers.{{j}}.weight", rng.standard_normal((rows, cols), np.float32))
            w.close()
            open(os.path.join(folder, "config.json"), "w").write("{{}}")
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    return [workdir / f"t{num_tensors}" / f"model{i}" for i in range(num_models)]


def measure(body: str) -> dict:
    code = f"{MONITOR}\nimport sys\nsys.path.insert(0, {str(ROOT)!r})\n{body}\nreport()\n"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("MEASURED ")][-1]
    return json.loads(line[len("MEASURED ") :])


def merge_body(models, out_dir, config_path) -> str:
    lines = ["merge_method: linear", "dtype: float32", "models:"]
    for m in models:
        lines += [f"  - model: {m}", "    parameters:", "      weight: 1.0"]
    Path(config_path).write_text("\n".join(lines) + "\n")
    return textwrap.dedent(
        f"""
        import shutil
        from manifold_merge.cli import main
        shutil.rmtree({str(out_dir)!r}, ignore_errors=True)
        rc = main(["merge", {str(config_path)!r}, {str(out_dir)!r}, "--out-shard-size", "100MB",
                   "--no-progress"])
        assert rc == 0, rc
        """
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--num-models", type=int, default=4)
    parser.add_argument("--workdir", default="/tmp/mm_bench_io")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS_io.md"))
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    rows = []
    for num_tensors in (40, 160):
        models = make_checkpoints(work, args.num_models, args.size_mb, num_tensors)
        largest = os.path.getsize(models[0] / "model.safetensors") / num_tensors / 1e6
        res = measure(merge_body(models, work / "merged", work / f"t{num_tensors}.yaml"))
        rows.append((f"merge_{num_tensors}_tensors", num_tensors, largest, res))
    models = [work / "t40" / f"model{i}" for i in range(args.num_models)]
    paths = [str(m / "model.safetensors") for m in models]
    res = measure(
        "from manifold_merge.io import read_safetensors\n"
        f"loaded = [read_safetensors(p) for p in {paths!r}]\n"
    )
    rows.append(("load_all (baseline)", 40, rows[0][2], res))
    res = measure(
        "import jax, manifold_merge\nfrom manifold_merge.io import open_checkpoint\n"
        f"readers = [open_checkpoint(p) for p in {[str(m) for m in models]!r}]\n"
    )
    rows.append(("import_only (floor)", 40, rows[0][2], res))
    shutil.rmtree(work / "merged", ignore_errors=True)

    merge40 = rows[0][3]["peak_anon_mb"]
    lines = [
        "# Streaming merge: peak memory",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}."
        f" {args.num_models} float32 checkpoints of {args.size_mb} MB each, linear merge, "
        "`--out-shard-size 100MB`. Command: `python benchmarks/io_memory.py`.",
        "",
        "| run | tensors per model | largest tensor (MB) | peak anonymous memory (MB) | "
        "peak RSS incl. mapped file pages (MB) |",
        "|---|---|---|---|---|",
    ]
    for name, t, largest, r in rows:
        lines.append(
            f"| {name} | {t} | {largest:.1f} | {r['peak_anon_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    floor = rows[3][3]["peak_anon_mb"]
    lines += [
        "",
        f"Streaming merge above the import floor: {merge40 - floor:.0f} MB with 40 tensors, "
        f"{rows[1][3]['peak_anon_mb'] - floor:.0f} MB with 160 tensors "
        f"(inputs: {args.num_models * args.size_mb} MB). Load-everything baseline above the "
        f"floor: {rows[2][3]['peak_anon_mb'] - floor:.0f} MB; ratio streaming / baseline = "
        f"{(merge40 - floor) / max(rows[2][3]['peak_anon_mb'] - floor, 1e-9):.3f}.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
