"""Closed forms of each manifold against independent float64 NumPy formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import angle, random_cluster, sphere_exp, sphere_karcher, sphere_log

import manifold_merge as mm
from manifold_merge.manifolds import get_manifold, list_manifolds

SOLVER32 = mm.KarcherSolver(tol=1e-7)


# ---------------------------------------------------------------------- Sphere
def test_sphere_log_exp_dist_match_numpy(rng):
    s = mm.Sphere(29, radius=2.5)
    for _ in range(5):
        x, y = random_cluster(rng, 2, 30, rng.uniform(0.01, 3.0))
        v_ref = 2.5 * sphere_log(x, y)
        v = s.log(jnp.asarray(2.5 * x, jnp.float32), jnp.asarray(2.5 * y, jnp.float32))
        np.testing.assert_allclose(np.asarray(v), v_ref, atol=2e-5)
        d = s.dist(jnp.asarray(2.5 * x, jnp.float32), jnp.asarray(2.5 * y, jnp.float32))
        assert abs(float(d) - 2.5 * angle(x, y)) < 1e-5
        t = rng.standard_normal(30)
        t -= np.dot(t, x) * x
        t *= rng.uniform(0.1, 2.0) / np.linalg.norm(t)
        e = s.exp(jnp.asarray(2.5 * x, jnp.float32), jnp.asarray(2.5 * t, jnp.float32))
        np.testing.assert_allclose(np.asarray(e), 2.5 * sphere_exp(x, t), atol=2e-5)


def test_sphere_parallel_transport_matches_numpy(rng):
    x, y = random_cluster(rng, 2, 8, 1.0)
    v = rng.standard_normal(8)
    v -= np.dot(v, x) * x
    # reference: rotate the component along the geodesic direction, keep the rest
    u = sphere_log(x, y)
    th = np.linalg.norm(u)
    e = u / th
    ref = v + np.dot(e, v) * ((np.cos(th) - 1) * e - np.sin(th) * x)
    out = mm.Sphere(7).transp(
        jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), jnp.asarray(v, jnp.float32)
    )
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    # transporting log_x(y) gives -log_y(x)
    tl = mm.Sphere(7).transp(
        jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), jnp.asarray(u, jnp.float32)
    )
    np.testing.assert_allclose(np.asarray(tl), -sphere_log(y, x), atol=1e-5)


def test_sphere_tiny_angles_keep_relative_precision(rng):
    # float32 points at angles 1e-4 .. 1e-6: the atan2 form agrees with float64 on the same
    # rounded inputs to relative 1e-4, where arccos(<x, y>) is off by orders of magnitude.
    x = rng.standard_normal(1000)
    x /= np.linalg.norm(x)
    for t in (1e-4, 1e-5, 1e-6):
        d = rng.standard_normal(1000)
        d -= np.dot(d, x) * x
        y = np.cos(t) * x + np.sin(t) * d / np.linalg.norm(d)
        x32, y32 = x.astype(np.float32), y.astype(np.float32)
        ref = angle(x32, y32)
        got = float(mm.Sphere(999).dist(jnp.asarray(x32), jnp.asarray(y32)))
        assert abs(got - ref) / ref < 1e-4
        naive = float(
            jnp.arccos(
                jnp.clip(jnp.dot(x32, y32) / (jnp.linalg.norm(x32) * jnp.linalg.norm(y32)), -1, 1)
            )
        )
        if t <= 1e-5:
            assert abs(naive - ref) / ref > 1e-2  # what the arccos form would have given


def test_sphere_antipode_log_is_finite_and_flagged(rng):
    x = rng.standard_normal(6).astype(np.float32)
    x /= np.linalg.norm(x)
    s = mm.Sphere(5)
    v = s.log(jnp.asarray(x), jnp.asarray(-x))
    assert bool(jnp.all(jnp.isfinite(v)))
    assert abs(float(s.dist(jnp.asarray(x), jnp.asarray(-x))) - np.pi) < 1e-6
    assert not bool(s.within_uniqueness_radius(jnp.asarray(x), jnp.asarray(-x)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_points_are_computed_in_float32(rng, dtype):
    x, y = random_cluster(rng, 2, 64, 0.7)
    s = mm.Sphere(63)
    xl, yl = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
    v = s.log(xl, yl)
    assert v.dtype == dtype
    ref = s.log(xl.astype(jnp.float32), yl.astype(jnp.float32)).astype(dtype)
    np.testing.assert_array_equal(np.asarray(v, np.float32), np.asarray(ref, np.float32))
    d = s.dist(xl, yl)
    assert d.dtype == jnp.float32
    # the same formula in float64 on the rounded points (which are unit only to bf16/fp16
    # precision, so this is not their exact angle): float32 arithmetic agrees to ~1e-7
    x64, y64 = np.asarray(xl, np.float64), np.asarray(yl, np.float64)
    ref = 2 * np.arctan2(np.linalg.norm(x64 - y64), np.linalg.norm(x64 + y64))
    assert abs(float(d) - ref) < 1e-6


def test_sphere_rejects_bad_settings():
    with pytest.raises(ValueError, match="dim >= 1"):
        mm.Sphere(0)
    with pytest.raises(ValueError, match="radius"):
        mm.Sphere(3, radius=-1.0)


# -------------------------------------------------------------------- FisherRao
def test_fisher_rao_distance_is_2_arccos_bhattacharyya(rng):
    fr = mm.FisherRao(7)
    for _ in range(10):
        p, q = rng.dirichlet(np.full(7, 0.7), 2)
        ref = 2 * np.arccos(np.clip(np.sum(np.sqrt(p * q)), -1, 1))
        with jax.enable_x64(True):
            got = float(fr.dist(jnp.asarray(p), jnp.asarray(q)))
        assert abs(got - ref) < 1e-10
        got32 = float(fr.dist(jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32)))
        assert abs(got32 - ref) < 1e-5


def test_fisher_rao_metric_is_the_fisher_information(rng):
    # g_p(u, v) = sum u v / p is the second-order term of KL: KL(p || p + tu) ~ t^2/2 g(u, u)
    fr = mm.FisherRao(5)
    with jax.enable_x64(True):
        p = jnp.asarray(rng.dirichlet(np.ones(5)))
        u = fr.proj(p, jnp.asarray(rng.standard_normal(5)) * p)
        assert abs(float(jnp.sum(u))) < 1e-12
        np.testing.assert_allclose(
            float(fr.inner(p, u, u)), float(np.sum(np.asarray(u) ** 2 / np.asarray(p)))
        )
        t = 1e-4
        q = np.asarray(p + t * u)
        kl = np.sum(np.asarray(p) * np.log(np.asarray(p) / q))
        assert abs(kl / (0.5 * t**2 * float(fr.inner(p, u, u))) - 1) < 1e-3
        # and the squared distance agrees with the metric to second order
        d = float(fr.dist(p, jnp.asarray(q)))
        assert abs(d**2 / (t**2 * float(fr.inner(p, u, u))) - 1) < 1e-3


def test_fisher_rao_karcher_mean_of_predictions_is_a_distribution(rng):
    k, n = 10, 6
    logits = rng.standard_normal((n, k)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    w = rng.uniform(0.1, 1.0, n)
    fr = mm.FisherRao(k)
    res = mm.karcher_mean(fr, jnp.asarray(probs, jnp.float32), w, solver=SOLVER32)
    assert bool(res.converged)
    mean = np.asarray(res.mean, np.float64)
    assert np.all(mean >= 0) and abs(mean.sum() - 1) < 1e-6
    # it is the squared, renormalised sphere mean of the sqrt(p_i)
    ref = sphere_karcher(np.sqrt(probs), w) ** 2
    np.testing.assert_allclose(mean, ref / ref.sum(), atol=2e-6)


def test_fisher_rao_tiny_distances_keep_relative_precision(rng):
    p = rng.dirichlet(np.ones(8))
    u = rng.standard_normal(8) * p
    u -= u.sum() * p
    for t in (1e-4, 1e-6):
        q = p + t * u / np.sqrt(np.sum(u**2 / p))
        p32, q32 = p.astype(np.float32), q.astype(np.float32)
        p64, q64 = p32.astype(np.float64), q32.astype(np.float64)
        ref = 4 * np.arctan2(
            np.linalg.norm(np.sqrt(p64) - np.sqrt(q64)), np.linalg.norm(np.sqrt(p64) + np.sqrt(q64))
        )
        got = float(mm.FisherRao(8).dist(jnp.asarray(p32), jnp.asarray(q32)))
        assert abs(got - ref) / ref < 1e-3


# ------------------------------------------------------------------- NormSphere
def test_norm_sphere_distance_is_the_product_distance(rng):
    a, b = random_cluster(rng, 2, 40, 1.0)
    ra, rb = 2.0, 7.0
    th = angle(a, b)
    x, y = jnp.asarray(ra * a, jnp.float32), jnp.asarray(rb * b, jnp.float32)
    got = float(mm.NormSphere(40).dist(x, y))
    assert abs(got - np.hypot(th, rb - ra)) < 1e-5
    got = float(mm.NormSphere(40, "geometric").dist(x, y))
    assert abs(got - np.hypot(th, np.log(rb / ra))) < 1e-6


def test_norm_sphere_rejects_unknown_rule():
    with pytest.raises(ValueError, match="norm_mean"):
        mm.NormSphere(4, "harmonic")


# --------------------------------------------------------- product and registry
def test_product_distance_and_structure(rng):
    a, b = random_cluster(rng, 2, 5, 0.8)
    e1, e2 = rng.standard_normal((2, 3))
    m = mm.ProductManifold({"w": mm.Sphere(4), "b": mm.Euclidean(3)})
    x = {"w": jnp.asarray(a, jnp.float32), "b": jnp.asarray(e1, jnp.float32)}
    y = {"w": jnp.asarray(b, jnp.float32), "b": jnp.asarray(e2, jnp.float32)}
    assert abs(float(m.dist(x, y)) - np.hypot(angle(a, b), np.linalg.norm(e1 - e2))) < 1e-5
    assert m.manifolds == {"w": mm.Sphere(4), "b": mm.Euclidean(3)}
    assert not bool(m.belongs({"w": x["w"]}))  # wrong structure
    with pytest.raises(TypeError, match="leaves are manifolds"):
        mm.ProductManifold({"w": 3})


def test_manifolds_are_hashable_static_pytrees():
    assert mm.Sphere(3) == mm.Sphere(3) and hash(mm.Sphere(3)) == hash(mm.Sphere(3))
    assert mm.Sphere(3) != mm.Sphere(3, radius=2.0)
    assert jax.tree.leaves(mm.ProductManifold([mm.Sphere(2), mm.Euclidean(1)])) == []
    out = jax.jit(lambda m, x: m.exp(x, jnp.zeros_like(x)))(mm.Sphere(2), jnp.array([1.0, 0, 0]))
    np.testing.assert_array_equal(np.asarray(out), [1.0, 0, 0])


def test_registry_builds_by_name_and_suggests_names():
    assert {"euclidean", "sphere", "fisher_rao", "norm_sphere", "product"} <= set(list_manifolds())
    assert get_manifold("sphere", dim=3, radius=2.0) == mm.Sphere(3, 2.0)
    assert get_manifold("norm_sphere", dim=4, norm_mean="geometric") == mm.NormSphere(
        4, "geometric"
    )
    with pytest.raises(KeyError, match="Did you mean 'sphere'"):
        get_manifold("spheer", dim=3)
    with pytest.raises(TypeError, match="manifold 'sphere'"):
        get_manifold("sphere", dims=3)


def test_public_api_is_exported():
    for name in [
        "AbstractManifold",
        "Sphere",
        "Euclidean",
        "FisherRao",
        "NormSphere",
        "ProductManifold",
        "karcher_mean",
        "KarcherSolver",
        "KarcherResult",
    ]:
        assert hasattr(mm, name), name
    import manifold_merge.solvers as solvers

    assert solvers.karcher_mean is mm.karcher_mean
