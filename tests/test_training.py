"""Generic training (optax), evaluation and the config-keyed parameter cache."""

from __future__ import annotations

import hashlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from manifold_merge.training import (
    cached,
    cached_folder,
    config_hash,
    cross_entropy_loss,
    evaluate,
    leaf_names,
    train,
)
from manifold_merge.training.trainer import _index_stream


class MLP(nn.Module):
    hidden: int = 16
    classes: int = 3

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.hidden)(x))  # Dense_0
        return nn.Dense(self.classes)(h)  # Dense_1


MODEL = MLP()


def apply_fn(params, x):
    return MODEL.apply({"params": params}, x)


def blobs(rng, n=240, d=4, k=3, sep=3.0):
    """A learnable k-class problem: Gaussian blobs around random centres."""
    centres = sep * rng.standard_normal((k, d))
    y = rng.integers(0, k, n)
    x = centres[y] + rng.standard_normal((n, d))
    return x.astype(np.float32), y.astype(np.int32)


def init(seed=0, d=4):
    return MODEL.init(jax.random.key(seed), jnp.zeros((1, d)))["params"]


def as_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


# ---------------------------------------------------------------------------------------------
# train


def test_training_lowers_the_loss_and_learns(rng):
    x, y = blobs(rng)
    params, hist = train(
        cross_entropy_loss(apply_fn),
        init(),
        (x, y),
        steps=300,
        batch_size=32,
        learning_rate=1e-2,
        progress=False,
        log_every=10,
    )
    assert [s for s, _ in hist] == list(range(10, 301, 10))
    losses = np.array([v for _, v in hist])
    assert np.all(np.isfinite(losses))
    assert losses[-5:].mean() < 0.7 * losses[:5].mean()
    res = evaluate(apply_fn, params, x, y, batch_size=64)
    assert res.accuracy > 0.8  # chance is about 1/3
    assert res.logits.shape == (len(x), 3)


def test_step_compiles_once_with_fixed_batch_shapes(rng):
    x, y = blobs(rng, n=37)  # 37 rows: batches wrap across epochs
    traces, shapes = [], set()
    base = cross_entropy_loss(apply_fn)

    def loss_fn(params, batch, key):
        traces.append(1)
        shapes.add(batch[0].shape)
        return base(params, batch, key)

    for batch_size in (10, 50):  # also larger than the data set
        traces.clear()
        _, hist = train(
            loss_fn,
            init(),
            (x, y),
            steps=23,
            batch_size=batch_size,
            learning_rate=1e-3,
            progress=False,
            log_every=5,
        )
        assert len(traces) == 1 and (batch_size, 4) in shapes
        assert [s for s, _ in hist] == [5, 10, 15, 20, 23]


def test_index_stream_covers_each_epoch_once():
    stream = _index_stream(7, 3, seed=5)
    idx = np.concatenate([next(stream) for _ in range(7)])  # 21 = 3 epochs
    for e in range(3):
        assert sorted(idx[7 * e : 7 * e + 7]) == list(range(7))
    again = _index_stream(7, 3, seed=5)
    np.testing.assert_array_equal(np.concatenate([next(again) for _ in range(7)]), idx)


@pytest.mark.parametrize("how", ["tree", "predicate"])
def test_frozen_params_are_bit_identical(rng, how):
    x, y = blobs(rng, n=64)
    p0 = as_numpy(init(1))
    before = jax.tree.map(np.copy, p0)
    trainable = (
        {"Dense_0": False, "Dense_1": True} if how == "tree" else lambda n: n.startswith("Dense_1")
    )
    params, _ = train(
        cross_entropy_loss(apply_fn),
        p0,
        (x, y),
        steps=20,
        batch_size=16,
        learning_rate=1e-2,
        weight_decay=0.1,  # decay must not touch frozen leaves either
        trainable=trainable,
        progress=False,
    )
    assert_trees_equal(params["Dense_0"], before["Dense_0"])
    assert params["Dense_0"]["kernel"] is p0["Dense_0"]["kernel"]
    assert not np.array_equal(params["Dense_1"]["kernel"], before["Dense_1"]["kernel"])
    assert_trees_equal(p0, before)  # the caller's arrays are untouched
    with pytest.raises(ValueError, match="no trainable"):
        train(
            cross_entropy_loss(apply_fn),
            p0,
            (x, y),
            steps=1,
            batch_size=4,
            learning_rate=1e-2,
            trainable=lambda n: False,
            progress=False,
        )


