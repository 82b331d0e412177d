"""merge() and every method against independent float64 NumPy references, plus invariants."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import (
    np_karcher_spherical_proxy,
    np_linear,
    np_model_stock,
    np_multislerp,
    np_nre,
    np_slerp,
    np_task_arithmetic,
    np_ties,
    sphere_log,
)

import manifold_merge as mm
from manifold_merge.merging import list_methods, register, resolve_param

SHAPES = {"dense/kernel": (12, 7), "dense/bias": (7,), "conv/kernel": (3, 2, 5)}


def make_models(rng, n, dtype=np.float32, tv_scale=0.3):
    """A base and n experts = base + random task vectors, as nested dicts."""
    base = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    experts = [
        {k: v + tv_scale * rng.standard_normal(v.shape) for k, v in base.items()} for _ in range(n)
    ]

    def nest(flat):
        out = {}
        for k, v in flat.items():
            a, b = k.split("/")
            out.setdefault(a, {})[b] = jnp.asarray(v, dtype)
        return out

    return nest(base), [nest(e) for e in experts]


def leaves(tree):
    return {
        mm.merging.tree.leaf_name(p): np.asarray(v, np.float64)
        for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def check_against(result, expected_fn, models, base, tol):
    base_l = leaves(base) if base is not None else None
    model_l = [leaves(m) for m in models]
    for name, got in leaves(result.params).items():
        xs = np.stack([m[name] for m in model_l])
        exp = expected_fn(xs, None if base_l is None else base_l[name])
        np.testing.assert_allclose(got, exp, rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-5), (jnp.bfloat16, 1e-2)])
def test_closed_form_methods_match_numpy(rng, dtype, tol):
    base, models = make_models(rng, 4, dtype)
    w = rng.uniform(0.2, 2.0, 4)
    # references are computed on the rounded inputs, so only the output rounding differs
    cases = {
        "linear": (dict(), lambda xs, b: np_linear(xs, w)),
        "task_arithmetic": (
            dict(**{"lambda": 0.7}),
            lambda xs, b: np_task_arithmetic(xs, b, w, 0.7),
        ),
        "nre": (dict(), lambda xs, b: np_nre(xs, w, b)),
        "model_stock": (dict(), lambda xs, b: np_model_stock(xs, b, w)),
        "multislerp": (dict(), lambda xs, b: np_multislerp(xs, w, b)),
        "ties": (dict(density=0.4, **{"lambda": 1.2}), lambda xs, b: np_ties(xs, b, w, 0.4, 1.2)),
    }
    for method, (params, fn) in cases.items():
        res = mm.merge(method, models, base=base, weights=w, **params)
        for leaf in jax.tree.leaves(res.params):
            assert leaf.dtype == jnp.dtype(dtype), method
        check_against(res, fn, models, base, tol * (10 if method == "ties" else 1))


def test_ties_without_weights_and_count_consensus_shape(rng):
    base, models = make_models(rng, 3)
    res = mm.merge("ties", models, base=base, density=1.0)
    check_against(res, lambda xs, b: np_ties(xs, b, np.ones(3), 1.0), models, base, 1e-5)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.8])
def test_slerp_matches_mergekit_semantics(rng, t):
    base, models = make_models(rng, 2, tv_scale=2.0)
    res = mm.merge("slerp", models, t=t)
    check_against(res, lambda xs, b: np_slerp(t, xs[0], xs[1]), models, None, 2e-5)
    # with a base: base at t = 0
    res = mm.merge("slerp", models[:1], base=base, t=t)
    check_against(res, lambda xs, b: np_slerp(t, b, xs[0]), models[:1], base, 2e-5)
    # weights instead of t
    res = mm.merge("slerp", models, weights=[1 - t, t] if 0 < t < 1 else [1, 1])
    tt = t if 0 < t < 1 else 0.5
    check_against(res, lambda xs, b: np_slerp(tt, xs[0], xs[1]), models, None, 2e-5)


def test_slerp_rejects_bad_settings(rng):
    base, models = make_models(rng, 3)
    with pytest.raises(ValueError, match="exactly 2 models"):
        mm.merge("slerp", models[:1])
    with pytest.raises(ValueError, match="takes 1..2 models"):
        mm.merge("slerp", models)
    with pytest.raises(ValueError, match="either t or weights"):
        mm.merge("slerp", models[:2], t=0.3, weights=[1, 2])


@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("with_base", [False, True])
def test_karcher_matches_float64_spherical_proxy(rng, with_base, dtype, tol):
    base, models = make_models(rng, 5, dtype)
    w = rng.uniform(0.1, 1.0, 5)
    with warnings.catch_warnings():  # small random task vectors may span > a hemisphere
        warnings.simplefilter("ignore", RuntimeWarning)
        res = mm.merge("karcher", models, base=base if with_base else None, weights=w)
    assert all(leaf.dtype == jnp.dtype(dtype) for leaf in jax.tree.leaves(res.params))
    check_against(
        res,
        lambda xs, b: np_karcher_spherical_proxy(xs, w, b),
        models,
        base if with_base else None,
        tol,
    )
    # random task vectors of a few entries may spread over more than a hemisphere (then the
    # mean is honestly not certified); with 84 entries they are near-orthogonal
    assert res.report["dense/kernel"].converged


def test_karcher_two_models_is_rescaled_slerp_of_directions(rng):
    _, models = make_models(rng, 2, tv_scale=1.5)
    t = 0.3
    res = mm.merge("karcher", models, weights=[1 - t, t])
    for name, got in leaves(res.params).items():
        a, b = (leaves(m)[name] for m in models)
        ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
        direction = np_slerp(t, ua, ub)
        expected = (
            direction
            / np.linalg.norm(direction)
            * ((1 - t) * np.linalg.norm(a) + t * np.linalg.norm(b))
        )
        np.testing.assert_allclose(got, expected, atol=2e-5, err_msg=name)
        if abs(np.linalg.norm(a) - np.linalg.norm(b)) > 0.1:  # mergekit's slerp differs
            assert np.max(np.abs(got - np_slerp(t, a, b))) > 1e-4


def test_karcher_honours_weights(rng):
    _, models = make_models(rng, 3, tv_scale=1.0)
    a = mm.merge("karcher", models, weights=[0.8, 0.1, 0.1])
    b = mm.merge("karcher", models)
    check_against(
        a, lambda xs, _: np_karcher_spherical_proxy(xs, [0.8, 0.1, 0.1]), models, None, 2e-5
    )
    diff = max(np.max(np.abs(leaves(a.params)[k] - leaves(b.params)[k])) for k in SHAPES)
    assert diff > 1e-2


def test_karcher_close_experts_get_the_exact_mean(rng):
    # cosine > 0.999 between the experts' full weights
    base = {"w": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)}
    models = [
        {"w": base["w"] + 0.02 * jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)}
        for _ in range(4)
    ]
    res = mm.merge("karcher", models, weights=[0.7, 0.1, 0.1, 0.1])
    xs = np.stack([np.asarray(m["w"], np.float64) for m in models])
    exp = np_karcher_spherical_proxy(xs, [0.7, 0.1, 0.1, 0.1])
    np.testing.assert_allclose(np.asarray(res.params["w"], np.float64), exp, atol=1e-6)
    assert res.report["w"].angle_spread < 0.06 and res.report["w"].converged


def test_karcher_zero_task_vectors_are_left_out(rng):
    base, models = make_models(rng, 3)
    models[2] = jax.tree.map(lambda x: x, base)  # expert 2 did not move: zero task vectors
    res = mm.merge("karcher", models, base=base)
    check_against(
        res, lambda xs, b: np_karcher_spherical_proxy(xs[:2], [1, 1], b), models, base, 2e-5
    )
    same = mm.merge("karcher", [base, base], base=base)
    for leaf, b in zip(jax.tree.leaves(same.params), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(b))


def test_equal_models_merge_to_themselves(rng):
    base, models = make_models(rng, 1)
    same = [models[0]] * 3
    for method, params in [
        ("linear", {}),
        ("nre", {}),
        ("multislerp", {}),
        ("karcher", {}),
        ("ties", {"density": 1.0}),  # no trimming: every sign agrees
        ("task_arithmetic", {"normalize": True}),
        ("model_stock", {}),
        ("fisher_rao_karcher", {"fishers": [models[0]] * 3}),
    ]:
        with warnings.catch_warnings():  # model_stock: identical task vectors, cos = 1
            warnings.simplefilter("ignore", RuntimeWarning)
            res = mm.merge(method, same, base=base, **params)
        for k, v in leaves(res.params).items():
            ref = leaves(models[0])[k]
            np.testing.assert_allclose(v, ref, atol=2e-5, err_msg=f"{method} {k}")


def test_task_arithmetic_with_zero_lambda_is_the_base(rng):
    base, models = make_models(rng, 3)
    res = mm.merge("task_arithmetic", models, base=base, **{"lambda": 0.0})
    for k, v in leaves(res.params).items():
        np.testing.assert_array_equal(v, leaves(base)[k])


def test_dare_is_reproducible_from_its_seed_and_unbiased(rng):
    base, models = make_models(rng, 3)
    a = mm.merge("dare_linear", models, base=base, density=0.5, seed=3)
    b = mm.merge("dare_linear", models, base=base, density=0.5, seed=3)
    c = mm.merge("dare_linear", models, base=base, density=0.5, seed=4)
    la, lb, lc = leaves(a.params), leaves(b.params), leaves(c.params)
    assert all(np.array_equal(la[k], lb[k]) for k in la)
    assert any(not np.array_equal(la[k], lc[k]) for k in la)
    # one model: every entry is dropped (0) or kept and rescaled by 1/density, kept with
    # probability density (40,000 draws: the kept fraction is within 0.02 at > 8 sigma)
    zero = {"w": jnp.zeros((200, 200))}
    tv = {"w": jnp.asarray(rng.standard_normal((200, 200)), jnp.float32)}
    out = leaves(mm.merge("dare_linear", [tv], base=zero, density=0.3, seed=1).params)["w"]
    t = leaves(tv)["w"]
    kept = out != 0
    np.testing.assert_allclose(out[kept], t[kept] / 0.3, rtol=1e-6)
    assert abs(kept.mean() - 0.3) < 0.02
    d = mm.merge("dare_ties", models, base=base, density=0.5, seed=3)
    assert all(np.all(np.isfinite(v)) for v in leaves(d.params).values())


def test_row_granularity_merges_each_row_independently(rng):
    base, models = make_models(rng, 3)
    w = [0.5, 0.3, 0.2]
    with warnings.catch_warnings():  # a row of 7 random entries may span > a hemisphere
        warnings.simplefilter("ignore", RuntimeWarning)
        res = mm.merge("karcher", models, base=base, weights=w, granularity="row")
    for name, got in leaves(res.params).items():
        xs = np.stack([leaves(m)[name] for m in models])
        b = leaves(base)[name]
        if xs.ndim == 2:  # vectors are one block
            exp = np_karcher_spherical_proxy(xs, w, b)
        else:
            exp = np.stack(
                [np_karcher_spherical_proxy(xs[:, r], w, b[r]) for r in range(xs.shape[1])]
            )
        np.testing.assert_allclose(got, exp, atol=2e-5, err_msg=name)
    assert res.report["dense/kernel"].blocks == 12
    col = mm.merge("nre", models, weights=w, granularity="column")
    xs = np.stack([leaves(m)["dense/kernel"] for m in models])
    exp = np.stack([np_nre(xs[:, :, c], w) for c in range(7)], axis=-1)
    np.testing.assert_allclose(leaves(col.params)["dense/kernel"], exp, atol=2e-5)


def test_name_filters_override_parameters(rng):
    base, models = make_models(rng, 2)
    rules = [
        {"filter": "bias", "value": 0.0},
        {"filter": "re:^conv/", "value": 2.0},
        {"value": 1.0},
    ]
    res = mm.merge("task_arithmetic", models, base=base, **{"lambda": rules})
    out = leaves(res.params)
    xs = {k: np.stack([leaves(m)[k] for m in models]) for k in SHAPES}
    b = leaves(base)
    np.testing.assert_allclose(out["dense/bias"], b["dense/bias"], atol=1e-6)
    np.testing.assert_allclose(
        out["conv/kernel"],
        np_task_arithmetic(xs["conv/kernel"], b["conv/kernel"], [1, 1], 2.0),
        atol=2e-5,
    )
    np.testing.assert_allclose(
        out["dense/kernel"],
        np_task_arithmetic(xs["dense/kernel"], b["dense/kernel"], [1, 1], 1.0),
        atol=2e-5,
    )
    assert resolve_param(3, "x", "p") == 3
    with pytest.raises(ValueError, match="no rule matching"):
        resolve_param([{"filter": "attn", "value": 1}], "mlp/w", "lambda")


def test_integer_leaves_are_copied_and_must_agree(rng):
    base, models = make_models(rng, 2)
    for m in models + [base]:
        m["position_ids"] = jnp.arange(16)
    res = mm.merge("karcher", models, base=base)
    np.testing.assert_array_equal(np.asarray(res.params["position_ids"]), np.arange(16))
    assert res.report["position_ids"].method == "copy"
    models[1]["position_ids"] = jnp.arange(16)[::-1]
    with pytest.raises(ValueError, match="position_ids.*not floating point"):
        mm.merge("linear", models)


def test_clear_errors(rng):
    base, models = make_models(rng, 2)
    with pytest.raises(KeyError, match="Did you mean 'karcher'"):
        mm.merge("karcer", models)
    with pytest.raises(TypeError, match="Did you mean 'density'"):
        mm.merge("ties", models, base=base, densty=0.5)
    with pytest.raises(TypeError, match="needs parameter 'density'"):
        mm.merge("ties", models, base=base)
    with pytest.raises(ValueError, match="needs a base"):
        mm.merge("task_arithmetic", models)
    with pytest.raises(ValueError, match="sum to zero"):
        mm.merge("linear", models, weights=[0, 0])
    with pytest.raises(ValueError, match="non-negative"):
        mm.merge("karcher", models, weights=[1, -1])
    with pytest.raises(ValueError, match="density"):
        mm.merge("ties", models, base=base, density=1.5)
    with pytest.raises(ValueError, match="granularity"):
        mm.merge("linear", models, granularity="diagonal")
    bad = jax.tree.map(lambda x: x, models[1])
    bad["dense"]["kernel"] = bad["dense"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="'dense/kernel': model 1 has NaN"):
        mm.merge("linear", [models[0], bad])
    wrong = jax.tree.map(lambda x: x, models[1])
    wrong["dense"]["bias"] = jnp.zeros(8)
    with pytest.raises(ValueError, match="'dense/bias': model 1 has shape"):
        mm.merge("linear", [models[0], wrong])
    with pytest.raises(TypeError, match="list of pytrees"):
        mm.merge("linear", models[0])


def test_non_convergence_is_a_visible_warning(rng):
    x = rng.standard_normal(6)
    models = [{"w": jnp.asarray(x, jnp.float32)}, {"w": jnp.asarray(-x, jnp.float32)}]
    with pytest.warns(RuntimeWarning, match="did not converge"):
        res = mm.merge("karcher", models)
    assert not res.report["w"].converged


def test_registry_lists_the_methods_and_takes_new_ones():
    expected = {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "slerp",
        "multislerp",
        "nre",
        "model_stock",
        "karcher",
    }
    assert expected <= set(list_methods())

    @register("test_elementwise_max")
    def elementwise_max(points, base, weights, key):
        return jnp.max(points, axis=0), {}

    res = mm.merge(
        "test_elementwise_max", [{"w": jnp.array([1.0, 5.0])}, {"w": jnp.array([3.0, 2.0])}]
    )
    np.testing.assert_array_equal(np.asarray(res.params["w"]), [3.0, 5.0])


# ------------------------------------------------------ fisher and Paper B's frechet
def make_fishers(rng, models):
    return [
        jax.tree.map(lambda x: jnp.asarray(rng.uniform(0, 3, x.shape) ** 2, x.dtype), m)
        for m in models
    ]


def np_fisher(xs, fs, w, floor=1e-6):
    f = (
        np.maximum(np.asarray(fs, np.float64), floor)
        * np.asarray(w)[(...,) + (None,) * (xs.ndim - 1)]
    )
    return (f * xs).sum(0) / f.sum(0)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-5), (jnp.bfloat16, 1e-2)])
def test_fisher_matches_numpy(rng, dtype, tol):
    _, models = make_models(rng, 3, dtype)
    fishers = make_fishers(rng, models)
    w = rng.uniform(0.2, 2.0, 3)
    res = mm.merge("fisher", models, fishers=fishers, weights=w)
    fl = [leaves(f) for f in fishers]
    for name, got in leaves(res.params).items():
        xs = np.stack([leaves(m)[name] for m in models])
        exp = np_fisher(xs, np.stack([f[name] for f in fl]), w)
        np.testing.assert_allclose(got, exp, rtol=tol, atol=tol, err_msg=name)


def test_frechet_frozen_metric_reduces_to_fisher_and_linear(rng):
    _, models = make_models(rng, 4)
    fishers = make_fishers(rng, models)
    w = rng.uniform(0.2, 2.0, 4)
    fisher = leaves(mm.merge("fisher", models, fishers=fishers, weights=w).params)
    fre = leaves(
        mm.merge(
            "frechet", models, fishers=fishers, weights=w, approx="frozen_metric", metric="fisher"
        ).params
    )
    lin = leaves(mm.merge("linear", models, weights=w).params)
    ident = leaves(mm.merge("frechet", models, weights=w, approx="frozen_metric").params)
    exact = leaves(mm.merge("frechet", models, weights=w).params)  # Euclidean geodesics
    for k in SHAPES:
        np.testing.assert_allclose(fre[k], fisher[k], atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(ident[k], lin[k], atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(exact[k], lin[k], atol=1e-6, rtol=1e-6)


def test_frechet_on_the_spherical_proxy_is_karcher(rng):
    base, models = make_models(rng, 3)
    w = [0.5, 0.3, 0.2]
    a = leaves(mm.merge("frechet", models, base=base, weights=w, manifold="norm_sphere").params)
    b = leaves(mm.merge("karcher", models, base=base, weights=w).params)
    for k in SHAPES:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6)
    # first order on the spherical proxy: one tangent step from the extrinsic mean
    c = mm.merge("frechet", models, weights=w, manifold="norm_sphere", approx="first_order")
    for k, v in leaves(c.params).items():
        xs = np.stack([leaves(m)[k] for m in models])
        exact = np_karcher_spherical_proxy(xs, w)
        assert np.linalg.norm(v - exact) < 0.05 * np.linalg.norm(exact)


def test_frechet_first_order_euclidean_with_base_is_normalised_task_arithmetic(rng):
    base, models = make_models(rng, 3)
    w = rng.uniform(0.2, 1.0, 3)
    res = mm.merge("frechet", models, base=base, weights=w, approx="first_order")
    check_against(
        res, lambda xs, b: np_task_arithmetic(xs, b, w, 1.0, normalize=True), models, base, 2e-5
    )


def test_fisher_and_frechet_errors(rng):
    _, models = make_models(rng, 2)
    with pytest.raises(TypeError, match="needs fishers"):
        mm.merge("fisher", models)
    with pytest.raises(ValueError, match="manifold='euclidean'"):
        mm.merge("frechet", models, manifold="norm_sphere", approx="frozen_metric")
    with pytest.raises(ValueError, match="approx must be one of"):
        mm.merge("frechet", models, approx="second_order")
    bad = make_fishers(rng, models)
    bad[1]["dense"]["kernel"] = jnp.ones((3, 3))
    with pytest.raises(ValueError, match=r"'dense/kernel': fishers\[1\] has shape"):
        mm.merge("fisher", models, fishers=bad)
    with pytest.raises(ValueError, match="list of 2 pytrees"):
        mm.merge("fisher", models, fishers=bad[:1])


def test_fisher_rao_karcher(rng):
    base, models = make_models(rng, 3)
    w = np.array([0.5, 0.3, 0.2])
    const = [jax.tree.map(lambda x: jnp.full(x.shape, 2.5, x.dtype), m) for m in models]
    a = leaves(mm.merge("fisher_rao_karcher", models, base=base, fishers=const, weights=w).params)
    b = leaves(mm.merge("karcher", models, base=base, weights=w).params)
    for k in SHAPES:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6)
    fishers = make_fishers(rng, models)
    res = mm.merge("fisher_rao_karcher", models, base=base, fishers=fishers, weights=w)
    out = leaves(res.params)
    fl = [leaves(f) for f in fishers]
    name = "dense/kernel"  # 84 entries: certified (see test_karcher_matches_float64...)
    assert res.report[name].converged
    # fixed point in float64: proj_x(sum_i w_i F_i * log_x(u_i)) = 0 for the direction x on the
    # unit sphere, and the norm is the weighted mean of the task vectors' norms
    x = (out[name] - leaves(base)[name]).ravel()
    r, xh = np.linalg.norm(x), x / np.linalg.norm(x)
    num = np.zeros_like(x)
    den = np.zeros_like(x)
    tnorms = []
    for wi, m, f in zip(w, models, fl):
        t = (leaves(m)[name] - leaves(base)[name]).ravel()
        tnorms.append(np.linalg.norm(t))
        fi = np.maximum(f[name].ravel(), 1e-6)
        num += wi * fi * sphere_log(xh, t / np.linalg.norm(t))
        den += wi * fi
    g = num / den
    assert np.linalg.norm(g - np.dot(g, xh) * xh) < 1e-5
    np.testing.assert_allclose(r, np.dot(w, tnorms) / w.sum(), rtol=1e-5)
    assert np.max(np.abs(out[name] - b[name])) > 1e-3  # the Fisher weighting changed the merge


def test_fisher_rao_karcher_concentrated_fishers_pick_coordinates(rng):
    """Nearly orthogonal task vectors, each expert's Fisher concentrated on its own block of
    coordinates: the direction follows the confident expert on its block (Fisher merging's
    behaviour) and the norm stays the mean norm. (Preconditioning NormSphere's tangent
    vectors, the earlier design, gave a norm 6x too large here.)"""
    n, d = 4, 400
    blocks = np.arange(d) % n
    tvs = rng.standard_normal((n, d)).astype(np.float32)
    fishers = np.where(blocks[None, :] == np.arange(n)[:, None], 1.0, 1e-6).astype(np.float32)
    base = rng.standard_normal(d).astype(np.float32)
    res = mm.merge(
        "fisher_rao_karcher",
        [{"w": base + t} for t in tvs],
        base={"w": base},
        fishers=[{"w": f} for f in fishers],
    )
    assert res.report["w"].converged
    out = np.asarray(res.params["w"], np.float64) - base
    np.testing.assert_allclose(np.linalg.norm(out), np.linalg.norm(tvs, axis=1).mean(), rtol=1e-5)
    for i in range(n):  # on expert i's block the merge is parallel to expert i's task vector
        on = blocks == i
        cos = np.dot(out[on], tvs[i][on]) / np.linalg.norm(out[on]) / np.linalg.norm(tvs[i][on])
        assert cos > 0.999


def test_karcher_mean_metric_weights_on_euclidean_is_fisher_weighted(rng):
    pts = rng.standard_normal((4, 9))
    m = rng.uniform(0.1, 3.0, (4, 9))
    w = rng.uniform(0.2, 1.0, 4)
    res = mm.karcher_mean(
        mm.Euclidean(9),
        jnp.asarray(pts, jnp.float32),
        w,
        metric_weights=jnp.asarray(m, jnp.float32),
    )
    ref = (w[:, None] * m * pts).sum(0) / (w[:, None] * m).sum(0)
    assert bool(res.converged)
    np.testing.assert_allclose(np.asarray(res.mean), ref, atol=1e-5)


def test_named_groups_are_one_block(rng):
    base, models = make_models(rng, 3, tv_scale=1.0)
    w = [0.5, 0.3, 0.2]
    res = mm.merge("karcher", models, weights=w, groups={"dense": "dense/"})
    xs = {k: np.stack([leaves(m)[k] for m in models]) for k in SHAPES}
    flat = np.concatenate([xs["dense/kernel"].reshape(3, -1), xs["dense/bias"].reshape(3, -1)], 1)
    exp = np_karcher_spherical_proxy(flat, w)
    out = leaves(res.params)
    np.testing.assert_allclose(out["dense/kernel"].ravel(), exp[:84], atol=2e-5)
    np.testing.assert_allclose(out["dense/bias"], exp[84:], atol=2e-5)
    np.testing.assert_allclose(
        out["conv/kernel"], np_karcher_spherical_proxy(xs["conv/kernel"], w), atol=2e-5
    )  # not in the group: its own block
    assert "group:dense" in res.report and res.report["dense/bias"].shape == (7,)
    with pytest.raises(ValueError, match="granularity='tensor'"):
        mm.merge("linear", models, groups={"dense": "dense/"}, granularity="row")


def test_integer_leaves_keep_their_dtype_without_x64(rng):
    ids = np.arange(6, dtype=np.int64).reshape(1, 6) + 2**40  # needs int64
    models = [{"ids": ids, "w": jnp.asarray(rng.normal(size=3), jnp.float32)} for _ in range(2)]
    out = mm.merge("linear", models).params
    assert out["ids"].dtype == np.int64 and np.array_equal(out["ids"], ids)


@pytest.mark.parametrize("with_base", [False, True])
def test_report_norm_ratio_and_angle_spread_match_numpy(rng, with_base):
    """The report's figures, computed inside the fused leaf kernel, against float64 NumPy:
    norm ratio ||merged - base|| / mean_i ||theta_i - base|| and the largest pairwise angle,
    including a pair at a tiny angle (atan2 form keeps it) and a zero task vector (no angle)."""
    n, shape = 5, (7, 11)
    base = rng.standard_normal(shape).astype(np.float32) if with_base else None
    vecs = [rng.standard_normal(shape) for _ in range(n - 2)]
    vecs.append(vecs[0] * 1.7 + 1e-4 * rng.standard_normal(shape))  # nearly parallel to 0
    vecs.append(np.zeros(shape))
    models = [(v + (0 if base is None else base)).astype(np.float32) for v in vecs]
    method = "linear" if base is None else "task_arithmetic"  # linear ignores a base
    res = mm.merge(method, [{"w": m} for m in models], base=None if base is None else {"w": base})
    rep = res.report["w"]
    tv = [np.asarray(m, np.float64) - (0 if base is None else base) for m in models]
    merged = np.asarray(res.params["w"], np.float64) - (0 if base is None else base)
    norms = [np.linalg.norm(v) for v in tv]
    np.testing.assert_allclose(rep.norm_ratio, np.linalg.norm(merged) / np.mean(norms), rtol=1e-5)
    angles = [
        np.arccos(np.clip(np.vdot(tv[i], tv[j]) / (norms[i] * norms[j]), -1, 1))
        for i in range(n)
        for j in range(i + 1, n)
        if norms[i] > 0 and norms[j] > 0
    ]
    np.testing.assert_allclose(rep.angle_spread, max(angles), rtol=1e-5)


def test_leaf_kernel_compiles_once_per_shape(rng):
    """A merge over many tensors compiles one kernel per (shape, dtype), reused by every leaf of
    that shape (issue 8: no recompilation per tensor in a checkpoint merge)."""
    from manifold_merge.merging import tree

    shapes = [(13, 3), (13, 3), (5,), (13, 3), (5,), (13, 3)]
    models = [
        {f"t{k}": rng.standard_normal(s).astype(np.float32) for k, s in enumerate(shapes)}
        for _ in range(3)
    ]
    before = tree._leaf_kernel._cache_size()
    mm.merge("multislerp", models)
    assert tree._leaf_kernel._cache_size() - before == 2
    mm.merge("multislerp", models)  # and a second merge compiles nothing
    assert tree._leaf_kernel._cache_size() - before == 2


@pytest.mark.parametrize("norm_mean", ["arithmetic", "geometric"])
@pytest.mark.parametrize("approx", ["exact", "first_order"])
def test_frechet_sphere_leaves_zero_task_vectors_out(rng, approx, norm_mean):
    """Row granularity on real task vectors meets all-zero rows (dead input pixels): the
    spherical Fréchet mean leaves zero vectors out, like karcher, and an all-zero row merges
    to the base row -- no NaN. (With the geometric norm rule a zero vector's log has an
    infinite radial part: 0 weight x inf was NaN in the first-order average.)"""
    base = rng.standard_normal((4, 6)).astype(np.float32)
    models = [base + rng.standard_normal((4, 6)).astype(np.float32) for _ in range(3)]
    models[0][1] = base[1]  # model 0 has a zero task vector in row 1
    for m in models:
        m[2] = base[2]  # every model: row 2 unchanged
    kw = dict(manifold="norm_sphere", approx=approx, norm_mean=norm_mean)
    res = mm.merge("frechet", [{"w": m} for m in models], base={"w": base}, granularity="row", **kw)
    out = np.asarray(res.params["w"])
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[2], base[2])
    # row 1: the same mean of the two non-zero task vectors alone
    ref = mm.merge("frechet", [{"w": m[1]} for m in models[1:]], base={"w": base[1]}, **kw)
    np.testing.assert_allclose(out[1], np.asarray(ref.params["w"]), atol=1e-5)
    if approx == "exact" and norm_mean == "arithmetic":  # which is Paper A's karcher
        ref = mm.merge("karcher", [{"w": m[1]} for m in models[1:]], base={"w": base[1]})
        np.testing.assert_allclose(out[1], np.asarray(ref.params["w"]), atol=1e-5)
