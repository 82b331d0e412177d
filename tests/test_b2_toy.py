"""Table B2 (configs/b2_toy.py): the smoke config runs through experiments/run.py, its records
match closed forms, and both of its tables render with every cell filled."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from configs import b2_toy as b2_config  # noqa: E402
from experiments import b2_toy, make_tables, run  # noqa: E402

COLLAPSES = ("euclidean average", "diagonal Fisher average", "full Fisher average", "lora_linear")
KEEPS = ("geomerge (quotient mean)", "lora_svd", "lora_cat")


def _closed_forms(l1: float, l2: float) -> dict[str, float]:
    """w of the coordinate averages for the experts (l1, 2 / l1) and (-l2, -2 / l2), in float64.

    Euclidean (= factor-wise lora_linear on 1x1 adapters): a = (l1 - l2) / 2,
    b = (1 / l1 - 1 / l2), so w = -(l1 - l2)^2 / (2 l1 l2). Diagonal Fisher (F_aa = c b^2,
    F_bb = c a^2): a = (1/l1 - 1/l2) / (1/l1^2 + 1/l2^2), b = 2 (l1 - l2) / (l1^2 + l2^2). Full
    Fisher: F_i = c g_i g_i^T with g_i = (b_i, a_i) and F_i theta_i = 2 w c g_i, so with
    G = [g_1 g_2] invertible the minimiser solves G^T theta = (4, 4).
    """
    euclid = -((l1 - l2) ** 2) / (2 * l1 * l2)
    a = (1 / l1 - 1 / l2) / (1 / l1**2 + 1 / l2**2)
    b = 2 * (l1 - l2) / (l1**2 + l2**2)
    g = np.array([[2 / l1, l1], [-2 / l2, -l2]])
    full = np.linalg.solve(g, [4.0, 4.0])
    return {
        "euclidean average": euclid,
        "lora_linear": euclid,
        "diagonal Fisher average": a * b,
        "full Fisher average": full[0] * full[1],
        "_cond": np.linalg.cond(g),
    }


def test_b2_smoke_records_and_tables(tmp_path, monkeypatch, seed):
    monkeypatch.setenv("MM_CACHE_DIR", str(tmp_path / "cache"))
    cfg = b2_config.get_config("smoke")
    cfg.seed = seed % 100_000
    metrics = run.run_one(cfg, tmp_path / "b2")
    recs = metrics["records"]

    # toy, at the original experts: closed forms 0 (coordinate averages) and 2 (quotient, Delta W)
    toy = {r["method"]: r for r in recs if r["part"] == "toy"}
    assert list(toy) == b2_config.TOY_ROWS
    for m in COLLAPSES:
        assert abs(toy[m]["w"]) < 1e-6, (m, toy[m]["w"])
    for m in KEEPS:
        assert abs(toy[m]["w"] - 2.0) < 1e-5, (m, toy[m]["w"])
        assert toy[m]["error"] == pytest.approx(abs(toy[m]["w"] - 2.0))
        assert toy[m]["invariant"] is True, (m, toy[m]["max_w_change"])
    for m in COLLAPSES:
        assert toy[m]["invariant"] is False, (m, toy[m]["max_w_change"])

    # toy under each random GL(1) rescaling: the same closed forms, in float64
    trials = [r for r in recs if r["part"] == "toy_gl1"]
    assert len(trials) == cfg.toy.num_rescalings * len(toy)
    for r in trials:
        l1, l2 = r["l1"], r["l2"]
        assert 1 / cfg.toy.max_scale <= min(abs(l1), abs(l2))
        assert max(abs(l1), abs(l2)) <= cfg.toy.max_scale
        ref = _closed_forms(l1, l2)
        if r["method"] in KEEPS:
            assert abs(r["w"] - 2.0) <= cfg.toy.invariance_tol, r
        elif r["method"] == "full Fisher average":
            # float32 Fishers, a pseudo-inverse of their sum: error ~ eps x cond(G)^2
            rtol = 1e-5 * ref["_cond"] ** 2
            assert r["w"] == pytest.approx(ref["full Fisher average"], rel=rtol, abs=1e-5), r
        else:
            assert r["w"] == pytest.approx(ref[r["method"]], rel=1e-5, abs=1e-6), r

    # reductions: every equality to float32 rounding, and the control differs
    red = {r["claim"]: r for r in recs if r["part"] == "reduction"}
    assert list(red) == b2_config.REDUCTION_ROWS
    for claim, r in red.items():
        assert r["holds"] is True, r
        assert r["dtype"] == "float32" and 0 < r["tol"] < 1e-3
        if claim != b2_toy.CONTROL_CLAIM:
            assert r["max_abs_diff"] <= r["tol"], r
    assert red[b2_toy.CONTROL_CLAIM]["max_abs_diff"] > 1000 * red[b2_toy.CONTROL_CLAIM]["tol"]

    # both tables render, every cell filled
    runs = make_tables.load_runs([tmp_path / "b2"])
    for spec in cfg.tables:
        table = make_tables.build_table(spec, runs)
        assert table.missing == [], (spec["name"], table.missing)
    toy_table = make_tables.build_table(cfg.tables[0], runs)
    assert toy_table.row_labels == b2_config.TOY_ROWS
    assert toy_table.cell_text("geomerge (quotient mean)", "invariant") == "yes"
    assert toy_table.cell_text("lora_linear", "invariant") == "no"


def test_rescaling_draws_are_gauge_equivalent(rng):
    scales = b2_toy.rescalings(rng, 64, 4.0)
    assert scales.shape == (64, 2) and np.all((np.abs(scales) >= 0.25) & (np.abs(scales) <= 4))
    assert (scales < 0).any() and (scales > 0).any()
    for ls in scales:
        moved = b2_toy.rescale(b2_toy.EXPERTS, ls)
        assert [a * b for a, b in moved] == pytest.approx([2.0, 2.0], rel=1e-12)


def test_config_modes_and_unknown_keys():
    assert b2_config.get_sweep("") == [{"seed": s} for s in (0, 1, 2)]
    with pytest.raises(ValueError, match="smoke"):
        b2_config.get_config("fast")
    cfg = b2_config.get_config("smoke")
    cfg.toy.num_rescaling = 3  # typo
    with pytest.raises(ValueError, match="num_rescalings"):
        b2_toy.run_toy_part(cfg)
