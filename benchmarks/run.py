"""Issue 8's benchmarks in one command: sets up the comparison environment, runs every
measurement side by side, and writes ``benchmarks/RESULTS.md``.

    python benchmarks/run.py            # everything (about 30-40 min on a 2-core CPU)
    python benchmarks/run.py --quick    # small sizes, 2 repeats: a check that it all runs

Steps:

1. the benchmark-only environment ``benchmarks/.venv-compare`` (never the project's own):
   torch (CPU build), mergekit and geomstats from PyPI, created on first use;
2. ``karcher_speed.py``: Karcher means of N in {2, 4, 8} blocks of D in {1e6, 1.6e7} float32:
   ours (Gram-space and iterative), NumPy floors, mergekit, geomstats, float64 errors;
3. ``end_to_end.py``: ``manifold-merge merge`` vs ``mergekit-pytorch`` on MiniLM-derived
   checkpoints (linear and karcher): wall time and peak RSS;
4. ``lora_speed.py``: core-space LoRA merges vs the dense equivalent, m = n = 4096, r = 16;
5. ``io_overlap.py``: a merge from disk with and without reading ahead (``--no-prefetch``);
6. ``sharding_speed.py``: ``merge(..., mesh=k)`` on k = 1, 2, 4, 8 simulated CPU devices
   (one process each) next to the unsharded merge: time and max difference.

Each part runs in its own process and writes a JSON file next to this script; the report is
rendered from those files (``--render-only`` re-renders without measuring).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMPARE_ENV = HERE / ".venv-compare"
#: The comparison environment: torch's CPU build (pip takes 2.13.0 from the machine's disk
#: where it lies there, see the README), the tools, and a NumPy that geomstats 2.8 imports
#: with (it uses np.trapz, removed in NumPy 2.4).
COMPARE_PACKAGES = ["torch==2.13.0", "mergekit", "geomstats", "numpy<2.4"]
KARCHER_TARGET_RATIO = 3.0  # karcher <= 3 x the one-pass floor at N = 8, D = 1.6e7
MERGEKIT_TARGET_SPEEDUP = 10.0
LORA_TARGET_SPEEDUP = 20.0


def compare_python() -> Path:
    py = COMPARE_ENV / "bin" / "python"
    if not py.exists():
        print(f"benchmarks: creating {COMPARE_ENV} ({', '.join(COMPARE_PACKAGES)})", flush=True)
        venv.create(COMPARE_ENV, with_pip=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *COMPARE_PACKAGES], check=True)
    return py


def part(script: str, *args: str) -> None:
    print(f"benchmarks: {script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True)


def _versions(py: Path) -> dict:
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    code = (
        "import json, importlib.metadata as m; "
        "print(json.dumps({k: m.version(k) for k in ('torch', 'mergekit', 'geomstats', 'numpy')}))"
    )
    try:
        other = json.loads(
            subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout
        )
    except (subprocess.CalledProcessError, FileNotFoundError, json.JSONDecodeError):
        other = {}
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "numpy": np.__version__,
        **{f"compare env {k}": v for k, v in other.items()},
    }


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except OSError:
        mem = float("nan")
    system = f"{platform.system()} {platform.machine()}"
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {system}"


def _fmt_s(v) -> str:
    return "—" if v is None else f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"


def _fmt_e(v) -> str:
    return "—" if v is None else f"{v:.1e}"


def render(py: Path, quick: bool) -> str:
    lines = ["# Benchmarks (issue 8)", ""]
    lines += [
        f"Written by `python benchmarks/run.py{' --quick' if quick else ''}`. "
        f"Machine: {_machine()}.",
        "",
    ]
    lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in _versions(py).items()) + ".", ""]
    lines += [
        "All times are medians of the runs shown (after a warm-up run that compiles); "
        "ratios are against baselines measured in the same run.",
        "",
    ]
    lines += _render_karcher()
    lines += _render_end_to_end()
    lines += _render_lora()
    lines += _render_io_overlap()
    lines += _render_sharding()
    return "\n".join(lines) + "\n"


def _table(columns: list[str], align: str, cells: list[list]) -> list[str]:
    """Markdown table lines; ``align`` has one letter per column, l(eft) or r(ight)."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    body = ["| " + " | ".join(map(str, c)) + " |" for c in cells]
    return ["| " + " | ".join(columns) + " |", rule, *body]


