"""Independent float64 NumPy references for the tests (no code shared with the package)."""

from __future__ import annotations

import numpy as np


def sphere_log(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Unit-sphere log via arccos in float64 (accurate enough above ~1e-7 rad in float64)."""
    c = np.clip(np.dot(x, y), -1.0, 1.0)
    v = y - c * x
    nv = np.linalg.norm(v)
    if nv == 0.0:
        return np.zeros_like(x)
    theta = np.arctan2(nv, c)
    return theta * v / nv


def sphere_exp(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    t = np.linalg.norm(v)
    if t == 0.0:
        return x.copy()
    y = np.cos(t) * x + np.sin(t) * v / t
    return y / np.linalg.norm(y)


def sphere_karcher(points: np.ndarray, weights: np.ndarray, tol: float = 1e-14, steps=10_000):
    """Weighted Karcher mean of unit vectors (rows of ``points``), float64, to ``tol``."""
    p = np.asarray(points, np.float64)
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    x = w @ p
    x /= np.linalg.norm(x)
    for _ in range(steps):
        g = sum(wi * sphere_log(x, pi) for wi, pi in zip(w, p))
        if np.linalg.norm(g) < tol:
            break
        x = sphere_exp(x, g)
    return x


def angle(x: np.ndarray, y: np.ndarray) -> float:
    """Angle between two vectors, float64, in the stable atan2 form."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    x = x / np.linalg.norm(x)
    y = y / np.linalg.norm(y)
    return 2.0 * np.arctan2(np.linalg.norm(x - y), np.linalg.norm(x + y))


def random_cluster(rng, n: int, dim: int, spread: float) -> np.ndarray:
    """``n`` unit vectors in R^dim at angle ``spread`` from a random centre, random directions."""
    c = rng.standard_normal(dim)
    c /= np.linalg.norm(c)
    out = []
    for _ in range(n):
        t = rng.standard_normal(dim)
        t -= np.dot(t, c) * c
        t /= np.linalg.norm(t)
        s = spread * rng.uniform(0.5, 1.0)
        out.append(np.cos(s) * c + np.sin(s) * t)
    return np.stack(out)


# ------------------------------------------------------------------ merge methods (NumPy)
def np_linear(xs, w, normalize=True):
    xs = np.asarray(xs, np.float64)
    w = np.asarray(w, np.float64)
    out = np.tensordot(w, xs, axes=1)
    return out / w.sum() if normalize else out


def np_task_arithmetic(xs, base, w, lam=1.0, normalize=False):
    return base + lam * np_linear(np.asarray(xs, np.float64) - base, w, normalize)


def np_nre(xs, w, base=None):
    xs = np.asarray(xs, np.float64)
    v = xs if base is None else xs - base
    a = np.asarray(w, np.float64) / np.sum(w)
    avg = np.tensordot(a, v, axes=1)
    norm = sum(ai * np.linalg.norm(vi) for ai, vi in zip(a, v))
    out = avg * norm / np.linalg.norm(avg)
    return out if base is None else base + out


def np_model_stock(xs, base, w):
    xs = np.asarray(xs, np.float64)
    tv = [(x - base).ravel() for x in xs]
    n = len(tv)
    cos = [
        np.dot(tv[i], tv[j]) / (np.linalg.norm(tv[i]) * np.linalg.norm(tv[j]))
        for i in range(n)
        for j in range(i + 1, n)
    ]
    c = np.mean(cos)
    t = n * c / (1 + (n - 1) * c)
    return t * np_linear(xs, w) + (1 - t) * base


def np_slerp(t, a, b):
    """mergekit's slerp (with the arccos of float64 dot products)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
    dot = np.sum(ua * ub)
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    om = np.arccos(dot)
    return np.sin((1 - t) * om) / np.sin(om) * a + np.sin(t * om) / np.sin(om) * b


def np_multislerp(xs, w, base=None):
    xs = np.asarray(xs, np.float64)
    v = (xs if base is None else xs - base).reshape(len(xs), -1)
    w = np.asarray(w, np.float64) / np.sum(w)
    norms = np.linalg.norm(v, axis=1)
    m = w @ (v / norms[:, None])
    out = (m / np.linalg.norm(m) * (w @ norms)).reshape(xs.shape[1:])
    return out if base is None else base + out


def np_ties(xs, base, w, density, lam=1.0, normalize=True):
    xs = np.asarray(xs, np.float64)
    tv = (xs - base).reshape(len(xs), -1)
    k = int(density * tv.shape[1])
    pruned = np.zeros_like(tv)
    for i, t in enumerate(tv):
        idx = np.argsort(-np.abs(t), kind="stable")[:k]
        pruned[i, idx] = t[idx]
    w = np.asarray(w, np.float64)
    weighted = pruned * w[:, None]
    sign = np.where(weighted.sum(0) >= 0, 1.0, -1.0)
    mask = np.sign(weighted) == sign
    mixed = (weighted * mask).sum(0)
    if normalize:
        div = (w[:, None] * mask).sum(0)
        div[div == 0] = 1
        mixed = mixed / div
    return base + lam * mixed.reshape(xs.shape[1:])


def np_karcher_spherical_proxy(xs, w, base=None):
    """Paper A with float64 NumPy: sphere Karcher mean of directions x weighted mean norm."""
    xs = np.asarray(xs, np.float64)
    v = (xs if base is None else xs - base).reshape(len(xs), -1)
    norms = np.linalg.norm(v, axis=1)
    keep = norms > 0
    w = np.asarray(w, np.float64) * keep
    d = sphere_karcher(v[keep], w[keep])
    out = (d * (w @ norms) / w.sum()).reshape(xs.shape[1:])
    return out if base is None else base + out


# ------------------------------------------------------------------------- LoRA (dense, float64)
def np_tsvd(x, rank):
    """Best rank-``rank`` approximation of a dense matrix (Eckart-Young)."""
    u, s, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def np_prune(rows, density):
    k = int(density * rows.shape[1])
    out = np.zeros_like(rows)
    for i, t in enumerate(rows):
        idx = np.argsort(-np.abs(t), kind="stable")[:k]
        out[i, idx] = t[idx]
    return out


def _np_disjoint_mean(rows, w):
    weighted = rows * w[:, None]
    sign = np.where(weighted.sum(0) >= 0, 1.0, -1.0)
    mask = np.sign(weighted) == sign
    div = (w[:, None] * mask).sum(0)
    div[div == 0] = 1
    return (weighted * mask).sum(0) / div


def np_knots_ties(deltas, w, density, rank):
    """KnOTS-TIES on dense updates: SVD of [dW_1 ... dW_N] = U S [V_1^T ... V_N^T] (top R
    triplets, R = the concatenation's rank), TIES on the rows of each V_i^T, U S V*^T, rank cut."""
    deltas = [np.asarray(d, np.float64) for d in deltas]
    n = deltas[0].shape[1]
    u, s, vt = np.linalg.svd(np.concatenate(deltas, axis=1), full_matrices=False)
    k = int(np.sum(s > s[0] * 1e-10))
    u, s, vt = u[:, :k], s[:k], vt[:k]
    blocks = np.stack([vt[:, i * n : (i + 1) * n].reshape(-1) for i in range(len(deltas))])
    merged = _np_disjoint_mean(np_prune(blocks, density), np.asarray(w, np.float64))
    return np_tsvd((u * s) @ merged.reshape(k, n), rank)


def np_ties_canonical(deltas, w, density, rank):
    """TIES in the canonical bases of the updates (left singular vectors of [dW_1 ... dW_N] and
    of [dW_1^T ... dW_N^T]), lifted back and truncated: lora_ties_svd's definition, dense."""
    deltas = [np.asarray(d, np.float64) for d in deltas]
    big_r = int(np.linalg.matrix_rank(np.concatenate(deltas, axis=1)))
    u = np.linalg.svd(np.concatenate(deltas, axis=1), full_matrices=False)[0][:, :big_r]
    v = np.linalg.svd(np.concatenate([d.T for d in deltas], axis=1), full_matrices=False)[0]
    v = v[:, :big_r]
    cores = np.stack([(u.T @ d @ v).reshape(-1) for d in deltas])
    merged = _np_disjoint_mean(np_prune(cores, density), np.asarray(w, np.float64))
    return np_tsvd(u @ merged.reshape(big_r, big_r) @ v.T, rank)


def random_array(rng: np.random.Generator, dtype: np.dtype, shape: tuple) -> np.ndarray:
    """Random bit patterns (NaNs, infinities, subnormals included); 0/1 for bool."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    if dtype == np.bool_:
        return rng.integers(0, 2, n).astype(bool).reshape(shape)
    raw = rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)