def test_integer_leaves_are_frozen_and_jax_inputs_survive(rng):
    x = rng.standard_normal((20, 3)).astype(np.float32)
    t = x @ rng.standard_normal(3).astype(np.float32)
    p0 = {"w": jnp.zeros(3), "count": jnp.arange(2)}

    def loss_fn(p, batch, key):
        return jnp.mean((batch[0] @ p["w"] - batch[1]) ** 2) + 0.0 * p["count"].sum()

    params, _ = train(loss_fn, p0, (x, t), steps=5, batch_size=4, learning_rate=0.1, progress=False)
    assert params["count"] is p0["count"] and not p0["w"].is_deleted()
    assert leaf_names(p0) == ["count", "w"]


def test_same_seed_same_result_different_seed_different(rng):
    x, y = blobs(rng, n=50)
    p0 = init(2)

    def dropout_loss(params, batch, key):  # uses the key: the per-step keys must be seeded too
        logits = apply_fn(params, batch[0])
        keep = jax.random.bernoulli(key, 0.8, logits.shape)
        return optax.softmax_cross_entropy_with_integer_labels(logits * keep, batch[1]).mean()

    kw = dict(steps=30, batch_size=8, learning_rate=1e-2, progress=False, log_every=1)
    a, ha = train(dropout_loss, p0, (x, y), seed=3, **kw)
    b, hb = train(dropout_loss, p0, (x, y), seed=3, **kw)
    c, hc = train(dropout_loss, p0, (x, y), seed=4, **kw)
    assert_trees_equal(a, b)
    assert ha == hb
    assert ha != hc
    assert not np.array_equal(a["Dense_0"]["kernel"], c["Dense_0"]["kernel"])


def test_dict_inputs_and_sgd_step_matches_the_gradient(rng):
    n, d = 12, 3
    data = (
        {"feat": rng.standard_normal((n, d)).astype(np.float32), "mask": rng.random(n) < 0.7},
        rng.standard_normal(n).astype(np.float32),
    )

    def loss_fn(p, batch, key):
        x, t = batch
        r = jnp.where(x["mask"], x["feat"] @ p["w"] - t, 0.0)
        return jnp.mean(r**2)

    w0 = rng.standard_normal(d).astype(np.float32)
    lr = 0.05
    # batch_size = n: one step sees every example once, in some order (the loss is a mean)
    kw = dict(steps=1, batch_size=n, progress=False)
    params, hist = train(loss_fn, {"w": w0}, data, learning_rate=lr, optimizer="sgd", **kw)
    x, t = data
    r = np.where(x["mask"], x["feat"].astype(np.float64) @ w0 - t, 0.0)
    grad = 2 * (x["feat"].T @ r) / n
    np.testing.assert_allclose(params["w"], w0 - lr * grad, rtol=1e-5, atol=1e-6)
    assert hist == [(1, pytest.approx(np.mean(r**2), rel=1e-5))]
    # an optax transformation passes through
    params2, _ = train(loss_fn, {"w": w0}, data, optimizer=optax.sgd(lr), **kw)
    np.testing.assert_allclose(params2["w"], params["w"], rtol=1e-6)


