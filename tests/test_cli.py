"""The ``manifold-merge`` command and the mergekit-style config parser, end to end on small
synthetic Hugging Face folders (written with the official safetensors package)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import yaml

from manifold_merge import merge
from manifold_merge.cli import main
from manifold_merge.io import (
    PeftAdapter,
    merge_peft_adapters,
    read_peft_adapter,
    write_peft_adapter,
)
from manifold_merge.io.hf import open_checkpoint, to_dtype
from manifold_merge.io.merge_config import ConfigError, load_merge_config
from manifold_merge.manifolds.lora import LoraFactors

ROOT = Path(__file__).resolve().parent.parent
BF16 = np.dtype(ml_dtypes.bfloat16)
SHAPES = {
    "model.embed_tokens.weight": (16, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.mlp.up_proj.weight": (8, 8),  # few distinct shapes: fewer compilations
    "model.layers.0.mlp.up_proj.bias": (8,),
    "model.norm.weight": (8,),
}
INT_NAME = "model.position_ids"
LAST = "model.norm.weight"


# -- fixtures and helpers -----------------------------------------------------------------


def write_model(folder: Path, tensors: dict, *, shards: int = 1, config: dict | None = None):
    """A Hugging Face folder: model.safetensors (or shards + index), config and tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        safetensors.numpy.save_file(tensors, folder / "model.safetensors", {"format": "pt"})
    else:
        weight_map = {}
        for k, part in enumerate(np.array_split(np.arange(len(names)), shards), start=1):
            fname = f"model-{k:05d}-of-{shards:05d}.safetensors"
            chunk = {names[j]: tensors[names[j]] for j in part}
            safetensors.numpy.save_file(chunk, folder / fname, {"format": "pt"})
            weight_map.update({n: fname for n in chunk})
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    (folder / "tokenizer.json").write_text(json.dumps({"source": folder.name}))
    return str(folder)


def load(folder) -> dict[str, np.ndarray]:
    with open_checkpoint(folder) as ckpt:
        return {k: np.array(ckpt.get(k)) for k in ckpt.keys()}


def random_model(rng, base=None, scale=0.1) -> dict:
    out = {}
    for name, shape in SHAPES.items():
        x = rng.standard_normal(shape).astype(np.float32)
        out[name] = x if base is None else (base[name] + scale * x).astype(np.float32)
    out[INT_NAME] = np.arange(16, dtype=np.int64).reshape(1, 16)
    return out


@pytest.fixture
def zoo(tmp_path, rng):
    """A base and three experts (the second one sharded), with their tensors."""
    base = random_model(rng)
    experts = [random_model(rng, base) for _ in range(3)]
    paths = {"base": write_model(tmp_path / "base", base, config={"model_type": "llama", "b": 1})}
    for i, t in enumerate(experts):
        paths[f"e{i}"] = write_model(tmp_path / f"e{i}", t, shards=2 if i == 1 else 1)
    return {"paths": paths, "base": base, "experts": experts, "tmp": tmp_path}


