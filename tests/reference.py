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
