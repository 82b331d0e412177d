"""experiments/make_tables.py: tables from fake run folders with known numbers."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments import make_tables as mt  # noqa: E402

METHODS = ["linear", "ties", "karcher"]
NUM_EXPERTS = [4, 2]  # written in this order: columns must come out sorted
SEEDS = [0, 1, 2]
LAYERS = [0, 1, 2]
TASKS = ["avg", "t0"]

A1 = {
    "name": "A1",
    "title": "Normalized accuracy",
    "rows": "method",
    "columns": "num_experts",
    "value": "normalized_accuracy",
    "where": {"task": "avg"},
    "format": ".3f",
    "figure": {"kind": "bar", "x": "num_experts", "y": "normalized_accuracy", "hue": "method"},
}
A2 = {
    "name": "A2",
    "title": "Per-layer activation variance",
    "rows": "method",
    "columns": "layer",
    "value": "activation_variance",
    "format": ".4f",
    "figure": {
        "kind": "line",
        "x": "layer",
        "y": "activation_variance",
        "hue": "method",
        "facet": "num_experts",
        "logy": True,
    },
}


def write_run(folder: Path, config: dict, records: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.json").write_text(json.dumps({"records": records, "runtime_s": 1.5}))


def make_sweep(root: Path, rng, seeds=SEEDS, tables=(A1, A2)) -> list[dict]:
    """A sweep over num_experts x seeds; returns every record joined with its config fields."""
    joined = []
    for k in NUM_EXPERTS:
        for s in seeds:
            config = {
                "name": "sweep",
                "seed": s,
                "num_experts": k,
                "karcher": {"tol": 1e-6},
                "task": "config-task",  # clashes with the records' field: records win
                "tables": list(tables),
            }
            records = []
            for m in METHODS:
                for task in TASKS:
                    records.append(
                        {
                            "method": m,
                            "task": task,
                            "normalized_accuracy": float(rng.uniform(0.5, 1.0)),
                            "accuracy": float(rng.uniform(0.3, 0.9)),
                            "kl": float(rng.exponential()),
                            "invariant": m == "linear" or (m == "karcher" and s == 0),
                        }
                    )
                for layer in LAYERS:
                    records.append(
                        {
                            "method": m,
                            "layer": layer,
                            "activation_variance": float(rng.uniform(0.01, 1.0)),
                            "effective_rank": float(rng.uniform(1, 32)),
                        }
                    )
            records.append({"method": "expert", "task": "avg", "accuracy": 0.95})
            write_run(root / "sweep" / f"k{k}" / f"seed{s}", config, records)
            joined += [{**mt.flatten(config), **r} for r in records]
    return joined


def select(records, value, **where):
    return [
        r[value] for r in records if value in r and all(r.get(k) == v for k, v in where.items())
    ]


def parse_markdown(md: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]
    assert all(set(c) <= set("-:") for c in split[1])
    return split[0], split[2:]


@pytest.fixture
def sweep(tmp_path, rng):
    records = make_sweep(tmp_path / "runs", rng)
    return mt.load_runs([tmp_path / "runs"]), records


def test_load_runs_joins_records_with_flat_config(sweep):
    runs, _ = sweep
    assert len(runs) == len(NUM_EXPERTS) * len(SEEDS)
    run = runs[0]
    assert run.flat_config["karcher.tol"] == 1e-6 and run.config["karcher"] == {"tol": 1e-6}
    assert run.metrics["runtime_s"] == 1.5
    joined = run.joined()
    assert {r["task"] for r in joined} == {"avg", "t0", "config-task"}  # records win on a clash
    assert all(r["num_experts"] == run.config["num_experts"] for r in joined)


def test_cells_are_mean_and_sample_std_over_seeds(sweep):
    runs, records = sweep
    table = mt.build_table(A1, runs)
    assert table.row_labels == METHODS  # first seen; "expert" has no normalized_accuracy
    assert table.col_labels == sorted(NUM_EXPERTS)
    assert table.missing == []
    for m in METHODS:
        for k in NUM_EXPERTS:
            want = select(records, "normalized_accuracy", method=m, num_experts=k, task="avg")
            mean, std, n = table.cells[m, k]
            assert n == len(SEEDS) == len(want)
            np.testing.assert_allclose(mean, np.mean(want), rtol=1e-12)
            np.testing.assert_allclose(std, np.std(want, ddof=1), rtol=1e-12)
            assert table.seeds[m, k] == frozenset(SEEDS)
    assert len(table.runs) == len(runs)


def test_where_list_and_values_mode_with_yes_no_format(sweep):
    runs, records = sweep
    spec = {
        "name": "B",
        "rows": "method",
        "values": ["accuracy", "kl", "invariant"],
        "where": {"task": ["avg", "t0"], "num_experts": 4},
        "formats": {"invariant": "yes/no"},
        "format": ".2f",
    }
    table = mt.build_table(spec, runs)
    assert table.col_labels == ["accuracy", "kl", "invariant"]
    assert table.row_labels == [*METHODS, "expert"]
    assert table.missing == [("expert", "kl"), ("expert", "invariant")]
    for m in METHODS:
        for v in ["accuracy", "kl"]:
            want = select(records, v, method=m, num_experts=4)
            mean, std, n = table.cells[m, v]
            assert n == len(TASKS) * len(SEEDS)
            np.testing.assert_allclose([mean, std], [np.mean(want), np.std(want, ddof=1)])
    assert table.cell_text("linear", "invariant") == "yes"
    assert table.cell_text("ties", "invariant") == "no"
    # mixed across records: how often, of the records in the cell
    mean, _, n = table.cells["karcher", "invariant"]
    assert table.cell_text("karcher", "invariant") == f"yes in {round(mean * n)}/{n}"
    assert 0 < mean < 1
    assert table.cell_text("expert", "accuracy") == "0.95 ± 0.00"
    assert table.cell_text("expert", "kl") == mt.MISSING
    # records per cell (2 tasks x 3 seeds) differ from seeds per cell: the footnote says so
    assert "n = 3–6" in table.markdown()


def test_empty_cells_are_reported_and_rendered_as_a_dash(sweep, tmp_path):
    runs, _ = sweep
    spec = {**A1, "row_order": ["karcher", "nonexistent"], "column_order": [8], "figure": None}
    table = mt.build_table(spec, runs)
    assert table.row_labels == ["karcher", "nonexistent", "linear", "ties"]
    assert table.col_labels == [8, 2, 4]
    assert set(table.missing) == {(m, 8) for m in table.row_labels} | {
        ("nonexistent", 2),
        ("nonexistent", 4),
    }
    header, body = parse_markdown(table.markdown())
    assert header == ["method", "num_experts=8", "num_experts=2", "num_experts=4"]
    assert body[1] == ["nonexistent", mt.MISSING, mt.MISSING, mt.MISSING]
    assert body[0][1] == mt.MISSING and body[0][2] != mt.MISSING
    assert "–: no records" in table.markdown()
    with pytest.warns(UserWarning, match="empty cells"):
        mt.render(runs, tmp_path / "out", [spec])
    with open(tmp_path / "out" / "A1.csv") as fh:
        rows = list(csv.DictReader(fh))
    empty = [r for r in rows if r["n"] == "0"]
    assert len(empty) == len(table.missing) and all(r["mean"] == r["std"] == "" for r in empty)


def test_compound_rows_and_csv(sweep, tmp_path):
    runs, records = sweep
    spec = {
        "name": "C",
        "rows": ["method", "layer"],
        "columns": "num_experts",
        "value": "effective_rank",
        "format": ".2f",
    }
    table = mt.build_table(spec, runs)
    assert table.row_labels == [(m, layer) for m in METHODS for layer in LAYERS]
    assert table.missing == []
    mt.render(runs, tmp_path / "out", [spec])
    with open(tmp_path / "out" / "C.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["method", "layer", "column", "mean", "std", "n"]
    assert len(rows) == 1 + len(METHODS) * len(LAYERS) * len(NUM_EXPERTS)
    for m, layer, k, mean, std, n in rows[1:]:
        want = select(records, "effective_rank", method=m, layer=int(layer), num_experts=int(k))
        assert int(n) == len(want) == len(SEEDS)
        np.testing.assert_allclose([float(mean), float(std)], [np.mean(want), np.std(want, ddof=1)])
    header, body = parse_markdown(table.markdown())
    assert header[:2] == ["method", "layer"] and body[0][:2] == ["linear", "0"]


def test_markdown_parses_back_to_the_numbers_at_the_format(sweep):
    runs, records = sweep
    table = mt.build_table(A2, runs)
    md = table.markdown()
    assert md.startswith("## A2: Per-layer activation variance\n")
    # 2 num_experts x 3 seeds records per cell
    assert "mean ± std (ddof=1) over each cell's records (n = 6, see CSV) from 3 seeds" in md
    header, body = parse_markdown(md)
    assert header == ["method", *(f"layer={layer}" for layer in LAYERS)]
    assert [r[0] for r in body] == METHODS
    for row in body:
        for layer, text in zip(LAYERS, row[1:]):
            mean, std = re.fullmatch(r"(\S+) ± (\S+)", text).groups()
            want = select(records, "activation_variance", method=row[0], layer=layer)
            assert len(want) == len(SEEDS) * len(NUM_EXPERTS)
            assert mean == f"{np.mean(want):.4f}" and std == f"{np.std(want, ddof=1):.4f}"


def test_a_single_record_shows_the_mean_alone(tmp_path, rng):
    records = make_sweep(tmp_path / "runs", rng, seeds=[7])
    table = mt.build_table(A1, mt.load_runs([tmp_path / "runs"]))
    assert all(n == 1 and np.isnan(std) for _, std, n in table.cells.values())
    want = select(records, "normalized_accuracy", method="ties", num_experts=2, task="avg")
    assert table.cell_text("ties", 2) == f"{want[0]:.3f}"
    assert "single record show the mean alone" in table.markdown()
    assert table.to_csv_rows()[1][3] == ""  # std


def test_seed_counts_varying_per_cell_go_in_the_footnote(tmp_path, rng):
    make_sweep(tmp_path / "runs", rng)
    # drop one seed of one cell: (ties, 2) has 2 seeds, the others 3
    path = tmp_path / "runs" / "sweep" / "k2" / "seed1" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["records"] = [
        r for r in metrics["records"] if (r["method"], r.get("task")) != ("ties", "avg")
    ]
    path.write_text(json.dumps(metrics))
    table = mt.build_table(A1, mt.load_runs([tmp_path / "runs"]))
    assert table.cells["ties", 2][2] == 2 and table.cells["ties", 4][2] == 3
    assert table.seeds["ties", 2] == {0, 2}
    assert "over 3 seeds; seeds per cell: 3, except ties/2: 2 (runs: " in table.footnote()


def test_render_writes_tables_figures_and_index(sweep, tmp_path):
    runs, _ = sweep
    out = tmp_path / "out"
    paths = mt.render(runs, out)  # specs from the runs' configs, deduplicated
    names = ["A1.md", "A1.csv", "A1.png", "A2.md", "A2.csv", "A2.png", "index.md"]
    assert [p.name for p in paths] == names
    assert sorted(f.name for f in out.iterdir()) == sorted(names)  # no temp files left
    for name, facets in [("A1", 1), ("A2", len(NUM_EXPERTS))]:
        png = out / f"{name}.png"
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(png)
        assert image.shape == (
            round(mt.FIGURE_HEIGHT * mt.DPI),
            round(mt.FACET_WIDTH * mt.DPI * facets),
            4,
        )
    index = (out / "index.md").read_text()
    assert index.index("## A1") < index.index("![A1](A1.png)") < index.index("## A2")
    assert "![A2](A2.png)" in index
    assert (out / "A1.md").read_text() in index

    paths = mt.render(runs, tmp_path / "only", only=["A2"])
    assert [p.name for p in paths] == ["A2.md", "A2.csv", "A2.png", "index.md"]
    with pytest.raises(ValueError, match="unknown tables"):
        mt.render(runs, tmp_path / "only", only=["A9"])


def test_bad_inputs_give_clear_errors(sweep, tmp_path):
    runs, _ = sweep
    bad = tmp_path / "bad"
    write_run(bad / "r", {"seed": 0}, [])
    (bad / "r" / "metrics.json").write_text('{"records": [')
    with pytest.raises(ValueError, match=re.escape(str(bad / "r" / "metrics.json"))):
        mt.load_runs([bad])
    nonnumeric = tmp_path / "nonnumeric"
    write_run(nonnumeric / "r", {"seed": 0}, [{"method": "x", "accuracy": "high"}])
    spec = {"name": "B", "rows": "method", "values": ["accuracy"]}
    with pytest.raises(ValueError, match=rf"'accuracy'.*{re.escape(str(nonnumeric / 'r'))}"):
        mt.build_table(spec, mt.load_runs([nonnumeric]))
    with pytest.raises(ValueError, match="unknown spec keys"):
        mt.build_table({**A1, "colums": "x"}, runs)
    with pytest.raises(ValueError, match="either 'columns' and 'value', or 'values'"):
        mt.build_table({"name": "X", "rows": "method", "columns": "num_experts"}, runs)
    with pytest.raises(FileNotFoundError):
        mt.load_runs([tmp_path / "nowhere"])


def test_folders_missing_a_file_are_skipped_with_a_warning(sweep, tmp_path):
    runs, _ = sweep
    half = tmp_path / "runs" / "sweep" / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    with pytest.warns(UserWarning, match=rf"skipping {re.escape(str(half))}: no metrics.json"):
        again = mt.load_runs([tmp_path / "runs", tmp_path / "runs" / "sweep"])  # overlapping
    assert [r.path for r in again] == [r.path for r in runs]


def test_cli_writes_the_tables(sweep, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            "experiments/make_tables.py",
            f"--runs={tmp_path / 'runs'}",
            f"--out={out}",
            "--only=A1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(f.name for f in out.iterdir()) == ["A1.csv", "A1.md", "A1.png", "index.md"]
    assert "6 runs -> 4 files" in proc.stdout
    header, body = parse_markdown((out / "A1.md").read_text())
    assert header == ["method", "num_experts=2", "num_experts=4"] and len(body) == 3
