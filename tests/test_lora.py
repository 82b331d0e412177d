"""LoRA quotient geometry and the LoRA merge methods, against dense float64 NumPy references,
closed forms and the GL(r) invariance every method but lora_linear must have."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

from manifold_merge import merge
from manifold_merge.manifolds import LoraFactors, LoraQuotient
from manifold_merge.manifolds.lora import core_space, sqrtm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METRICS = ("scaled", "induced", "embedded")


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def adapters(rng, m, n, ranks, scale=1.0):
    return [
        LoraFactors(
            jnp.asarray(scale * rng.normal(size=(m, r))), jnp.asarray(rng.normal(size=(r, n)))
        )
        for r in ranks
    ]


def dense(f):
    return np.asarray(f.b, np.float64) @ np.asarray(f.a, np.float64)


def rel(x, y):
    return float(np.linalg.norm(np.asarray(x) - np.asarray(y)) / np.linalg.norm(np.asarray(y)))


def gl(rng, r):
    """A random well-conditioned M in GL(r): rotations around a diagonal in [e^-0.5, e^0.5]."""
    q1, _ = np.linalg.qr(rng.normal(size=(r, r)))
    q2, _ = np.linalg.qr(rng.normal(size=(r, r)))
    return q1 @ np.diag(np.exp(rng.uniform(-0.5, 0.5, r))) @ q2


def reparametrise(rng, fs):
    out = []
    for f in fs:
        m = gl(rng, f.b.shape[1])
        out.append(LoraFactors(f.b @ m, jnp.linalg.solve(m, f.a)))
    return out


def point(rng, mf):
    """A point near the base point E, as LoraQuotient.random_point draws them."""
    return mf.random_point(jax.random.key(int(rng.integers(2**31))), jnp.float64)


# ------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("metric", METRICS)
def test_horizontal_projection_is_orthogonal_to_the_vertical_space(metric, rng):
    mf = LoraQuotient(9, 7, 3, metric=metric)
    x = point(rng, mf)
    u = LoraFactors(jnp.asarray(rng.normal(size=(9, 3))), jnp.asarray(rng.normal(size=(3, 7))))
    h = mf.horizontal_proj(x, u)
    for _ in range(3):
        lam = jnp.asarray(rng.normal(size=(3, 3)))
        vert = LoraFactors(x.b @ lam, -lam @ x.a)  # (G L, -H L^T) in (b, a) form
        assert abs(float(mf.inner(x, h, vert))) < 1e-10 * float(mf.norm(x, h))
        # A vertical vector projects to zero (it changes nothing in Delta W).
        z = mf.horizontal_proj(x, vert)
        assert float(jnp.max(jnp.abs(jnp.concatenate([z.b.ravel(), z.a.ravel()])))) < 1e-10
    hh = mf.horizontal_proj(x, h)
    np.testing.assert_allclose(hh.b, h.b, atol=1e-11)
    np.testing.assert_allclose(hh.a, h.a, atol=1e-11)
    v = mf.vertical_proj(x, u)
    lam = np.linalg.lstsq(np.asarray(x.b), np.asarray(v.b), rcond=None)[0]
    np.testing.assert_allclose(v.b, np.asarray(x.b) @ lam, atol=1e-10)
    np.testing.assert_allclose(v.a, -lam @ np.asarray(x.a), atol=1e-10)


@pytest.mark.parametrize("metric", METRICS)
def test_metric_is_invariant_under_the_group(metric, rng):
    mf = LoraQuotient(8, 6, 3, metric=metric)
    x = point(rng, mf)
    u, v = (mf.random_tangent(jax.random.key(int(rng.integers(1e9))), x) for _ in range(2))
    m = jnp.asarray(gl(rng, 3))
    mi = jnp.linalg.inv(m)
    xm = LoraFactors(x.b @ m, mi @ x.a)
    um, vm = (LoraFactors(t.b @ m, mi @ t.a) for t in (u, v))
    np.testing.assert_allclose(mf.inner(xm, um, vm), mf.inner(x, u, v), rtol=1e-9)


def test_embedded_metric_is_the_frobenius_product_of_the_updates(rng):
    mf = LoraQuotient(8, 6, 2, metric="embedded")
    x = point(rng, mf)
    u = LoraFactors(jnp.asarray(rng.normal(size=(8, 2))), jnp.asarray(rng.normal(size=(2, 6))))
    v = LoraFactors(jnp.asarray(rng.normal(size=(8, 2))), jnp.asarray(rng.normal(size=(2, 6))))
    du = np.asarray(u.b) @ np.asarray(x.a) + np.asarray(x.b) @ np.asarray(u.a)
    dv = np.asarray(v.b) @ np.asarray(x.a) + np.asarray(x.b) @ np.asarray(v.a)
    np.testing.assert_allclose(mf.inner(x, u, v), np.sum(du * dv), rtol=1e-10)


@pytest.mark.parametrize("approx", ["horizontal", "lstsq", "procrustes"])
@pytest.mark.parametrize("metric", ["scaled", "induced"])
def test_align_keeps_the_update_and_is_idempotent(approx, metric, rng):
    mf = LoraQuotient(9, 7, 3, metric=metric, approx=approx)
    x, y0 = point(rng, mf), point(rng, mf)
    m = jnp.asarray(gl(rng, 3))
    y = LoraFactors(y0.b @ m, jnp.linalg.solve(m, y0.a))  # another representative of y0
    al = mf.align(x, y)
    np.testing.assert_allclose(dense(al), dense(y0), atol=1e-10)
    again = mf.align(x, al)
    np.testing.assert_allclose(again.b, al.b, atol=1e-9)
    np.testing.assert_allclose(again.a, al.a, atol=1e-9)
    same = mf.align(x, x)
    np.testing.assert_allclose(same.b, x.b, atol=1e-9)
    # The alignment depends on y's class only.
    al0 = mf.align(x, y0)
    np.testing.assert_allclose(al0.b, al.b, atol=1e-8)
    if approx == "horizontal":  # y M - x is horizontal: the exact inverse of the retraction
        d = LoraFactors(al.b - x.b, al.a - x.a)
        h = mf.horizontal_proj(x, d)
        np.testing.assert_allclose(h.b, d.b, atol=1e-9)


@pytest.mark.parametrize("approx", ["lstsq", "procrustes", "chordal"])
def test_approximate_logs_agree_with_the_exact_inverse_to_first_order(approx, rng):
    metric = "embedded" if approx == "chordal" else "scaled"
    mf = LoraQuotient(9, 7, 3, metric=metric, approx=approx)
    x = point(rng, mf)
    v = mf.random_tangent(jax.random.key(int(rng.integers(1e9))), x)
    errs = []
    for t in (1e-2, 1e-3):
        tv = LoraFactors(t * v.b, t * v.a)
        lg = mf.log(x, mf.exp(x, tv))
        errs.append(float(mf.norm(x, LoraFactors(lg.b - tv.b, lg.a - tv.a))) / t)
    # error / t = O(t): dividing t by 10 divides it by about 10 (it is not exact: > 0).
    assert errs[1] < errs[0] / 5, errs
    assert errs[0] < 0.2


def test_chordal_distance_is_the_frobenius_distance_of_the_updates(rng):
    mf = LoraQuotient(9, 7, 3, metric="embedded")
    x, y = point(rng, mf), point(rng, mf)
    np.testing.assert_allclose(mf.dist(x, y), np.linalg.norm(dense(x) - dense(y)), rtol=1e-10)
    np.testing.assert_allclose(mf.dist(x, y), mf.dist(y, x), rtol=1e-12)


def test_sqrtm_matches_the_eigendecomposition(rng):
    for r in (1, 3, 6):
        v = rng.normal(size=(r, r)) + 3 * np.eye(r)
        lam = rng.uniform(0.05, 20.0, r)
        x = v @ np.diag(lam) @ np.linalg.inv(v)
        want = v @ np.diag(np.sqrt(lam)) @ np.linalg.inv(v)
        np.testing.assert_allclose(sqrtm(jnp.asarray(x)), want, rtol=1e-8, atol=1e-9)


def test_core_space_reconstructs_every_update(rng):
    fs = adapters(rng, 20, 15, [2, 3, 4])
    cs = core_space(fs)
    assert cs.u_b.shape == (20, 9) and cs.u_a.shape == (15, 9)
    np.testing.assert_allclose(cs.u_b.T @ cs.u_b, np.eye(9), atol=1e-12)
    for f, c in zip(fs, cs.cores()):
        np.testing.assert_allclose(cs.u_b @ c @ cs.u_a.T, dense(f), atol=1e-11)


def test_lora_quotient_validates_its_configuration():
    with pytest.raises(ValueError, match="metric"):
        LoraQuotient(4, 4, 2, metric="frobenius")
    with pytest.raises(ValueError, match="chordal"):
        LoraQuotient(4, 4, 2, metric="scaled", approx="chordal")
    with pytest.raises(ValueError, match="unknown distance approximation"):
        LoraQuotient(4, 4, 2, approx="lstq")
    with pytest.raises(ValueError, match="exceeds"):
        LoraQuotient(4, 3, 4)


# --------------------------------------------------------------------- merge reductions
def test_lora_cat_is_the_exact_weighted_sum_with_scaling(rng):
    fs = adapters(rng, 24, 18, [2, 5, 3])
    w, s = rng.uniform(0.2, 2.0, 3), rng.uniform(0.5, 4.0, 3)
    out = merge("lora_cat", fs, weights=w, scaling=list(s)).params
    want = sum(wi * si * dense(f) for wi, si, f in zip(w, s, fs))
    assert out.b.shape == (24, 10)
    assert rel(dense(out), want) < 1e-13


@pytest.mark.parametrize("ranks", [[4, 4, 4], [2, 3, 5]])
def test_lora_svd_is_the_truncated_svd_of_the_dense_sum(ranks, rng):
    fs = adapters(rng, 30, 22, ranks)
    w = rng.uniform(0.2, 2.0, len(fs))
    want_sum = sum(wi * dense(f) for wi, f in zip(w, fs))
    for rank in (None, 3):
        out = merge("lora_svd", fs, weights=w, rank=rank).params
        r = max(ranks) if rank is None else rank
        assert out.b.shape == (30, r)
        assert rel(dense(out), ref.np_tsvd(want_sum, r)) < 1e-10
        # Balanced factors.
        np.testing.assert_allclose(out.b.T @ out.b, out.a @ out.a.T, atol=1e-9)


@pytest.mark.parametrize("ranks", [[3, 3, 3], [2, 4, 3]])
def test_geomerge_embedded_is_eckart_young_and_task_arithmetic_at_full_rank(ranks, rng):
    fs = adapters(rng, 26, 20, ranks)
    w = rng.uniform(0.2, 2.0, len(fs))
    total = sum(wi * dense(f) for wi, f in zip(w, fs))
    res = merge("geomerge", fs, weights=w, metric="embedded", rank=3, tol=1e-12)
    assert res.report["adapter"].converged
    assert rel(dense(res.params), ref.np_tsvd(total, 3)) < 1e-9
    high = merge("geomerge", fs, weights=w, metric="embedded", high_rank=True, tol=1e-12)
    assert high.params.b.shape[1] == sum(ranks)
    assert rel(dense(high.params), total) < 1e-10


def test_embedded_karcher_iteration_reaches_eckart_young_from_another_start(rng):
    from manifold_merge import KarcherSolver, karcher_mean

    mf = LoraQuotient(12, 10, 2, metric="embedded")
    pts = [point(rng, mf) for _ in range(4)]
    stacked = LoraFactors(jnp.stack([p.b for p in pts]), jnp.stack([p.a for p in pts]))
    w = rng.uniform(0.5, 1.5, 4)
    w = w / w.sum()
    res = karcher_mean(mf, stacked, w, solver=KarcherSolver(500, 1e-11, 0.5), init=pts[0])
    assert bool(res.converged)
    want = ref.np_tsvd(sum(wi * dense(p) for wi, p in zip(w, pts)), 2)
    assert rel(dense(res.mean), want) < 1e-8


def test_core_space_linear_at_full_rank_is_the_weighted_sum(rng):
    fs = adapters(rng, 20, 25, [3, 2, 4, 1])
    w = rng.uniform(-1.0, 2.0, 4)
    out = merge("core_space", fs, weights=w).params
    assert out.b.shape[1] == 10
    assert rel(dense(out), sum(wi * dense(f) for wi, f in zip(w, fs))) < 1e-11


def test_knots_matches_a_dense_reference(rng):
    fs = adapters(rng, 28, 21, [3, 3, 3])
    w = rng.uniform(0.3, 1.5, 3)
    out = merge("knots", fs, weights=w, density=0.4, rank=4).params
    want = ref.np_knots_ties([dense(f) for f in fs], w, 0.4, 4)
    assert rel(dense(out), want) < 1e-9
    lin = merge("knots", fs, weights=w, base_method="linear", rank=9).params
    assert rel(dense(lin), sum(wi * dense(f) for wi, f in zip(w, fs))) < 1e-10


def test_lora_ties_svd_matches_a_dense_reference(rng):
    fs = adapters(rng, 25, 19, [2, 4, 3])
    w = rng.uniform(0.3, 1.5, 3)
    out = merge("lora_ties_svd", fs, weights=w, density=0.3).params
    want = ref.np_ties_canonical([dense(f) for f in fs], w, 0.3, 4)
    assert rel(dense(out), want) < 1e-9


@pytest.mark.parametrize("metric", ["scaled", "induced"])
@pytest.mark.parametrize("approx", ["procrustes", "horizontal", "lstsq"])
def test_geomerge_of_commuting_updates_has_a_closed_form(metric, approx, rng):
    """Updates sharing singular vectors, U diag(s_i) V^T (stored unbalanced, b = U diag(s_i)):
    the horizontal and Procrustes alignments map each onto the balanced iterate's form, so the
    fixed point sum_i a_i (y_i - x) = 0 has singular values (sum_i a_i sqrt(s_i))^2 whatever
    the metric; the one-sided least-squares alignment keeps b fixed and moves a, so its fixed
    point is the arithmetic mean sum_i a_i s_i."""
    m, n, r = 14, 11, 3
    u = np.linalg.qr(rng.normal(size=(m, r)))[0]
    v = np.linalg.qr(rng.normal(size=(n, r)))[0]
    svals = rng.uniform(0.5, 3.0, size=(3, r))
    fs = [LoraFactors(jnp.asarray(u * s), jnp.asarray(v.T)) for s in svals]
    w = rng.uniform(0.3, 1.5, 3)
    a = w / w.sum()
    res = merge(
        "geomerge",
        fs,
        weights=w,
        metric=metric,
        approx=approx,
        normalize=True,
        tol=1e-12,
        max_iter=500,
    )
    assert res.report["adapter"].converged
    mean_s = a @ svals if approx == "lstsq" else (a @ np.sqrt(svals)) ** 2
    want = (u * mean_s) @ v.T
    assert rel(dense(res.params), want) < 1e-8


def test_geomerge_returns_equal_adapters_unchanged_and_scales_with_the_weights(rng):
    f = adapters(rng, 16, 12, [3])[0]
    reps = reparametrise(rng, [f, f, f])
    res = merge("geomerge", reps, weights=[0.2, 0.5, 0.3], tol=1e-12)
    assert rel(dense(res.params), dense(f)) < 1e-9
    res = merge("geomerge", reps, weights=[1.0, 1.0, 1.0], tol=1e-12)
    assert rel(dense(res.params), 3 * dense(f)) < 1e-9


def test_geomerge_converges_on_spread_out_adapters_float32(rng):
    with jax.enable_x64(False):
        fs = [
            LoraFactors(jnp.asarray(f.b, jnp.float32), jnp.asarray(f.a, jnp.float32))
            for f in adapters(rng, 48, 40, [6] * 5)
        ]
        res = merge("geomerge", fs)
    rep = res.report["adapter"]
    assert rep.converged and res.params.b.dtype == jnp.float32
    assert 0 < rep.num_steps < 1000


def test_toy_problem():
    from experiments.lora_toy import run_toy

    out = run_toy(num_samples=512)
    assert out["experts_w"] == [2.0, 2.0]
    assert abs(out["euclidean_w"]) < 1e-12
    assert abs(out["fisher_diagonal_w"]) < 1e-6
    assert abs(out["fisher_full_w"]) < 1e-6 and out["fisher_sum_rank"] == 1
    assert abs(out["quotient_w"] - 2.0) < 1e-5


# ---------------------------------------------------------------------------- invariance
INVARIANT = [
    ("lora_cat", {}),
    ("lora_svd", {"rank": 3}),
    ("lora_ties_svd", {"density": 0.4}),
    ("lora_dare_svd", {"density": 0.5, "seed": 3}),
    ("lora_dare_svd", {"density": 0.5, "consensus": "sum"}),
    ("knots", {"density": 0.4}),
    ("knots", {"base_method": "dare", "density": 0.6}),
    ("knots", {"base_method": "linear"}),
    ("core_space", {}),
    ("core_space", {"base_method": "ties", "density": 0.3}),
    ("geomerge", {"tol": 1e-12}),
    ("geomerge", {"metric": "induced", "tol": 1e-12}),
    ("geomerge", {"approx": "horizontal", "tol": 1e-12}),
    ("geomerge", {"metric": "embedded", "rank": 2}),
    ("geomerge", {"metric": "embedded", "high_rank": True}),
]


@pytest.mark.parametrize("method,params", INVARIANT, ids=[f"{m}-{p}" for m, p in INVARIANT])
def test_merge_depends_on_the_updates_only(method, params, rng):
    fs = adapters(rng, 18, 14, [3, 3, 3], scale=0.3)
    # Close adapters (a shared part plus task parts), as fine-tunes of one model are.
    shared = adapters(rng, 18, 14, [3])[0]
    fs = [LoraFactors(shared.b + f.b, shared.a + 0.3 * f.a) for f in fs]
    w = rng.uniform(0.3, 1.5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # must converge
        one = merge(method, fs, weights=w, **params).params
        two = merge(method, reparametrise(rng, fs), weights=w, **params).params
    assert rel(dense(two), dense(one)) < 1e-6


def test_lora_linear_depends_on_the_representatives(rng):
    fs = adapters(rng, 18, 14, [3, 3])
    one = merge("lora_linear", fs).params
    two = merge("lora_linear", reparametrise(rng, fs)).params
    assert rel(dense(two), dense(one)) > 1e-2
    same = merge("lora_linear", [fs[0], fs[0]], weights=[0.3, 0.7]).params
    assert rel(dense(same), dense(fs[0])) < 1e-12


# ---------------------------------------------------------------------------- merge layer
def test_adapter_pytrees_merge_module_by_module(rng):
    def adapter():
        q, v = adapters(rng, 12, 10, [2, 2])
        return {"layer0": {"query": q, "value": v}, "head": jnp.asarray(rng.normal(size=(5,)))}

    ads = [adapter() for _ in range(3)]
    w = [0.5, 1.0, 1.5]
    res = merge(
        "lora_svd",
        ads,
        weights=w,
        rank=[{"filter": "value", "value": 1}, {"value": 2}],
    )
    assert isinstance(res.params["layer0"]["query"], LoraFactors)
    assert res.params["layer0"]["query"].b.shape == (12, 2)
    assert res.params["layer0"]["value"].b.shape == (12, 1)
    np.testing.assert_allclose(
        res.params["head"], sum(wi * a["head"] for wi, a in zip(w, ads)) / 3.0, rtol=1e-12
    )
    assert set(res.report) == {"layer0/query", "layer0/value", "head"}
    assert res.report["layer0/query"].shape == (12, 10)
    d = merge("lora_cat", ads, weights=w, dense=True).params["layer0"]["query"]
    assert d.shape == (12, 10)
    want = sum(wi * dense(a["layer0"]["query"]) for wi, a in zip(w, ads))
    assert rel(d, want) < 1e-12


def test_lora_errors_are_clear(rng):
    fs = adapters(rng, 10, 8, [2, 3])
    with pytest.raises(ValueError, match="one rank"):
        merge("lora_linear", fs)
    with pytest.raises(ValueError, match="exact at rank"):
        merge("lora_cat", fs, rank=2)
    with pytest.raises(ValueError, match="lower rank"):
        merge("geomerge", fs, rank=3)
    with pytest.raises(ValueError, match="density"):
        merge("lora_ties_svd", fs)
    with pytest.raises(ValueError, match="LoRA adapter"):
        merge("linear", fs)
    with pytest.raises(ValueError, match="tensor 'q'.*adapter 1"):
        merge("lora_svd", [{"q": fs[0]}, {"q": adapters(rng, 10, 9, [2])[0]}])
    with pytest.raises(ValueError, match="scaling"):
        merge("lora_svd", fs, scaling=[1.0])
    with pytest.raises(ValueError, match="exceeds"):
        merge("lora_svd", fs, rank=6)
    bad = LoraFactors(fs[0].b.at[0, 0].set(jnp.nan), fs[0].a)
    with pytest.raises(ValueError, match="adapter 0 has NaN"):
        merge("lora_svd", [bad, fs[1]])
    with pytest.raises(TypeError, match="Did you mean 'rank'"):
        merge("lora_svd", fs, rnak=2)
