"""manifold_merge.io.planned: checkpoints laid out from their tensor list and written in pieces
(in any order, by one or several writers) are byte-identical to CheckpointWriter's output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from reference import random_array

from manifold_merge.io import CheckpointWriter, open_checkpoint
from manifold_merge.io.planned import PlannedCheckpointWriter, plan_shards
from manifold_merge.io.safetensors import DTYPES, dtype_name

BF16 = np.dtype(ml_dtypes.bfloat16)
INDEX = "model.safetensors.index.json"


def random_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """F32, BF16, I64 and F16 tensors (plus the other dtypes at random), a 0-d, a zero-size one
    and one much larger than the others."""
    shapes = {
        "embed.weight": ("F32", (37, 11)),  # 1628 bytes: larger than the small shard limits
        "scalar": ("BF16", ()),
        "empty": ("F16", (3, 0, 2)),
        "ids": ("I64", (13,)),
        "half": ("F16", (5, 7)),
        "bf": ("BF16", (9, 4)),
    }
    names = list(DTYPES)
    for i in range(int(rng.integers(3, 7))):
        ndim = int(rng.integers(1, 3))
        shapes[f"layer.{i}.w"] = (names[rng.integers(len(names))], tuple(rng.integers(1, 12, ndim)))
    order = list(shapes)
    rng.shuffle(order)
    return {k: random_array(rng, DTYPES[shapes[k][0]], shapes[k][1]) for k in order}


def plan_of(tensors: dict[str, np.ndarray]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(k, dtype_name(v.dtype), tuple(int(d) for d in v.shape)) for k, v in tensors.items()]


def reference(folder: Path, tensors: dict, **kwargs) -> list[str]:
    with CheckpointWriter(folder, **kwargs) as w:
        for k, v in tensors.items():
            w.add(k, v)
    return w.close()


def pieces(rng: np.random.Generator, tensors: dict, part=None) -> list[tuple[str, int, object]]:
    """Each tensor cut into random pieces ``(name, start, data)``, all shuffled. ``part``
    (``(i, n)``) keeps the ``i``-th of ``n`` contiguous element ranges of each tensor."""
    out = []
    for name, arr in tensors.items():
        flat = arr.reshape(-1)
        lo, hi = 0, flat.size
        if part is not None:
            i, n = part
            lo, hi = flat.size * i // n, flat.size * (i + 1) // n
        if hi == lo:
            continue
        cuts = sorted(set(rng.integers(lo + 1, hi + 1, int(rng.integers(0, 4))).tolist()))
        bounds = [lo, *[c for c in cuts if c < hi], hi]
        for a, b in zip(bounds[:-1], bounds[1:]):
            piece = flat[a:b]
            if len(piece) % 2 == 0 and rng.integers(2):
                piece = piece.reshape(2, -1)  # any shape, read in C order
            out.append((name, a, piece))
    rng.shuffle(out)
    return out


def assert_same_files(a: Path, b: Path, files: list[str]) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(files)
    assert sorted(p.name for p in b.iterdir()) == sorted(files)
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


@pytest.mark.parametrize(
    "shard_size, metadata",
    [(None, None), (None, {"merge": "karcher", "ü": "ω"}), (100, None), ("150", {"x": "1"})],
)
def test_identical_to_checkpoint_writer(tmp_path, rng, shard_size, metadata):
    tensors = random_tensors(rng)
    ref = reference(tmp_path / "ref", tensors, out_shard_size=shard_size, metadata=metadata)
    if shard_size is not None:
        assert len(ref) >= 4  # 3+ shards and the index
    w = PlannedCheckpointWriter(
        tmp_path / "out", plan_of(tensors), out_shard_size=shard_size, metadata=metadata
    )
    assert w.files == ref
    for name, start, data in pieces(rng, tensors):
        w.write(name, data, start)
    assert w.missing() == []
    assert w.close() == ref
    assert_same_files(tmp_path / "ref", tmp_path / "out", ref)
    ckpt = open_checkpoint(tmp_path / "out")
    assert ckpt.keys() == list(tensors)
    for k, v in tensors.items():
        assert ckpt.get(k).tobytes() == v.tobytes()


def test_weight_map_and_files_match(tmp_path, rng):
    tensors = random_tensors(rng)
    with CheckpointWriter(tmp_path / "ref", out_shard_size=300) as ref:
        for k, v in tensors.items():
            ref.add(k, v)
    w = PlannedCheckpointWriter(tmp_path / "out", plan_of(tensors), out_shard_size=300)
    assert w.weight_map == ref.weight_map
    assert w.files == ref.close()
    assert w.total_size == sum(v.nbytes for v in tensors.values())
    assert w.keys() == list(tensors)
    assert w.info("ids") == ("I64", (13,))
    w.abort()


def test_plan_shards_matches_checkpoint_writer(tmp_path, rng):
    for trial in range(20):
        sizes = [(f"t{i}", int(rng.choice([0, 1, 4, 8, 40, 100]))) for i in range(8)]
        limit = int(rng.choice([1, 8, 40, 64, 100, 1000]))
        folder = tmp_path / str(trial)
        with CheckpointWriter(folder, out_shard_size=limit) as ref:
            for k, n in sizes:
                ref.add(k, np.zeros(n, np.uint8))
        shards = plan_shards(sizes, limit)
        files = ref.close()
        names = files[:-1] if len(files) > 1 else files
        assert {t: names[i] for i, ts in enumerate(shards) for t in ts} == ref.weight_map
    assert plan_shards([], None) == [[]] and plan_shards([("a", 5)], None) == [["a"]]


def test_no_tensors(tmp_path):
    ref = reference(tmp_path / "ref", {})
    with PlannedCheckpointWriter(tmp_path / "out", []) as w:
        assert w.missing() == []
    assert_same_files(tmp_path / "ref", tmp_path / "out", ref)


@pytest.mark.parametrize("shard_size", [None, 300])
def test_two_writers_share_the_files(tmp_path, rng, shard_size):
    tensors = random_tensors(rng)
    ref = reference(tmp_path / "ref", tensors, out_shard_size=shard_size)
    plan = plan_of(tensors)
    first = PlannedCheckpointWriter(tmp_path / "out", plan, out_shard_size=shard_size)
    second = PlannedCheckpointWriter(
        tmp_path / "out", plan, out_shard_size=shard_size, create=False
    )
    todo = [(first, *p) for p in pieces(rng, tensors, (0, 2))]
    todo += [(second, *p) for p in pieces(rng, tensors, (1, 2))]
    rng.shuffle(todo)
    for w, name, start, data in todo:
        w.write(name, data, start)
    # each writer knows only its own half (the first half of a 1-element tensor is empty)
    assert first.missing() == [k for k, v in tensors.items() if v.size >= 1]
    assert second.missing() == [k for k, v in tensors.items() if v.size >= 2]
    second.close()
    first.close()
    assert_same_files(tmp_path / "ref", tmp_path / "out", ref)


def test_jax_and_big_endian_data(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = np.arange(5, dtype=np.int64)
    ref = reference(tmp_path / "ref", {"x": x, "y": y})
    with PlannedCheckpointWriter(tmp_path / "out", plan_of({"x": x, "y": y})) as w:
        w.write("x", jnp.asarray(x[:2]))  # a JAX array, 2-D
        w.write("x", x[2:].T.copy().T, start=8)  # a Fortran-ordered piece, read in C order
        w.write("y", y.astype(">i8"))  # stored little-endian
        w.write("y", np.zeros(0, np.int64), start=5)  # empty, at the end: allowed
    assert_same_files(tmp_path / "ref", tmp_path / "out", ref)


def test_missing_lists_partly_written_tensors(tmp_path):
    plan = [("a", "F32", (4,)), ("b", "I64", (2, 3)), ("c", "BF16", (0,)), ("d", "F16", ())]
    with PlannedCheckpointWriter(tmp_path, plan) as w:
        assert w.missing() == ["a", "b", "d"]
        w.write("a", np.ones(2, np.float32), start=2)
        w.write("a", np.ones(1, np.float32), start=0)
        w.write("b", np.ones((2, 3), np.int64))
        w.write("d", np.float16(1))
        assert w.missing() == ["a"]
        w.write("a", np.ones(2, np.float32), start=1)  # overlapping writes are fine
        assert w.missing() == []
    assert open_checkpoint(tmp_path).get("a").tolist() == [1.0] * 4


def test_write_errors(tmp_path):
    plan = [("w", "BF16", (2, 3)), ("n", "I64", (4,))]
    with PlannedCheckpointWriter(tmp_path, plan) as w:
        with pytest.raises(ValueError, match=r"'w' is planned as BF16.*dtype float32"):
            w.write("w", np.zeros(6, np.float32))
        with pytest.raises(ValueError, match=r"'n' is planned as I64.*dtype int32"):
            w.write("n", np.zeros(4, np.int32))
        with pytest.raises(ValueError, match=r"\[4, 7\) are out of bounds for tensor 'w'"):
            w.write("w", np.zeros(3, BF16), start=4)
        with pytest.raises(ValueError, match="start -1 for tensor 'n'"):
            w.write("n", np.zeros(1, np.int64), start=-1)
        with pytest.raises(KeyError, match="tensor 'nope' is not in the plan"):
            w.write("nope", np.zeros(1, np.int64))
        assert w.missing() == ["w", "n"]  # nothing was written
    with pytest.raises(ValueError, match="closed"):
        w.write("n", np.zeros(4, np.int64))


@pytest.mark.parametrize(
    "plan, error, match",
    [
        ([("a", "F32", (1,)), ("a", "F32", (2,))], ValueError, "tensor 'a' appears more than once"),
        ([("__metadata__", "F32", (1,))], ValueError, "reserved"),
        ([(3, "F32", (1,))], TypeError, "names must be str"),
        ([("a", "F8", (1,))], ValueError, "tensor 'a' has dtype 'F8'"),
        ([("a", np.float32, (1,))], ValueError, "tensor 'a' has dtype"),
        ([("a", "F32", (2, -1))], ValueError, r"tensor 'a' has shape \(2, -1\)"),
        ([("a", "F32", (2.0,))], ValueError, "tensor 'a' has shape"),
        ([("a", "F32")], TypeError, "must be a \\(name, dtype, shape\\) tuple"),
    ],
)
def test_plan_errors(tmp_path, plan, error, match):
    with pytest.raises(error, match=match):
        PlannedCheckpointWriter(tmp_path / "out", plan)
    assert not (tmp_path / "out").exists()  # nothing created for an invalid plan


@pytest.mark.parametrize("size", [0, -5, "big", "5B"])
def test_bad_shard_size(tmp_path, size):
    with pytest.raises(ValueError, match="out_shard_size must be positive|size"):
        PlannedCheckpointWriter(tmp_path, [("a", "F32", (1,))], out_shard_size=size)


def test_refuses_folder_with_weights(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    (tmp_path / "old.index.json").write_text("{}")
    with pytest.raises(FileExistsError, match="model-00001-of-00002.safetensors, old.index.json"):
        PlannedCheckpointWriter(tmp_path, [("a", "F32", (1,))])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model-00001-of-00002.safetensors",
        "old.index.json",
    ]


def test_create_false_checks_the_files(tmp_path):
    plan = [("a", "F32", (100,)), ("b", "F32", (100,))]
    with pytest.raises(FileNotFoundError, match="model.safetensors' does not exist"):
        PlannedCheckpointWriter(tmp_path / "none", plan, create=False)
    PlannedCheckpointWriter(tmp_path, plan, out_shard_size=400).close()
    first = tmp_path / "model-00001-of-00002.safetensors"
    index = tmp_path / INDEX
    with pytest.raises(FileNotFoundError, match="/model.safetensors' does not exist"):
        PlannedCheckpointWriter(tmp_path, plan, create=False)  # one file planned, not there
    with pytest.raises(ValueError, match="different header"):  # same sizes, other names
        PlannedCheckpointWriter(
            tmp_path, [("b", "F32", (100,)), ("a", "F32", (100,))], out_shard_size=400, create=False
        )
    text = index.read_text()
    index.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json' does not exist"):
        PlannedCheckpointWriter(tmp_path, plan, out_shard_size=400, create=False)
    index.write_text(text)
    size = first.stat().st_size
    os.truncate(first, size - 1)
    with pytest.raises(ValueError, match=f"00002.safetensors' is {size - 1} bytes long.*{size}"):
        PlannedCheckpointWriter(tmp_path, plan, out_shard_size=400, create=False)
    os.truncate(first, size)
    with PlannedCheckpointWriter(tmp_path, plan, out_shard_size=400, create=False) as w:
        w.write("a", np.ones(100, np.float32))
    assert json.loads(index.read_text())["weight_map"] == w.weight_map
    assert first.exists()  # create=False never removes files


def test_abort_removes_the_files(tmp_path):
    plan = [("a", "F32", (100,)), ("b", "F32", (100,))]
    (tmp_path / "config.json").write_text("{}")
    w = PlannedCheckpointWriter(tmp_path, plan, out_shard_size=400)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["config.json", *w.files])
    other = PlannedCheckpointWriter(tmp_path, plan, out_shard_size=400, create=False)
    other.write("b", np.ones(100, np.float32))
    other.abort()  # not the creator: the files stay
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["config.json", *w.files])
    w.write("a", np.ones(100, np.float32))
    w.abort()
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    with pytest.raises(ValueError, match="aborted"):
        w.close()


def test_exception_in_with_removes_the_files(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with PlannedCheckpointWriter(tmp_path, [("a", "I8", (3,))]) as w:
            w.write("a", np.ones(3, np.int8))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with PlannedCheckpointWriter(tmp_path, [("a", "I8", (3,))]) as w:
        pass  # unwritten: still closed normally (coverage is the caller's to check)
    assert w.missing() == ["a"]
    assert open_checkpoint(tmp_path).get("a").tolist() == [0, 0, 0]