def _load(name):
    path = HERE / name
    return json.loads(path.read_text()) if path.exists() else None


def _section(name: str, title: str, intro: str = "") -> tuple[object, list[str]]:
    """The results in ``name`` (None if not measured) and the section's opening lines."""
    rows = _load(name)
    head = [f"## {title}", ""]
    if rows is None:
        return None, [*head, "(not measured)", ""]
    return rows, [*head, *([intro, ""] if intro else [])]


def _render_karcher() -> list[str]:
    rows, out = _section(
        "results_karcher.json",
        "Karcher means of N blocks of D float32",
        "Error: angle to the float64 reference direction (rad) / relative norm error. "
        "`w @ X` is NumPy's BLAS pass over the stacked (N, D) array, the one-pass floor; "
        "the loop is `S += w_i X_i` over the tensors.",
    )
    if rows is None:
        return out
    cells = []
    floors = {(r["N"], r["D"]): r["median_s"] for r in rows if r["impl"] == "numpy_w@X"}
    for r in rows:
        floor = floors.get((r["N"], r["D"]))
        med = r.get("median_s")
        ratio = f"{med / floor:.2f}×" if med is not None and floor else "—"
        note = r.get("error") or ""
        if "first_call_s" in r:
            note = f"first call (compiles) {_fmt_s(r['first_call_s'])}"
        if r.get("version"):
            note = (note + f"; v{r['version']}").lstrip("; ")
        if r.get("converged") is False:
            note += "; not converged"
        cells.append([r["N"], f"{r['D']:.1e}", r["impl"], _fmt_s(med), ratio,
                      r.get("steps", "—"), _fmt_e(r.get("angle_err")),
                      _fmt_e(r.get("norm_err")), note])  # fmt: skip
    out += _table(
        ["N", "D", "implementation", "median", "vs floor", "steps", "angle error",
         "norm error", "note"],
        "rrlrrrrrl",
        cells,
    )  # fmt: skip
    out += [""]
    big = [
        r
        for r in rows
        if r["N"] == max(x["N"] for x in rows) and r["D"] == max(x["D"] for x in rows)
    ]
    by = {r["impl"]: r for r in big}
    if "ours_gram" in by and "numpy_w@X" in by:
        n, d = big[0]["N"], big[0]["D"]
        ratio = by["ours_gram"]["median_s"] / by["numpy_w@X"]["median_s"]
        ok = "met" if ratio <= KARCHER_TARGET_RATIO else "missed"
        out.append(
            f"- Target karcher ≤ {KARCHER_TARGET_RATIO:g}× the one-pass floor at N = {n}, "
            f"D = {d:.1e}: **{ratio:.2f}×, {ok}**."
        )
        p1, p2 = by.get("ours_gram_pass1"), by.get("ours_gram_pass2")
        if ratio > KARCHER_TARGET_RATIO and p1 and p2:
            fl = by["numpy_w@X"]["median_s"]
            out.append(
                f"  Why: timed alone in this run, pass 1 (the Gram) takes {_fmt_s(p1['median_s'])} "
                f"({p1['median_s'] / fl:.2f}× the floor) and pass 2 (the weighted sum) "
                f"{_fmt_s(p2['median_s'])} ({p2['median_s'] / fl:.2f}×). Pass 2 is a plain "
                "weighted sum, near the floor; the gap is pass 1, whose (8 × 8192)·(8192 × 8) "
                "block products XLA's CPU dot computes on one core, compute-bound rather than "
                "at memory bandwidth. "
                "What would close it: a Gram kernel that keeps the N(N+1)/2 running sums in "
                "SIMD registers and splits the columns over both cores (an XLA custom call, "
                "or Pallas once it targets CPUs); on an accelerator the dot is not the limit."
            )
        mk = by.get("mergekit_karcher", {})
        if mk.get("median_s"):
            speed = mk["median_s"] / by["ours_gram"]["median_s"]
            err_ok = by["ours_gram"]["angle_err"] <= mk["angle_err"]
            ok = "met" if speed >= MERGEKIT_TARGET_SPEEDUP and err_ok else "missed"
            out.append(
                f"- Target ≥ {MERGEKIT_TARGET_SPEEDUP:g}× faster than mergekit's karcher "
                f"with error ≤ its error: **{speed:.1f}× faster, angle error "
                f"{by['ours_gram']['angle_err']:.1e} vs {mk['angle_err']:.1e}, {ok}**."
            )
    out.append("")
    return out