def test_train_argument_errors(rng):
    x, y = blobs(rng, n=10)
    loss = cross_entropy_loss(apply_fn)
    kw = dict(steps=1, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="learning_rate"):
        train(loss, init(), (x, y), **kw)
    with pytest.raises(ValueError, match="optimizer"):
        train(loss, init(), (x, y), optimizer="lbfgs", learning_rate=0.1, **kw)
    with pytest.raises(ValueError, match="optax transformation"):
        train(loss, init(), (x, y), optimizer=optax.sgd(0.1), learning_rate=0.1, **kw)
    with pytest.raises(ValueError, match="leading"):
        train(loss, init(), (x, y[:5]), learning_rate=0.1, **kw)
    with pytest.raises(ValueError, match="trainable"):
        train(loss, init(), (x, y), learning_rate=0.1, trainable={"Dense_9": True}, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        train(loss, init(), (x, y), steps=1, batch_size=0, learning_rate=0.1)

    def nan_loss(p, batch, key):
        return jnp.log(-jnp.abs(apply_fn(p, batch[0])).sum() - 1.0)

    with pytest.raises(FloatingPointError, match="loss"):
        train(nan_loss, init(), (x, y), learning_rate=0.1, **kw)
    params, hist = train(loss, init(), (x, y), steps=0, batch_size=4, learning_rate=0.1)
    assert hist == [] and np.array_equal(params["Dense_0"]["kernel"], init()["Dense_0"]["kernel"])


def test_cross_entropy_and_evaluate_match_numpy(rng):
    x, y = blobs(rng, n=45)
    params = init(3)
    logits = np.asarray(apply_fn(params, x), np.float64)
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    ref_loss = np.mean(lse - logits[np.arange(len(y)), y])
    loss = cross_entropy_loss(apply_fn)(params, (x, y), None)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    ref_acc = np.mean(logits.argmax(1) == y)
    for bs in (7, 45, 100):  # padded last batch, exact fit, one padded batch
        res = evaluate(apply_fn, params, x, y, batch_size=bs)
        assert res.accuracy == ref_acc
        np.testing.assert_allclose(res.logits, logits, rtol=1e-5, atol=1e-5)

    def dict_apply(p, x):
        return apply_fn(p, x["a"] + x["b"])

    res = evaluate(dict_apply, params, {"a": x, "b": np.zeros_like(x)}, y, batch_size=16)
    assert res.accuracy == ref_acc
    with pytest.raises(ValueError, match="rows"):
        evaluate(apply_fn, params, x, y[:3])


# ---------------------------------------------------------------------------------------------
# cache


def test_config_hash_is_stable():
    a = {"lr": 0.1, "model": {"layers": (2, 3), "act": "relu"}, "seed": 0}
    b = {"seed": 0, "model": {"act": "relu", "layers": [2, 3]}, "lr": 0.1}
    h = config_hash(a)
    assert h == config_hash(b) and len(h) == 16 and int(h, 16) >= 0
    assert h == config_hash(ml_collections.ConfigDict(b))
    assert h == config_hash(ml_collections.FrozenConfigDict(a))
    assert h == config_hash({**b, "seed": np.int64(0), "lr": np.float64(0.1)})
    assert h != config_hash({**a, "seed": 1})
    assert h != config_hash({**a, "lr": 0.1000001})
    assert config_hash({"x": True}) != config_hash({"x": 1})
    # the documented recipe (sha256 of sorted, compact JSON): stable across runs and machines
    canonical = b'{"a":1,"b":[1,2],"c":{"x":0.5,"y":null}}'
    assert (
        config_hash({"c": {"y": None, "x": 0.5}, "b": (1, 2), "a": 1})
        == (hashlib.sha256(canonical).hexdigest()[:16])
    )
    with pytest.raises(TypeError, match="JSON"):
        config_hash({"f": lambda: 0})
    with pytest.raises(TypeError, match="keys"):
        config_hash({1: "a"})


def make_params(rng):
    return {
        "Dense_0": {
            "kernel": rng.standard_normal((3, 4)).astype(np.float32),
            "bias": np.zeros(4, np.float32),
        },
        "step": np.int32(7),
    }


def test_cached_hit_miss_and_force(rng, tmp_path):
    calls = []
    expected = make_params(rng)

    def build():
        calls.append(1)
        return jax.tree.map(jnp.asarray, expected)

    cfg = {"task": "a", "seed": 0}
    first = cached(tmp_path, cfg, build)
    assert len(calls) == 1
    assert_trees_equal(first, expected)
    assert isinstance(first["Dense_0"]["kernel"], np.ndarray)
    entry = tmp_path / config_hash(cfg)
    assert json.loads((entry / "config.json").read_text()) == cfg
    again = cached(tmp_path, ml_collections.ConfigDict({"seed": 0, "task": "a"}), build)
    assert len(calls) == 1
    assert_trees_equal(again, first)
    cached(tmp_path, {"task": "b", "seed": 0}, build)  # another config: a miss
    assert len(calls) == 2
    cached(tmp_path, cfg, build, force=True)
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [config_hash(cfg), config_hash({"task": "b", "seed": 0})]
    )  # no temporary folders left behind


