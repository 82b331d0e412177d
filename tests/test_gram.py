"""The two-pass Gram-space Karcher solver: against float64 NumPy and the iterative solver."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import angle, np_karcher_spherical_proxy, random_cluster, sphere_karcher

import manifold_merge as mm
from manifold_merge.solvers import gram
from manifold_merge.solvers.gram import gram_karcher_mean, span_gram


def _np_geometric_proxy(xs, w):
    """Sphere Karcher mean of the directions x weighted geometric mean of the norms."""
    xs = np.asarray(xs, np.float64)
    norms = np.linalg.norm(xs, axis=1)
    w = np.asarray(w, np.float64) / np.sum(w)
    return sphere_karcher(xs, w) * np.exp(w @ np.log(norms))


@pytest.fixture
def small_blocks(monkeypatch):
    """Gram blocks of 1000 columns, so that blocking and the remainder are exercised on
    small inputs (the default block is 65,536)."""
    monkeypatch.setattr(gram, "GRAM_BLOCK", 1000)


@pytest.mark.parametrize("d", [37, 1000, 4321])
def test_span_gram_is_the_float64_gram(rng, small_blocks, d):
    """Within the rounding bound of float32 dots over blocks of B columns summed in float64:
    |G - X X^T| <= B eps (|X| |X|^T), raw or around a reference input."""
    x = rng.standard_normal((5, d)).astype(np.float32) * rng.uniform(0.1, 10, (5, 1))
    x64 = x.astype(np.float64)
    ref = x64 @ x64.T
    bound = gram.GRAM_BLOCK * np.finfo(np.float32).eps * (np.abs(x64) @ np.abs(x64).T)
    with jax.enable_x64(True):
        for k in (None, 0, 3):
            g = np.asarray(jax.jit(span_gram, static_argnums=1)(jnp.asarray(x), k))
            assert g.dtype == np.float64
            assert np.all(np.abs(g - ref) <= bound), k
            assert np.abs(g - ref).max() < 1e-6 * np.abs(ref).max()  # typical: far below


def test_span_gram_keeps_tiny_differences(rng, small_blocks):
    """Two inputs 1e-4 rad apart: their squared distance comes out of G with full relative
    precision (the Gram of the raw vectors would give it to about 1e-7 / 1e-8 = 10 %)."""
    x = random_cluster(rng, 2, 5000, 1e-4).astype(np.float32) * 30.0
    x64 = x.astype(np.float64)
    with jax.enable_x64(True):
        g = np.asarray(span_gram(jnp.asarray(x), 0))
    d2 = g[0, 0] + g[1, 1] - 2 * g[0, 1]
    ref = np.sum((x64[0] - x64[1]) ** 2)
    assert abs(d2 - ref) < 1e-6 * ref


@pytest.mark.parametrize(("n", "spread"), [(1, 0.3), (2, 1.2), (5, 1e-3), (5, 0.3), (12, 1.2)])
def test_sphere_matches_float64_reference(rng, small_blocks, n, spread):
    dim = 20_000
    pts = random_cluster(rng, n, dim, spread).astype(np.float32)
    w = rng.uniform(0.05, 1.0, n)
    ref = sphere_karcher(pts.astype(np.float64), w)
    res = jax.jit(gram_karcher_mean, static_argnums=0)(mm.Sphere(dim - 1), pts, w)
    assert bool(res.converged), res
    assert res.mean.dtype == jnp.float32
    assert angle(res.mean, ref) < 2e-7
    assert float(res.grad_norm) <= gram.GRAM_TOL


def test_radius_is_honoured(rng):
    pts = random_cluster(rng, 4, 300, 0.5) * 3.0
    w = rng.uniform(0.1, 1, 4)
    res = gram_karcher_mean(mm.Sphere(299, radius=3.0), jnp.asarray(pts, jnp.float32), w)
    np.testing.assert_allclose(np.linalg.norm(res.mean), 3.0, rtol=1e-6)
    assert angle(res.mean, sphere_karcher(pts, w)) < 2e-7


@pytest.mark.parametrize("norm_mean", ["arithmetic", "geometric"])
@pytest.mark.parametrize("spread", [0.01, 0.8])
def test_norm_sphere_matches_float64_reference(rng, small_blocks, norm_mean, spread):
    n, dim = 6, 7000
    pts = random_cluster(rng, n, dim, spread) * rng.lognormal(0, 0.5, (n, 1))
    pts = pts.astype(np.float32)
    w = rng.uniform(0.05, 1.0, n)
    if norm_mean == "arithmetic":
        ref = np_karcher_spherical_proxy(pts, w)
    else:
        ref = _np_geometric_proxy(pts, w)
    res = gram_karcher_mean(mm.NormSphere(dim, norm_mean), jnp.asarray(pts), w)
    assert bool(res.converged)
    out = np.asarray(res.mean, np.float64)
    assert angle(out, ref) < 2e-7
    np.testing.assert_allclose(np.linalg.norm(out), np.linalg.norm(ref), rtol=1e-6)


@pytest.mark.parametrize("spread", [1e-4, 0.05, 0.9])
def test_agrees_with_the_iterative_solver(rng, spread):
    """The issue's contract: both solvers agree to 1e-6 rad."""
    n, dim = 8, 50_000
    pts = jnp.asarray(random_cluster(rng, n, dim, spread) * rng.uniform(0.5, 2, (n, 1)))
    pts = pts.astype(jnp.float32)
    w = jnp.asarray(rng.uniform(0.1, 1.0, n), jnp.float32)
    m = mm.NormSphere(dim)
    a = gram_karcher_mean(m, pts, w)
    b = mm.karcher_mean(m, pts, w)
    assert bool(a.converged) and bool(b.converged)
    assert angle(a.mean, b.mean) < 1e-6
    np.testing.assert_allclose(np.linalg.norm(a.mean), np.linalg.norm(b.mean), rtol=1e-6)


