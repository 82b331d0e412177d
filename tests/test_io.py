"""manifold_merge.io: the safetensors reader/writer (against the official package) and PEFT
LoRA adapter folders (read, write, merge)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tracemalloc

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from manifold_merge.io import (
    PeftAdapter,
    SafetensorsFile,
    merge_peft_adapters,
    read_peft_adapter,
    read_safetensors,
    write_peft_adapter,
    write_safetensors,
)
from manifold_merge.io import peft as peft_io
from manifold_merge.io import safetensors as st_io
from manifold_merge.manifolds.lora import LoraFactors
from manifold_merge.merging import MergeResult

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": BF16,
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


def random_array(rng: np.random.Generator, dtype: np.dtype, shape: tuple) -> np.ndarray:
    """Random bit patterns (NaNs, infinities, subnormals included); 0/1 for bool."""
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    raw = rng.integers(0, 256, math.prod(shape) * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def random_shapes(rng: np.random.Generator) -> list[tuple]:
    shapes = [(), (0,), (3, 0), tuple(int(d) for d in rng.integers(1, 6, rng.integers(1, 4)))]
    return shapes + [(int(rng.integers(1, 40)),)]


def random_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    tensors = {}
    for name, dtype in DTYPES.items():
        for j, shape in enumerate(random_shapes(rng)):
            tensors[f"layer.{name.lower()}.{j}"] = random_array(rng, dtype, shape)
    keys = list(tensors)
    rng.shuffle(keys)  # the writer keeps the given order, whatever it is
    return {k: tensors[k] for k in keys}


def assert_bitwise_equal(x: np.ndarray, y: np.ndarray, name: str = "") -> None:
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype, (name, x.dtype, y.dtype)
    assert x.shape == y.shape, (name, x.shape, y.shape)
    assert x.tobytes() == y.tobytes(), name


def raw_file(path, header, data: bytes = b"", *, length: int | None = None) -> str:
    """A safetensors file from a header (object or raw bytes) and a data area."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if length is None else length
    with open(path, "wb") as fh:
        fh.write(n.to_bytes(8, "little") + body + data)
    return str(path)


# -- safetensors: round trip and interop ---------------------------------------------------


def test_round_trip_every_dtype_bit_for_bit(tmp_path, rng):
    tensors = random_tensors(rng)
    path = tmp_path / "t.safetensors"
    write_safetensors(path, tensors, {"format": "np", "note": "é ∑"})
    with SafetensorsFile(path) as f:
        assert f.keys() == list(tensors)
        assert len(f) == len(tensors) and list(f) == list(tensors)
        assert f.metadata == {"format": "np", "note": "é ∑"}
        for name, x in tensors.items():
            assert name in f
            assert f.info(name) == (st_io.dtype_name(x.dtype), x.shape)
            assert f.nbytes(name) == x.nbytes
            assert_bitwise_equal(f.get(name), x, name)
        assert "missing" not in f
    back = read_safetensors(path)
    assert list(back) == list(tensors)
    for name, x in tensors.items():
        assert_bitwise_equal(back[name], x, name)
        assert back[name].flags.writeable


def test_header_padded_with_spaces_to_eight_bytes(tmp_path, rng):
    for j in range(8):  # names of every length mod 8
        path = tmp_path / f"{j}.safetensors"
        write_safetensors(path, {"x" * (j + 1): random_array(rng, DTYPES["F32"], (2,))})
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        assert n % 8 == 0
        header = raw[8 : 8 + n]
        assert json.loads(header) and header == header.rstrip(b" ") + b" " * (
            n - len(header.rstrip(b" "))
        )


def test_ours_read_by_official_package(tmp_path, rng):
    tensors = random_tensors(rng)
    path = tmp_path / "ours.safetensors"
    write_safetensors(path, tensors, {"format": "pt"})
    loaded = safetensors.numpy.load_file(path)
    assert set(loaded) == set(tensors)
    for name, x in tensors.items():
        assert_bitwise_equal(loaded[name], x, name)
    with safetensors.safe_open(path, framework="np") as f:
        assert f.metadata() == {"format": "pt"}


def test_official_package_read_by_ours(tmp_path, rng):
    tensors = random_tensors(rng)
    path = tmp_path / "official.safetensors"
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt", "k": "v"})
    with SafetensorsFile(path) as f:
        assert set(f.keys()) == set(tensors)
        assert f.metadata == {"format": "pt", "k": "v"}
        for name, x in tensors.items():
            assert_bitwise_equal(f.get(name), x, name)