def _render_end_to_end() -> list[str]:
    rows, out = _section(
        "results_end_to_end.json",
        "End to end: `manifold-merge merge` vs `mergekit-pytorch`",
        "MiniLM-derived checkpoints (4 experts, float32 output). Each run is a fresh process; "
        "ours keeps its persistent XLA cache, so its first run compiles and the later runs "
        "load the compiled programs.",
    )
    if rows is None:
        return out
    out += _table(
        ["method", "tool", "first run", "median of later runs", "peak RSS (median)",
         "max rel. difference to the other tool"],
        "llrrrr",
        [[r["method"], r["tool"], _fmt_s(r["first_wall_s"]),
          f"{_fmt_s(r['median_wall_s'])} ({r['runs']} runs)",
          f"{r['median_peak_rss_mb']:.0f} MB", f"{r['max_rel_diff_vs_other']:.1e}"]
         for r in rows],
    )  # fmt: skip
    out.append("")
    for method in dict.fromkeys(r["method"] for r in rows):
        by = {r["tool"]: r for r in rows if r["method"] == method}
        if {"ours", "mergekit"} <= set(by):
            a, b = by["ours"], by["mergekit"]
            ok = "met" if a["median_wall_s"] <= b["median_wall_s"] else "missed"
            first = "met" if a["first_wall_s"] <= b["first_wall_s"] else "missed"
            out.append(
                f"- {method}: wall time ours / mergekit = "
                f"{a['median_wall_s'] / b['median_wall_s']:.2f} (later runs, **{ok}**), "
                f"{a['first_wall_s'] / b['first_wall_s']:.2f} (first run, "
                f"compiling: {first})."
            )
    if any(r["tool"] == "ours" and r["method"] == "karcher" for r in rows):
        out += [
            "",
            "The first karcher run compiles one program per distinct tensor shape (MiniLM has 8 "
            "float ones; each takes 1–3 s on this CPU, against about 0.5 s for linear), "
            "which is where its first-run time goes; later runs load them from the cache. "
            "What would close the first-run gap: compiling the shape-independent part (the "
            "N-dimensional float64 solve) once per N and only the two passes per shape.",
        ]
    out.append("")
    return out


def _render_lora() -> list[str]:
    rows, out = _section("results_lora.json", "LoRA: core space vs the dense equivalent")
    if rows is None:
        return out
    out += _table(
        ["method", "N", "m × n, r", "output rank", "ours (core space)", "dense (sum + SVD)",
         "speed-up", "rel. difference"],
        "lrlrrrrr",
        [[r["method"], r["N"], f"{r['m']} × {r['n']}, {r['r']}", r["out_rank"],
          _fmt_s(r["ours_median_s"]), _fmt_s(r["dense_median_s"]), f"{r['speedup']:.0f}×",
          f"{r['rel_diff']:.1e}"] for r in rows],
    )  # fmt: skip
    at8 = [r for r in rows if r["N"] == 8]
    if at8:
        worst = min(r["speedup"] for r in at8)
        ok = "met" if worst >= LORA_TARGET_SPEEDUP else "missed"
        out += [
            "",
            f"- Target core space ≥ {LORA_TARGET_SPEEDUP:g}× faster than dense at N = 8: "
            f"**{worst:.0f}× (slowest method), {ok}**.",
        ]
    out.append("")
    return out


def _render_io_overlap() -> list[str]:
    r = _load("results_io_overlap.json")
    if r is None:
        return []
    med = r["median_s"]
    return [
        "## Reading the next tensor during the current merge",
        "",
        f"`io_overlap.py`: `manifold-merge merge` ({r['method']}) of 4 checkpoints of "
        f"{r['size_mb_per_model']} MB (40 tensors each), every input file evicted from the page "
        f"cache before each run (pages still cached afterwards: "
        f"{r['pages_cached_after_evict_max']}), medians of {r['runs']} runs:",
        "",
        "| prefetch (default) | `--no-prefetch` | ratio |",
        "|---:|---:|---:|",
        f"| {_fmt_s(med['prefetch'])} | {_fmt_s(med['no_prefetch'])} | "
        f"{med['prefetch'] / med['no_prefetch']:.2f} |",
        "",
        *(
            [
                f"Single runs ranged {min(min(v) for v in r['times_s'].values()):.2f}–"
                f"{max(max(v) for v in r['times_s'].values()):.2f} s.",
                "",
            ]
            if "times_s" in r
            else []
        ),
    ]