def test_zero_weights_and_duplicates(rng):
    """Zero-weight points are ignored, and duplicated inputs (a singular Gram) are fine."""
    pts = random_cluster(rng, 4, 500, 0.7).astype(np.float32)
    dup = np.concatenate([pts, pts[:2]])  # rank 4 in 6 points
    w = np.array([0.4, 0.1, 0.3, 0.2, 0.0, 0.0])
    ref = sphere_karcher(pts.astype(np.float64), w[:4])
    res = gram_karcher_mean(mm.Sphere(499), jnp.asarray(dup), w)
    assert bool(res.converged) and angle(res.mean, ref) < 2e-7
    far = dup.copy()
    far[5] = -far[0]  # an antipodal point of weight 0 changes nothing
    res = gram_karcher_mean(mm.Sphere(499), jnp.asarray(far), w)
    assert bool(res.converged) and angle(res.mean, ref) < 2e-7


def test_antipodal_pair_is_not_converged(rng):
    x = random_cluster(rng, 1, 100, 0.0)[0]
    res = gram_karcher_mean(mm.Sphere(99), jnp.asarray(np.stack([x, -x]), jnp.float32),
                            jnp.array([0.5, 0.5]))  # fmt: skip
    assert not bool(res.converged)


def test_vmap_over_blocks_equals_a_loop(rng):
    blocks = np.stack([random_cluster(rng, 3, 400, 0.4) for _ in range(5)]).astype(np.float32)
    w = jnp.asarray([0.2, 0.5, 0.3])
    m = mm.NormSphere(400)
    batched = jax.jit(jax.vmap(lambda p: gram_karcher_mean(m, p, w).mean))(blocks)
    for b, out in zip(blocks, batched):
        np.testing.assert_allclose(out, gram_karcher_mean(m, b, w).mean, atol=1e-7)


def test_float64_inputs_stay_float64(rng):
    pts = random_cluster(rng, 5, 3000, 0.6)
    w = rng.uniform(0.1, 1, 5)
    with jax.enable_x64(True):
        res = gram_karcher_mean(mm.Sphere(2999), jnp.asarray(pts), w)
        assert res.mean.dtype == jnp.float64
        assert angle(res.mean, sphere_karcher(pts, w)) < 1e-10


def test_refuses_other_manifolds():
    with pytest.raises(TypeError, match="Sphere or NormSphere"):
        gram_karcher_mean(mm.Euclidean(3), jnp.ones((2, 3)), jnp.ones(2))
    with pytest.raises(ValueError, match="coordinates"):
        gram_karcher_mean(mm.Sphere(3), jnp.ones((2, 3)), jnp.ones(2))


def test_zero_vector_with_weight_is_not_converged(rng):
    """NormSphere reads a point as direction x norm: a zero vector of positive weight has no
    direction, so the mean is not certified (karcher leaves such vectors out beforehand)."""
    pts = np.concatenate([random_cluster(rng, 2, 300, 0.3), np.zeros((1, 300))])
    res = gram_karcher_mean(mm.NormSphere(300), jnp.asarray(pts, jnp.float32), jnp.ones(3) / 3)
    assert not bool(res.converged)
    res = gram_karcher_mean(mm.NormSphere(300), jnp.asarray(pts, jnp.float32),
                            jnp.array([0.5, 0.5, 0.0]))  # fmt: skip
    assert bool(res.converged)
