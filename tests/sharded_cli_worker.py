"""Run by tests/test_sharding.py in a subprocess with 8 simulated CPU devices: merges experts
derived from the real all-MiniLM-L6-v2 checkpoint with ``manifold-merge merge`` on one device
and with ``--devices 8``, and prints one JSON line per method comparing the two outputs.
Usage: ``sharded_cli_worker.py MINILM_DIR WORK_DIR [CASES]``, CASES a comma-separated subset
of linear, ties, karcher, nan, adapters (default linear, nan, adapters). Not a test
module."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from minilm_experts import write_experts

from manifold_merge.cli import main
from manifold_merge.io import CheckpointWriter, open_checkpoint

SEED = int(os.environ.get("MM_TEST_SEED", "0"))


def config(root: Path, models, base, method, extra=(), dtype="float32") -> str:
    lines = [f"merge_method: {method}", f"dtype: {dtype}", f"base_model: {base}", "models:"]
    for m, w in zip(models, [0.5, 0.3, 0.2]):
        lines += [f"  - model: {m}", "    parameters:", f"      weight: {w}"]
    lines += list(extra)
    path = root / f"{method}-{dtype}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def compare(a: Path, b: Path) -> dict:
    files_a = sorted(p.name for p in a.iterdir())
    files_b = sorted(p.name for p in b.iterdir())
    same_bytes = files_a == files_b and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files_a if f.endswith("safetensors")
    )
    worst, names = 0.0, 0
    with open_checkpoint(str(a)) as ca, open_checkpoint(str(b)) as cb:
        same_keys = list(ca.keys()) == list(cb.keys())
        for name in ca.keys():
            x = np.asarray(ca.get(name)).astype(np.float64)
            y = np.asarray(cb.get(name)).astype(np.float64)
            scale = max(1.0, float(np.max(np.abs(x)))) if x.size else 1.0
            worst = max(worst, float(np.max(np.abs(x - y))) / scale if x.size else 0.0)
            names += 1
    return {
        "files": files_a,
        "same_files": files_a == files_b,
        "same_bytes": same_bytes,
        "same_keys": same_keys,
        "tensors": names,
        "max_rel_diff": worst,
    }


def run():
    minilm, root = sys.argv[1], Path(sys.argv[2])
    wanted = (sys.argv[3] if len(sys.argv) > 3 else "linear,nan,adapters").split(",")
    models = write_experts(minilm, root, np.random.default_rng(SEED))
    cases = [
        ("linear", [], "bfloat16", ["--out-shard-size", "30MB"]),
        ("ties", ["parameters:", "  density: 0.3"], "bfloat16", []),
        ("karcher", [], "float32", []),
    ]
    for method, extra, dtype, flags in cases:
        if method not in wanted:
            continue
        cfg = config(root, models, minilm, method, extra, dtype)
        single, sharded = root / f"{method}-single", root / f"{method}-sharded"
        report = root / f"{method}-report.json"
        rc1 = main(["merge", cfg, str(single), "--no-progress", *flags])
        rc2 = main(
            ["merge", cfg, str(sharded), "--no-progress", "--devices", "8", "--report",
             str(report), *flags]
        )  # fmt: skip
        row = {"case": method, "rc": [rc1, rc2], **compare(single, sharded)}
        rep = json.loads(report.read_text())
        row["report_devices"] = rep.get("devices")
        row["converged"] = not rep["not_converged"]
        row["leftovers"] = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
        print(json.dumps(row), flush=True)
    if "nan" in wanted:
        broken(root, minilm, models)
    if "adapters" in wanted:
        adapters(root)


def broken(root: Path, minilm: str, models: list[str]) -> None:
    """An expert with a NaN in one tensor: the sharded merge fails, naming the tensor, and
    leaves neither the output folder nor its temporary folder behind."""
    bad = root / "expert_nan"
    bad.mkdir()
    victim = "encoder.layer.3.attention.self.key.weight"
    with open_checkpoint(models[0]) as src, CheckpointWriter(bad) as w:
        for name in src.keys():
            x = np.array(src.get(name))
            if name == victim:
                x[7, 11] = np.nan
            w.add(name, x)
    cfg = config(root, [models[0], str(bad), models[2]], minilm, "linear", dtype="float32")
    out = root / "nan-sharded"
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["merge", cfg, str(out), "--no-progress", "--devices", "8"])
    row = {
        "case": "nan",
        "rc": rc,
        "names_tensor": victim in err.getvalue() and "NaN" in err.getvalue(),
        "out_exists": out.exists(),
        "leftovers": sorted(p.name for p in root.iterdir() if p.name.startswith(".")),
    }
    print(json.dumps(row), flush=True)


def adapters(root: Path) -> None:
    """PEFT LoRA adapters (MiniLM-sized modules, 384 x 384, r = 8) merged with core_space on
    one device and with --devices 8 (b split along m, a along n, the core space by TSQR): the
    merged updates agree to float32 rounding (a TSQR and one QR round differently; the float64
    comparison of the same path is in sharded_worker.py)."""
    from manifold_merge.io import PeftAdapter, read_peft_adapter, write_peft_adapter
    from manifold_merge.manifolds import LoraFactors

    rng = np.random.default_rng(SEED + 1)
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"],
           "base_model_name_or_path": "all-MiniLM-L6-v2"}  # fmt: skip
    paths = []
    for i in range(3):
        lora = {
            f"base_model.model.encoder.layer.{k}.attention.self.{m}": LoraFactors(
                (0.1 * rng.standard_normal((384, 8))).astype(np.float32),
                rng.standard_normal((8, 384)).astype(np.float32),
            )
            for k in range(2)
            for m in ("query", "value")
        }
        write_peft_adapter(root / f"adapter{i}", PeftAdapter(cfg, lora, {}))
        paths.append(str(root / f"adapter{i}"))
    lines = ["merge_method: core_space", "models:"] + [f"  - model: {p}" for p in paths]
    yaml_path = root / "adapters.yaml"
    yaml_path.write_text("\n".join(lines) + "\n")
    single, sharded = root / "adapters-single", root / "adapters-sharded"
    rc1 = main(["merge", str(yaml_path), str(single), "--no-progress"])
    rc2 = main(["merge", str(yaml_path), str(sharded), "--no-progress", "--devices", "8"])
    a, b = read_peft_adapter(single), read_peft_adapter(sharded)
    worst = 0.0
    for m in a.lora:
        da = np.asarray(a.lora[m].b, np.float64) @ np.asarray(a.lora[m].a, np.float64)
        db = np.asarray(b.lora[m].b, np.float64) @ np.asarray(b.lora[m].a, np.float64)
        worst = max(worst, float(np.max(np.abs(da - db)) / np.max(np.abs(da))))
    row = {"case": "adapters", "rc": [rc1, rc2], "same_modules": set(a.lora) == set(b.lora),
           "same_config": a.config == b.config, "max_rel_diff": worst}  # fmt: skip
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    run()
