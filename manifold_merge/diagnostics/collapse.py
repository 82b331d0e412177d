"""Representation-collapse diagnostics: activation variance, effective rank, norm ratios.

ALGORITHMS.md section 8. Everything here takes arrays (activations of one layer, shaped
``(num_examples[, tokens], d)``) or parameter pytrees and returns Python floats, computed on
the host in float64 whatever the input dtype (JAX arrays are copied to the host). Activations
are reduced in row chunks, so no float64 copy of a whole large activation tensor is made.

Ratios ``a / b`` follow the merge report's convention when the denominator vanishes: 1.0 when
both are zero (nothing to compare, e.g. a frozen tensor's zero task vectors), ``inf`` otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Rows per float64 chunk: about 2**22 numbers (32 MB) at a time.
_CHUNK_NUMBERS = 2**22
SPECTRA = ("covariance", "singular_values")


def _ratio(a: float, b: float) -> float:
    if b > 0:
        return float(a / b)
    return 1.0 if a == 0 else float("inf")


def _rows(h: Any, mask: Any, what: str = "activations") -> np.ndarray:
    """The valid rows of ``h`` as a 2-D ``(m, d)`` array (examples and tokens flattened)."""
    h = np.asarray(h)
    if h.ndim < 2:
        raise ValueError(f"{what} must have shape (num_examples[, tokens], d), got {h.shape}")
    if h.dtype.kind not in "biu" and not jnp.issubdtype(h.dtype, jnp.floating):  # bf16 too
        raise TypeError(f"{what} must be real numbers, got dtype {h.dtype}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != h.shape[:-1]:
            raise ValueError(
                f"mask must have the shape of {what} without the feature axis, "
                f"{h.shape[:-1]}, got {mask.shape}"
            )
        rows = h[mask.astype(bool)]
    else:
        rows = h.reshape(-1, h.shape[-1])
    if rows.shape[0] == 0:
        raise ValueError(f"{what} have no (unmasked) rows")
    return rows


def _chunks(rows: np.ndarray):
    step = max(1, _CHUNK_NUMBERS // max(1, rows.shape[1]))
    for s in range(0, rows.shape[0], step):
        yield rows[s : s + step].astype(np.float64)


def _mean(rows: np.ndarray) -> np.ndarray:
    total = np.zeros(rows.shape[1], np.float64)
    for c in _chunks(rows):
        total += c.sum(axis=0)
    return total / rows.shape[0]


def activation_variance(h: Any, *, mask: Any = None) -> float:
    """Mean per-feature variance AV = (1/d) sum_j Var(h_j) of one layer's activations.

    The variance of each feature j is taken over all examples (and tokens), population form
    (divided by the number of rows m, not m - 1): Var(h_j) = (1/m) sum_r (h_rj - mean_j)^2,
    computed in two float64 passes (mean first), which is stable for large means.

    Args:
        h: activations, shape (num_examples, d) or (num_examples, tokens, d).
        mask: optional bool array of shape ``h.shape[:-1]``; False rows (padded tokens) are
            left out.

    Returns:
        AV as a float (0.0 for a single row).

    Example:
        >>> h = np.array([[0.0, 0.0], [2.0, 4.0]])  # Var = 1 and 4
        >>> activation_variance(h)
        2.5
    """
    rows = _rows(h, mask)
    mu = _mean(rows)
    total = 0.0
    for c in _chunks(rows):
        total += float(np.sum(np.square(c - mu)))
    return total / (rows.shape[0] * rows.shape[1])


def variance_ratio(merged_h: Any, expert_hs: Sequence[Any], *, mask: Any = None) -> float:
    """AV(merged) / mean_i AV(expert_i) for one layer (below 1: the merge's activations shrank).

    Args:
        merged_h: the merged model's activations of the layer, (num_examples[, tokens], d).
        expert_hs: the experts' activations of the same layer on the same inputs, a sequence
            (or an array with the expert axis first) of arrays shaped like ``merged_h``.
        mask: optional padding mask shared by all of them (see :func:`activation_variance`).

    Returns:
        The ratio as a float.

    Example:
        >>> h = np.array([[0.0, 1.0], [2.0, 3.0]])
        >>> variance_ratio(0.5 * h, [h, -h])  # a scaled copy: the scale squared
        0.25
    """
    if len(expert_hs) == 0:
        raise ValueError("variance_ratio needs at least one expert's activations")
    merged = activation_variance(merged_h, mask=mask)
    experts = [activation_variance(h, mask=mask) for h in expert_hs]
    return _ratio(merged, float(np.mean(experts)))


def _spectrum(rows: np.ndarray) -> np.ndarray:
    """Eigenvalues (>= 0, float64) of the (unnormalised) scatter matrix of the centred rows.

    The smaller of the d x d scatter and the m x m Gram matrix of the centred rows is formed
    (they share their non-zero eigenvalues) and diagonalised with ``eigvalsh`` in float64.
    """
    m, d = rows.shape
    mu = _mean(rows)
    if m < d:
        centred = rows.astype(np.float64) - mu
        mat = centred @ centred.T
    else:
        mat = np.zeros((d, d), np.float64)
        for c in _chunks(rows):
            c = c - mu
            mat += c.T @ c
    lam = np.linalg.eigvalsh(mat)
    # Zero eigenvalues come out as rounding noise of about eps * lambda_max (of either sign);
    # set them to 0, or their square roots (about 1e-8 sigma_max) would count as singular values.
    return np.where(lam > max(m, d) * np.finfo(np.float64).eps * lam.max(initial=0.0), lam, 0.0)


def effective_rank(h: Any, *, mask: Any = None, spectrum: str = "covariance") -> float:
    """Roy & Vetterli (2007) effective rank of one layer's activations.

    With the spectrum s_k >= 0 and p_k = s_k / sum_k s_k, EffRank = exp(-sum_k p_k log p_k),
    with 0 log 0 = 0 (zero eigenvalues are dropped). It lies in [1, min(m, d)]: k for k equal
    non-zero eigenvalues, and near d for isotropic data.

    The spectrum, as ``spectrum`` chooses:

    * ``"covariance"`` (default, ALGORITHMS.md section 8): the eigenvalues lambda_k of the
      covariance of the activations (centred over examples and tokens);
    * ``"singular_values"``: the singular values sigma_k = sqrt(lambda_k (m - 1)) of the centred
      activation matrix, Roy & Vetterli's original definition (a larger number for the same
      data, since sqrt flattens the spectrum).

    The eigenvalues come from ``eigvalsh`` of the d x d covariance (or the m x m Gram matrix of
    the centred rows when there are fewer rows than features) in float64; those below
    max(m, d) * eps * lambda_max (float64 rounding noise) count as zero.

    Args:
        h: activations, shape (num_examples, d) or (num_examples, tokens, d).
        mask: optional bool array of shape ``h.shape[:-1]`` (False: padded, left out).
        spectrum: ``"covariance"`` or ``"singular_values"``.

    Returns:
        The effective rank as a float; 0.0 when the activations do not vary at all.

    Example:
        >>> h = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
        >>> round(effective_rank(h), 12)  # two equal eigenvalues, one zero
        2.0
    """
    if spectrum not in SPECTRA:
        raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")
    s = _spectrum(_rows(h, mask))
    if spectrum == "singular_values":
        s = np.sqrt(s)
    total = s.sum()
    if not total > 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def _per_layer(fn, layers, *args, **kwargs):
    if isinstance(layers, Mapping):
        return {name: fn(h, *args, **kwargs) for name, h in layers.items()}
    return [fn(h, *args, **kwargs) for h in layers]


def layer_activation_variances(layers: Sequence[Any] | Mapping[str, Any], *, mask: Any = None):
    """:func:`activation_variance` of every layer.

    Args:
        layers: a list of per-layer activations, or a dict ``{layer name: activations}``.
        mask: optional padding mask shared by all layers.

    Returns:
        A list (or dict with the same keys) of floats.

    Example:
        >>> layer_activation_variances({"l0": np.array([[0.0], [2.0]]), "l1": np.ones((2, 3))})
        {'l0': 1.0, 'l1': 0.0}
    """
    return _per_layer(activation_variance, layers, mask=mask)


def layer_effective_ranks(
    layers: Sequence[Any] | Mapping[str, Any], *, mask: Any = None, spectrum: str = "covariance"
):
    """:func:`effective_rank` of every layer (a list, or a dict for a dict of layers)."""
    return _per_layer(effective_rank, layers, mask=mask, spectrum=spectrum)


def layer_variance_ratios(
    merged_layers: Sequence[Any] | Mapping[str, Any],
    expert_layers: Sequence[Sequence[Any] | Mapping[str, Any]],
    *,
    mask: Any = None,
):
    """:func:`variance_ratio` of every layer.

    Args:
        merged_layers: the merged model's per-layer activations (list, or dict by layer name).
        expert_layers: one such list/dict per expert (the expert axis first), on the same
            inputs and with the same layers.
        mask: optional padding mask shared by everything.

    Returns:
        A list (or dict) of floats, one per layer.

    Example:
        >>> h = np.array([[0.0], [1.0]])
        >>> layer_variance_ratios([2 * h, h], [[h, h], [-h, h]])
        [4.0, 1.0]
    """
    if len(expert_layers) == 0:
        raise ValueError("layer_variance_ratios needs at least one expert")
    if isinstance(merged_layers, Mapping):
        for i, e in enumerate(expert_layers):
            if not isinstance(e, Mapping) or set(e) != set(merged_layers):
                raise ValueError(
                    f"expert {i}'s layers do not match the merged model's {sorted(merged_layers)}"
                )
        return {
            k: variance_ratio(h, [e[k] for e in expert_layers], mask=mask)
            for k, h in merged_layers.items()
        }
    for i, e in enumerate(expert_layers):
        if isinstance(e, Mapping) or len(e) != len(merged_layers):
            raise ValueError(
                f"expert {i} has {len(e)} layers where the merged model has {len(merged_layers)}"
            )
    return [
        variance_ratio(h, [e[k] for e in expert_layers], mask=mask)
        for k, h in enumerate(merged_layers)
    ]


def _named_leaves(tree: Any) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in flat}


def _norm(x: Any, ref: Any = None) -> float:
    """||x - ref|| (or ||x||) in float64, in chunks of the flattened tensors."""
    flat = np.asarray(x).reshape(-1)
    ref = None if ref is None else np.asarray(ref).reshape(-1)
    total = 0.0
    for s in range(0, flat.size, _CHUNK_NUMBERS):
        c = flat[s : s + _CHUNK_NUMBERS].astype(np.float64)
        if ref is not None:
            c = c - ref[s : s + _CHUNK_NUMBERS].astype(np.float64)
        total += float(np.dot(c, c))
    return float(np.sqrt(total))


def norm_ratio(merged_params: Any, expert_params: Sequence[Any], *, base: Any = None):
    """Per-tensor norm ratio ||merged|| / mean_i ||theta_i|| (Frobenius norms, float64).

    With ``base`` the ratio is of task vectors: ||merged - base|| / mean_i ||theta_i - base||.
    Linear averaging of N orthogonal task vectors of equal norm gives 1/sqrt(N); the spherical
    proxy gives 1 by construction (ALGORITHMS.md section 8).

    Args:
        merged_params: the merged pytree.
        expert_params: the experts' pytrees (same structure and shapes), a sequence.
        base: optional base pytree of the same structure.

    Returns:
        ``{name: ratio}`` with "/"-joined key paths as names (``"Dense_0/kernel"``), in
        ``merged_params``'s leaf order. 0/0 (e.g. all task vectors zero) gives 1.0.

    Example:
        >>> experts = [{"w": np.array([1.0, 0.0])}, {"w": np.array([0.0, 1.0])}]
        >>> {k: round(v, 6) for k, v in norm_ratio({"w": np.array([0.5, 0.5])}, experts).items()}
        {'w': 0.707107}
    """
    if len(expert_params) == 0:
        raise ValueError("norm_ratio needs at least one expert")
    merged = _named_leaves(merged_params)
    experts = [_named_leaves(e) for e in expert_params]
    trees = [("expert " + str(i), e) for i, e in enumerate(experts)]
    based = _named_leaves(base) if base is not None else None
    if based is not None:
        trees.append(("base", based))
    for what, tree in trees:
        if set(tree) != set(merged):
            missing = sorted(set(merged) ^ set(tree))[:5]
            raise ValueError(f"{what}'s tensors differ from the merged model's, e.g. {missing}")

    out = {}
    for name, m in merged.items():
        tensors = [m] + [e[name] for e in experts]
        ref = None if based is None else based[name]
        shapes = {np.shape(t) for t in tensors + ([] if ref is None else [ref])}
        if len(shapes) != 1:
            raise ValueError(f"tensor {name!r} has different shapes: {sorted(shapes)}")
        norms = [_norm(t, ref) for t in tensors]
        out[name] = _ratio(norms[0], float(np.mean(norms[1:])))
    return out
