"""Diagonal Fisher and input Grams against NumPy; RegMean against its closed form."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import manifold_merge as mm
from manifold_merge.stats import diagonal_fisher, input_grams


class MLP(nn.Module):
    hidden: int = 6
    classes: int = 4

    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Dense(self.hidden)(x))  # Dense_0
        return nn.Dense(self.classes)(h)  # Dense_1


def softmax_regression(rng, d=5, k=4):
    params = {
        "w": jnp.asarray(rng.standard_normal((d, k)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(k), jnp.float32),
    }
    return params, lambda p, x: x @ p["w"] + p["b"]


def np_per_example_grads(params, x, y):
    """d log softmax(xW + b)_y / d(W, b) = (x (e_y - p), e_y - p), in float64."""
    w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    e = np.eye(w.shape[1])[y] - p
    return np.einsum("ni,nk->nik", x, e), e, p


def test_empirical_fisher_matches_numpy(rng):
    params, apply_fn = softmax_regression(rng)
    x = rng.standard_normal((50, 5)).astype(np.float32)
    y = rng.integers(0, 4, 50)
    f = diagonal_fisher(apply_fn, params, x, y, kind="empirical", batch_size=16)
    gw, gb, _ = np_per_example_grads(params, x.astype(np.float64), y)
    np.testing.assert_allclose(np.asarray(f["w"]), (gw**2).mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(f["b"]), (gb**2).mean(0), rtol=1e-4, atol=1e-6)
    # the padded last batch is masked: another batch size gives the same diagonal
    g = diagonal_fisher(apply_fn, params, x, y, kind="empirical", batch_size=7)
    np.testing.assert_allclose(np.asarray(g["w"]), np.asarray(f["w"]), rtol=1e-5, atol=1e-7)


def test_true_fisher_approaches_the_exact_expectation(rng):
    params, apply_fn = softmax_regression(rng)
    x = rng.standard_normal((64, 5)).astype(np.float32)
    f = diagonal_fisher(apply_fn, params, x, kind="true", key=jax.random.key(1), num_samples=64)
    _, _, p = np_per_example_grads(params, x.astype(np.float64), np.zeros(64, int))
    # exact: E_y~p [(x (e_y - p))^2] summed over classes with weights p_y
    exact = np.zeros((5, 4))
    for c in range(4):
        gw, _, _ = np_per_example_grads(params, x.astype(np.float64), np.full(64, c))
        exact += (p[:, c][:, None, None] * gw**2).mean(0)
    rel = abs(float(jnp.sum(f["w"])) - exact.sum()) / exact.sum()
    assert rel < 0.1  # 4096 draws: sampling error of a few percent
    a = diagonal_fisher(apply_fn, params, x, kind="true", key=jax.random.key(5))
    b = diagonal_fisher(apply_fn, params, x, kind="true", key=jax.random.key(5))
    assert all(
        np.array_equal(np.asarray(u), np.asarray(v))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def test_fisher_errors(rng):
    params, apply_fn = softmax_regression(rng)
    x = np.zeros((3, 5), np.float32)
    with pytest.raises(ValueError, match="needs labels"):
        diagonal_fisher(apply_fn, params, x, kind="empirical")
    with pytest.raises(ValueError, match="key="):
        diagonal_fisher(apply_fn, params, x, kind="true")
    with pytest.raises(ValueError, match="kind must be"):
        diagonal_fisher(apply_fn, params, x, kind="observed")


def test_input_grams_match_numpy_on_a_flax_mlp(rng):
    model = MLP()
    params = model.init(jax.random.key(0), jnp.ones((1, 5)))["params"]
    x = rng.standard_normal((29, 5)).astype(np.float32)
    grams = input_grams(lambda p, v: model.apply({"params": p}, v), params, x, batch_size=8)
    assert set(grams) == {"Dense_0/kernel", "Dense_1/kernel"}
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(
        np.asarray(grams["Dense_0/kernel"]), x64.T @ x64, rtol=1e-5, atol=1e-4
    )
    h = np.tanh(
        x64 @ np.asarray(params["Dense_0"]["kernel"], np.float64)
        + np.asarray(params["Dense_0"]["bias"], np.float64)
    )
    np.testing.assert_allclose(np.asarray(grams["Dense_1/kernel"]), h.T @ h, rtol=1e-4, atol=1e-4)


def test_regmean_matches_its_closed_form_and_fisher_merging_uses_stats(rng):
    model = MLP()
    apply_fn = lambda p, v: model.apply({"params": p}, v)  # noqa: E731
    experts = [model.init(jax.random.key(i), jnp.ones((1, 5)))["params"] for i in range(3)]
    data = [rng.standard_normal((40, 5)).astype(np.float32) for _ in range(3)]
    grams = [input_grams(apply_fn, p, x) for p, x in zip(experts, data)]
    w = np.array([0.5, 0.3, 0.2])
    res = mm.merge("regmean", experts, grams=grams, weights=w, alpha=0.9)
    for layer in ("Dense_0", "Dense_1"):
        g = [np.asarray(gr[f"{layer}/kernel"], np.float64) for gr in grams]
        d = g[0].shape[0]
        sc = [wi * gi * (0.9 + 0.1 * np.eye(d)) for wi, gi in zip(w, g)]
        ks = [np.asarray(p[layer]["kernel"], np.float64) for p in experts]
        ref = np.linalg.solve(sum(sc), sum(s @ k for s, k in zip(sc, ks)))
        np.testing.assert_allclose(np.asarray(res.params[layer]["kernel"]), ref, atol=1e-4)
        bias = sum(wi * np.asarray(p[layer]["bias"], np.float64) for wi, p in zip(w, experts))
        np.testing.assert_allclose(np.asarray(res.params[layer]["bias"]), bias, atol=1e-6)
    # alpha = 1 and identical Grams: RegMean is the weighted average
    same = [grams[0]] * 3
    avg = mm.merge("regmean", experts, grams=same, weights=w, alpha=1.0)
    lin = mm.merge("linear", experts, weights=w)
    for a, b in zip(jax.tree.leaves(avg.params), jax.tree.leaves(lin.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    with pytest.raises(ValueError, match="do not have"):
        mm.merge("regmean", experts, grams=[{"Nope/kernel": jnp.eye(2)}] * 3)
    # end to end: Fisher merging from diagonal Fisher estimates of each expert on its data
    ys = [rng.integers(0, 4, 40) for _ in range(3)]
    fishers = [
        diagonal_fisher(apply_fn, p, x, y, kind="empirical") for p, x, y in zip(experts, data, ys)
    ]
    fm = mm.merge("fisher", experts, fishers=fishers)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(fm.params))


def test_regmean_square_kernels_get_their_grams_whole(rng):
    """Regression: a (d, d) kernel has a Gram of its own shape; it must still reach RegMean
    as a (d, d) matrix, not be flattened like a statistic shaped as the leaf."""
    from manifold_merge.models import MLP as FlaxMLP

    model = FlaxMLP(widths=(6, 6), num_classes=3)
    apply_fn = lambda p, v: model.apply({"params": p}, v)  # noqa: E731
    experts = [model.init(jax.random.key(i), jnp.ones((1, 6)))["params"] for i in range(3)]
    grams = [
        input_grams(apply_fn, p, rng.standard_normal((30, 6)).astype(np.float32)) for p in experts
    ]
    res = mm.merge("regmean", experts, grams=grams, alpha=0.7)
    for layer in ("Dense_0", "Dense_1"):
        g = [
            np.asarray(gr[f"{layer}/kernel"], np.float64) * (0.7 + 0.3 * np.eye(6)) for gr in grams
        ]
        ks = [np.asarray(p[layer]["kernel"], np.float64) for p in experts]
        ref = np.linalg.solve(sum(g), sum(gi @ k for gi, k in zip(g, ks)))
        np.testing.assert_allclose(np.asarray(res.params[layer]["kernel"]), ref, atol=1e-4)


def test_regmean_dead_inputs_get_the_average_not_nan(rng):
    """An input feature that is always 0 (an image corner) makes every Gram singular; the
    ridge gives its kernel row the weighted average, and the other rows the RegMean solution."""
    d, k = 5, 3
    kernels = [rng.standard_normal((d, k)) for _ in range(3)]
    grams = []
    for _ in range(3):
        x = rng.standard_normal((40, d))
        x[:, 2] = 0.0  # dead feature
        grams.append({"w": x.T @ x})
    w = np.array([0.2, 0.3, 0.5])
    res = mm.merge("regmean", [{"w": kk} for kk in kernels], grams=grams, weights=w, alpha=1.0)
    out = np.asarray(res.params["w"], np.float64)
    assert np.all(np.isfinite(out))
    avg = sum(wi * kk for wi, kk in zip(w, kernels)) / w.sum()
    np.testing.assert_allclose(out[2], avg[2], rtol=1e-5, atol=1e-6)
    live = [0, 1, 3, 4]
    g = [wi * gr["w"][np.ix_(live, live)] for wi, gr in zip(w, grams)]
    ref = np.linalg.solve(sum(g), sum(gi @ kk[live] for gi, kk in zip(g, kernels)))
    np.testing.assert_allclose(out[live], ref, rtol=1e-3, atol=1e-4)
