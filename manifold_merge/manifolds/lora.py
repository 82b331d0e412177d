"""LoRA adapters as points of the quotient manifold of rank-r matrices (ALGORITHMS.md section 7).

A LoRA update is Delta W = b @ a with b (m, r) and a (r, n). Write G = b, H = a^T, so
Delta W = G H^T. The group GL(r) acts by (G, H) M = (G M, H M^-T) without changing Delta W, so
the adapters that mean the same update form an orbit, and the space of updates is the quotient
(the manifold of rank-r m x n matrices). With P = G^T G and Q = H^T H:

* vertical space at (G, H) (moving along the orbit): {(G L, -H L^T)};
* metrics (``metric=``): ``"scaled"`` (a) g = tr(P^-1 xi_G^T eta_G) + tr(Q^-1 xi_H^T eta_H),
  invariant under the group and under scaling of Delta W; ``"induced"`` (b)
  g = tr(Q xi_G^T eta_G) + tr(P xi_H^T eta_H), the change of Delta W without its cross term;
  ``"embedded"``: the Frobenius inner product of the induced changes of Delta W (degenerate on
  the vertical space, a metric on the quotient);
* horizontal space: the g-orthogonal complement of the vertical space (for the embedded metric,
  which is orthogonal to everything vertical, the induced metric's complement);
* points are represented by factors, tangent vectors by horizontal factor pairs
  ``LoraFactors(xi_b, xi_a)``; ``exp`` is the retraction x + v (the quotient geodesics of these
  metrics have no closed form) and ``log`` its (approximate) inverse by a distance approximation
  (``approx=``, see :mod:`manifold_merge.manifolds.approx`).

The **core space** (:func:`core_space`) represents N adapters exactly as R x R cores in shared
orthonormal bases (R = sum r_i), so every merge runs in O((m + n) R^2 + R^3) without forming an
m x n matrix.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from manifold_merge.manifolds.approx import (
    Chordal,
    DistanceApprox,
    HorizontalAlign,
    LstsqAlign,
    ProcrustesAlign,
    get_approx,
)
from manifold_merge.manifolds.base import AbstractManifold, static_dataclass, upcast
from manifold_merge.sharding import over_parameter_axis

METRICS = ("scaled", "induced", "embedded")
#: Iterations of the (scaled) Denman-Beavers square root: quadratic convergence, r x r matrices.
SQRTM_STEPS = 14


class LoraFactors(NamedTuple):
    """One LoRA update Delta W = b @ a: ``b`` is (m, r) (PEFT's ``lora_B``), ``a`` is (r, n)
    (PEFT's ``lora_A``). Any LoRA scaling (alpha / r) is folded in by the caller.

    Example:
        >>> import jax.numpy as jnp
        >>> f = LoraFactors(jnp.ones((4, 2)), jnp.ones((2, 3)))
        >>> f.dense().shape, f.rank
        ((4, 3), 2)
    """

    b: jax.Array
    a: jax.Array

    @property
    def rank(self) -> int:
        return self.b.shape[-1]

    def dense(self) -> jax.Array:
        """The (m, n) matrix b @ a (forms it: only for small layers, tests and dense output)."""
        return self.b @ self.a


# ----------------------------------------------------------------------------- core space
class CoreSpace(NamedTuple):
    """N adapters in shared orthonormal bases: Delta W_i = u_b @ (core_b[i] @ core_a[i]) @ u_a^T.

    Attributes:
        u_b: (m, k_b) orthonormal basis of the span of all b_i (k_b = min(m, R)).
        u_a: (n, k_a) orthonormal basis of the span of all a_i^T.
        core_b: list of (k_b, r_i) core factors (u_b^T b_i).
        core_a: list of (r_i, k_a) core factors (a_i u_a).
    """

    u_b: jax.Array
    u_a: jax.Array
    core_b: list
    core_a: list

    def cores(self) -> list:
        """The (k_b, k_a) cores C_i = core_b[i] @ core_a[i]."""
        return [cb @ ca for cb, ca in zip(self.core_b, self.core_a)]

    def lift(self, core: LoraFactors) -> LoraFactors:
        """Core factors (k_b, r), (r, k_a) -> full factors (m, r), (r, n)."""
        return LoraFactors(self.u_b @ core.b, core.a @ self.u_a.T)


def core_space(factors: list[LoraFactors]) -> CoreSpace:
    """QR of the stacked factors: B_cat = [b_1 ... b_N] = U_B R_B, A_cat^T = U_A R_A.

    Every Delta W_i = U_B (R_B E_i R_A^T) U_A^T with E_i selecting block i, so all adapters are
    exact R x R cores in shared bases. The bases depend on the representatives only through an
    orthogonal change of core coordinates, to which every method built on them is equivariant.
    Cost O((m + n) R^2). When m and n are split over devices (``merge(..., mesh=...)``), the
    QRs are TSQRs (:func:`tall_qr`) and only R x R matrices are replicated.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> ks = jax.random.split(jax.random.key(0), 4)
        >>> fs = [LoraFactors(jax.random.normal(ks[i], (6, 2)), jax.random.normal(ks[i + 2],
        ...       (2, 5))) for i in range(2)]
        >>> cs = core_space(fs)
        >>> c0 = cs.cores()[0]
        >>> bool(jnp.allclose(cs.u_b @ c0 @ cs.u_a.T, fs[0].dense(), atol=1e-5))
        True
    """
    ranks = [f.b.shape[1] for f in factors]
    b_cat = jnp.concatenate([f.b for f in factors], axis=1)
    a_cat = jnp.concatenate([f.a for f in factors], axis=0)
    u_b, r_b = tall_qr(b_cat)
    u_a, r_a = tall_qr(a_cat.T)
    edges = [0]
    for r in ranks:
        edges.append(edges[-1] + r)
    core_b = [r_b[:, lo:hi] for lo, hi in zip(edges[:-1], edges[1:])]
    core_a = [r_a[:, lo:hi].T for lo, hi in zip(edges[:-1], edges[1:])]
    return CoreSpace(u_b, u_a, core_b, core_a)


def tall_qr(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reduced QR x = Q R of a tall (rows, R) matrix, made unique by a non-negative diagonal
    of R (so the result does not depend on how it was computed).

    When the rows are split over devices (:mod:`manifold_merge.sharding`; a LoRA merge kernel
    says so while it traces), it is a TSQR: each device factors its own rows, one small QR of the
    stacked (devices x R, R) R factors combines them, and each device keeps its rows of Q.
    That needs at least R rows per device.
    """
    # r is computed identically on every device from the gathered R factors
    q_t, r = over_parameter_axis(
        _tsqr, x.T, replicated=(False, True), kind="lora", check_replication=False
    )
    return q_t.T, r


def _tsqr(axis, x_t):
    """QR of x = x_t^T, of this device's rows combined over ``axis`` (see :func:`tall_qr`)."""
    q, r = jnp.linalg.qr(x_t.T)
    if axis is not None:
        k = r.shape[0]
        stacked = jax.lax.all_gather(r, axis).reshape(-1, r.shape[1])
        q2, r = jnp.linalg.qr(stacked)
        q = q @ jax.lax.dynamic_slice_in_dim(q2, jax.lax.axis_index(axis) * k, k, axis=0)
    sign = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(r.dtype)
    return (q * sign).T, r * sign[:, None]


def balanced_factors(u: jax.Array, s: jax.Array, vt: jax.Array, rank: int) -> LoraFactors:
    """The rank-``rank`` truncation of U diag(s) V^T as balanced factors (b^T b = a a^T)."""
    root = jnp.sqrt(s[:rank])
    return LoraFactors(u[:, :rank] * root, root[:, None] * vt[:rank])


def truncated_svd(core: jax.Array, rank: int) -> LoraFactors:
    """Balanced factors of the best rank-``rank`` approximation of ``core`` (Eckart-Young)."""
    u, s, vt = jnp.linalg.svd(core, full_matrices=False)
    return balanced_factors(u, s, vt, rank)


# ----------------------------------------------------------------------------- linear algebra
def _sym_solve(p, x):
    """p^-1 x for symmetric positive definite p."""
    return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(p), x)


@functools.partial(jax.jit, static_argnames="steps")
def sqrtm(x: jax.Array, steps: int = SQRTM_STEPS) -> jax.Array:
    """Principal square root of a square matrix with no eigenvalues on the closed negative real
    axis, by the determinant-scaled Denman-Beavers iteration (matrix products and inverses only,
    so it runs on every backend and differentiates).

    Example:
        >>> import jax.numpy as jnp
        >>> s = sqrtm(jnp.array([[4.0, 1.0], [0.0, 9.0]]))
        >>> bool(jnp.allclose(s @ s, jnp.array([[4.0, 1.0], [0.0, 9.0]]), atol=1e-4))
        True
    """
    r = x.shape[-1]
    eye = jnp.eye(r, dtype=x.dtype)

    def body(_, yz):
        y, z = yz
        _, ldy = jnp.linalg.slogdet(y)
        _, ldz = jnp.linalg.slogdet(z)
        mu = jnp.exp(-(ldy + ldz) / (2 * r))
        yi, zi = jnp.linalg.inv(y), jnp.linalg.inv(z)
        return 0.5 * (mu * y + zi / mu), 0.5 * (mu * z + yi / mu)

    y, _ = jax.lax.fori_loop(0, steps, body, (x, eye))
    return y


# ----------------------------------------------------------------------------- the manifold
@static_dataclass
class LoraQuotient(AbstractManifold):
    """Rank-``rank`` m x n matrices as LoRA factors modulo GL(r) (ALGORITHMS.md section 7).

    Points are :class:`LoraFactors` ``(b (m, r), a (r, n))`` of full rank; tangent vectors are
    horizontal ``LoraFactors`` of the same shapes.

    Args:
        m, n: the shape of Delta W = b @ a.
        rank: r.
        metric: ``"scaled"`` (default; metric (a), invariant to the scale of Delta W),
            ``"induced"`` (metric (b)) or ``"embedded"`` (Frobenius on Delta W).
        approx: the distance approximation behind ``log`` and ``dist``: a name or a
            :mod:`~manifold_merge.manifolds.approx` strategy, ``"horizontal"`` (default for
            scaled/induced: the exact inverse of the retraction), ``"lstsq"``,
            ``"procrustes"``, or ``"chordal"`` (default and only choice besides the
            alignments for ``metric="embedded"``; its mean is the truncated SVD).

    ``exp`` is the retraction x + v; ``dist`` is ||log_x(y)||_x (symmetric only to second
    order) except for ``"chordal"``, where it is ||Delta W_y - Delta W_x||_F. The heavier
    operations are jitted per method (the manifold is a static pytree), so eager use, as in the
    axiom suite, compiles each once per shape instead of dispatching dozens of small ops.

    Example:
        >>> import jax
        >>> mf = LoraQuotient(6, 5, 2)
        >>> x, y = mf.random_point(jax.random.key(0)), mf.random_point(jax.random.key(1))
        >>> back = mf.exp(x, mf.log(x, y))          # a representative of y
        >>> bool(jax.numpy.allclose(back.dense(), y.dense(), atol=1e-4))
        True
    """

    m: int
    n: int
    rank: int
    metric: str = "scaled"
    approx: DistanceApprox | str | None = None

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"LoraQuotient metric must be one of {METRICS}, got {self.metric!r}")
        for field in ("m", "n", "rank"):
            if not (isinstance(getattr(self, field), int) and getattr(self, field) >= 1):
                raise ValueError(f"LoraQuotient {field} must be a positive int")
        if self.rank > min(self.m, self.n):
            raise ValueError(
                f"LoraQuotient rank {self.rank} exceeds min(m, n) = {min(self.m, self.n)}"
            )
        approx = self.approx
        if approx is None:
            approx = Chordal() if self.metric == "embedded" else HorizontalAlign()
        approx = get_approx(approx)
        if not isinstance(approx, (HorizontalAlign, LstsqAlign, ProcrustesAlign, Chordal)):
            raise ValueError(f"LoraQuotient does not support the approximation {approx.name!r}")
        if isinstance(approx, Chordal) and self.metric != "embedded":
            raise ValueError("approx='chordal' is the embedded metric's; use metric='embedded'")
        object.__setattr__(self, "approx", approx)

    # --------------------------------------------------------------- helpers
    @staticmethod
    def _grams(x):
        b, a = upcast(x.b), upcast(x.a)
        return b, a, b.T @ b, a @ a.T

    @staticmethod
    def _cast(v, like):
        return LoraFactors(v.b.astype(like.b.dtype), v.a.astype(like.a.dtype))

    # ------------------------------------------------------------------ metric
    @jax.jit
    def inner(self, x, u, v):
        b, a, p, q = self._grams(x)
        ub, ua, vb, va = upcast(u.b), upcast(u.a), upcast(v.b), upcast(v.a)
        gg, hh = ub.T @ vb, ua @ va.T  # xi_G^T eta_G and xi_H^T eta_H
        if self.metric == "scaled":
            return jnp.trace(_sym_solve(p, gg)) + jnp.trace(_sym_solve(q, hh))
        out = jnp.sum(q * gg) + jnp.sum(p * hh)  # tr(Q gg) + tr(P hh); Q, P symmetric
        if self.metric == "embedded":
            # Cross terms 2 <xi_G H^T, G eta_H^T>, symmetrised, as r x r products.
            out = out + jnp.sum((ub.T @ b) * (va @ a.T).T) + jnp.sum((vb.T @ b) * (ua @ a.T).T)
        return out

    @jax.jit
    def relative_norm(self, x, v):
        """Scaled metric: the norm itself (scale-free). Others: norm / ||Delta W_x||_F."""
        if self.metric == "scaled":
            return self.norm(x, v)
        _, _, p, q = self._grams(x)
        return self.norm(x, v) / jnp.sqrt(jnp.sum(p * q))

    def vertical_proj(self, x, u):
        """The vertical part (G L, -H L^T) of ``u``: u - horizontal_proj(x, u)."""
        h = self.horizontal_proj(x, u)
        return LoraFactors(u.b - h.b, u.a - h.a)

    @jax.jit
    def horizontal_proj(self, x, u):
        """g-orthogonal projection onto the horizontal space: (xi_G - G L, xi_H + H L^T).

        Scaled metric: L solves the Sylvester equation (QP) L + L (QP) = Q G^T xi_G - xi_H^T H P
        (QP is similar to the SPD P^(1/2) Q P^(1/2), so one eigendecomposition solves it).
        Induced and embedded: L = (P^-1 G^T xi_G - xi_H^T H Q^-1) / 2.
        """
        b, a, p, q = self._grams(x)
        ub, ua = upcast(u.b), upcast(u.a)
        gx, hx = b.T @ ub, ua @ a.T  # G^T xi_G, xi_H^T H
        if self.metric == "scaled":
            c = q @ gx - hx @ p
            chol = jnp.linalg.cholesky(p)  # P = L L^T; L^T (QP) L^-T = L^T Q L = V D V^T
            d, vecs = jnp.linalg.eigh(chol.T @ q @ chol)
            w = jax.scipy.linalg.solve_triangular(chol.T, vecs, lower=False)  # L^-T V
            w_inv = vecs.T @ chol.T
            lam = w @ ((w_inv @ c @ w) / (d[:, None] + d[None, :])) @ w_inv
        else:
            lam = 0.5 * (_sym_solve(p, gx) - _sym_solve(q, hx.T).T)
        out = LoraFactors(ub - b @ lam, ua + lam @ a)
        return self._cast(out, u)

    def proj(self, x, u):
        """Tangent vectors of the quotient are horizontal lifts: :meth:`horizontal_proj`."""
        return self.horizontal_proj(x, u)

    # --------------------------------------------------------------- geodesics
    def exp(self, x, v):
        """The retraction (b + xi_b, a + xi_a) (quotient geodesics have no closed form)."""
        return LoraFactors(
            (upcast(x.b) + upcast(v.b)).astype(x.b.dtype),
            (upcast(x.a) + upcast(v.a)).astype(x.a.dtype),
        )

    def retr(self, x, v):
        return self.exp(x, v)

    @jax.jit
    def align(self, x, y):
        """The representative of ``y`` closest to ``x`` under the distance approximation.

        Same Delta W as ``y`` (for ``"lstsq"`` also when ``y`` has lower rank, padded with zero
        columns). For ``"chordal"``, which does not align, ``y`` itself.
        """
        if isinstance(self.approx, Chordal):
            return y
        b, a, p, q = self._grams(x)
        by, ay = upcast(y.b), upcast(y.a)
        if isinstance(self.approx, LstsqAlign):
            m = jnp.linalg.pinv(by) @ b
            out = LoraFactors(by @ m, jnp.linalg.pinv(m) @ ay)
        elif isinstance(self.approx, ProcrustesAlign):
            # Rotate balanced y onto balanced x, then carry it by the g in GL(r) that maps
            # balanced x to x itself (so that align(x, x) = x).
            bal, xbal = _balance(LoraFactors(by, ay)), _balance(LoraFactors(b, a))
            u, _, vt = jnp.linalg.svd(bal.b.T @ xbal.b + bal.a @ xbal.a.T)
            g = jnp.linalg.pinv(xbal.b) @ b
            o = u @ vt
            out = LoraFactors(bal.b @ o @ g, jnp.linalg.solve(g, o.T @ bal.a))
        else:  # HorizontalAlign: y M - x horizontal <=> M A M = B
            if self.metric == "scaled":
                am, bm = q @ (b.T @ by), (ay @ a.T) @ p
            else:
                am, bm = _sym_solve(p, b.T @ by), _sym_solve(q, (ay @ a.T).T).T
            m = jnp.linalg.solve(am, sqrtm(am @ bm))
            out = LoraFactors(by @ m, jnp.linalg.solve(m, ay))
        return LoraFactors(out.b.astype(y.b.dtype), out.a.astype(y.a.dtype))

    @jax.jit
    def log(self, x, y):
        b, a, p, q = self._grams(x)
        if isinstance(self.approx, Chordal):
            by, ay = upcast(y.b), upcast(y.a)
            dh = by @ (ay @ a.T) - b @ q  # (Delta W_y - Delta W_x) H
            dg = ay.T @ (by.T @ b) - a.T @ p  # (Delta W_y - Delta W_x)^T G
            xi_b = _sym_solve(q, dh.T).T
            xi_h = dg - a.T @ _sym_solve(q, a @ dg)  # (I - P_V) D^T G
            raw = LoraFactors(xi_b, _sym_solve(p, xi_h.T))
            return self.horizontal_proj(x, self._cast(raw, x))
        y2 = self.align(x, y)
        diff = LoraFactors(upcast(y2.b) - b, upcast(y2.a) - a)
        if not isinstance(self.approx, HorizontalAlign):
            diff = self.horizontal_proj(x, diff)
        return self._cast(diff, x)

    @jax.jit
    def dist(self, x, y):
        if isinstance(self.approx, Chordal):
            cs = core_space(
                [LoraFactors(upcast(x.b), upcast(x.a)), LoraFactors(upcast(y.b), upcast(y.a))]
            )
            c = cs.cores()
            d = c[1] - c[0]
            return jnp.sqrt(jnp.sum(d * d))
        return self.norm(x, self.log(x, y))

    @jax.jit
    def within_uniqueness_radius(self, x, y):
        """``"horizontal"``: the alignment exists (A B has a principal square root, checked by
        its residual). Otherwise True: no uniqueness radius is known for these quotients."""
        if not isinstance(self.approx, HorizontalAlign):
            return jnp.asarray(True)
        b, a, p, q = self._grams(x)
        by, ay = upcast(y.b), upcast(y.a)
        if self.metric == "scaled":
            ab = q @ (b.T @ by) @ (ay @ a.T) @ p
        else:
            ab = _sym_solve(p, b.T @ by) @ _sym_solve(q, (ay @ a.T).T).T
        s = sqrtm(ab)
        resid = jnp.linalg.norm(s @ s - ab) / jnp.linalg.norm(ab)
        return resid < 1e-3

    # ----------------------------------------------------------------- sampling
    def random_point(self, key, dtype=jnp.float32):
        """Factors b = E + 0.15 Z (m, r) and a = E^T + 0.15 Z' (r, n), E the first r unit vectors
        and Z, Z' standard normal: full rank, and pairs lie where the alignments are defined
        (the quotient has no global logarithm, as a sphere has none at antipodes)."""
        kb, ka = jax.random.split(key)
        eb = jnp.eye(self.m, self.rank, dtype=dtype)
        ea = jnp.eye(self.rank, self.n, dtype=dtype)
        return LoraFactors(
            eb + 0.15 * jax.random.normal(kb, (self.m, self.rank), dtype),
            ea + 0.15 * jax.random.normal(ka, (self.rank, self.n), dtype),
        )

    def belongs(self, x, atol=1e-5):
        """Right shapes, finite, and full rank r (smallest singular value > atol x largest)."""
        if tuple(x.b.shape) != (self.m, self.rank) or tuple(x.a.shape) != (self.rank, self.n):
            return jnp.asarray(False)
        b, a = upcast(x.b), upcast(x.a)
        ok = jnp.all(jnp.isfinite(b)) & jnp.all(jnp.isfinite(a))
        for f in (b, a):
            s = jnp.linalg.svd(f, compute_uv=False)
            ok = ok & (s[-1] > atol * s[0])
        return ok

    # ------------------------------------------------------------ solver support
    @jax.jit
    def init_mean(self, points, weights):
        """The balanced factors of the rank-r truncated SVD of sum_i w_i Delta W_i (core space)."""
        n = weights.shape[0]
        factors = [LoraFactors(points.b[i] * weights[i], points.a[i]) for i in range(n)]
        cs = core_space(factors)
        total = sum(cs.cores())
        return cs.lift(truncated_svd(total, self.rank))


def _balance(f: LoraFactors) -> LoraFactors:
    """Balanced factors (b^T b = a a^T) of the same Delta W, from the SVD of its core."""
    qb, rb = jnp.linalg.qr(f.b)
    qa, ra = jnp.linalg.qr(f.a.T)
    u, s, vt = jnp.linalg.svd(rb @ ra.T)
    root = jnp.sqrt(s)
    return LoraFactors(qb @ (u * root), (root[:, None] * vt) @ qa.T)
