"""Distance approximations: the typed, named strategies of Paper B's ablation axis.

A Fréchet mean needs ``log_x(p_i)`` (or a surrogate of ``d(x, p_i)^2``). Each strategy below is
a frozen dataclass with a ``name`` used in configs (``get_approx("lstsq")``); a manifold or a
merge method states which ones it supports.

* Vector-space / sphere merges (method ``frechet``): :class:`ExactLog`, :class:`FirstOrder`,
  :class:`FrozenMetric`.
* The LoRA quotient (:class:`~manifold_merge.manifolds.LoraQuotient`), where ``log_x(y)`` has
  no closed form and is approximated by aligning a representative of ``y`` to ``x`` over the
  GL(r) orbit, then taking the (horizontal) difference: :class:`HorizontalAlign`,
  :class:`LstsqAlign`, :class:`ProcrustesAlign`, and :class:`Chordal` for the embedded metric.
"""

from __future__ import annotations

import dataclasses
import difflib


@dataclasses.dataclass(frozen=True)
class DistanceApprox:
    """Base of the distance-approximation strategies (``name`` identifies it in configs)."""

    name = "abstract"


@dataclasses.dataclass(frozen=True)
class ExactLog(DistanceApprox):
    """The manifold's exact logarithm and geodesic distance."""

    name = "exact"


@dataclasses.dataclass(frozen=True)
class FirstOrder(DistanceApprox):
    """One tangent-space average at a fixed reference point (no iteration)."""

    name = "first_order"


@dataclasses.dataclass(frozen=True)
class FrozenMetric(DistanceApprox):
    """d(x, p_i)^2 ~ (x - p_i)^T F_i (x - p_i) with the metric frozen at p_i (closed form)."""

    name = "frozen_metric"


@dataclasses.dataclass(frozen=True)
class HorizontalAlign(DistanceApprox):
    """LoRA quotient: the representative y M of y whose difference to x is horizontal at x.

    M solves M A M = B (A, B r x r, from the factors), M = A^-1 (A B)^(1/2) with the principal
    square root. ``log_x(y) = y M - x`` is then the exact inverse of the retraction
    ``x + v``, so exp(log) and log(exp) round-trip exactly. Needs equal ranks.
    """

    name = "horizontal"


@dataclasses.dataclass(frozen=True)
class LstsqAlign(DistanceApprox):
    """LoRA quotient: M = b_y^+ b (least squares, ALGORITHMS.md section 7), then the horizontal
    projection of y M - x. Closed form; works for inputs of lower rank than the mean."""

    name = "lstsq"


@dataclasses.dataclass(frozen=True)
class ProcrustesAlign(DistanceApprox):
    """LoRA quotient: balance y (b^T b = a a^T from its SVD), then the orthogonal M closest to
    x (Procrustes), then the horizontal projection of y M - x. Needs equal ranks."""

    name = "procrustes"


@dataclasses.dataclass(frozen=True)
class Chordal(DistanceApprox):
    """LoRA quotient with the embedded metric: d = ||Delta W_y - Delta W_x||_F and log = the
    horizontal lift of the tangent projection of Delta W_y - Delta W_x. Its Fréchet mean is the
    truncated SVD of the weighted sum (Eckart-Young). Works for any input ranks."""

    name = "chordal"


_APPROX = {
    cls.name: cls
    for cls in (
        ExactLog,
        FirstOrder,
        FrozenMetric,
        HorizontalAlign,
        LstsqAlign,
        ProcrustesAlign,
        Chordal,
    )
}


def get_approx(approx: str | DistanceApprox) -> DistanceApprox:
    """The strategy named ``approx`` (an instance is returned as is).

    Example:
        >>> get_approx("lstsq")
        LstsqAlign()
    """
    if isinstance(approx, DistanceApprox):
        return approx
    try:
        return _APPROX[approx]()
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(approx), _APPROX, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown distance approximation {approx!r}; known: {sorted(_APPROX)}.{hint}"
        ) from None


def list_approx() -> list[str]:
    """Names of the distance approximations."""
    return sorted(_APPROX)
