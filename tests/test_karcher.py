"""karcher_mean against closed forms, invariances and an independent float64 NumPy solver."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import angle, random_cluster, sphere_exp, sphere_karcher, sphere_log

import manifold_merge as mm
from manifold_merge.solvers.karcher import FLOOR_PATIENCE, _karcher_mean

SOLVER32 = mm.KarcherSolver(tol=1e-7)


def unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def slerp_np(a, b, t):
    a, b = unit(a), unit(b)
    om = np.arctan2(np.linalg.norm(a - b), np.linalg.norm(a + b)) * 2
    return (np.sin((1 - t) * om) * a + np.sin(t * om) * b) / np.sin(om)


# ------------------------------------------------------------------ closed forms
def test_one_point_is_its_own_mean(rng):
    x = unit(rng.standard_normal(7)).astype(np.float32)
    res = mm.karcher_mean(mm.Sphere(6), x[None])
    # x is unit only to float32 rounding: a few steps at the floor, never the step cap
    assert bool(res.converged) and int(res.num_steps) <= FLOOR_PATIENCE + 5
    assert angle(res.mean, x) < 4 * np.finfo(np.float32).eps  # float32 rounding of a unit vector


def test_one_hot_weights_select_the_point(rng):
    pts = random_cluster(rng, 5, 40, 0.8).astype(np.float32)
    for i in range(5):
        w = np.eye(5)[i]
        res = mm.karcher_mean(mm.Sphere(39), pts, w, solver=SOLVER32)
        assert bool(res.converged)
        assert angle(res.mean, pts[i]) < 1e-6


def test_euclidean_mean_is_weighted_average(rng):
    pts = rng.standard_normal((6, 11)) * 3 + 50.0
    w = rng.uniform(0.1, 2.0, 6)
    res = mm.karcher_mean(mm.Euclidean(11), jnp.asarray(pts, jnp.float32), w)
    ref = (w / w.sum()) @ pts
    assert bool(res.converged)
    np.testing.assert_allclose(np.asarray(res.mean), ref, rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize("t", [0.0, 0.1, 0.37, 0.5, 0.9])
def test_two_points_give_the_geodesic_point(rng, t):
    a, b = random_cluster(rng, 2, 300, 1.3)
    res = mm.karcher_mean(
        mm.Sphere(299), jnp.asarray(np.stack([a, b]), jnp.float32), [1 - t, t], solver=SOLVER32
    )
    assert bool(res.converged)
    assert angle(res.mean, slerp_np(a, b, t)) < 1e-6


def test_radius_is_honoured(rng):
    pts = 4.0 * random_cluster(rng, 3, 20, 0.5)
    w = rng.uniform(0.2, 1.0, 3)
    res = mm.karcher_mean(
        mm.Sphere(19, radius=4.0), jnp.asarray(pts, jnp.float32), w, solver=SOLVER32
    )
    assert bool(res.converged)
    assert abs(np.linalg.norm(np.asarray(res.mean, np.float64)) - 4.0) < 1e-5
    assert angle(res.mean, sphere_karcher(pts, w)) < 1e-6


def test_symmetric_ring_has_the_pole_as_mean(rng):
    # k points at polar angle phi, equally spaced in azimuth: the mean is the pole, for any phi
    # below pi/2, whatever rotation is applied to the whole configuration.
    k, phi = 7, 1.1
    az = 2 * np.pi * np.arange(k) / k + rng.uniform(0, 2 * np.pi)
    ring = np.stack(
        [np.sin(phi) * np.cos(az), np.sin(phi) * np.sin(az), np.full(k, np.cos(phi))], 1
    )
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    res = mm.karcher_mean(mm.Sphere(2), jnp.asarray(ring @ q.T, jnp.float32), solver=SOLVER32)
    assert bool(res.converged)
    assert angle(res.mean, q @ np.array([0.0, 0.0, 1.0])) < 1e-6


def test_two_far_points_with_unequal_weights_are_certified(rng):
    # 1.7 rad apart, weights (0.99, 0.01): the mean is 1.68 rad from the light point (outside
    # its hemisphere) but both points lie within pi/2 of their midpoint, so it is unique.
    a, b = random_cluster(rng, 2, 20, 0.1)
    b = sphere_exp(a, 1.7 * unit(sphere_log(a, b)))
    res = mm.karcher_mean(
        mm.Sphere(19), jnp.asarray(np.stack([a, b]), jnp.float32), [0.99, 0.01], solver=SOLVER32
    )
    assert bool(res.converged)
    assert angle(res.mean, slerp_np(a, b, 0.01)) < 1e-6


def test_antipodal_pair_is_not_converged(rng):
    x = unit(rng.standard_normal(5))
    pts = jnp.asarray(np.stack([x, -x]), jnp.float32)
    for w in ([0.5, 0.5], [0.6, 0.4]):
        res = mm.karcher_mean(mm.Sphere(4), pts, w)
        assert not bool(res.converged)
        assert bool(jnp.all(jnp.isfinite(res.mean)))


def test_symmetric_triple_on_a_great_circle_is_not_converged():
    # three points 120 degrees apart: the two poles are both means; the fixed point the
    # iteration sits on is a saddle, and must not be reported as the mean
    az = 2 * np.pi * np.arange(3) / 3
    pts = jnp.asarray(np.stack([np.cos(az), np.sin(az), np.zeros(3)], 1), jnp.float32)
    res = mm.karcher_mean(mm.Sphere(2), pts)
    assert not bool(res.converged)


def test_zero_weight_points_are_ignored(rng):
    pts = random_cluster(rng, 3, 10, 0.5)
    far = -pts[0]  # antipodal to point 0, but weighted 0
    all_pts = jnp.asarray(np.vstack([pts, far[None]]), jnp.float32)
    w = [1.0, 1.0, 1.0, 0.0]
    res = mm.karcher_mean(mm.Sphere(9), all_pts, w, solver=SOLVER32)
    assert bool(res.converged)
    assert angle(res.mean, sphere_karcher(pts, [1, 1, 1])) < 1e-6


# ---------------------------------------------------------- independent reference
@pytest.mark.parametrize("n", [2, 5, 16])
@pytest.mark.parametrize("spread", [1e-3, 0.05, 0.6, 1.2])
def test_matches_float64_numpy_reference_high_dim(rng, n, spread):
    dim = 100_000
    pts = random_cluster(rng, n, dim, spread).astype(np.float32)
    w = rng.uniform(0.05, 1.0, n)
    ref = sphere_karcher(pts.astype(np.float64), w)
    res = mm.karcher_mean(mm.Sphere(dim - 1), jnp.asarray(pts), w, solver=SOLVER32)
    assert bool(res.converged), res
    assert angle(res.mean, ref) < 1e-6


def test_float64_matches_reference_to_1e10(rng):
    pts = random_cluster(rng, 6, 5000, 0.9)
    w = rng.uniform(0.1, 1.0, 6)
    ref = sphere_karcher(pts, w)
    with jax.enable_x64(True):
        res = mm.karcher_mean(
            mm.Sphere(4999), jnp.asarray(pts), w, solver=mm.KarcherSolver(tol=1e-13)
        )
        assert res.mean.dtype == jnp.float64 and bool(res.converged)
        assert angle(res.mean, ref) < 1e-10


def test_close_experts_get_an_exact_mean(rng):
    # cosine > 0.999 between experts: mergekit's shared tol stops before the first update;
    # here the gradient rule still lands on the float64 mean.
    pts = random_cluster(rng, 4, 20_000, 0.04)
    w = np.array([0.7, 0.1, 0.1, 0.1])
    ref = sphere_karcher(pts, w)
    extrinsic = unit(w @ pts)
    res = mm.karcher_mean(mm.Sphere(19_999), jnp.asarray(pts, jnp.float32), w, solver=SOLVER32)
    assert bool(res.converged)
    assert angle(res.mean, ref) < 1e-7 < angle(extrinsic, ref)


# ------------------------------------------------------------------ invariances
@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(0.05, 5.0), min_size=2, max_size=6),
    st.integers(0, 2**31 - 1),
    st.floats(0.01, 1.4),
)
def test_permutation_invariance_and_weight_scaling(weights, seed, spread):
    rng = np.random.default_rng(seed)
    n = len(weights)
    pts = random_cluster(rng, n, 64, spread).astype(np.float32)
    w = np.asarray(weights)
    perm = rng.permutation(n)
    s = mm.Sphere(63)
    a = mm.karcher_mean(s, jnp.asarray(pts), w, solver=SOLVER32)
    b = mm.karcher_mean(s, jnp.asarray(pts[perm]), w[perm] * 3.7, solver=SOLVER32)
    assert bool(a.converged) and bool(b.converged)
    assert angle(a.mean, b.mean) < 5e-7
    assert angle(a.mean, sphere_karcher(pts, w)) < 1e-6


def test_rotation_equivariance(rng):
    pts = random_cluster(rng, 5, 6, 1.0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    w = rng.uniform(0.1, 1.0, 5)
    s = mm.Sphere(5)
    a = mm.karcher_mean(s, jnp.asarray(pts, jnp.float32), w, solver=SOLVER32).mean
    b = mm.karcher_mean(s, jnp.asarray(pts @ q.T, jnp.float32), w, solver=SOLVER32).mean
    assert angle(q @ np.asarray(a, np.float64), b) < 1e-6


# ---------------------------------------------------------------- jit and vmap
def test_vmap_over_problems_equals_a_loop(rng):
    problems = np.stack([random_cluster(rng, 4, 50, s) for s in (0.01, 0.3, 0.7, 1.2, 0.1)])
    weights = rng.uniform(0.1, 1.0, (5, 4))
    s = mm.Sphere(49)

    def solve(p, w):
        return mm.karcher_mean(s, p, w, solver=SOLVER32)

    p32, w32 = jnp.asarray(problems, jnp.float32), jnp.asarray(weights, jnp.float32)
    batched = jax.vmap(solve)(p32, w32)
    for i in range(5):
        single = jax.jit(solve)(p32[i], w32[i])
        assert int(batched.num_steps[i]) == int(single.num_steps)
        assert bool(batched.converged[i]) == bool(single.converged)
        assert angle(batched.mean[i], single.mean) < 1e-6
        assert angle(batched.mean[i], sphere_karcher(problems[i], weights[i])) < 1e-6


def test_works_under_jit_with_traced_weights(rng):
    pts = jnp.asarray(random_cluster(rng, 3, 30, 0.5), jnp.float32)
    s = mm.Sphere(29)
    fn = jax.jit(lambda p, w: mm.karcher_mean(s, p, w, solver=SOLVER32))
    good = fn(pts, jnp.array([1.0, 2.0, 3.0]))
    assert bool(good.converged)
    assert angle(good.mean, sphere_karcher(np.asarray(pts), [1, 2, 3])) < 1e-6
    for bad in ([1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [1.0, np.nan, 1.0]):
        assert not bool(fn(pts, jnp.array(bad)).converged)


def test_second_call_does_not_recompile(rng):
    s = mm.Sphere(99)
    pts = jnp.asarray(random_cluster(rng, 4, 100, 0.4), jnp.float32)
    mm.karcher_mean(s, pts, [1, 2, 3, 4], solver=SOLVER32)
    size = _karcher_mean._cache_size()
    pts2 = jnp.asarray(random_cluster(rng, 4, 100, 0.9), jnp.float32)
    mm.karcher_mean(s, pts2, [4, 3, 2, 1], solver=SOLVER32)
    mm.karcher_mean(mm.Sphere(99), pts2, None, solver=mm.KarcherSolver(tol=1e-7))
    assert _karcher_mean._cache_size() == size


# ----------------------------------------------------------- validation, dtypes
@pytest.mark.parametrize(
    "weights, match",
    [
        ([1.0, -0.5, 1.0], "non-negative"),
        ([0.0, 0.0, 0.0], "positive sum"),
        ([1.0, np.inf, 1.0], "finite"),
        ([1.0, 1.0], r"shape \(3,\)"),
    ],
)
def test_bad_weights_raise_clear_errors(weights, match):
    pts = jnp.eye(3)
    with pytest.raises(ValueError, match=match):
        mm.karcher_mean(mm.Sphere(2), pts, weights)


def test_bad_points_raise_clear_errors():
    with pytest.raises(ValueError, match="leading expert axis"):
        mm.karcher_mean(
            mm.ProductManifold({"a": mm.Sphere(2), "b": mm.Sphere(2)}),
            {"a": jnp.eye(3), "b": jnp.eye(3)[:2]},
        )
    with pytest.raises(TypeError, match="stack them"):
        mm.karcher_mean(mm.Sphere(2), [jnp.eye(3)[0], jnp.eye(3)[1]])
    with pytest.raises(TypeError, match="floating point"):
        mm.karcher_mean(mm.Euclidean(3), jnp.ones((2, 3), jnp.int32))
    with pytest.raises(TypeError, match="AbstractManifold"):
        mm.karcher_mean("sphere", jnp.eye(3))


@pytest.mark.parametrize(
    "kwargs", [{"step_size": 0.0}, {"step_size": 1.5}, {"tol": -1.0}, {"max_steps": -1}]
)
def test_bad_solver_settings_raise(kwargs):
    with pytest.raises(ValueError, match="KarcherSolver"):
        mm.KarcherSolver(**kwargs)


def test_nan_input_is_never_converged(rng):
    pts = random_cluster(rng, 3, 10, 0.5).astype(np.float32)
    pts[1, 3] = np.nan
    res = mm.karcher_mean(mm.Sphere(9), jnp.asarray(pts))
    assert not bool(res.converged)


def test_max_steps_exhausted_is_not_converged(rng):
    pts = jnp.asarray(random_cluster(rng, 6, 40, 1.2), jnp.float32)
    res = mm.karcher_mean(mm.Sphere(39), pts, solver=mm.KarcherSolver(max_steps=1, tol=1e-9))
    assert int(res.num_steps) == 1 and not bool(res.converged)


def test_tolerance_below_the_rounding_floor_converges_at_the_floor(rng):
    pts = random_cluster(rng, 6, 2000, 0.8)
    w = rng.uniform(0.1, 1.0, 6)
    res = mm.karcher_mean(
        mm.Sphere(1999), jnp.asarray(pts, jnp.float32), w, solver=mm.KarcherSolver(tol=0.0)
    )
    assert bool(res.converged) and int(res.num_steps) < 100
    assert float(res.grad_norm) < 32 * np.finfo(np.float32).eps
    assert angle(res.mean, sphere_karcher(pts, w)) < 1e-6


def test_damped_steps_and_custom_init_reach_the_same_mean(rng):
    pts = random_cluster(rng, 5, 80, 1.0)
    w = rng.uniform(0.1, 1.0, 5)
    s = mm.Sphere(79)
    ref = sphere_karcher(pts, w)
    res = mm.karcher_mean(
        s,
        jnp.asarray(pts, jnp.float32),
        w,
        solver=mm.KarcherSolver(step_size=0.5, tol=1e-7),
        init=jnp.asarray(pts[2], jnp.float32),
    )
    assert bool(res.converged) and int(res.num_steps) > 5
    assert angle(res.mean, ref) < 1e-6


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_are_computed_in_float32(rng, dtype):
    pts = jnp.asarray(random_cluster(rng, 4, 256, 0.3), dtype)
    res = mm.karcher_mean(mm.Sphere(255), pts, solver=SOLVER32)
    assert res.mean.dtype == dtype
    ref32 = mm.karcher_mean(mm.Sphere(255), pts.astype(jnp.float32), solver=SOLVER32)
    assert bool(res.converged)
    np.testing.assert_array_equal(np.asarray(res.mean), np.asarray(ref32.mean.astype(dtype)))
    # and it is the float64 mean of the rounded inputs, to bf16/fp16 output precision
    assert angle(res.mean, sphere_karcher(np.asarray(pts, np.float64), np.ones(4))) < 1e-2


# -------------------------------------------------------- other manifolds' means
def test_product_mean_is_the_tuple_of_factor_means(rng):
    sph = random_cluster(rng, 4, 12, 0.7)
    euc = rng.standard_normal((4, 3))
    w = rng.uniform(0.1, 1.0, 4)
    m = mm.ProductManifold({"w": mm.Sphere(11), "b": mm.Euclidean(3)})
    res = mm.karcher_mean(
        m,
        {"w": jnp.asarray(sph, jnp.float32), "b": jnp.asarray(euc, jnp.float32)},
        w,
        solver=SOLVER32,
    )
    assert bool(res.converged)
    assert angle(res.mean["w"], sphere_karcher(sph, w)) < 1e-6
    np.testing.assert_allclose(np.asarray(res.mean["b"]), (w / w.sum()) @ euc, atol=1e-6)


@pytest.mark.parametrize("rule", ["arithmetic", "geometric"])
def test_norm_sphere_mean_is_direction_mean_times_norm_mean(rng, rule):
    dirs = random_cluster(rng, 5, 300, 0.9)
    norms = rng.uniform(0.5, 40.0, 5)
    w = rng.uniform(0.1, 1.0, 5)
    wn = w / w.sum()
    pts = dirs * norms[:, None]
    res = mm.karcher_mean(
        mm.NormSphere(300, rule), jnp.asarray(pts, jnp.float32), w, solver=SOLVER32
    )
    assert bool(res.converged)
    mean = np.asarray(res.mean, np.float64)
    expected_norm = wn @ norms if rule == "arithmetic" else np.exp(wn @ np.log(norms))
    assert abs(np.linalg.norm(mean) / expected_norm - 1) < 1e-6
    assert angle(mean, sphere_karcher(dirs, w)) < 1e-6


def test_norm_sphere_two_experts_is_rescaled_slerp(rng):
    a, b = random_cluster(rng, 2, 50, 1.0)
    na, nb, t = 3.0, 11.0, 0.3
    res = mm.karcher_mean(
        mm.NormSphere(50),
        jnp.asarray(np.stack([na * a, nb * b]), jnp.float32),
        [1 - t, t],
        solver=SOLVER32,
    )
    expected = ((1 - t) * na + t * nb) * slerp_np(a, b, t)
    np.testing.assert_allclose(np.asarray(res.mean), expected, rtol=1e-5, atol=1e-5)


def test_norm_sphere_zero_tensor_is_not_converged(rng):
    pts = random_cluster(rng, 3, 10, 0.3).astype(np.float32)
    pts[2] = 0.0
    res = mm.karcher_mean(mm.NormSphere(10), jnp.asarray(pts))
    assert not bool(res.converged)