def write_config(tmp_path: Path, cfg: dict, name: str = "merge.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["merge", *map(str, args), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def models_entry(paths, weights=None, base=True):
    entries = [{"model": paths["base"]}] if base else []  # mergekit lists the base too
    for i in range(3):
        e = {"model": paths[f"e{i}"]}
        if weights is not None:
            e["parameters"] = {"weight": weights[i]}
        entries.append(e)
    return entries


# -- merging ------------------------------------------------------------------------------


def test_linear_equals_float64_weighted_average(zoo, capsys):
    w = [0.5, 0.3, 0.2]
    cfg = {
        "merge_method": "linear",
        "base_model": zoo["paths"]["base"],
        "models": models_entry(zoo["paths"], w, base=False),
    }
    out = zoo["tmp"] / "out"
    code, stdout, err = run(capsys, write_config(zoo["tmp"], cfg), out)
    assert code == 0, err
    merged = load(out)
    first = zoo["experts"][0]
    assert list(merged) == list(load(zoo["paths"]["base"]))  # the base's order
    assert {k: (v.shape, v.dtype) for k, v in merged.items()} == {
        k: (v.shape, v.dtype) for k, v in first.items()
    }
    for name in SHAPES:
        ref = sum(wi * e[name].astype(np.float64) for wi, e in zip(w, zoo["experts"])) / sum(w)
        np.testing.assert_allclose(merged[name], ref, rtol=2e-6, atol=1e-7, err_msg=name)
    np.testing.assert_array_equal(merged[INT_NAME], first[INT_NAME])
    # config and tokenizer from the base model, no weights of the base copied
    assert json.loads((out / "config.json").read_text()) == {"model_type": "llama", "b": 1}
    assert json.loads((out / "tokenizer.json").read_text()) == {"source": "base"}
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert leftovers(zoo["tmp"]) == []
    assert "merged 6 tensors" in stdout


CASES = {
    "task_arithmetic": (
        {"lambda": [{"filter": "mlp", "value": 0.7}, {"value": 1.0}]},
        {},
        [0.5, 0.3, 0.2],
    ),
    "ties": ({"density": 0.5, "lambda": 0.9}, {}, [1.0, 0.6, 0.4]),
    "karcher": ({}, {"tol": 1e-7, "max_iter": 100}, [0.5, 0.3, 0.2]),  # compiled as by default
    "slerp": ({"t": 0.3}, {}, None),
}


@pytest.mark.parametrize("method", list(CASES))
def test_methods_match_merge_on_the_same_arrays(zoo, capsys, method):
    params, extras, w = CASES[method]
    paths = zoo["paths"]
    n = 1 if method == "slerp" else 3
    cfg = {
        "merge_method": method,
        "base_model": paths["base"],
        "models": models_entry(paths, w)[: n + 1],
        "parameters": params,
    }
    if extras:
        cfg["manifold_merge"] = extras
    out = zoo["tmp"] / "out"
    code, _, err = run(capsys, write_config(zoo["tmp"], cfg), out)
    assert code == 0, err
    merged = load(out)
    ref = merge(
        method,
        zoo["experts"][:n],
        base=zoo["base"],
        weights=None if w is None else w[:n],
        **params,
        **extras,
    ).params
    assert list(merged) == list(load(paths["base"]))
    for name in merged:
        np.testing.assert_array_equal(merged[name], np.asarray(ref[name]), err_msg=name)


def test_sharded_output_equals_unsharded(zoo, capsys):
    cfg = write_config(
        zoo["tmp"],
        {"merge_method": "nre", "models": models_entry(zoo["paths"], [1, 2, 3], base=False)},
    )
    one, many = zoo["tmp"] / "one", zoo["tmp"] / "many"
    assert run(capsys, cfg, one)[0] == 0
    code, _, err = run(capsys, cfg, many, "--out-shard-size", "400")
    assert code == 0, err
    files = sorted(os.listdir(many))
    assert "model.safetensors.index.json" in files
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) >= 3
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(SHAPES) | {INT_NAME}
    a, b = load(one), load(many)
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize("key", ["out_dtype", "dtype"])
def test_output_dtype_bfloat16(zoo, capsys, key):
    w = [0.2, 0.3, 0.5]
    cfg = {
        "merge_method": "linear",
        "models": models_entry(zoo["paths"], w, base=False),
        key: "bfloat16",
    }
    out = zoo["tmp"] / "out"
    code, _, err = run(capsys, write_config(zoo["tmp"], cfg), out)
    assert code == 0, err
    merged = load(out)
    ref = merge("linear", zoo["experts"], weights=w).params
    for name in SHAPES:
        assert merged[name].dtype == BF16
        np.testing.assert_array_equal(merged[name], to_dtype(np.asarray(ref[name]), "bfloat16"))
    assert merged[INT_NAME].dtype == np.int64


def test_bfloat16_inputs_computed_in_float32(tmp_path, rng, capsys):
    a, b = random_model(rng), random_model(rng)
    a16 = {k: v.astype(BF16) if v.dtype == np.float32 else v for k, v in a.items()}
    b16 = {k: v.astype(BF16) if v.dtype == np.float32 else v for k, v in b.items()}
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": write_model(tmp_path / "a", a16)},
            {"model": write_model(tmp_path / "b", b16)},
        ],
        "out_dtype": "float32",
    }
    code, _, err = run(capsys, write_config(tmp_path, cfg), tmp_path / "out")
    assert code == 0, err
    merged = load(tmp_path / "out")
    for name in SHAPES:
        ref = (a16[name].astype(np.float64) + b16[name].astype(np.float64)) / 2
        assert merged[name].dtype == np.float32
        np.testing.assert_allclose(merged[name], ref, rtol=1e-6, atol=1e-7)  # not bf16-rounded