# Orbax's failed restore of garbled array files can leave a callback for its closed asyncio loop
# ("Event loop is closed", ignored in a background thread); the cache itself recovers.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["config", "wrong_config", "metadata", "arrays", "missing"])
def test_corrupted_cache_entry_is_rebuilt(rng, tmp_path, damage):
    calls = []
    expected = make_params(rng)

    def build():
        calls.append(1)
        return expected

    cfg = {"damage": damage}
    cached(tmp_path, cfg, build)
    entry = tmp_path / config_hash(cfg)
    if damage == "config":
        (entry / "config.json").write_text("{not json")
    elif damage == "wrong_config":
        (entry / "config.json").write_text(json.dumps({"damage": "other"}))
    elif damage == "metadata":
        (entry / "params" / "_METADATA").write_text("garbage")
    elif damage == "arrays":
        for root, _, files in os.walk(entry / "params"):
            for f in files:
                if f != "_METADATA":
                    with open(os.path.join(root, f), "wb") as fh:
                        fh.write(b"\0garbage")
    else:
        import shutil

        shutil.rmtree(entry / "params")
    if damage == "missing":  # config intact, item gone: a plain miss, no warning
        out = cached(tmp_path, cfg, build)
    else:
        with pytest.warns(UserWarning, match="rebuilding"):
            out = cached(tmp_path, cfg, build)
    assert len(calls) == 2
    assert_trees_equal(out, expected)
    assert_trees_equal(cached(tmp_path, cfg, build), expected)
    assert len(calls) == 2


def test_failed_build_leaves_nothing(tmp_path):
    def build():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cached(tmp_path, {"a": 1}, build)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match="nested dict"):
        cached(tmp_path, {"a": 1}, lambda: [1, 2])
    assert list(tmp_path.iterdir()) == []


def test_cached_folder(rng, tmp_path):
    calls = []

    def write(path):
        calls.append(path)
        os.makedirs(path)
        (path / "adapter_config.json").write_text('{"r": 2}')

    cfg = {"adapter": "lora", "task": 1}
    folder = cached_folder(tmp_path, cfg, write)
    assert folder == tmp_path / config_hash(cfg) / "folder"
    assert (folder / "adapter_config.json").read_text() == '{"r": 2}'
    assert not calls[0].exists()  # written in a temporary place, then moved
    assert cached_folder(tmp_path, cfg, write) == folder and len(calls) == 1
    # the same config can hold params too; neither evicts the other
    params = make_params(rng)
    cached(tmp_path, cfg, lambda: params)
    assert (folder / "adapter_config.json").exists()
    assert cached_folder(tmp_path, cfg, write) == folder and len(calls) == 1
    assert_trees_equal(cached(tmp_path, cfg, lambda: 1 / 0), params)
    cached_folder(tmp_path, cfg, write, force=True)
    assert len(calls) == 2
    with pytest.raises(RuntimeError, match="did not create"):
        cached_folder(tmp_path, {"other": 1}, lambda path: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [config_hash(cfg)]
