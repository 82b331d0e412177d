"""The manifold axiom suite: checks every :class:`AbstractManifold` must pass.

Use it on a manifold of your own::

    from manifold_merge.testing import check_manifold
    check_manifold(MyManifold(dim=5))          # raises AssertionError naming the axiom

or run single axioms (``AXIOMS`` maps names to check functions) under pytest parametrisation.
Each check draws a batch of random points and tangent vectors with the manifold's own
``random_point`` / ``random_tangent`` (so it also exercises ``vmap``) and runs in the dtype
given; float64 checks switch on ``jax.enable_x64`` for their duration.

Options a manifold may need:

* ``step``: the tangent length used for exp/log round trips, as a float or a function
  ``x -> float`` (default ``min(1, injectivity_radius / 4)``). Manifolds with a boundary, such
  as ``FisherRao``, pass a step that stays inside it.
* ``far_pair``: ``(key, dtype) -> (x, y)`` giving two points close to each other's cut locus,
  for the near-antipodal gradient check. Default: ``y = exp_x(v)`` with
  ``||v|| = 0.999 * injectivity_radius`` (skipped when that is infinite).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from manifold_merge.manifolds.base import AbstractManifold

__all__ = ["AXIOMS", "check_manifold", "tolerance"]


def tolerance(dtype) -> float:
    """Absolute tolerance of the checks for computations in ``dtype``."""
    return 2e-5 if jnp.dtype(dtype) == jnp.float32 else 1e-10


@contextlib.contextmanager
def _precision(dtype):
    if jnp.dtype(dtype) == jnp.float64:
        with jax.enable_x64(True):
            yield
    else:
        yield


def _draws(manifold, key, dtype, num):
    kx, ky, ku, kv = jax.random.split(key, 4)
    xs = jax.vmap(lambda k: manifold.random_point(k, dtype))(jax.random.split(kx, num))
    ys = jax.vmap(lambda k: manifold.random_point(k, dtype))(jax.random.split(ky, num))
    us = jax.vmap(manifold.random_tangent)(jax.random.split(ku, num), xs)
    vs = jax.vmap(manifold.random_tangent)(jax.random.split(kv, num), xs)
    return xs, ys, us, vs


def _scale(manifold, x, v, length):
    """v rescaled to Riemannian length ``length``."""
    n = manifold.norm(x, v)
    return jax.tree.map(lambda a: (a * (length / n)).astype(a.dtype), v)


def _step(manifold, x, step):
    if step is None:
        return min(1.0, manifold.injectivity_radius() / 4)
    return step(x) if callable(step) else step


def _leaves_close(a, b, atol, what):
    for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        la = np.asarray(la, np.float64)
        lb = np.asarray(lb, np.float64)
        err = np.max(np.abs(la - lb)) if la.size else 0.0
        scale = max(1.0, float(np.max(np.abs(lb))) if lb.size else 1.0)
        assert err <= atol * scale, f"{what}: max abs difference {err:.3g} > {atol * scale:.3g}"


def _scalars_close(a, b, atol, what):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    err = np.max(np.abs(a - b))
    assert err <= atol, f"{what}: max abs difference {err:.3g} > {atol:.3g}"


def _tree_sub(a, b):
    return jax.tree.map(lambda p, q: p - q, a, b)


def _tree_lin(alpha, a, beta, b):
    return jax.tree.map(lambda p, q: (alpha * p + beta * q).astype(p.dtype), a, b)


def _each(fn, *trees):
    """Apply fn to the i-th element of every tree (a Python loop, the vmap reference)."""
    n = jax.tree.leaves(trees[0])[0].shape[0]
    return [fn(*[jax.tree.map(lambda a, i=i: a[i], t) for t in trees]) for i in range(n)]


# ------------------------------------------------------------------------------- axioms
def check_belongs(m, key, dtype, num=8, step=None, **_):
    """random_point belongs; exp of a random tangent belongs; random_tangent is tangent."""
    xs, _, us, _ = _draws(m, key, dtype, num)
    assert bool(jnp.all(jax.vmap(m.belongs)(xs))), "random_point does not belong"
    ys = jax.vmap(m.exp)(xs, jax.vmap(lambda x, u: _scale(m, x, u, _step(m, x, step)))(xs, us))
    assert bool(jnp.all(jax.vmap(m.belongs)(ys))), "exp(x, v) does not belong"
    _leaves_close(jax.vmap(m.proj)(xs, us), us, tolerance(dtype), "random_tangent not tangent")


def check_dtype(m, key, dtype, num=4, **_):
    """Points and tangents keep their dtype; scalars are float32 or better."""
    xs, ys, us, _ = _draws(m, key, dtype, num)
    for name, out in [
        ("exp", jax.vmap(m.exp)(xs, us)),
        ("log", jax.vmap(m.log)(xs, ys)),
        ("proj", jax.vmap(m.proj)(xs, us)),
        ("retr", jax.vmap(m.retr)(xs, us)),
        ("transp", jax.vmap(m.transp)(xs, ys, us)),
    ]:
        for leaf in jax.tree.leaves(out):
            assert leaf.dtype == jnp.dtype(dtype), f"{name} returned {leaf.dtype}, not {dtype}"
    for name, out in [("dist", jax.vmap(m.dist)(xs, ys)), ("inner", jax.vmap(m.inner)(xs, us, us))]:
        assert jnp.finfo(out.dtype).bits >= 32, f"{name} returned {out.dtype}"


def check_inner(m, key, dtype, num=8, **_):
    """inner is symmetric, bilinear and positive; norm = sqrt(inner)."""
    xs, _, us, vs = _draws(m, key, dtype, num)
    tol = tolerance(dtype)
    uv = jax.vmap(m.inner)(xs, us, vs)
    _scalars_close(uv, jax.vmap(m.inner)(xs, vs, us), tol, "inner not symmetric")
    w = jax.vmap(lambda u, v: _tree_lin(2.0, u, -3.0, v))(us, vs)
    lhs = jax.vmap(m.inner)(xs, w, vs)
    rhs = 2.0 * uv - 3.0 * jax.vmap(m.inner)(xs, vs, vs)
    _scalars_close(lhs, rhs, tol * (1 + float(jnp.max(jnp.abs(rhs)))), "inner not bilinear")
    uu = jax.vmap(m.inner)(xs, us, us)
    assert bool(jnp.all(uu > 0)), "inner(x, u, u) not positive for random u"
    _scalars_close(jax.vmap(m.norm)(xs, us), jnp.sqrt(uu), tol * 10, "norm != sqrt(inner)")


def check_proj(m, key, dtype, num=8, **_):
    """proj is idempotent and g-orthogonal: inner(x, u - proj u, w) = 0 for tangent w."""
    xs, _, us, vs = _draws(m, key, dtype, num)
    raw = jax.tree.map(lambda u, v: u + 0.5 * v, us, vs)  # tangent; add a normal part below
    ambient = jax.tree.map(lambda r, x: r + 0.3 * x, raw, xs)
    p = jax.vmap(m.proj)(xs, ambient)
    _leaves_close(jax.vmap(m.proj)(xs, p), p, tolerance(dtype), "proj not idempotent")
    resid = _tree_sub(ambient, p)
    ip = jax.vmap(m.inner)(xs, resid, vs)
    scale = jax.vmap(m.norm)(xs, vs) * (1 + jax.vmap(m.norm)(xs, resid))
    _scalars_close(ip / scale, jnp.zeros_like(ip), tolerance(dtype) * 10, "proj not orthogonal")


def check_exp_log(m, key, dtype, num=8, step=None, **_):
    """exp(x, 0) = x, log(x, x) = 0, exp(x, log(x, y)) = y, log(x, exp(x, v)) = v."""
    xs, ys, us, _ = _draws(m, key, dtype, num)
    tol = tolerance(dtype)
    zeros = jax.tree.map(jnp.zeros_like, us)
    _leaves_close(jax.vmap(m.exp)(xs, zeros), xs, tol, "exp(x, 0) != x")
    _leaves_close(jax.vmap(m.log)(xs, xs), zeros, tol, "log(x, x) != 0")
    vs = jax.vmap(lambda x, u: _scale(m, x, u, _step(m, x, step)))(xs, us)
    ys = jax.vmap(m.exp)(xs, vs)
    _leaves_close(jax.vmap(m.log)(xs, ys), vs, tol * 5, "log(x, exp(x, v)) != v")
    back = jax.vmap(m.exp)(xs, jax.vmap(m.log)(xs, ys))
    d = jax.vmap(m.dist)(back, ys)
    _scalars_close(d, jnp.zeros_like(d), tol * 5, "exp(x, log(x, y)) != y")


def check_dist(m, key, dtype, num=8, step=None, **_):
    """dist is symmetric, non-negative, 0 on the diagonal, = ||log||, triangle inequality."""
    kx, kz = jax.random.split(key)
    xs, ys, _, _ = _draws(m, kx, dtype, num)
    _, zs, _, _ = _draws(m, kz, dtype, num)
    tol = tolerance(dtype)
    dxy = jax.vmap(m.dist)(xs, ys)
    _scalars_close(dxy, jax.vmap(m.dist)(ys, xs), tol, "dist not symmetric")
    assert bool(jnp.all(dxy >= 0)), "dist negative"
    dxx = jax.vmap(m.dist)(xs, xs)
    _scalars_close(dxx, jnp.zeros_like(dxx), tol, "dist(x, x) != 0")
    nlog = jax.vmap(lambda x, y: m.norm(x, m.log(x, y)))(xs, ys)
    _scalars_close(dxy, nlog, tol * 5, "dist != norm(log)")
    lhs = dxy
    rhs = jax.vmap(m.dist)(xs, zs) + jax.vmap(m.dist)(zs, ys)
    assert bool(jnp.all(lhs <= rhs + tol)), "triangle inequality violated"


def check_tiny_distances(m, key, dtype, num=8, **_):
    """Distances of 1e-4 .. 1e-6 (relative to the step scale) keep their relative precision.

    The points are rounded to ``dtype``; the distance computed in ``dtype`` must match the
    same formula evaluated in float64 on those rounded points (an arccos form would fail).
    """
    xs, _, us, _ = _draws(m, key, dtype, num)
    for t in (1e-4, 1e-5, 1e-6):
        vs = jax.vmap(lambda x, u, t=t: _scale(m, x, u, t))(xs, us)
        ys = jax.vmap(m.exp)(xs, vs)
        d = np.asarray(jax.vmap(m.dist)(xs, ys), np.float64)
        with jax.enable_x64(True):
            x64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), xs)
            y64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), ys)
            ref = np.asarray(jax.vmap(m.dist)(x64, y64))
        assert np.all(ref > 0), f"points at distance {t} rounded onto each other"
        rel = np.max(np.abs(d - ref) / ref)
        assert rel < 1e-3, f"dist at scale {t}: relative error {rel:.3g} (atan2 form lost)"
        nlog = np.asarray(jax.vmap(lambda x, y: m.norm(x, m.log(x, y)))(xs, ys), np.float64)
        rel = np.max(np.abs(nlog - ref) / ref)
        assert rel < 1e-3, f"||log|| at scale {t}: relative error {rel:.3g}"


def check_retr(m, key, dtype, num=8, **_):
    """retr agrees with exp to first order: dist(retr(x, tv), exp(x, tv)) = o(t)."""
    xs, _, us, _ = _draws(m, key, dtype, num)
    t = 1e-2
    vs = jax.vmap(lambda x, u: _scale(m, x, u, t))(xs, us)
    d = jax.vmap(m.dist)(jax.vmap(m.retr)(xs, vs), jax.vmap(m.exp)(xs, vs))
    assert float(jnp.max(d)) <= 0.05 * t + tolerance(dtype), (
        f"retr differs from exp by {float(jnp.max(d)):.3g} at step {t}"
    )


def check_transp(m, key, dtype, num=8, step=None, isometric=True, **_):
    """transp lands in T_y, is the identity for y = x and (if isometric) keeps inner products."""
    xs, _, us, vs = _draws(m, key, dtype, num)
    tol = tolerance(dtype)
    steps = jax.vmap(lambda x, u: _scale(m, x, u, _step(m, x, step)))(xs, us)
    ys = jax.vmap(m.exp)(xs, steps)
    tv = jax.vmap(m.transp)(xs, ys, vs)
    _leaves_close(jax.vmap(m.proj)(ys, tv), tv, tol * 5, "transp not tangent at y")
    _leaves_close(jax.vmap(m.transp)(xs, xs, vs), vs, tol * 5, "transp(x, x, v) != v")
    if isometric:
        tu = jax.vmap(m.transp)(xs, ys, us)
        before = jax.vmap(m.inner)(xs, us, vs)
        after = jax.vmap(m.inner)(ys, tu, tv)
        # Relative to the size of the inner products (as the bilinearity check): float32
        # products of norm-sphere factors reach |<u, v>| ~ 1e2-1e3.
        scale = 1.0 + float(jnp.max(jnp.abs(before)))
        _scalars_close(after, before, tol * 10 * scale, "transp does not keep inner products")


def check_jit(m, key, dtype, num=4, **_):
    """jit(op) == op for exp, log, dist, inner, proj, transp."""
    xs, ys, us, vs = _draws(m, key, dtype, num)
    tol = tolerance(dtype)
    for name, fn, args in [
        ("exp", m.exp, (xs, us)),
        ("log", m.log, (xs, ys)),
        ("dist", m.dist, (xs, ys)),
        ("inner", m.inner, (xs, us, vs)),
        ("proj", m.proj, (xs, us)),
        ("transp", m.transp, (xs, ys, vs)),
    ]:
        eager = jax.vmap(fn)(*args)
        jitted = jax.jit(jax.vmap(fn))(*args)
        _leaves_close(jitted, eager, tol, f"jit({name}) != {name}")


def check_vmap(m, key, dtype, num=4, **_):
    """vmap(op) equals a Python loop over the batch for exp, log, dist."""
    xs, ys, us, _ = _draws(m, key, dtype, num)
    tol = tolerance(dtype)
    for name, fn, args in [
        ("exp", m.exp, (xs, us)),
        ("log", m.log, (xs, ys)),
        ("dist", m.dist, (xs, ys)),
    ]:
        batched = jax.vmap(fn)(*args)
        looped = _each(fn, *args)
        looped = jax.tree.map(lambda *a: jnp.stack(a), *looped)
        _leaves_close(batched, looped, tol, f"vmap({name}) != loop")


def _default_far_pair(m, key, dtype):
    r = m.injectivity_radius()
    kx, ku = jax.random.split(key)
    x = m.random_point(kx, dtype)
    v = _scale(m, x, m.random_tangent(ku, x), 0.999 * r)
    return x, m.exp(x, v)


def check_gradients(m, key, dtype, num=4, far_pair=None, **_):
    """Gradients of dist^2, dist, log and exp are finite at coincident and near-antipodal points
    and at v = 0."""
    xs, _, us, _ = _draws(m, key, dtype, num)

    def finite(tree, what):
        for leaf in jax.tree.leaves(tree):
            assert bool(jnp.all(jnp.isfinite(leaf))), f"non-finite gradient: {what}"

    def sum_leaves(tree):
        return sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(tree))

    for i in range(num):
        x = jax.tree.map(lambda a, i=i: a[i], xs)
        u = jax.tree.map(lambda a, i=i: a[i], us)
        finite(jax.grad(lambda y: m.dist(x, y) ** 2)(x), "dist^2 at y = x")
        finite(jax.grad(lambda y: m.dist(x, y))(x), "dist at y = x")
        finite(jax.grad(lambda y: sum_leaves(m.log(x, y)))(x), "log at y = x")
        zero = jax.tree.map(jnp.zeros_like, u)
        finite(jax.grad(lambda v: sum_leaves(m.exp(x, v)))(zero), "exp at v = 0")
        finite(jax.grad(lambda v: m.norm(x, v))(zero), "norm at v = 0")
    if far_pair is None and math.isinf(m.injectivity_radius()):
        return
    make = far_pair or (lambda k, dt: _default_far_pair(m, k, dt))
    for k in jax.random.split(jax.random.fold_in(key, 1), num):
        x, y = make(k, dtype)
        finite(jax.grad(lambda y: m.dist(x, y))(y), "dist near the cut locus")
        finite(jax.grad(lambda y: m.dist(x, y) ** 2)(y), "dist^2 near the cut locus")
        finite(jax.grad(lambda y: sum_leaves(m.log(x, y)))(y), "log near the cut locus")


AXIOMS: dict[str, Callable] = {
    "belongs": check_belongs,
    "dtype": check_dtype,
    "inner": check_inner,
    "proj": check_proj,
    "exp_log": check_exp_log,
    "dist": check_dist,
    "tiny_distances": check_tiny_distances,
    "retr": check_retr,
    "transp": check_transp,
    "jit": check_jit,
    "vmap": check_vmap,
    "gradients": check_gradients,
}


def run_axiom(manifold: AbstractManifold, name: str, *, key=None, dtype=jnp.float32, **options):
    """Run one axiom of :data:`AXIOMS` on ``manifold`` in ``dtype`` (raises AssertionError)."""
    key = jax.random.key(0) if key is None else key
    with _precision(dtype):
        AXIOMS[name](manifold, key, jnp.dtype(dtype), **options)


def check_manifold(
    manifold: AbstractManifold,
    *,
    key=None,
    dtypes=(jnp.float32, jnp.float64),
    skip: tuple[str, ...] = (),
    **options,
) -> None:
    """Run every axiom on ``manifold`` in every dtype; raise AssertionError on the first failure.

    Args:
        manifold: the manifold under test.
        key: a ``jax.random`` key (default ``key(0)``); vary it to test fresh draws.
        dtypes: dtypes to run in (float64 runs under ``jax.enable_x64``).
        skip: names of axioms that do not apply (e.g. ``("transp",)``), documented by the caller.
        **options: ``step``, ``far_pair``, ``isometric`` (see the module docstring), ``num``.

    Example:
        >>> from manifold_merge.manifolds import Sphere
        >>> check_manifold(Sphere(3), dtypes=("float32",))
    """
    unknown = set(skip) - set(AXIOMS)
    if unknown:
        raise ValueError(f"unknown axioms in skip: {sorted(unknown)}; known: {sorted(AXIOMS)}")
    for dtype in dtypes:
        for name in AXIOMS:
            if name in skip:
                continue
            try:
                run_axiom(manifold, name, key=key, dtype=dtype, **options)
            except AssertionError as err:
                raise AssertionError(
                    f"{manifold!r} fails axiom {name!r} in {dtype}: {err}"
                ) from err