def test_same_bytes_as_official_package(tmp_path, rng):
    # The reference orders tensors by dtype then name; given that order, the files are equal.
    names = sorted(f"w{j}" for j in range(int(rng.integers(1, 6))))
    tensors = {n: random_array(rng, DTYPES["F32"], (int(rng.integers(0, 5)), 3)) for n in names}
    safetensors.numpy.save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    write_safetensors(tmp_path / "ours.safetensors", tensors, {"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (
        tmp_path / "ref.safetensors"
    ).read_bytes()


def test_jax_arrays_keep_dtype(tmp_path, rng):
    x = jnp.asarray(rng.standard_normal((3, 4)), jnp.bfloat16)
    y = jnp.asarray(rng.standard_normal(5), jnp.float32)
    write_safetensors(tmp_path / "j.safetensors", {"x": x, "y": y})
    back = read_safetensors(tmp_path / "j.safetensors")
    assert_bitwise_equal(back["x"], np.asarray(x))
    assert back["x"].dtype == BF16
    assert_bitwise_equal(back["y"], np.asarray(y))


def test_non_contiguous_and_big_endian_arrays(tmp_path, rng):
    m = rng.standard_normal((4, 6))
    big = m.astype(">f4")
    write_safetensors(tmp_path / "x.safetensors", {"t": m.T, "s": m[::2, 1::3], "be": big})
    back = read_safetensors(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(back["t"], m.T)
    np.testing.assert_array_equal(back["s"], m[::2, 1::3])
    assert back["be"].dtype == np.dtype("<f4")
    np.testing.assert_array_equal(back["be"], big)
    assert safetensors.numpy.load_file(tmp_path / "x.safetensors")["be"].tolist() == big.tolist()


def _memmap_in_base_chain(x: np.ndarray) -> bool:
    while x is not None:
        if isinstance(x, np.memmap):
            return True
        x = getattr(x, "base", None)
    return False


def test_get_is_a_read_only_view_into_the_map(tmp_path, rng):
    x = random_array(rng, DTYPES["F32"], (7, 5))
    write_safetensors(tmp_path / "v.safetensors", {"pad": np.zeros(3, np.int8), "x": x})
    with SafetensorsFile(tmp_path / "v.safetensors") as f:
        a, b = f.get("x"), f.get("x")
    assert type(a) is np.ndarray
    assert _memmap_in_base_chain(a)
    assert np.shares_memory(a, b)  # two gets, one buffer: nothing was copied
    assert not a.flags.writeable
    with pytest.raises(ValueError):
        a[0, 0] = 1.0
    assert_bitwise_equal(a, x)  # still valid after close


def test_opening_does_not_read_the_data(tmp_path):
    # A 256 MiB tensor in a sparse file: opening and viewing it must not allocate its size.
    size = 256 * 2**20
    path = tmp_path / "big.safetensors"
    header = {"big": {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}}
    raw_file(path, header)
    with open(path, "r+b") as fh:
        fh.truncate(fh.seek(0, os.SEEK_END) + size)
    tracemalloc.start()
    try:
        with SafetensorsFile(path) as f:
            view = f.get("big")
            assert view.shape == (size // 4,)
            assert float(view[12345]) == 0.0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, peak


def test_closed_file_and_unknown_tensor(tmp_path, rng):
    write_safetensors(tmp_path / "c.safetensors", {"x": random_array(rng, BF16, (2,))})
    f = SafetensorsFile(tmp_path / "c.safetensors")
    with pytest.raises(KeyError, match="'y'.*c.safetensors"):
        f.get("y")
    f.close()
    with pytest.raises(ValueError, match="closed"):
        f.get("x")


def test_empty_file_of_tensors(tmp_path):
    write_safetensors(tmp_path / "e.safetensors", {})
    assert read_safetensors(tmp_path / "e.safetensors") == {}
    write_safetensors(tmp_path / "z.safetensors", {"z": np.zeros((0, 4), np.float16)})
    with SafetensorsFile(tmp_path / "z.safetensors") as f:
        assert f.get("z").shape == (0, 4) and f.get("z").dtype == np.float16


# -- safetensors: corrupt files -----------------------------------------------------------

F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
CORRUPT = {
    "empty file": lambda p: p.write_bytes(b"") or p,
    "shorter than 8 bytes": lambda p: p.write_bytes(b"\x01\x00\x00") or p,
    "header longer than file": lambda p: raw_file(p, {"x": F32_2}, bytes(8), length=10**6),
    "not utf-8": lambda p: raw_file(p, b'{"\xff\xfe": 1}'),
    "not json": lambda p: raw_file(p, b"{this is not json}"),
    "json list": lambda p: raw_file(p, [1, 2, 3]),
    "entry not an object": lambda p: raw_file(p, {"x": [1, 2]}),
    "missing dtype": lambda p: raw_file(p, {"x": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
    "missing shape": lambda p: raw_file(p, {"x": {"dtype": "F32", "data_offsets": [0, 8]}}),
    "missing offsets": lambda p: raw_file(p, {"x": {"dtype": "F32", "shape": [2]}}, bytes(8)),
    "bad shape": lambda p: raw_file(
        p, {"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)
    ),
    "bad offsets": lambda p: raw_file(
        p, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8)
    ),
    "size mismatch": lambda p: raw_file(
        p, {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)
    ),
    "overlap": lambda p: raw_file(
        p, {"x": F32_2, "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)
    ),
    "gap": lambda p: raw_file(
        p, {"x": F32_2, "y": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, bytes(20)
    ),
    "not starting at 0": lambda p: raw_file(
        p, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)
    ),
    "beyond the data": lambda p: raw_file(
        p, {"x": F32_2, "y": {"dtype": "I8", "shape": [9], "data_offsets": [8, 17]}}, bytes(12)
    ),
    "truncated data": lambda p: raw_file(p, {"x": F32_2}, bytes(5)),
    "uncovered bytes": lambda p: raw_file(p, {"x": F32_2}, bytes(16)),
    "duplicate key": lambda p: raw_file(
        p, b'{"x": %s, "x": %s}' % ((json.dumps(F32_2).encode(),) * 2), bytes(8)
    ),
    "non-str metadata": lambda p: raw_file(p, {"__metadata__": {"a": 1}, "x": F32_2}, bytes(8)),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_file_raises_naming_the_file(tmp_path, case):
    path = tmp_path / f"corrupt_{case.replace(' ', '_')}.safetensors"
    CORRUPT[case](path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        SafetensorsFile(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_safetensors(path)


@pytest.mark.parametrize(
    ("case", "tensor"),
    [("overlap", "y"), ("gap", "y"), ("size mismatch", "x"), ("missing dtype", "x")],
)
def test_corrupt_entry_error_names_the_tensor(tmp_path, case, tensor):
    path = CORRUPT[case](tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match=f"tensor '{tensor}'"):
        SafetensorsFile(path)


def test_unsupported_stored_dtype_names_tensor_and_dtype(tmp_path):
    header = {"scale": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}
    path = raw_file(tmp_path / "f8.safetensors", header, bytes(4))
    with pytest.raises(ValueError, match=r"'scale'.*'F8_E4M3'"):
        SafetensorsFile(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        SafetensorsFile(path)


# -- safetensors: writer errors and atomicity ----------------------------------------------


def _folder_state(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("bad", [np.zeros(2, np.complex64), np.zeros(2, np.uint32), ["a", "b"]])
def test_unsupported_dtype_leaves_existing_file_untouched(tmp_path, rng, bad):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"old": random_array(rng, DTYPES["F32"], (3,))})
    before = _folder_state(tmp_path)
    tensors = {"a": np.ones(2, np.float32), "bad": bad, "c": np.ones(2, np.float32)}
    with pytest.raises(ValueError, match="'bad'"):
        write_safetensors(path, tensors)
    assert _folder_state(tmp_path) == before


def test_failure_while_writing_removes_the_temporary_file(tmp_path, rng, monkeypatch):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"old": random_array(rng, DTYPES["F32"], (3,))})
    before = _folder_state(tmp_path)

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(st_io.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_safetensors(path, {"new": random_array(rng, DTYPES["F64"], (1000,))})
    assert _folder_state(tmp_path) == before


def test_writer_rejects_bad_metadata_and_names(tmp_path):
    path = tmp_path / "m.safetensors"
    with pytest.raises(TypeError, match="'version'"):
        write_safetensors(path, {"x": np.zeros(1)}, {"version": 2})
    with pytest.raises(TypeError, match="str"):
        write_safetensors(path, {1: np.zeros(1)})
    with pytest.raises(ValueError, match="__metadata__"):
        write_safetensors(path, {"__metadata__": np.zeros(1)})
    assert not os.listdir(tmp_path)


# -- PEFT adapters --------------------------------------------------------------------------

P = "base_model.model."
HIDDEN, VOCAB = 12, 30
ATTN = [f"encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")]
EMBED = "embeddings.word_embeddings"


def peft_rank_alpha(config: dict, name: str) -> tuple[int, float]:
    """PEFT's rule, written out independently: first pattern p with (.*\\.)?(p)$ matching."""

    def lookup(pattern, default):
        for key, value in (pattern or {}).items():
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        return default

    return lookup(config.get("rank_pattern"), config["r"]), lookup(
        config.get("alpha_pattern"), config["lora_alpha"]
    )


def peft_scale(config: dict, name: str) -> float:
    r, alpha = peft_rank_alpha(config, name)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def peft_config(**overrides) -> dict:
    """A config as PEFT 0.1x writes it for a BERT-style sequence classifier."""
    config = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": 16,
        "lora_dropout": 0.1,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": ["classifier"],
        "peft_type": "LORA",
        "r": 8,
        "rank_pattern": {},
        "revision": None,
        "target_modules": ["query", "value", "word_embeddings"],
        "task_type": "SEQ_CLS",
        "use_dora": False,
        "use_rslora": False,
    }
    config.update(overrides)
    return config


def make_adapter(folder, rng, *, dtype=np.float32, classifier=None, hidden=HIDDEN, **overrides):
    """Write a realistic adapter folder (with the official safetensors package, keys sorted as
    PEFT's files have them); return its config and tensors."""
    config = peft_config(**overrides)

    def rand(shape):
        return rng.standard_normal(shape).astype(dtype)

    tensors = {}
    for name in ATTN:
        r, _ = peft_rank_alpha(config, name)
        tensors[f"{P}{name}.lora_A.weight"] = rand((r, hidden))
        tensors[f"{P}{name}.lora_B.weight"] = rand((hidden, r))
    r, _ = peft_rank_alpha(config, EMBED)
    tensors[f"{P}{EMBED}.lora_embedding_A"] = rand((r, VOCAB))
    tensors[f"{P}{EMBED}.lora_embedding_B"] = rand((hidden, r))
    if classifier is None:
        classifier = {"weight": rand((2, hidden)), "bias": rand((2,))}
    for k, v in classifier.items():
        tensors[f"{P}classifier.{k}"] = v
    os.makedirs(folder, exist_ok=True)
    safetensors.numpy.save_file(
        tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"}
    )
    with open(os.path.join(folder, "adapter_config.json"), "w") as fh:
        fh.write(json.dumps(config, indent=2, sort_keys=True))
    return config, tensors


PATTERNS = {
    "rank_pattern": {"encoder.layer.1.attention.self.query": 4},
    "alpha_pattern": {"layer.1.attention.self.query": 12, "value": 32},
}


@pytest.mark.parametrize("dtype", [np.float32, BF16, np.float16])
def test_adapter_round_trip_bit_for_bit(tmp_path, rng, dtype):
    config, tensors = make_adapter(tmp_path / "in", rng, dtype=dtype, **PATTERNS)
    adapter = read_peft_adapter(tmp_path / "in")
    assert adapter.config == config
    assert set(adapter.lora) == {P + m for m in ATTN + [EMBED]}
    assert adapter.kind(P + EMBED) == "embedding" and adapter.kind(P + ATTN[0]) == "linear"
    assert set(adapter.other) == {P + "classifier.weight", P + "classifier.bias"}
    q1 = adapter.lora[P + "encoder.layer.1.attention.self.query"]
    assert q1.a.shape == (4, HIDDEN) and q1.b.shape == (HIDDEN, 4) and q1.a.dtype == dtype

    write_peft_adapter(tmp_path / "out", adapter)
    with open(tmp_path / "out" / "adapter_config.json") as fh:
        assert json.load(fh) == config
    with SafetensorsFile(tmp_path / "in" / "adapter_model.safetensors") as f_in:
        with SafetensorsFile(tmp_path / "out" / "adapter_model.safetensors") as f_out:
            assert f_out.keys() == f_in.keys()  # names and order reproduced
            assert f_out.metadata == f_in.metadata == {"format": "pt"}
    reference = safetensors.numpy.load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert set(reference) == set(tensors)
    for key, x in tensors.items():
        assert_bitwise_equal(reference[key], x, key)
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]  # no temporary folders left


def test_scale_with_patterns_and_rslora(tmp_path, rng):
    make_adapter(tmp_path / "a", rng, **PATTERNS)
    make_adapter(tmp_path / "b", rng, use_rslora=True, **PATTERNS)
    a, b = read_peft_adapter(tmp_path / "a"), read_peft_adapter(tmp_path / "b")
    # Hand-computed: default r=8, alpha=16; layer.1 query r=4, alpha=12; values alpha=32.
    expected = {
        "encoder.layer.0.attention.self.query": (16 / 8, 16 / math.sqrt(8)),
        "encoder.layer.1.attention.self.query": (12 / 4, 12 / 2),
        "encoder.layer.0.attention.self.value": (32 / 8, 32 / math.sqrt(8)),
        "encoder.layer.1.attention.self.value": (32 / 8, 32 / math.sqrt(8)),
        EMBED: (16 / 8, 16 / math.sqrt(8)),
    }
    for name, (plain, rs) in expected.items():
        assert a.scale(P + name) == pytest.approx(plain, rel=1e-12)
        assert b.scale(P + name) == pytest.approx(rs, rel=1e-12)
    with pytest.raises(KeyError, match="no LoRA module"):
        a.scale(P + "encoder.layer.0.attention.self.key")


def test_delta_factors_fold_the_scale(tmp_path, rng):
    _, tensors = make_adapter(tmp_path / "a", rng, dtype=BF16, **PATTERNS)
    adapter = read_peft_adapter(tmp_path / "a")
    for module in adapter.lora:
        d = adapter.delta_factors(module)
        assert d.b.dtype == np.float32 and d.a.dtype == np.float32
        kind = "embedding_" if module.endswith(EMBED) else ""
        suffix = "" if kind else ".weight"
        B = tensors[f"{module}.lora_{kind}B{suffix}"].astype(np.float64)
        A = tensors[f"{module}.lora_{kind}A{suffix}"].astype(np.float64)
        want = peft_scale(adapter.config, module[len(P) :]) * B @ A
        np.testing.assert_allclose(d.b.astype(np.float64) @ d.a, want, rtol=1e-5, atol=1e-5)


def test_match_pattern_follows_peft():
    m = P + "encoder.layer.1.attention.self.query"
    match = peft_io.match_pattern
    assert match({"encoder.layer.1.attention.self.query": 1}, m) is not None  # the full name
    assert match({"self.query": 1}, m) == "self.query"  # a suffix after a dot
    assert match({"query": 1}, m) == "query"
    assert match({"uery": 1}, m) is None  # not at a dot
    assert match({"self.quer": 1}, m) is None  # must reach the end
    assert match({"layer.0.attention.self.query": 1}, m) is None
    assert match({"value": 1, "query": 2, "self.query": 3}, m) == "query"  # first match wins
    assert match({r"layer\.[01]\.attention\.self\.query": 1}, m) is not None  # a regex
    assert match({"^encoder.layer.1.attention.self.query": 1}, m) is not None  # anchored
    assert match({"^layer.1.attention.self.query": 1}, m) is None
    assert match({P + "encoder.layer.1.attention.self.query": 1}, m) is not None  # with prefix
    with pytest.raises(ValueError, match="regular expression"):
        match({"layer.(": 1}, m)


def _break(folder, *, drop=(), add=None, config=None):
    """Rewrite an adapter folder's tensors / config in place."""
    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = safetensors.numpy.load_file(path)
    for key in drop:
        del tensors[key]
    tensors.update(add or {})
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    if config is not None:
        with open(os.path.join(folder, "adapter_config.json"), "w") as fh:
            json.dump(config, fh)


Q0 = P + "encoder.layer.0.attention.self.query"


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("no folder", FileNotFoundError, "no PEFT adapter folder"),
        ("a file", NotADirectoryError, "expected a folder"),
        ("no weights", FileNotFoundError, "adapter_model.safetensors"),
        ("no config", FileNotFoundError, "adapter_config.json"),
        ("pickle", ValueError, "(?s)adapter_model.bin.*Pickles are never loaded.*safetensors"),
        ("bad json", ValueError, "not valid JSON"),
        ("not lora", ValueError, "peft_type is 'IA3'"),
        ("A without B", ValueError, f"{re.escape(Q0)}.*lora_A.*no.*lora_B"),
        ("B without A", ValueError, f"{re.escape(Q0)}.*lora_B.*no.*lora_A"),
        ("shape mismatch", ValueError, f"{re.escape(Q0)}.*same r"),
        ("rank vs r", ValueError, f"{re.escape(Q0)}.*rank 8.*r gives rank 6"),
        ("rank vs pattern", ValueError, "rank 4.*rank_pattern.*gives rank 5"),
        ("dora config", ValueError, "DoRA"),
        ("dora tensor", ValueError, "DoRA"),
        ("unnamed factor", ValueError, "lora_A.default.weight"),
        ("conv factor", ValueError, "4-D"),
    ],
)
def test_read_errors_name_the_folder(tmp_path, rng, case, error, match):
    folder = tmp_path / "adapter"
    config, tensors = make_adapter(folder, rng, **PATTERNS)
    weights, cfg = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    q1 = "encoder.layer.1.attention.self.query"
    if case == "no folder":
        folder = tmp_path / "missing"
    elif case == "a file":
        folder = weights
    elif case == "no weights":
        weights.unlink()
    elif case == "no config":
        cfg.unlink()
    elif case == "pickle":
        weights.rename(folder / "adapter_model.bin")
    elif case == "bad json":
        cfg.write_text("{r: 8,")
    elif case == "not lora":
        _break(folder, config={**config, "peft_type": "IA3"})
    elif case == "A without B":
        _break(folder, drop=[Q0 + ".lora_B.weight"])
    elif case == "B without A":
        _break(folder, drop=[Q0 + ".lora_A.weight"])
    elif case == "shape mismatch":
        _break(folder, add={Q0 + ".lora_B.weight": np.zeros((HIDDEN, 9), np.float32)})
    elif case == "rank vs r":
        _break(folder, config={**config, "r": 6, "rank_pattern": {q1: 4, EMBED: 8, "value": 8}})
    elif case == "rank vs pattern":
        _break(folder, config={**config, "rank_pattern": {q1: 5}})
    elif case == "dora config":
        _break(folder, config={**config, "use_dora": True})
    elif case == "dora tensor":
        _break(folder, add={Q0 + ".lora_magnitude_vector": np.ones(HIDDEN, np.float32)})
    elif case == "unnamed factor":
        _break(folder, add={P + "pooler.lora_A.default.weight": np.ones((8, 2), np.float32)})
    elif case == "conv factor":
        conv = P + "conv"
        _break(
            folder,
            add={
                conv + ".lora_A.weight": np.ones((8, 3, 3, 3), np.float32),
                conv + ".lora_B.weight": np.ones((4, 8, 1, 1), np.float32),
            },
        )
    with pytest.raises(error, match=match) as info:
        read_peft_adapter(folder)
    assert str(folder) in str(info.value)


def test_other_tensors_and_lora_bias_kept(tmp_path, rng):
    folder = tmp_path / "a"
    make_adapter(folder, rng)
    extra = {Q0 + ".lora_B.bias": rng.standard_normal(HIDDEN).astype(np.float32)}
    _break(folder, add=extra)
    adapter = read_peft_adapter(folder)
    assert_bitwise_equal(adapter.other[Q0 + ".lora_B.bias"], extra[Q0 + ".lora_B.bias"])


# -- PEFT: writing --------------------------------------------------------------------------


def _small_adapter(rng, r=2) -> PeftAdapter:
    config = peft_config(r=r, target_modules=["query"], modules_to_save=None)
    b = rng.standard_normal((HIDDEN, r)).astype(np.float32)
    return PeftAdapter(config, {Q0: LoraFactors(b, rng.standard_normal((r, 5)))}, {})


def test_write_refuses_existing_folder_without_overwrite(tmp_path, rng):
    make_adapter(tmp_path / "a", rng)
    before = _folder_state(tmp_path / "a")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_peft_adapter(tmp_path / "a", _small_adapter(rng))
    assert _folder_state(tmp_path / "a") == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        write_peft_adapter(tmp_path / "file", _small_adapter(rng), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["a", "file"]


def test_overwrite_replaces_the_folder(tmp_path, rng):
    make_adapter(tmp_path / "a", rng)
    (tmp_path / "a" / "README.md").write_text("old")
    new = _small_adapter(rng)
    write_peft_adapter(tmp_path / "a", new, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["a"]
    assert sorted(os.listdir(tmp_path / "a")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    back = read_peft_adapter(tmp_path / "a")
    assert back.config == new.config
    assert_bitwise_equal(back.lora[Q0].b, new.lora[Q0].b)
    assert back.lora[Q0].a.dtype == np.float64  # kept as given


def test_write_creates_missing_parents(tmp_path, rng):
    write_peft_adapter(tmp_path / "x" / "y" / "a", _small_adapter(rng))
    assert read_peft_adapter(tmp_path / "x" / "y" / "a").config["r"] == 2


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("where", ["weights", "rename"])
def test_failed_write_leaves_nothing_and_keeps_existing(
    tmp_path, rng, monkeypatch, where, overwrite
):
    target = tmp_path / "out" / "adapter"
    if overwrite:
        make_adapter(target, rng)
    before = _folder_state(target) if overwrite else None

    if where == "weights":

        def boom(*args, **kwargs):
            raise OSError("disk full")

        monkeypatch.setattr(peft_io, "write_safetensors", boom)
    else:
        real_rename = os.rename

        def rename(src, dst):
            if ".tmp-" in os.path.basename(src):
                raise OSError("rename failed")
            real_rename(src, dst)

        monkeypatch.setattr(peft_io.os, "rename", rename)
    with pytest.raises(OSError, match="disk full|rename failed"):
        write_peft_adapter(target, _small_adapter(rng), overwrite=overwrite)
    if overwrite:
        assert sorted(os.listdir(tmp_path / "out")) == ["adapter"]
        assert _folder_state(target) == before
    else:
        assert os.listdir(tmp_path) == []  # even the parent it created is gone


def test_write_rejects_configs_that_do_not_describe_the_tensors(tmp_path, rng):
    adapter = _small_adapter(rng, r=2)
    cases = {
        "rank 2.*r gives rank 3": adapter._replace(config={**adapter.config, "r": 3}),
        "rank_pattern": adapter._replace(config={**adapter.config, "rank_pattern": {"query": 4}}),
        "target_modules.*encoder.layer.0.attention.self.query": adapter._replace(
            config={**adapter.config, "target_modules": ["value"]}
        ),
        "peft_type": adapter._replace(config={**adapter.config, "peft_type": "LOHA"}),
        "JSON": adapter._replace(config={**adapter.config, "extra": object()}),
    }
    for match, bad in cases.items():
        with pytest.raises(ValueError, match=match):
            write_peft_adapter(tmp_path / "a", bad)
    assert os.listdir(tmp_path) == []
    # A regex target_modules as PEFT allows it, and "all-linear", are accepted.
    for targets in (r".*\.attention\.self\.(query|value)", "all-linear"):
        ok = adapter._replace(config={**adapter.config, "target_modules": targets})
        write_peft_adapter(tmp_path / "a", ok, overwrite=True)


# -- PEFT: merging --------------------------------------------------------------------------


def _three_adapters(tmp_path, rng, dtype=np.float32):
    """Adapters of one base with different ranks, patterns and rsLoRA; same classifier."""
    classifier = {
        "weight": rng.standard_normal((2, HIDDEN)).astype(dtype),
        "bias": rng.standard_normal(2).astype(dtype),
    }
    specs = [
        dict(r=8, lora_alpha=16, **PATTERNS),
        dict(r=4, lora_alpha=8, use_rslora=True),
        dict(r=6, lora_alpha=6, rank_pattern={"value": 2}),
    ]
    paths, made = [], []
    for i, spec in enumerate(specs):
        path = str(tmp_path / f"adapter{i}")
        made.append(make_adapter(path, rng, dtype=dtype, classifier=classifier, **spec))
        paths.append(path)
    return paths, made


def _factor_keys(module: str) -> tuple[str, str]:
    if module.endswith(EMBED):
        return module + ".lora_embedding_B", module + ".lora_embedding_A"
    return module + ".lora_B.weight", module + ".lora_A.weight"


def _reconstruct(folder) -> tuple[dict, dict, dict]:
    """As PEFT would: per module scale * B @ A, in float64, from the written files."""
    with open(os.path.join(folder, "adapter_config.json")) as fh:
        config = json.load(fh)
    tensors = safetensors.numpy.load_file(os.path.join(folder, "adapter_model.safetensors"))
    deltas = {}
    for name in ATTN + [EMBED]:
        b_key, a_key = _factor_keys(P + name)
        B, A = tensors[b_key].astype(np.float64), tensors[a_key].astype(np.float64)
        assert peft_rank_alpha(config, name)[0] == A.shape[0] == B.shape[1], name
        deltas[name] = peft_scale(config, name) * B @ A
    return config, tensors, deltas


@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_merge_lora_cat_reconstructs_the_weighted_sum(tmp_path, rng, dtype):
    paths, made = _three_adapters(tmp_path, rng, dtype)
    w = rng.uniform(0.2, 2.0, len(paths))
    out = tmp_path / "merged"
    result = merge_peft_adapters(paths, out, "lora_cat", weights=w.tolist())
    assert isinstance(result, MergeResult)

    config, tensors, deltas = _reconstruct(out)
    for name in ATTN + [EMBED]:
        want = sum(
            w[i]
            * peft_scale(cfg, name)
            * (t[_factor_keys(P + name)[0]].astype(np.float64))
            @ t[_factor_keys(P + name)[1]].astype(np.float64)
            for i, (cfg, t) in enumerate(made)
        )
        rank = sum(peft_rank_alpha(cfg, name)[0] for cfg, _ in made)
        assert tensors[_factor_keys(P + name)[1]].shape == (rank, want.shape[1]), name
        tol = 1e-5 if dtype == np.float32 else 3e-2
        scale = np.abs(want).max()
        np.testing.assert_allclose(deltas[name], want, rtol=tol, atol=tol * scale, err_msg=name)
    first = made[0][0]
    for key in ("base_model_name_or_path", "task_type", "lora_dropout", "bias", "target_modules"):
        assert config[key] == first[key], key
    assert config["lora_alpha"] == first["lora_alpha"] and config["use_rslora"] is False
    assert config["alpha_pattern"] == {}
    for key, x in made[0][1].items():
        if "classifier" in key:
            assert_bitwise_equal(tensors[key], x, key)
        else:
            assert tensors[key].dtype == dtype
    read_peft_adapter(out)  # a valid adapter by our own reader's checks too


def test_merge_writes_through_the_method_result(tmp_path, rng, monkeypatch):
    # The I/O around merge(), with merge() replaced by a known concatenation: checks the scaled
    # inputs, the forwarded arguments, and that the output reconstructs what merge returned.
    paths, made = _three_adapters(tmp_path, rng)
    order = [1, 0, 2]  # the first adapter uses rsLoRA: the output scale is alpha / sqrt(r_m)
    paths, made = [paths[i] for i in order], [made[i] for i in order]
    calls = {}

    def fake_merge(method, models, *, weights=None, **kwargs):
        calls.update(method=method, weights=weights, kwargs=kwargs, models=models)
        w = np.ones(len(models)) if weights is None else np.asarray(weights)
        params = {}
        for m in models[0]:
            b = np.concatenate([wi * x[m].b for wi, x in zip(w, models)], axis=1)
            a = np.concatenate([x[m].a for x in models], axis=0)
            keep = 3 if m.endswith("layer.0.attention.self.query") else b.shape[1]  # mixed ranks
            params[m] = LoraFactors(b[:, :keep], a[:keep])
        return MergeResult(params, {})

    monkeypatch.setattr(peft_io, "merge", fake_merge)
    result = merge_peft_adapters(paths, tmp_path / "m", "some_lora", weights=[1, 2, 3], t=0.5)
    assert calls["method"] == "some_lora" and calls["weights"] == [1, 2, 3]
    assert calls["kwargs"] == {"t": 0.5}  # rank only when given
    for i, (cfg, t) in enumerate(made):
        for name in ATTN + [EMBED]:
            f = calls["models"][i][P + name]
            b_key, a_key = _factor_keys(P + name)
            np.testing.assert_allclose(f.b, peft_scale(cfg, name) * t[b_key], rtol=1e-6)
            assert_bitwise_equal(f.a, t[a_key])
    config, _, deltas = _reconstruct(tmp_path / "m")
    for name in ATTN + [EMBED]:
        f = result.params[P + name]
        want = np.asarray(f.b, np.float64) @ np.asarray(f.a, np.float64)
        np.testing.assert_allclose(deltas[name], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert config["use_rslora"] is True and config["lora_alpha"] == made[0][0]["lora_alpha"]
    ranks = [np.shape(result.params[P + n].b)[1] for n in ATTN + [EMBED]]
    assert config["r"] == max(set(ranks), key=ranks.count)
    assert config["rank_pattern"] == {
        n: r for n, r in zip(ATTN + [EMBED], ranks) if r != config["r"]
    }
    merge_peft_adapters(paths, tmp_path / "m", "some_lora", rank=4, overwrite=True)
    assert calls["kwargs"] == {"rank": 4}
    with pytest.raises(FileExistsError):
        merge_peft_adapters(paths, tmp_path / "m", "some_lora")


def test_rank_pattern_is_unambiguous_under_peft_matching():
    # "x.a.q" ends with ".a.q": a pattern for module a.q alone would also catch it.
    ranks = {P + "a.q": 4, P + "x.a.q": 8, P + "b.q": 8}
    pattern = peft_io._rank_pattern(ranks, 8)
    config = {"r": 8, "lora_alpha": 1, "rank_pattern": pattern}
    for module, r in ranks.items():
        assert peft_rank_alpha(config, module[len(P) :])[0] == r, (module, pattern)
    assert list(pattern) == ["x.a.q", "a.q"]


def test_merge_rejects_different_modules(tmp_path, rng):
    paths, _ = _three_adapters(tmp_path, rng)
    _break(paths[2], drop=[Q0 + ".lora_A.weight", Q0 + ".lora_B.weight"])
    with pytest.raises(ValueError, match=f"{re.escape(paths[2])}.*lacks.*{re.escape(Q0)}"):
        merge_peft_adapters(paths, tmp_path / "m", "lora_cat")
    assert not (tmp_path / "m").exists()


def test_merge_rejects_different_shapes(tmp_path, rng):
    a = str(tmp_path / "a")
    b = str(tmp_path / "b")
    classifier = {"weight": np.zeros((2, HIDDEN), np.float32)}
    make_adapter(a, rng, classifier=classifier)
    make_adapter(b, rng, classifier=classifier)
    _break(
        b,
        add={
            Q0 + ".lora_A.weight": np.ones((8, HIDDEN + 1), np.float32),
        },
    )
    with pytest.raises(ValueError, match=f"{re.escape(Q0)}.*{re.escape(b)}.*shape"):
        merge_peft_adapters([a, b], tmp_path / "m", "lora_cat")


def test_merge_rejects_different_other_tensors(tmp_path, rng):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_adapter(a, rng)
    make_adapter(b, rng)  # another random classifier head
    with pytest.raises(ValueError, match=r"classifier\.(weight|bias).*differs"):
        merge_peft_adapters([a, b], tmp_path / "m", "lora_cat")
    with pytest.raises(TypeError, match="list"):
        merge_peft_adapters(a, tmp_path / "m", "lora_cat")


def _reparametrised_copy(src, dst, rng):
    """The same adapter with every module's (B, A) replaced by (B M, M^-1 A), M random in GL(r)."""
    tensors = safetensors.numpy.load_file(os.path.join(src, "adapter_model.safetensors"))
    for name in ATTN + [EMBED]:
        b_key, a_key = _factor_keys(P + name)
        b, a = tensors[b_key].astype(np.float64), tensors[a_key].astype(np.float64)
        r = b.shape[1]
        m = np.linalg.qr(rng.standard_normal((r, r)))[0] @ np.diag(rng.uniform(0.6, 1.6, r))
        tensors[b_key] = (b @ m).astype(np.float32)
        tensors[a_key] = np.linalg.solve(m, a).astype(np.float32)
    os.makedirs(dst)
    safetensors.numpy.save_file(tensors, os.path.join(dst, "adapter_model.safetensors"))
    shutil.copy(os.path.join(src, "adapter_config.json"), dst)


def test_merge_peft_folders_with_quotient_methods(tmp_path, rng):
    paths = []
    head = {"weight": rng.standard_normal((2, HIDDEN)).astype(np.float32)}
    for i, spec in enumerate([dict(r=4, lora_alpha=8), dict(r=4, lora_alpha=16, use_rslora=True)]):
        paths.append(str(tmp_path / f"a{i}"))
        make_adapter(paths[-1], rng, classifier=head, **spec)
    moved = [str(tmp_path / f"moved{i}") for i in range(2)]
    for p, q in zip(paths, moved):
        _reparametrised_copy(p, q, rng)
    w = [0.4, 0.6]
    merge_peft_adapters(paths, tmp_path / "svd", "lora_svd", weights=w, rank=3)
    _, _, deltas = _reconstruct(tmp_path / "svd")
    _, _, inputs0 = _reconstruct(paths[0])
    _, _, inputs1 = _reconstruct(paths[1])
    for name in ATTN + [EMBED]:
        total = w[0] * inputs0[name] + w[1] * inputs1[name]
        u, s, vt = np.linalg.svd(total)
        want = (u[:, :3] * s[:3]) @ vt[:3]
        np.testing.assert_allclose(deltas[name], want, atol=1e-4 * np.abs(want).max())
    # geomerge depends on the updates only: reparametrised folders give the same adapter.
    merge_peft_adapters(paths, tmp_path / "g0", "geomerge", weights=w)
    merge_peft_adapters(moved, tmp_path / "g1", "geomerge", weights=w)
    _, _, d0 = _reconstruct(tmp_path / "g0")
    _, _, d1 = _reconstruct(tmp_path / "g1")
    for name in ATTN + [EMBED]:
        err = np.linalg.norm(d1[name] - d0[name]) / np.linalg.norm(d0[name])
        assert err < 1e-4, (name, err)


def test_aligned_empty_starts_on_the_boundary():
    from manifold_merge.io.safetensors import aligned_empty

    for shape, dtype in [((3, 5), np.float32), ((7,), np.float64), ((1000, 3), np.float16)]:
        a = aligned_empty(shape, dtype)
        assert a.shape == shape and a.dtype == dtype
        assert a.ctypes.data % 64 == 0
        a[...] = 1  # writable, and its own memory
        assert a.flags.writeable
    assert aligned_empty((0, 4), np.float32).shape == (0, 4)  # no data: nothing to align
