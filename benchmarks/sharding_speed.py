"""Sharded merges (``merge(..., mesh=k)``) next to the unsharded merge, on k simulated devices.

For each device count k in ``--devices`` (default 1, 2, 4, 8) a fresh subprocess starts with
``XLA_FLAGS=--xla_force_host_platform_device_count=k`` (the flag must be set before JAX is
imported, so each k needs its own process) and, on the same inputs (fixed seed), times

* ``linear``, ``ties`` (density 0.3, with a base: task vectors) and ``karcher`` (default
  algorithm, which takes the Gram-space solver at this size; no base) on N = 4 models of one
  (4096, 1024) float32 leaf;
* ``lora_svd`` on N = 4 rank-16 adapters of a 4096 x 4096 module (``LoraFactors`` b: m x r,
  a: r x n), output rank 16;

each once with ``mesh=k`` and once without a mesh (the unsharded baseline, same process).
Inputs are NumPy arrays on the host (64-byte aligned, as the CLI stages them), so both
timings include handing the inputs to the devices. Times are medians of ``--repeats`` runs
after one warm-up run (compilation, reported separately), each blocked on the output leaves
(``jax.block_until_ready``); the sharded and unsharded runs alternate, so that both see the
same load. The 1-minute load average before and after each subprocess is recorded. Also
recorded: max |sharded - unsharded| (for LoRA on the merged update b a, whose factors are
defined only up to signs, and on the factors themselves) and the per-device shard shapes of
the sharded result.

On a CPU the simulated devices share the machine's cores: this measures that the sharded
merge is correct and what partitioning costs, not a speed-up.

    python benchmarks/sharding_speed.py [--devices 1,2,4,8 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
N_MODELS = 4
SHAPE = (4096, 1024)
LORA_M = LORA_N = 4096
LORA_R = 16
TIES_DENSITY = 0.3
#: (method, kwargs of merge besides models / mesh, whether it takes the base)
METHODS = (
    ("linear", {}, False),
    ("ties", {"density": TIES_DENSITY}, True),
    ("karcher", {}, False),
    ("lora_svd", {"rank": LORA_R}, False),
)


def label(method: str, kwargs: dict) -> str:
    extra = {k: v for k, v in kwargs.items() if k not in ("rank",)}
    return method + "".join(f" {k}={v}" for k, v in extra.items())


def make_models(seed: int = 0):
    """A base and N models around it (task vectors ~0.1 of the base's scale), 64-byte aligned."""
    from manifold_merge.io.safetensors import aligned_empty  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    base = aligned_empty(SHAPE, np.float32)
    base[...] = rng.standard_normal(SHAPE, dtype=np.float32)
    models = []
    for _ in range(N_MODELS):
        x = aligned_empty(SHAPE, np.float32)
        x[...] = base + np.float32(0.1) * rng.standard_normal(SHAPE, dtype=np.float32)
        models.append({"w": x})
    return {"w": base}, models


def make_adapters(seed: int = 0):
    from manifold_merge.manifolds import LoraFactors  # noqa: PLC0415

    rng = np.random.default_rng(seed + 1)
    out = []
    for _ in range(N_MODELS):
        b = rng.standard_normal((LORA_M, LORA_R), dtype=np.float32) / np.sqrt(LORA_R)
        a = rng.standard_normal((LORA_R, LORA_N), dtype=np.float32) / np.sqrt(LORA_N)
        out.append(LoraFactors(b, a))
    return out


def lora_spectrum() -> dict:
    """Singular values of the summed update sum_i b_i a_i around the truncation (float64, via
    the core space): a truncated SVD's factors move by about rounding / relative gap, which
    bounds how close a sharded and an unsharded ``lora_svd`` can be in float32."""
    fs = make_adapters()
    b = np.concatenate([f.b for f in fs], axis=1).astype(np.float64)
    a = np.concatenate([f.a for f in fs], axis=0).astype(np.float64)
    sv = np.linalg.svd(np.linalg.qr(b)[1] @ np.linalg.qr(a.T)[1].T, compute_uv=False)
    r = LORA_R
    return {
        "sigma_r": float(sv[r - 1]),
        "sigma_r_plus_1": float(sv[r]),
        "relative_gap": float((sv[r - 1] - sv[r]) / sv[r - 1]),
    }


def _once(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _timed_pair(fn_a, fn_b, repeats: int):
    """First calls (compiling) of a then b, then ``repeats`` timed runs of each, alternating
    a, b, a, b, ... so that both see the same load on a shared machine."""
    first_a, out_a = _once(fn_a)
    first_b, out_b = _once(fn_b)
    times_a, times_b = [], []
    for _ in range(repeats):
        t, out_a = _once(fn_a)
        times_a.append(t)
        t, out_b = _once(fn_b)
        times_b.append(t)
    return (first_a, times_a, out_a), (first_b, times_b, out_b)


def _shards(arr) -> list:
    return sorted({tuple(int(d) for d in s.data.shape) for s in arr.addressable_shards})


def worker(k: int, repeats: int) -> dict:
    """Runs in the subprocess with k simulated devices."""
    import jax  # noqa: PLC0415

    from manifold_merge import merge  # noqa: PLC0415

    assert len(jax.devices()) >= k, jax.devices()
    base, models = make_models()
    adapters = make_adapters()
    rows = []
    for method, kwargs, with_base in METHODS:
        lora = method.startswith("lora")
        ms = adapters if lora else models
        extra = {"base": base} if with_base else {}

        def run(mesh, method=method, ms=ms, kwargs=kwargs, extra=extra):
            out = merge(method, ms, mesh=mesh, **extra, **kwargs).params
            return jax.block_until_ready(out)

        row = {"method": label(method, kwargs), "devices": k}
        try:
            (first_u, times_u, out_u), (first_s, times_s, out_s) = _timed_pair(
                lambda run=run: run(None), lambda run=run: run(k), repeats
            )
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
            rows.append(row)
            print(f"sharding_speed: k={k} {row['method']}: {row['error'][:300]}", flush=True)
            continue
        row.update(
            unsharded_median_s=float(np.median(times_u)),
            unsharded_first_s=first_u,
            sharded_median_s=float(np.median(times_s)),
            sharded_first_s=first_s,
            runs=repeats,
            unsharded_times_s=times_u,
            sharded_times_s=times_s,
        )
        if lora:
            bu, au = np.asarray(out_u.b), np.asarray(out_u.a)
            bs, as_ = np.asarray(out_s.b), np.asarray(out_s.a)
            du, ds = bu @ au, bs @ as_
            row["max_abs_diff"] = float(np.max(np.abs(ds - du)))
            row["max_abs_unsharded"] = float(np.max(np.abs(du)))
            row["max_abs_diff_factors"] = float(
                max(np.max(np.abs(bs - bu)), np.max(np.abs(as_ - au)))
            )
            row["compared"] = "b @ a"
            row["shard_shape"] = {"b": _shards(out_s.b), "a": _shards(out_s.a)}
            row["spec"] = {"b": str(out_s.b.sharding.spec), "a": str(out_s.a.sharding.spec)}
            row["devices_used"] = len({s.device for s in out_s.b.addressable_shards})
        else:
            u, s = np.asarray(out_u["w"]), np.asarray(out_s["w"])
            row["max_abs_diff"] = float(np.max(np.abs(s - u)))
            row["max_abs_unsharded"] = float(np.max(np.abs(u)))
            row["compared"] = "w"
            row["shard_shape"] = {"w": _shards(out_s["w"])}
            row["spec"] = {"w": str(out_s["w"].sharding.spec)}
            row["devices_used"] = len({sh.device for sh in out_s["w"].addressable_shards})
        row["max_rel_diff"] = row["max_abs_diff"] / row["max_abs_unsharded"]
        rows.append(row)
        print(
            f"sharding_speed: k={k} {row['method']}: "
            f"sharded {row['sharded_median_s'] * 1e3:.1f} ms, "
            f"unsharded {row['unsharded_median_s'] * 1e3:.1f} ms, "
            f"max diff {row['max_abs_diff']:.1e}, shards {row['shard_shape']}",
            flush=True,
        )
    return {"devices": k, "jax_devices": len(jax.devices()), "rows": rows}


def spawn(k: int, repeats: int, timeout: int) -> dict:
    env = dict(os.environ)
    flag = f"--xla_force_host_platform_device_count={k}"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(k),
           "--repeats", str(repeats)]  # fmt: skip
    print(f"sharding_speed: {k} device(s)", flush=True)
    load_before, t0 = os.getloadavg()[0], time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"devices": k, "error": f"did not finish in {timeout} s", "rows": []}
    load = {"load_1min_before": load_before, "load_1min_after": os.getloadavg()[0],
            "wall_s": time.perf_counter() - t0}  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    sys.stdout.write("".join(ln + "\n" for ln in proc.stdout.splitlines() if ln not in lines))
    if proc.returncode != 0 or not lines:
        err = f"worker failed (rc {proc.returncode}): {proc.stderr.strip()[-1500:]}"
        return {"devices": k, "rows": [], "error": err, **load}
    return {**json.loads(lines[-1]), **load}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timeout", type=int, default=600, help="seconds per device count")
    p.add_argument("--out", default=str(HERE / "results_sharding.json"))
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker is not None:
        print(json.dumps(worker(a.worker, a.repeats)), flush=True)
        return 0
    t0 = time.perf_counter()
    ks = [int(k) for k in a.devices.split(",")]
    runs = [spawn(k, a.repeats, a.timeout) for k in ks]
    result = {
        "setup": {
            "models": N_MODELS,
            "leaf_shape": list(SHAPE),
            "dtype": "float32",
            "lora": {"m": LORA_M, "n": LORA_N, "r": LORA_R, "rank": LORA_R},
            "ties_density": TIES_DENSITY,
            "repeats": a.repeats,
            "inputs": "NumPy arrays on the host, 64-byte aligned",
            "simulated": "XLA_FLAGS=--xla_force_host_platform_device_count=k, one process per k",
            "cpu_count": os.cpu_count(),
        },
        "wall_s": time.perf_counter() - t0,
        "lora_spectrum": lora_spectrum(),
        "runs": runs,
    }
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"sharding_speed: wrote {a.out} ({result['wall_s']:.0f} s)", flush=True)
    return 0 if all(not r.get("error") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