def test_dry_run_writes_nothing(zoo, capsys):
    cfg = {
        "merge_method": "ties",
        "base_model": zoo["paths"]["base"],
        "models": models_entry(zoo["paths"], [0.5, 0.3, 0.2]),
        "parameters": {"density": 0.4},
        "out_dtype": "bf16",
    }
    before = sorted(os.listdir(zoo["tmp"]))
    out = zoo["tmp"] / "out"
    code, stdout, err = run(
        capsys, write_config(zoo["tmp"], cfg), out, "--dry-run", "--report", zoo["tmp"] / "r.json"
    )
    assert code == 0, err
    assert sorted(os.listdir(zoo["tmp"])) == sorted([*before, "merge.yaml"])
    assert "method: ties" in stdout and "tensors: 6 to write" in stdout
    assert zoo["paths"]["e2"] in stdout and "weight 0.2" in stdout and "bfloat16" in stdout


def test_report_lists_every_tensor(zoo, capsys):
    cfg = {
        "merge_method": "karcher",
        "base_model": zoo["paths"]["base"],
        "models": models_entry(zoo["paths"]),
    }
    out = zoo["tmp"] / "out"
    for report in (zoo["tmp"] / "r.json", out / "report.json"):
        code, _, err = run(
            capsys, write_config(zoo["tmp"], cfg), out, "--report", report, "--force"
        )
        assert code == 0, err
        data = json.loads(report.read_text())
        assert set(data["tensors"]) == set(load(out))
        for name, shape in SHAPES.items():
            entry = data["tensors"][name]
            assert entry["method"] == "karcher" and entry["shape"] == list(shape)
            assert entry["num_steps"] >= 1 and isinstance(entry["converged"], bool)
            assert entry["converged"] == (name not in data["not_converged"])
            for field in ("grad_norm", "norm_ratio", "angle_spread"):
                assert isinstance(entry[field], float)
        assert data["tensors"][INT_NAME]["method"] == "copy"
        assert data["skipped"] == []
    assert leftovers(zoo["tmp"]) == []


def test_non_convergence_is_printed_and_reported(zoo, capsys):
    far = [random_model(np.random.default_rng(s)) for s in range(3)]  # far-apart experts
    models = [{"model": write_model(zoo["tmp"] / f"far{i}", t)} for i, t in enumerate(far)]
    cfg = {"merge_method": "karcher", "models": models, "manifold_merge": {"max_iter": 1}}
    report = zoo["tmp"] / "r.json"
    code, _, err = run(
        capsys, write_config(zoo["tmp"], cfg), zoo["tmp"] / "out", "--report", report
    )
    assert code == 0, err
    assert "warning" in err and "did not converge" in err
    data = json.loads(report.read_text())
    assert data["not_converged"] and set(data["not_converged"]) <= set(SHAPES)
    assert any("did not converge" in w for w in data["warnings"])


# -- tensor policies ----------------------------------------------------------------------


@pytest.fixture
def ragged(zoo):
    """e2 lacks ``extra.weight``, which the base, e0 and e1 have."""
    extra = "model.extra.weight"
    rng = np.random.default_rng(0)
    tensors = {"base": dict(zoo["base"])}
    tensors["base"][extra] = rng.standard_normal((4, 4)).astype(np.float32)
    for i in (0, 1):
        tensors[f"e{i}"] = dict(zoo["experts"][i])
        tensors[f"e{i}"][extra] = rng.standard_normal((4, 4)).astype(np.float32)
    tensors["e2"] = zoo["experts"][2]
    paths = {k: write_model(zoo["tmp"] / f"r{k}", t) for k, t in tensors.items()}
    return {**zoo, "paths": paths, "tensors": tensors, "extra": extra}


def test_missing_tensor_policy_error_by_default(ragged, capsys):
    cfg = {"merge_method": "linear", "models": models_entry(ragged["paths"], base=False)}
    out = ragged["tmp"] / "out"
    code, _, err = run(capsys, write_config(ragged["tmp"], cfg), out)
    assert code == 1
    assert ragged["extra"] in err and ragged["paths"]["e2"] in err and "models[2]" in err
    assert "--tensor-policy" in err
    assert not out.exists() and leftovers(ragged["tmp"]) == []


