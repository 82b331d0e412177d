"""Collapse and function-space diagnostics against float64 NumPy references and closed forms."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
from reference import sphere_karcher

import manifold_merge as mm
from manifold_merge import diagnostics as dg
from manifold_merge.diagnostics import collapse

# ---------------------------------------------------------------------------------------------
# independent references (float64 NumPy, written from the formulas)


def ref_av(h, mask=None):
    h = np.asarray(h, np.float64)
    rows = h.reshape(-1, h.shape[-1]) if mask is None else h[np.asarray(mask, bool)]
    return float(np.mean(np.var(rows, axis=0)))


def ref_effrank(h, mask=None, singular=False):
    h = np.asarray(h, np.float64)
    rows = h.reshape(-1, h.shape[-1]) if mask is None else h[np.asarray(mask, bool)]
    if singular:
        s = np.linalg.svd(rows - rows.mean(0), compute_uv=False)
    else:
        s = np.clip(np.linalg.eigvalsh(np.cov(rows, rowvar=False, bias=True)), 0, None)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def ref_softmax(z):
    e = np.exp(np.asarray(z, np.float64))
    return e / e.sum(-1, keepdims=True)


def ref_kl(a, b):
    p, q = ref_softmax(a), ref_softmax(b)
    return float(np.mean(np.sum(p * np.log(p / q), axis=-1)))


def ref_fr(p, q):
    return 2 * np.arccos(np.clip(np.sum(np.sqrt(p * q), axis=-1), -1, 1))


def ref_barycenter(probs, weights):
    """Per input: the squared float64 sphere Karcher mean of the sqrt(p_i) (tests/reference)."""
    probs = np.asarray(probs, np.float64)
    return np.stack(
        [sphere_karcher(np.sqrt(probs[:, j]), weights) ** 2 for j in range(probs.shape[1])]
    )


def dirichlet(rng, n, k, alpha=1.0):
    return rng.dirichlet(np.full(k, alpha), size=n)


# ---------------------------------------------------------------------------------------------
# activation variance


@pytest.mark.parametrize("shape", [(40, 7), (9, 5, 6)])
def test_activation_variance_matches_numpy(rng, shape):
    h = (rng.standard_normal(shape) * rng.uniform(0.1, 3, shape[-1]) + 5).astype(np.float32)
    assert dg.activation_variance(h) == pytest.approx(ref_av(h), rel=1e-12)
    assert dg.activation_variance(jax.numpy.asarray(h)) == pytest.approx(ref_av(h), rel=1e-12)


def test_activation_variance_mask_drops_padded_tokens(rng):
    h = rng.standard_normal((6, 8, 4))
    mask = rng.random((6, 8)) < 0.6
    mask[0, 0] = True
    garbage = h.copy()
    garbage[~mask] = 1e6  # padded positions must not matter
    assert dg.activation_variance(garbage, mask=mask) == pytest.approx(ref_av(h, mask), rel=1e-12)
    with pytest.raises(ValueError, match="mask"):
        dg.activation_variance(h, mask=mask[:, :3])
    with pytest.raises(ValueError, match="no"):
        dg.activation_variance(h, mask=np.zeros((6, 8), bool))


def test_chunked_reduction_equals_one_pass(rng, monkeypatch):
    h = rng.standard_normal((50, 3, 6)) + 100.0
    mask = rng.random((50, 3)) < 0.7
    av, er = dg.activation_variance(h, mask=mask), dg.effective_rank(h, mask=mask)
    monkeypatch.setattr(collapse, "_CHUNK_NUMBERS", 13)  # 2-row chunks
    assert dg.activation_variance(h, mask=mask) == pytest.approx(av, rel=1e-12)
    assert dg.effective_rank(h, mask=mask) == pytest.approx(er, rel=1e-10)
    assert dg.activation_variance(h, mask=mask) == pytest.approx(ref_av(h, mask), rel=1e-12)


def test_activation_variance_is_stable_for_large_means(rng):
    # float32 data around 1e4: a one-pass E[x^2] - E[x]^2 would lose everything
    h = (1e4 + 1e-2 * rng.standard_normal((500, 3))).astype(np.float32)
    assert dg.activation_variance(h) == pytest.approx(ref_av(h), rel=1e-9)


def test_variance_ratio_of_scaled_copy_is_scale_squared(rng):
    h = rng.standard_normal((30, 4, 5))
    s = rng.uniform(0.1, 2.0)
    experts = [h, -h, h + rng.standard_normal(5)]  # shifts and sign flips keep the variance
    assert dg.variance_ratio(s * h, experts) == pytest.approx(s**2, rel=1e-12)
    e = [rng.standard_normal((30, 4, 5)) * (i + 1) for i in range(3)]
    m = rng.standard_normal((30, 4, 5))
    assert dg.variance_ratio(m, e) == pytest.approx(
        ref_av(m) / np.mean([ref_av(x) for x in e]), rel=1e-12
    )
    assert dg.variance_ratio(m, np.stack(e)) == pytest.approx(dg.variance_ratio(m, e), rel=1e-15)
    assert dg.variance_ratio(np.zeros((3, 2)), [rng.standard_normal((3, 2))]) == 0.0
    assert dg.variance_ratio(np.ones((3, 2)), [np.zeros((3, 2))]) == 1.0  # 0/0
    with pytest.raises(ValueError, match="at least one"):
        dg.variance_ratio(m, [])


def test_per_layer_helpers(rng):
    layers = [rng.standard_normal((20, 3)), rng.standard_normal((20, 6))]
    experts = [[2 * x for x in layers], [3 * x for x in layers]]
    assert dg.layer_activation_variances(layers) == pytest.approx([ref_av(x) for x in layers])
    assert dg.layer_effective_ranks(layers) == pytest.approx([ref_effrank(x) for x in layers])
    assert dg.layer_variance_ratios(layers, experts) == pytest.approx([2 / 13, 2 / 13])
    named = {"a": layers[0], "b": layers[1]}
    out = dg.layer_variance_ratios(named, [dict(zip("ab", e)) for e in experts])
    assert list(out) == ["a", "b"] and out["b"] == pytest.approx(2 / 13)
    with pytest.raises(ValueError, match="layers"):
        dg.layer_variance_ratios(layers, [layers[:1]])
    with pytest.raises(ValueError, match="match"):
        dg.layer_variance_ratios(named, [{"a": layers[0]}])


# ---------------------------------------------------------------------------------------------
# effective rank


@pytest.mark.parametrize("shape", [(200, 6), (5, 12), (4, 6, 9)])
def test_effective_rank_matches_numpy(rng, shape):
    h = rng.standard_normal(shape) * rng.uniform(0.1, 3, shape[-1])
    assert dg.effective_rank(h) == pytest.approx(ref_effrank(h), rel=1e-9)
    assert dg.effective_rank(h, spectrum="singular_values") == pytest.approx(
        ref_effrank(h, singular=True), rel=1e-9
    )


def test_effective_rank_closed_forms(rng):
    d = 8
    iso = rng.standard_normal((20000, d))
    assert dg.effective_rank(iso) == pytest.approx(d, rel=2e-3)
    # rank-k data with equal eigenvalues: k orthonormal directions, +-1 balanced coefficients
    k = 3
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    coeffs = np.array(list(itertools.product([-1.0, 1.0], repeat=k)))  # covariance = identity
    h = coeffs @ q.T * rng.uniform(0.5, 2.0)
    assert dg.effective_rank(h) == pytest.approx(k, abs=1e-9)
    assert dg.effective_rank(h, spectrum="singular_values") == pytest.approx(k, abs=1e-9)
    assert dg.effective_rank(h.astype(np.float32)) == pytest.approx(k, abs=1e-5)
    # zero eigenvalues cost nothing (0 log 0 = 0) and constant data has rank 0
    assert dg.effective_rank(np.ones((5, 4))) == 0.0
    rank1 = np.outer(rng.standard_normal(30), rng.standard_normal(d))
    assert dg.effective_rank(rank1) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="spectrum"):
        dg.effective_rank(h, spectrum="svd")


def test_effective_rank_with_mask(rng):
    h = rng.standard_normal((7, 5, 4))
    mask = rng.random((7, 5)) < 0.5
    mask[:2] = True
    garbage = np.where(mask[..., None], h, 1e3)
    assert dg.effective_rank(garbage, mask=mask) == pytest.approx(ref_effrank(h, mask), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# norm ratio


def test_norm_ratio_matches_numpy(rng):
    experts = [
        {"a": {"w": rng.standard_normal((3, 4))}, "b": rng.standard_normal(5).astype(np.float32)}
        for _ in range(3)
    ]
    merged = {"a": {"w": rng.standard_normal((3, 4))}, "b": rng.standard_normal(5)}
    base = {"a": {"w": rng.standard_normal((3, 4))}, "b": rng.standard_normal(5)}
    out = dg.norm_ratio(merged, experts)
    assert list(out) == ["a/w", "b"]
    for name, get in [("a/w", lambda t: t["a"]["w"]), ("b", lambda t: t["b"])]:
        norms = [np.linalg.norm(np.asarray(get(e), np.float64)) for e in experts]
        assert out[name] == pytest.approx(np.linalg.norm(get(merged)) / np.mean(norms), rel=1e-12)
        tv = dg.norm_ratio(merged, experts, base=base)[name]
        ref = np.linalg.norm(get(merged) - get(base)) / np.mean(
            [np.linalg.norm(np.asarray(get(e), np.float64) - get(base)) for e in experts]
        )
        assert tv == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_norm_ratio_of_averaged_orthogonal_task_vectors_is_one_over_sqrt_n(rng, n):
    d = 12
    q, _ = np.linalg.qr(rng.standard_normal((d, n)))
    scale = rng.uniform(0.5, 3)
    base = {"w": rng.standard_normal(d)}
    experts = [{"w": base["w"] + scale * q[:, i]} for i in range(n)]
    merged = {"w": np.mean([e["w"] for e in experts], axis=0)}
    assert dg.norm_ratio(merged, experts, base=base)["w"] == pytest.approx(n**-0.5, rel=1e-10)


def test_norm_ratio_edge_cases(rng):
    z = {"w": np.zeros(3)}
    assert dg.norm_ratio(z, [z, z])["w"] == 1.0  # 0/0: nothing changed
    assert dg.norm_ratio({"w": np.ones(3)}, [z])["w"] == float("inf")
    with pytest.raises(ValueError, match="differ"):
        dg.norm_ratio({"w": np.ones(3)}, [{"v": np.ones(3)}])
    with pytest.raises(ValueError, match="shapes"):
        dg.norm_ratio({"w": np.ones(3)}, [{"w": np.ones(4)}])


# ---------------------------------------------------------------------------------------------
# accuracy, KL


def test_accuracy_and_normalized_accuracy(rng):
    logits = rng.standard_normal((50, 4))
    labels = rng.integers(0, 4, 50)
    assert dg.accuracy(logits, labels) == np.mean(logits.argmax(1) == labels)
    m, e = rng.uniform(0.2, 0.9, 4), rng.uniform(0.5, 1.0, 4)
    res = dg.normalized_accuracy(m, e)
    np.testing.assert_allclose(res.per_task, m / e, rtol=1e-15)
    assert res.mean == pytest.approx(np.mean(m / e), rel=1e-15)
    with pytest.raises(ValueError, match="shape"):
        dg.accuracy(logits, labels[:10])
    with pytest.raises(ValueError, match="positive"):
        dg.normalized_accuracy([0.5], [0.0])
    with pytest.raises(ValueError, match="tasks"):
        dg.normalized_accuracy({"a": 0.5}, {"b": 0.5})


def test_mean_kl_matches_numpy_and_is_nonnegative(rng):
    a, b = 2 * rng.standard_normal((40, 5)), 2 * rng.standard_normal((40, 5))
    assert dg.mean_kl(a, b) == pytest.approx(ref_kl(a, b), rel=1e-10)
    assert dg.mean_kl(a, b) >= 0
    assert dg.mean_kl(a, a) == 0.0
    assert dg.mean_kl(a, a + rng.standard_normal((40, 1))) == pytest.approx(0.0, abs=1e-14)
    # huge logits: stable (the direct softmax would overflow)
    big = dg.mean_kl(1000 * a, 1000 * a + 1)
    assert big == pytest.approx(0.0, abs=1e-9)
    assert np.isfinite(dg.mean_kl(500 * a, 500 * b))
    # token-level with a padding mask
    ta, tb = rng.standard_normal((4, 6, 3)), rng.standard_normal((4, 6, 3))
    mask = rng.random((4, 6)) < 0.5
    mask[0, 0] = True
    assert dg.mean_kl(ta, tb, mask=mask) == pytest.approx(ref_kl(ta[mask], tb[mask]), rel=1e-10)


# ---------------------------------------------------------------------------------------------
# Fisher–Rao distance, barycenter


def test_fisher_rao_distance_matches_numpy(rng):
    p, q = dirichlet(rng, 30, 6), dirichlet(rng, 30, 6)
    np.testing.assert_allclose(dg.fisher_rao_distance(p, q), ref_fr(p, q), rtol=1e-12)
    assert isinstance(dg.fisher_rao_distance(p[0], q[0]), float)
    # broadcasting one distribution against many
    np.testing.assert_allclose(dg.fisher_rao_distance(p[0], q), ref_fr(p[0], q), rtol=1e-12)


def test_fisher_rao_distance_closed_forms(rng):
    p = dirichlet(rng, 5, 4)
    np.testing.assert_array_equal(dg.fisher_rao_distance(p, p), 0.0)
    a, b = np.array([0.3, 0.7, 0.0, 0.0]), np.array([0.0, 0.0, 0.4, 0.6])
    assert dg.fisher_rao_distance(a, b) == pytest.approx(np.pi, rel=1e-15)
    # close distributions: d ~ sqrt(sum delta_k^2 / p_k), where arccos would return ~0 or noise
    p = dirichlet(rng, 1, 5, alpha=5.0)[0]
    delta = 1e-9 * rng.standard_normal(5)
    delta -= delta.mean()
    small = dg.fisher_rao_distance(p, p + delta)
    assert small == pytest.approx(np.sqrt(np.sum(delta**2 / p)), rel=1e-5)


# The barycenter tests share N in {2, 4} experts, K = 5 classes and at most 8 inputs (one input
# chunk size), so that they share the few compilations of the vmapped Karcher solver.


def test_barycenter_matches_numpy_karcher(rng):
    probs = [dirichlet(rng, 6, 5) for _ in range(4)]
    w = rng.uniform(0.2, 1.0, 4)
    bary = dg.fisher_rao_barycenter(probs, w)
    assert bary.shape == (6, 5) and bary.dtype == np.float32
    ref = ref_barycenter(probs, w)
    np.testing.assert_allclose(bary, ref, atol=2e-6)
    np.testing.assert_allclose(bary.sum(-1), 1.0, atol=1e-6)
    with jax.enable_x64(True):
        bary64 = dg.fisher_rao_barycenter(probs, w)
    assert bary64.dtype == np.float64
    np.testing.assert_allclose(bary64, ref, atol=1e-11)


def test_barycenter_of_two_is_the_sphere_midpoint(rng):
    p, q = dirichlet(rng, 8, 5), dirichlet(rng, 8, 5)
    a, b = np.sqrt(p), np.sqrt(q)
    theta = np.arccos(np.clip(np.sum(a * b, -1, keepdims=True), -1, 1))
    for t in [0.5, rng.uniform(0.1, 0.9)]:  # slerp(a, b, t) in sqrt space, weights (1 - t, t)
        s = (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)
        with jax.enable_x64(True):
            bary = dg.fisher_rao_barycenter([p, q], [1 - t, t])
        np.testing.assert_allclose(bary, s**2, atol=1e-11)
        # the barycenter lies on the geodesic: the distances split t : 1 - t
        d = dg.fisher_rao_distance(p, q)
        np.testing.assert_allclose(dg.fisher_rao_distance(p, bary), t * d, atol=1e-9)


def test_barycenter_is_invariant_under_permuting_experts(rng):
    probs = [dirichlet(rng, 5, 5) for _ in range(4)]
    w = rng.uniform(0.1, 1.0, 4)
    perm = rng.permutation(4)
    b1 = dg.fisher_rao_barycenter(probs, w)
    b2 = dg.fisher_rao_barycenter([probs[i] for i in perm], w[perm])
    np.testing.assert_allclose(b1, b2, atol=2e-6)
    # identical experts: their barycenter is that distribution
    np.testing.assert_allclose(dg.fisher_rao_barycenter([probs[0]] * 4), probs[0], atol=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        dg.fisher_rao_barycenter([probs[0], probs[1][:2]])
    with pytest.raises(ValueError, match="weights"):
        dg.fisher_rao_barycenter(probs, [1.0, -1.0, 1.0, 1.0])


def test_distance_to_barycenter(rng):
    probs = [dirichlet(rng, 7, 5) for _ in range(4)]
    with jax.enable_x64(True):
        bary = dg.fisher_rao_barycenter(probs)
        assert dg.distance_to_barycenter(probs, bary) == pytest.approx(0.0, abs=1e-7)
    merged = dirichlet(rng, 7, 5)
    ref = np.mean(ref_fr(merged, ref_barycenter(probs, np.ones(4))))
    assert dg.distance_to_barycenter(probs, merged) == pytest.approx(ref, abs=1e-5)
    with pytest.raises(ValueError, match="shape"):
        dg.distance_to_barycenter(probs, merged[:3])


def test_barycenter_in_chunks_and_nonconvergence_warning(rng, monkeypatch):
    from manifold_merge.diagnostics import function_space

    probs = [dirichlet(rng, 7, 5) for _ in range(4)]
    whole = dg.fisher_rao_barycenter(probs)
    monkeypatch.setattr(function_space, "_BARYCENTER_CHUNK", 4)  # 4 + 3 (padded) inputs
    np.testing.assert_allclose(dg.fisher_rao_barycenter(probs), whole, atol=1e-7)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        dg.fisher_rao_barycenter(probs, solver=mm.KarcherSolver(max_steps=1, tol=0.0))


def test_low_precision_inputs_are_reduced_in_float64(rng):
    h = jax.numpy.asarray(rng.standard_normal((64, 5)), jax.numpy.bfloat16)
    h64 = np.asarray(h).astype(np.float64)
    assert dg.activation_variance(h) == pytest.approx(ref_av(h64), rel=1e-12)
    assert dg.effective_rank(h) == pytest.approx(ref_effrank(h64), rel=1e-9)
    with pytest.raises(TypeError, match="real"):
        dg.activation_variance(np.zeros((3, 2), complex))
