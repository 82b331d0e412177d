"""Sharded merges (manifold_merge.sharding): on 8 simulated CPU devices in a subprocess
(XLA_FLAGS must be set before JAX starts, and the rest of the suite runs on one device), the
sharded results equal the single-device ones and every device holds only its slice; plus the
pieces that run on one device here (helpers, TIES' threshold prune against NumPy)."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import np_prune
from simulated_devices import DEVICES, HERE, simulated

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

#: Cases of tests/sharded_worker.py run by default; SLOW_CASES with ``-m slow``.
BLOCK_CASES = ["linear", "ties", "karcher_gram", "karcher_iterative", "fisher"]
SLOW_CASES = [
    "ties_dense",
    "dare_ties",
    "karcher_row",
    "karcher_group",
    "fisher_rao_karcher",
    "frechet_first_order",
]


def _worker_rows(cases: list[str]) -> dict:
    """One run of tests/sharded_worker.py on ``cases``: {case: row}."""
    proc = subprocess.run(
        [sys.executable, str(HERE / "sharded_worker.py"), ",".join(cases)],
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


@pytest.fixture(scope="module")
def sharded_rows():
    return _worker_rows([*BLOCK_CASES, "lora"])


@pytest.fixture(scope="module")
def slow_sharded_rows():
    return _worker_rows(SLOW_CASES)


def _check_equal(row):
    for leaf, diff in row["diff"].items():
        # float32: 1e-6 of the values' scale (measured: <= 4.8e-7 absolute, scales 2-5)
        assert diff <= 1e-6 * max(1.0, row["scale"][leaf]), (row["case"], leaf, diff)
    assert row["converged"], row["case"]


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_sharded_merge_equals_single_device(sharded_rows, case):
    _check_equal(sharded_rows[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES)
def test_more_sharded_methods_equal_single_device(slow_sharded_rows, case):
    _check_equal(slow_sharded_rows[case])


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_each_device_holds_only_its_slice(sharded_rows, case):
    lay = sharded_rows[case]["layout"]
    assert lay["kernel"]["spec"] == "P('params', None)"
    assert lay["kernel"]["shards"] == [[512 // DEVICES, 384]]
    assert lay["kernel"]["devices"] == DEVICES
    if "bias" in lay:  # (the solvers' cases merge the kernel alone)
        assert lay["bias"]["spec"] == "P('params',)"
        assert lay["bias"]["shards"] == [[48 // DEVICES]]
        # 30 rows do not divide by 8: replicated, whole on every device
        assert lay["emb"]["spec"] == "P()" and lay["emb"]["shards"] == [[30, 16]]


@pytest.mark.parametrize("case", ["linear", "ties", "karcher_gram", "fisher"])
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


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_threshold_prune_matches_a_stable_top_k(rng, density):
    tv = rng.normal(size=(5, 3001)).astype(np.float32)
    tv[:, :1500] = np.round(tv[:, :1500], 1)  # many ties at every magnitude
    tv[:, 2500:] = 0.0
    tv[1] = -tv[1]  # -0.0 and 0.0 tie too
    got = np.asarray(jax.jit(lambda x: magnitude_prune(x, density))(tv))
    np.testing.assert_array_equal(got, np_prune(tv, density))
    assert np.all(np.count_nonzero(got, axis=1) <= int(density * tv.shape[1]))


def test_threshold_prune_float64(rng):
    with jax.enable_x64(True):
        tv = np.round(rng.normal(size=(3, 777)), 2)
        got = np.asarray(magnitude_prune(jnp.asarray(tv), 0.4))
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, np_prune(tv, 0.4))


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