def test_missing_tensor_policy_intersection_skips(ragged, capsys):
    cfg = {"merge_method": "linear", "models": models_entry(ragged["paths"], base=False)}
    out, report = ragged["tmp"] / "out", ragged["tmp"] / "r.json"
    code, _, err = run(
        capsys,
        write_config(ragged["tmp"], cfg),
        out,
        "--tensor-policy",
        "intersection",
        "--report",
        report,
    )
    assert code == 0, err
    assert ragged["extra"] not in load(out)
    assert [s["tensor"] for s in json.loads(report.read_text())["skipped"]] == [ragged["extra"]]


def test_missing_tensor_policy_union(ragged, capsys):
    w = [0.5, 0.3, 0.2]
    extra, t = ragged["extra"], ragged["tensors"]
    cfg = {"merge_method": "linear", "models": models_entry(ragged["paths"], w, base=False)}
    out = ragged["tmp"] / "out"
    code, _, err = run(capsys, write_config(ragged["tmp"], cfg), out, "--tensor-policy", "union")
    assert code == 0, err
    ref = (0.5 * t["e0"][extra].astype(np.float64) + 0.3 * t["e1"][extra]) / 0.8
    np.testing.assert_allclose(load(out)[extra], ref, rtol=2e-6, atol=1e-7)
    # a base-using method whose base lacks the tensor: copied from the first model having it
    tensors = dict(t["base"])
    del tensors[extra]
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": write_model(ragged["tmp"] / "nobase", tensors),
        "models": models_entry(ragged["paths"], w, base=False),
    }
    out2 = ragged["tmp"] / "out2"
    code, _, err = run(capsys, write_config(ragged["tmp"], cfg), out2, "--tensor-policy", "union")
    assert code == 0, err
    np.testing.assert_array_equal(load(out2)[extra], t["e0"][extra])


# -- errors -------------------------------------------------------------------------------


def _break(zoo, case):
    """(config dict, expected exit status, substrings of the message) for one error case."""
    p, tmp = zoo["paths"], zoo["tmp"]
    base_cfg = {
        "merge_method": "ties",
        "base_model": p["base"],
        "models": models_entry(p, [0.5, 0.3, 0.2]),
        "parameters": {"density": 0.5},
    }
    cfg = json.loads(json.dumps(base_cfg))
    if case == "missing path":
        cfg["models"][2]["model"] = str(tmp / "nowhere")
        return cfg, 2, ["models[2].model", "nowhere", "does not exist"]
    if case == "unknown method":
        cfg["merge_method"] = "tiess"
        return cfg, 2, ["merge_method", "'tiess'", "did you mean 'ties'"]
    if case == "mistyped model parameter":
        cfg["models"][1]["parameters"] = {"wieght": 0.5}
        return cfg, 2, ["models[1].parameters.wieght", "did you mean 'weight'"]
    if case == "mistyped parameter":
        cfg["parameters"] = {"densty": 0.5}
        return cfg, 2, ["parameters.densty", "did you mean 'density'"]
    if case == "mistyped extra":
        cfg["manifold_merge"] = {"granularty": "row"}
        return cfg, 2, ["manifold_merge.granularty", "did you mean 'granularity'"]
    if case == "zero-sum weights":
        cfg["merge_method"] = "task_arithmetic"  # negative weights allowed, not a zero sum
        cfg["models"] = models_entry(p, [1.0, -0.5, -0.5])
        del cfg["parameters"]
        return cfg, 2, ["weight", "sum to zero"]
    if case == "base required":
        del cfg["base_model"]
        cfg["models"] = cfg["models"][1:]
        return cfg, 2, ["base_model", "'ties' needs a base model"]
    if case == "slices":
        cfg = {"merge_method": "slerp", "slices": [{"sources": [{"model": p["e0"]}]}]}
        return cfg, 2, ["slices", "not supported"]
    if case == "per-model density":
        cfg["models"][1]["parameters"]["density"] = 0.3
        cfg["models"][2]["parameters"]["density"] = 0.6
        return cfg, 2, ["density", "per-model values", "models[1]", p["e0"], p["e1"]]
    if case == "shape mismatch":
        t = dict(zoo["experts"][2])
        t["model.layers.0.mlp.up_proj.weight"] = np.zeros((8, 9), np.float32)
        cfg["models"][3]["model"] = write_model(tmp / "bad", t)
        return cfg, 1, ["model.layers.0.mlp.up_proj.weight", str(tmp / "bad"), "shape"]
    if case == "NaN input":
        t = dict(zoo["experts"][1])
        t[LAST] = t[LAST].copy()
        t[LAST][3] = np.nan
        cfg["models"][2]["model"] = write_model(tmp / "nan", t)
        return cfg, 1, [LAST, str(tmp / "nan"), "NaN"]
    if case == "corrupt header":
        folder = Path(write_model(tmp / "corrupt", zoo["experts"][0]))
        raw = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(raw[:8] + b"{not json" + raw[17:])
        cfg["models"][1]["model"] = str(folder)
        return cfg, 1, ["model.safetensors", "models[1]", "JSON"]
    if case == "unsupported dtype":
        folder = tmp / "f8"
        folder.mkdir()
        header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}})
        raw = len(header).to_bytes(8, "little") + header.encode() + b"\0\0"
        (folder / "model.safetensors").write_bytes(raw)
        cfg["models"][1]["model"] = str(folder)
        return cfg, 1, ["F8_E4M3", "'w'", str(folder)]
    if case == "bin checkpoint":
        folder = tmp / "pickled"
        folder.mkdir()
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
        (folder / "config.json").write_text("{}")
        cfg["models"][1]["model"] = str(folder)
        return cfg, 1, ["pytorch_model.bin", "pickled", "models[1]"]
    if case == "out_dtype":
        cfg["out_dtype"] = "int8"
        return cfg, 2, ["out_dtype", "'int8'"]
    raise AssertionError(case)