def _render_sharding() -> list[str]:
    res, out = _section("results_sharding.json", "Sharded merges on simulated CPU devices")
    if res is None:
        return out
    s = res["setup"]
    runs = {r["devices"]: r for r in res["runs"]}
    ks = sorted(runs)
    kmax = ks[-1]
    lo = s["lora"]
    out += [
        f"`sharding_speed.py`: N = {s['models']} models of one {s['leaf_shape'][0]} × "
        f"{s['leaf_shape'][1]} {s['dtype']} leaf (`ties`: density {s['ties_density']}, with a "
        f"base; `karcher`: no base, default algorithm, i.e. the Gram-space solver at this "
        f"size) and `lora_svd` on N = {s['models']} adapters, m = n = {lo['m']}, r = {lo['r']} "
        f"(output rank {lo['rank']}). Each device count k runs in its own process with "
        "`XLA_FLAGS=--xla_force_host_platform_device_count=k`; the unsharded `merge` (no "
        "mesh) runs in the same process, alternating with the sharded one. Inputs are NumPy "
        "arrays on the host, so both include handing them to the devices. Medians of "
        f"{s['repeats']} runs after a warm-up (compiling) run.",
        "",
        f"**What this measures.** On this {s['cpu_count']}-core CPU the k simulated devices "
        "share the same cores, so this shows that a sharded merge gives the unsharded result "
        "and what partitioning costs; it cannot show a speed-up (that needs k real "
        "accelerators; no GPU or TPU was available for these runs).",
        "",
    ]
    methods = list(dict.fromkeys(r["method"] for k in ks for r in runs[k]["rows"]))
    cells, failures = [], []
    for mname in methods:
        by = {k: next((r for r in runs[k]["rows"] if r["method"] == mname), None) for k in ks}
        times = []
        for k in ks:
            r = by[k]
            if r is None:
                times.append("—")
            elif "error" in r:
                times.append("fails")
                failures.append((mname, k, r["error"]))
            else:
                times.append(_fmt_s(r["sharded_median_s"]))
        top = by[kmax]
        ok = [r for r in by.values() if r is not None and "error" not in r]
        if top is not None and "error" not in top:
            base_s = _fmt_s(top["unsharded_median_s"])
            ratio = f"{top['sharded_median_s'] / top['unsharded_median_s']:.2f}×"
            shards = "; ".join(
                f"{leaf} {' / '.join('×'.join(map(str, sh)) for sh in v)}"
                for leaf, v in top["shard_shape"].items()
            )
        else:
            base_s = ratio = shards = "—"
        if ok:
            worst = max(ok, key=lambda r: r["max_abs_diff"])
            diff = f"{worst['max_abs_diff']:.1e} ({worst['max_rel_diff']:.1e} rel.)"
            if worst.get("compared") == "b @ a":
                diff += " on b a"
        else:
            diff = "—"
        cells.append([f"`{mname}`", *times, base_s, ratio, diff, shards])
    out += _table(
        ["method", *[f"{k} device{'s' if k > 1 else ''}" for k in ks],
         f"unsharded (in the {kmax}-device process)", f"{kmax} devices / unsharded",
         "max abs. diff. (over all k)", f"shard per device ({kmax} devices)"],
        "l" + "r" * (len(ks) + 3) + "l",
        cells,
    )  # fmt: skip
    baselines = [
        r["unsharded_median_s"]
        for k in ks
        for r in runs[k]["rows"]
        if "error" not in r and r["method"] == "linear"
    ]
    loads = [
        v
        for k in ks
        for v in (runs[k].get("load_1min_before"), runs[k].get("load_1min_after"))
        if v is not None
    ]
    out += [""]
    out.append(
        "Max abs. diff.: the largest |sharded − unsharded| entry over the device counts "
        "(relative: divided by the largest |unsharded| entry); for `lora_svd` on the merged "
        "update b a (the factors themselves are defined only up to signs), the factors' "
        "largest difference being "
        + ", ".join(
            f"{r['max_abs_diff_factors']:.1e} (k = {k})"
            for k in ks
            for r in runs[k]["rows"]
            if "max_abs_diff_factors" in r
        )
        + "."
    )
    spec = res.get("lora_spectrum")
    if spec:
        out.append(
            f"The summed LoRA update's singular values at the truncation to rank {lo['rank']} "
            f"are {spec['sigma_r']:.3f} and {spec['sigma_r_plus_1']:.3f} (relative gap "
            f"{spec['relative_gap']:.1e}): the truncated SVD's factors move by about float32 "
            "rounding / gap, which is the size of the `lora_svd` difference."
        )
    if baselines and len(baselines) > 1:
        out.append("")
        out.append(
            f"The unsharded `linear` baseline ranged {_fmt_s(min(baselines))}–"
            f"{_fmt_s(max(baselines))} across the {len(baselines)} processes."
        )
    if loads:
        out.append("")
        out.append(
            (
                "The machine was shared with other work during the runs: "
                if max(loads) > s["cpu_count"] + 1
                else ""
            )
            + f"1-minute load average {min(loads):.1f}–{max(loads):.1f} on {s['cpu_count']} "
            "cores (before/after each process, this benchmark included); single times are "
            "noisy, and sharded and unsharded runs alternate to see the same load. Per process "
            "(before → after): "
            + ", ".join(
                f"k = {k}: {runs[k]['load_1min_before']:.1f} → {runs[k]['load_1min_after']:.1f}"
                for k in ks
                if runs[k].get("load_1min_before") is not None
            )
            + "."
        )
    lora_top = next(
        (r for r in runs[kmax]["rows"] if r["method"].startswith("lora") and "error" not in r),
        None,
    )
    if lora_top:
        ts = lora_top["sharded_times_s"]
        out.append(
            f"The sharded `{lora_top['method']}` time grows with k and varied most between "
            f"runs (k = {kmax}: {_fmt_s(min(ts))}–{_fmt_s(max(ts))}). Its partitioned kernel "
            "(a TSQR per factor: k local QRs, a gather of the k R factors, replicated small "
            "solves) runs on the same 2 cores as the one-QR unsharded merge."
        )
    if failures:
        out += ["", "Failures (the error raised by `merge(..., mesh=k)`):", ""]
        seen = {}
        for mname, k, err in failures:
            seen.setdefault((mname, err.splitlines()[0] if err else ""), []).append((k, err))
        for (mname, _), items in seen.items():
            first = items[0][1].strip().splitlines()
            msg = " ".join(ln.strip() for ln in first if ln.strip())[:600]
            ks_s = ", ".join(str(k) for k, _ in items)
            out.append(f"- `{mname}` at k = {ks_s}: `{msg}`")
    for k in ks:
        if runs[k].get("error"):
            out.append(f"- k = {k}: the process failed: `{runs[k]['error'][:300]}`")
    out.append("")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 2 repeats")
    p.add_argument("--render-only", action="store_true", help="re-render RESULTS.md")
    p.add_argument("--only", default="karcher,end_to_end,lora,io_overlap,sharding")
    a = p.parse_args()
    py = compare_python()
    if not a.render_only:
        reps = "2" if a.quick else "5"
        parts = a.only.split(",")
        if "karcher" in parts:
            sizes = ["--ds", "100000,1000000", "--ns", "2,8"] if a.quick else []
            part("karcher_speed.py", "--compare-python", str(py), "--repeats", reps, *sizes)
        if "end_to_end" in parts:
            part("end_to_end.py", "--compare-bin", str(py.parent), "--repeats", reps)
        if "lora" in parts:
            sizes = ["--m", "1024", "--n", "1024"] if a.quick else []
            part("lora_speed.py", "--repeats", reps, *sizes)
        if "io_overlap" in parts:
            sizes = ["--size-mb", "50"] if a.quick else []
            part("io_overlap.py", "--repeats", reps, *sizes)
        if "sharding" in parts:
            part("sharding_speed.py", "--repeats", reps)
    text = render(py, a.quick)
    (HERE / "RESULTS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