ERROR_CASES = [
    "missing path",
    "unknown method",
    "mistyped model parameter",
    "mistyped parameter",
    "mistyped extra",
    "zero-sum weights",
    "base required",
    "slices",
    "per-model density",
    "shape mismatch",
    "NaN input",
    "corrupt header",
    "unsupported dtype",
    "bin checkpoint",
    "out_dtype",
]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_name_the_culprit_and_write_nothing(zoo, capsys, case):
    cfg, status, needles = _break(zoo, case)
    config = write_config(zoo["tmp"], cfg)
    out = zoo["tmp"] / "out"
    code, _, err = run(capsys, config, out)
    assert code == status, err
    assert err.startswith("manifold-merge: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists() and leftovers(zoo["tmp"]) == []
    # an existing OUT_DIR is left exactly as it was, with or without --force
    out.mkdir()
    (out / "keep.txt").write_text("old")
    for extra in ([], ["--force"]):
        assert main(["merge", config, str(out), "--no-progress", *extra]) != 0
        assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "old"
    assert leftovers(zoo["tmp"]) == []


@pytest.mark.parametrize(
    "text, needle",
    [
        ("- just\n- a list\n", "expected a mapping"),
        ("merge_method: [linear\n", "not valid YAML"),
        ("", "empty"),
        ("merge_method: linear\n", "models: missing"),
    ],
)
def test_bad_yaml_is_a_config_error(tmp_path, capsys, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    code, _, err = run(capsys, path, tmp_path / "out")
    assert code == 2 and needle in err and str(path) in err, err


def test_missing_config_file(tmp_path, capsys):
    code, _, err = run(capsys, tmp_path / "nope.yaml", tmp_path / "out")
    assert code == 2 and "nope.yaml" in err and "no such file" in err


def test_existing_out_dir_needs_force_and_is_replaced_only_after_success(zoo, capsys):
    cfg = write_config(
        zoo["tmp"], {"merge_method": "linear", "models": models_entry(zoo["paths"], base=False)}
    )
    out = zoo["tmp"] / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    code, _, err = run(capsys, cfg, out)
    assert code == 2 and "already exists" in err and "--force" in err
    assert os.listdir(out) == ["keep.txt"]
    code, _, err = run(capsys, cfg, out, "--force")
    assert code == 0, err
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert leftovers(zoo["tmp"]) == []


def test_failure_in_the_last_tensor_leaves_nothing(zoo, capsys):
    last = list(load(zoo["paths"]["base"]))[-1]  # the order of the merge
    assert last in SHAPES
    t = dict(zoo["experts"][2])
    t[last] = np.full_like(t[last], np.inf)
    models = models_entry(zoo["paths"], base=False)
    models[2]["model"] = write_model(zoo["tmp"] / "inf", t)
    cfg = write_config(zoo["tmp"], {"merge_method": "linear", "models": models})
    out = zoo["tmp"] / "out"
    code, _, err = run(capsys, cfg, out, "--out-shard-size", "200")  # shards already written
    assert code == 1 and last in err and str(zoo["tmp"] / "inf") in err
    assert not out.exists() and leftovers(zoo["tmp"]) == []


def test_output_overlapping_an_input_is_refused(zoo, capsys):
    cfg = write_config(
        zoo["tmp"], {"merge_method": "linear", "models": models_entry(zoo["paths"], base=False)}
    )
    before = sorted(os.listdir(zoo["paths"]["e0"]))
    code, _, err = run(capsys, cfg, zoo["paths"]["e0"], "--force")
    assert code == 2 and "overlaps" in err and "models[0].model" in err
    assert sorted(os.listdir(zoo["paths"]["e0"])) == before


# -- other inputs -------------------------------------------------------------------------


def test_peft_adapters_merge_with_lora_svd(tmp_path, rng, capsys):
    config = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["q", "v"],
        "base_model_name_or_path": "tiny",
    }
    paths = []
    for i in range(2):
        lora = {
            f"base_model.model.enc.{m}": LoraFactors(
                rng.standard_normal((6, 2)).astype(np.float32),
                rng.standard_normal((2, 5)).astype(np.float32),
            )
            for m in ("q", "v")
        }
        write_peft_adapter(tmp_path / f"ad{i}", PeftAdapter(config, lora, {}))
        paths.append(str(tmp_path / f"ad{i}"))
    cfg = {
        "merge_method": "lora_svd",
        "models": [
            {"model": paths[0], "parameters": {"weight": 0.7}},
            {"model": paths[1], "parameters": {"weight": 0.3}},
        ],
        "parameters": {"rank": 3},
    }
    report = tmp_path / "r.json"
    code, _, err = run(capsys, write_config(tmp_path, cfg), tmp_path / "out", "--report", report)
    assert code == 0, err
    merge_peft_adapters(paths, tmp_path / "ref", "lora_svd", weights=[0.7, 0.3], rank=3)
    got, ref = read_peft_adapter(tmp_path / "out"), read_peft_adapter(tmp_path / "ref")
    assert got.config == ref.config and set(got.lora) == set(ref.lora)
    for m in ref.lora:
        np.testing.assert_array_equal(got.lora[m].b, ref.lora[m].b)
        np.testing.assert_array_equal(got.lora[m].a, ref.lora[m].a)
    assert set(json.loads(report.read_text())["tensors"]) == set(ref.lora)
    assert leftovers(tmp_path) == []


def test_orbax_checkpoints_merge(tmp_path, rng, capsys):
    from manifold_merge.io.checkpoint import save_params

    trees = [
        {"Dense_0": {"kernel": rng.standard_normal((4, 3)).astype(np.float32)}} for _ in range(2)
    ]
    for i, t in enumerate(trees):
        save_params(tmp_path / f"orbax{i}", t)
    cfg = {
        "merge_method": "linear",
        "models": [{"model": str(tmp_path / f"orbax{i}")} for i in range(2)],
    }
    code, _, err = run(capsys, write_config(tmp_path, cfg), tmp_path / "out")
    assert code == 0, err
    merged = load(tmp_path / "out")
    ref = (trees[0]["Dense_0"]["kernel"] + trees[1]["Dense_0"]["kernel"]) / 2
    np.testing.assert_allclose(merged["Dense_0/kernel"], ref, rtol=1e-6)


def test_python_dash_m_runs_the_command(zoo):
    cfg = write_config(
        zoo["tmp"], {"merge_method": "linear", "models": models_entry(zoo["paths"], base=False)}
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    ok = subprocess.run(
        [sys.executable, "-m", "manifold_merge", "merge", cfg, str(zoo["tmp"] / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (zoo["tmp"] / "out" / "model.safetensors").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "manifold_merge", "merge", cfg, str(zoo["tmp"] / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert bad.returncode == 2 and "manifold-merge: error:" in bad.stderr
    assert "Traceback" not in bad.stderr


# -- the config parser --------------------------------------------------------------------


def _plan(**cfg):
    cfg.setdefault("models", [{"model": "a"}, {"model": "b"}])
    return load_merge_config(cfg)


def test_parser_mergekit_forms():
    plan = _plan(
        merge_method="ties",
        base_model="base",
        models=[
            {"model": "base"},
            {"model": "a", "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": {"path": "b"}, "parameters": {"weight": 0.4, "density": 0.5}},
        ],
        parameters={"lambda": {"filter": "mlp", "value": 0.5}, "normalize": True},
    )
    assert [m.path for m in plan.models] == ["a", "b"] and plan.weights() == [0.6, 0.4]
    assert plan.parameters["density"] == 0.5  # agreeing per-model values become global
    # a single rule becomes a list; rules without a default get the method's default
    assert plan.parameters["lambda"] == [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]
    rules = _plan(merge_method="linear", parameters={"normalize": [{"filter": "*", "value": 0}]})
    assert rules.parameters["normalize"] == [{"value": 0}]
    # mergekit's defaults for its names; weights per tensor from filter rules
    dare = _plan(merge_method="dare_ties", base_model="base")
    assert dare.parameters == {"density": 1.0, "normalize": False}
    w = _plan(
        merge_method="linear",
        models=[
            {"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 2}, {"value": 1}]}},
            {"model": "b", "parameters": {"weight": 1}},
        ],
    )
    assert w.weights_for("layers.0.mlp.w") == [2.0, 1.0] and w.weights_for("attn") == [1.0, 1.0]


def test_parser_mapped_and_ignored_mergekit_parameters():
    with pytest.warns(UserWarning, match="int8_mask"):
        plan = _plan(
            merge_method="ties",
            base_model="base",
            parameters={"density": 0.3, "int8_mask": True, "rescale": False},
        )
    assert plan.parameters == {"density": 0.3} and any("int8_mask" in n for n in plan.notes)
    nuslerp = _plan(merge_method="nuslerp", parameters={"nuslerp_flatten": False})
    assert nuslerp.method == "slerp" and nuslerp.parameters == {"granularity": "row"}
    stock = _plan(merge_method="model_stock", base_model="base", parameters={"filter_wise": True})
    assert stock.parameters == {"granularity": "row"}
    with pytest.warns(UserWarning, match="union"):
        assert _plan(merge_method="linear", tokenizer_source="union").tokenizer_source == "union"


@pytest.mark.parametrize(
    "cfg, needle",
    [
        ({"merge_method": "della"}, "not implemented"),
        ({"merge_method": "ties", "base_model": "b", "parameters": {"epsilon": 0.1}}, "della"),
        ({"merge_method": "ties", "base_model": "b", "parameters": {"rescale": True}}, "rescale"),
        ({"merge_method": "slerp", "parameters": {"t": [0, 0.5, 1]}}, "gradient"),
        ({"merge_method": "nuslerp", "base_model": "b"}, "nuslerp with a base"),
        ({"merge_method": "linear", "models": []}, "models:"),
        ({"merge_method": "linear", "mdoels": []}, "did you mean 'models'"),
        ({"merge_method": "linear", "tokenizer": {"source": "union"}}, "tokenizer:"),
        ({"merge_method": "slerp", "models": [{"model": "a"}]}, "slerp takes"),
        (
            {
                "merge_method": "linear",
                "models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "b"}],
            },
            "models[1].parameters.weight: missing",
        ),
        (
            {
                "merge_method": "linear",
                "parameters": {"normalize": True},
                "manifold_merge": {"normalize": False},
            },
            "give it in one place",
        ),
        ({"merge_method": "fisher_rao_karcher"}, "manifold_merge.fishers"),
        ({"merge_method": "linear", "models": [{"model": {"lora": "x", "model": "a"}}]}, "LoRA"),
    ],
)
def test_parser_refusals(cfg, needle):
    cfg = {"models": [{"model": "a"}, {"model": "b"}], **cfg}
    with pytest.raises(ConfigError) as info:
        load_merge_config(cfg)
    assert needle in str(info.value)


def test_statistics_and_groups(zoo, capsys):
    rng = np.random.default_rng(1)
    fishers = [
        {k: rng.uniform(0.1, 2, SHAPES[k]).astype(np.float32) for k in SHAPES} for _ in range(3)
    ]
    models = models_entry(zoo["paths"], [0.5, 0.3, 0.2], base=False)
    for i, m in enumerate(models):
        path = zoo["tmp"] / f"fisher{i}.safetensors"
        safetensors.numpy.save_file(fishers[i], path)
        m["manifold_merge"] = {"fishers": str(path)}
    out = zoo["tmp"] / "out"
    code, _, err = run(
        capsys, write_config(zoo["tmp"], {"merge_method": "fisher", "models": models}), out
    )
    assert code == 0, err
    full = [{**f, INT_NAME: np.ones((1, 16), np.float32)} for f in fishers]  # shaped as models
    ref = merge("fisher", zoo["experts"], weights=[0.5, 0.3, 0.2], fishers=full).params
    merged = load(out)
    for name in SHAPES:
        np.testing.assert_array_equal(merged[name], np.asarray(ref[name]), err_msg=name)
    # tensors of a group are read together and merged as one block
    groups = {"mlp": "mlp.up_proj"}
    cfg = {
        "merge_method": "nre",
        "models": models_entry(zoo["paths"], [0.5, 0.3, 0.2], base=False),
        "manifold_merge": {"groups": groups},
    }
    out2, report = zoo["tmp"] / "out2", zoo["tmp"] / "r.json"
    code, _, err = run(capsys, write_config(zoo["tmp"], cfg), out2, "--report", report)
    assert code == 0, err
    ref = merge("nre", zoo["experts"], weights=[0.5, 0.3, 0.2], groups=groups).params
    merged = load(out2)
    for name in SHAPES:
        np.testing.assert_array_equal(merged[name], np.asarray(ref[name]), err_msg=name)
    entries = json.loads(report.read_text())["tensors"]
    assert entries["model.layers.0.mlp.up_proj.bias"]["group"] == "mlp"


def test_compile_cache_stores_programs_and_reuses_them(zoo, capsys, monkeypatch):
    """By default the CLI keeps compiled XLA programs (here in --compile-cache DIR); a second
    merge loads them and gives the same bytes; --no-compile-cache stores nothing. The cached
    runs are subprocesses (the cache is a process-wide JAX setting)."""
    cfg = write_config(
        zoo["tmp"],
        {"merge_method": "karcher", "models": models_entry(zoo["paths"], base=False)},
    )
    env = {k: v for k, v in os.environ.items() if k != "MM_COMPILE_CACHE"}
    env["JAX_PLATFORMS"] = "cpu"

    def merge_into(out, *flags):
        proc = subprocess.run(
            [sys.executable, "-m", "manifold_merge", "merge", cfg, str(out), "--no-progress",
             *flags],
            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return (out / "model.safetensors").read_bytes()

    cache = zoo["tmp"] / "xla"
    first = merge_into(zoo["tmp"] / "a", "--compile-cache", str(cache))
    assert sorted(cache.iterdir()), "no compiled program was stored"
    assert merge_into(zoo["tmp"] / "b", "--compile-cache", str(cache)) == first
    monkeypatch.delenv("MM_COMPILE_CACHE")
    monkeypatch.setenv("MM_CACHE_DIR", str(zoo["tmp"] / "mm"))  # where the default would go
    assert run(capsys, cfg, zoo["tmp"] / "c", "--no-compile-cache")[0] == 0
    assert (zoo["tmp"] / "c" / "model.safetensors").read_bytes() == first
    assert not (zoo["tmp"] / "mm").exists()


def test_no_prefetch_gives_the_same_bytes(zoo, capsys):
    """Reading the next tensor ahead (the default) changes when data are read, not what is
    merged: the output files are identical with --no-prefetch."""
    cfg = write_config(
        zoo["tmp"],
        {"merge_method": "ties", "base_model": zoo["paths"]["base"],
         "models": models_entry(zoo["paths"]), "parameters": {"density": 0.5}},
    )  # fmt: skip
    a, b = zoo["tmp"] / "with", zoo["tmp"] / "without"
    assert run(capsys, cfg, a)[0] == 0
    assert run(capsys, cfg, b, "--no-prefetch")[0] == 0
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    "devices, needle",
    [
        ("4", "xla_force_host_platform_device_count=4"),  # this process sees one CPU device
        ("two", "a number or 'all'"),
        ("0", "at least 1"),
    ],
)
def test_devices_flag_errors_write_nothing(zoo, capsys, devices, needle):
    cfg = {"merge_method": "linear", "models": models_entry(zoo["paths"], base=False)}
    out = zoo["tmp"] / "out"
    code, _, err = run(capsys, write_config(zoo["tmp"], cfg), out, "--devices", devices)
    assert code == 2 and needle in err, err
    assert not out.exists() and leftovers(zoo["tmp"]) == []


def test_devices_1_is_the_single_device_merge(zoo, capsys):
    cfg = {"merge_method": "ties", "base_model": zoo["paths"]["base"],
           "models": models_entry(zoo["paths"]), "parameters": {"density": 0.5}}  # fmt: skip
    config = write_config(zoo["tmp"], cfg)
    assert run(capsys, config, zoo["tmp"] / "a")[0] == 0
    assert run(capsys, config, zoo["tmp"] / "b", "--devices", "1")[0] == 0
    a, b = load(zoo["tmp"] / "a"), load(zoo["tmp"] / "b")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
