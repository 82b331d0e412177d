"""Render Markdown + CSV tables and PNG figures from experiment run folders.

A run folder is any folder below the given roots holding both ``config.json`` (the run's full
config as nested JSON, with a ``tables`` list of table specs) and ``metrics.json``
(``{"records": [{field: scalar}, ...], "runtime_s": ..., ...}``). Every record is joined with its
run's flattened config (dotted keys such as ``karcher.tol``; record fields win on a clash), and
each cell aggregates all records, over all runs and seeds, sharing its row and column labels
into mean ± sample std (ddof=1; the mean alone when n = 1).

    python experiments/make_tables.py --runs=results/A1[,results/A2] --out=results/tables \
        [--only=A1,A2]

writes per table ``<name>.md``, ``<name>.csv`` (tidy: ``row, column, mean, std, n``) and, if the
spec has a figure, ``<name>.png`` (error bars: std over records), plus an ``index.md`` of all
tables. Specs come from the runs' configs (deduplicated by name) or are passed to ``render``.
An example spec::

    {"name": "A1", "title": "Normalized accuracy vs number of experts",
     "rows": "method",                    # field (or list of fields: compound rows)
     "columns": "num_experts",            # field giving the column labels ...
     "value": "normalized_accuracy",      # ... and the metric in each cell
     # "values": ["accuracy", "kl"],      # or instead of columns/value: one column per metric
     "where": {"task": "avg"},            # keep records with field == value (a list: any of)
     "row_order": ["linear", "karcher"],  # else first-seen; "column_order": else sorted
     "format": ".3f", "formats": {"invariant": "yes/no"},  # per-column override
     "seed_key": "seed",
     "figure": {"kind": "line", "x": "layer", "y": "activation_variance", "hue": "method",
                "facet": "num_experts", "logy": False}}   # kind: line | bar; optional "where"

Records lacking a table's row, column or value field (or holding null there) are left out of
it. A cell without records renders "–" and is listed in ``Table.missing``. Labels listed in
``row_order``/``column_order`` always get a row/column; labels seen but not listed follow them.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SPEC_KEYS = frozenset(
    "name title rows columns value values where row_order column_order format formats seed_key "
    "figure".split()
)
FIGURE_KEYS = frozenset("kind x y hue facet logy where".split())
MISSING = "–"
YES_NO = "yes/no"
DPI, FACET_WIDTH, FIGURE_HEIGHT = 120, 4.5, 3.6  # inches per facet subplot, at DPI


@dataclass
class Run:
    path: Path
    config: dict
    flat_config: dict
    records: list[dict]
    metrics: dict

    def joined(self) -> list[dict]:
        """The records joined with the flat config; record fields win on a clash."""
        return [{**self.flat_config, **flatten(r)} for r in self.records]


def flatten(d: Mapping, prefix: str = "") -> dict:
    """{"karcher": {"tol": 1e-6}} -> {"karcher.tol": 1e-6}; lists stay values."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from e


def load_runs(roots: Sequence[str | os.PathLike] | str | os.PathLike) -> list[Run]:
    """Every run folder at or below the roots, sorted by path within each root."""
    if isinstance(roots, str | os.PathLike):
        roots = [roots]
    runs, seen = [], set()
    for root in map(Path, roots):
        if not root.is_dir():
            raise FileNotFoundError(f"run root {root} is not a folder")
        folders = {p.parent for name in ("config.json", "metrics.json") for p in root.rglob(name)}
        for folder in sorted(folders):
            if folder.resolve() in seen:
                continue
            seen.add(folder.resolve())
            config_path, metrics_path = folder / "config.json", folder / "metrics.json"
            if not (config_path.is_file() and metrics_path.is_file()):
                lacking = "metrics.json" if config_path.is_file() else "config.json"
                warnings.warn(f"skipping {folder}: no {lacking}", stacklevel=2)
                continue
            config, metrics = _read_json(config_path), _read_json(metrics_path)
            if not isinstance(config, dict):
                raise ValueError(f"{config_path}: expected a JSON object")
            records = metrics.get("records") if isinstance(metrics, dict) else None
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise ValueError(f'{metrics_path}: expected {{"records": [{{field: value}}, ...]}}')
            runs.append(Run(folder, config, flatten(config), records, metrics))
    return runs


def _check_spec(spec: Mapping) -> dict:
    """The spec as a dict, keys set to None (config placeholders) dropped; raises if invalid."""
    spec = {k: v for k, v in spec.items() if v is not None}
    name = spec.get("name")
    if not isinstance(name, str) or not name or Path(name).name != name or "rows" not in spec:
        raise ValueError(f"a table spec needs a file-stem 'name' and 'rows': {spec}")
    if unknown := set(spec) - SPEC_KEYS:
        raise ValueError(f"table {name!r}: unknown spec keys {sorted(unknown)}")
    if ("columns" in spec) != ("value" in spec) or ("columns" in spec) == ("values" in spec):
        raise ValueError(f"table {name!r}: give either 'columns' and 'value', or 'values'")
    fig = spec.get("figure")
    if fig is not None and (
        set(fig) - FIGURE_KEYS
        or not {"x", "y"} <= set(fig)
        or fig.get("kind", "line") not in {"line", "bar"}
    ):
        raise ValueError(
            f"table {name!r}: figure needs x and y, kind line|bar, and only keys "
            f"{sorted(FIGURE_KEYS)}: {fig}"
        )
    return spec


def _hashable(v):
    return tuple(map(_hashable, v)) if isinstance(v, list) else v


def _records(runs: Sequence[Run], where: Mapping):
    """(run, joined record) pairs matching where: field == value, or value in a list."""
    for run in runs:
        for rec in run.joined():
            if all(
                k in rec and (rec[k] in want if isinstance(want, list) else rec[k] == want)
                for k, want in where.items()
            ):
                yield run, rec


def _label(rec: Mapping, fields: Sequence[str]):
    """The value (one field) or tuple of values (compound) labelling a record; None if absent."""
    values = [rec.get(f) for f in fields]
    if any(v is None for v in values):
        return None
    values = [_hashable(v) for v in values]
    return values[0] if len(values) == 1 else tuple(values)


def _number(v, name: str, run: Run) -> float:
    if isinstance(v, bool | int | float):
        return float(v)
    raise ValueError(f"field {name!r} is not numeric ({v!r}) in a record of run folder {run.path}")


def _sort_key(v):
    if isinstance(v, bool | int | float):
        return (0, v, "")
    return (1, 0, str(v))


def _text(v) -> str:
    if isinstance(v, tuple):
        return ",".join(map(_text, v))
    return (f"{v:g}" if isinstance(v, float) else str(v)).replace("|", r"\|")


def _ordered(seen: Sequence, explicit: Sequence | None) -> list:
    head = [_hashable(v) for v in explicit or []]
    return head + [v for v in seen if v not in head]


@dataclass
class Table:
    name: str
    title: str
    row_fields: tuple[str, ...]
    column_field: str | None  # None: one column per metric ("values")
    row_labels: list
    col_labels: list
    cells: dict  # {(row, col): (mean, std, n)}; std is nan when n == 1
    missing: list  # [(row, col)] without records
    seeds: dict = field(default_factory=dict)  # {(row, col): frozenset of seed values}
    runs: list[Path] = field(default_factory=list)
    fmt: str = ".3f"
    formats: dict = field(default_factory=dict)
    spec: dict = field(default_factory=dict)

    def cell_text(self, row, col) -> str:
        if (row, col) not in self.cells:
            return MISSING
        mean, std, n = self.cells[row, col]
        fmt = self.formats.get(col, self.formats.get(_text(col), self.fmt))
        if fmt == YES_NO:
            if mean in (0, 1):
                return "yes" if mean == 1 else "no"
            return f"yes in {round(mean * n)}/{n}"  # mixed across seeds: say how often
        return f"{mean:{fmt}}" if n == 1 else f"{mean:{fmt}} ± {std:{fmt}}"

    def footnote(self) -> str:
        if not self.cells:
            return "No records matched this table."
        per_cell = {k: len(self.seeds[k] - {None}) for k in self.cells}
        all_seeds = len(frozenset().union(*self.seeds.values()) - {None})
        ns = [n for _, _, n in self.cells.values()]
        if all(n == per_cell[k] for k, (_, _, n) in self.cells.items()):
            counts = Counter(per_cell.values())
            text = f"mean ± std (ddof=1) over {all_seeds} seeds"
            if len(counts) > 1:
                usual = counts.most_common(1)[0][0]
                odd = [
                    f"{_text(r)}/{_text(c)}: {s}" for (r, c), s in per_cell.items() if s != usual
                ]
                more = f", … ({len(odd) - 10} more)" if len(odd) > 10 else ""
                text += f"; seeds per cell: {usual}, except " + ", ".join(odd[:10]) + more
        else:
            span = f"{min(ns)}–{max(ns)}" if min(ns) < max(ns) else min(ns)
            text = f"mean ± std (ddof=1) over each cell's records (n = {span}, see CSV)"
            text += f" from {all_seeds} seeds" if all_seeds else ""
        if min(ns) == 1:
            text += "; cells with a single record show the mean alone"
        if self.missing:
            text += f"; {MISSING}: no records"
        return f"{text} (runs: {_runs_text(self.runs)})."

    def markdown(self) -> str:
        def line(cells):
            return "| " + " | ".join(cells) + " |"

        cols = [
            _text(c) if self.column_field is None else f"{self.column_field}={_text(c)}"
            for c in self.col_labels
        ]
        lines = [f"## {self.name}" + (f": {self.title}" if self.title else ""), ""]
        lines += [line([*self.row_fields, *cols])]
        lines += [line(["---"] * len(self.row_fields) + ["---:"] * len(cols))]
        for r in self.row_labels:
            labels = r if len(self.row_fields) > 1 else (r,)
            lines.append(
                line([*map(_text, labels), *(self.cell_text(r, c) for c in self.col_labels)])
            )
        return "\n".join([*lines, "", self.footnote()]) + "\n"

    def to_csv_rows(self) -> list[list]:
        """Header ["row" | the row fields..., "column", "mean", "std", "n"], then one row per
        cell (empty cells too, with n = 0 and empty mean/std)."""
        compound = len(self.row_fields) > 1
        rows = [[*(self.row_fields if compound else ["row"]), "column", "mean", "std", "n"]]
        for r in self.row_labels:
            for c in self.col_labels:
                mean, std, n = self.cells.get((r, c), (None, None, 0))
                rows.append(
                    [
                        *(r if compound else (r,)),
                        c,
                        "" if mean is None else mean,
                        "" if std is None or math.isnan(std) else std,
                        n,
                    ]
                )
        return rows


def _runs_text(paths: Sequence[Path]) -> str:
    if not paths:
        return "none"
    common = Path(os.path.commonpath([str(p) for p in paths]))
    if len(paths) > 6:
        return f"{len(paths)} folders under {common}"
    if len(paths) == 1:
        return str(paths[0])
    return f"{common}/{{" + ", ".join(str(p.relative_to(common)) for p in paths) + "}"


def build_table(spec: Mapping, runs: Sequence[Run]) -> Table:
    spec = _check_spec(spec)
    rows = spec["rows"]
    row_fields = (rows,) if isinstance(rows, str) else tuple(rows)
    seed_key = spec.get("seed_key", "seed")
    values: dict = {}
    seeds: dict = {}
    row_seen, col_seen, used = {}, {}, {}
    for run, rec in _records(runs, spec.get("where", {})):
        row = _label(rec, row_fields)
        if row is None:
            continue
        if "columns" in spec:
            col = _label(rec, [spec["columns"]])
            pairs = [] if col is None else [(col, spec["value"])]
        else:
            pairs = [(name, name) for name in spec["values"]]
        for col, name in pairs:
            if rec.get(name) is None:
                continue
            values.setdefault((row, col), []).append(_number(rec[name], name, run))
            seeds.setdefault((row, col), set()).add(_hashable(rec.get(seed_key)))
            row_seen[row] = col_seen[col] = used[run.path] = None
    row_labels = _ordered(list(row_seen), spec.get("row_order"))
    if "columns" in spec:
        col_labels = _ordered(sorted(col_seen, key=_sort_key), spec.get("column_order"))
    else:
        col_labels = _ordered(list(spec["values"]), spec.get("column_order"))
    cells = {}
    for k, v in values.items():
        a = np.asarray(v, dtype=np.float64)
        cells[k] = (float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan, a.size)
    missing = [(r, c) for r in row_labels for c in col_labels if (r, c) not in cells]
    return Table(
        name=spec["name"],
        title=spec.get("title", ""),
        row_fields=row_fields,
        column_field=spec.get("columns"),
        row_labels=row_labels,
        col_labels=col_labels,
        cells=cells,
        missing=missing,
        seeds={k: frozenset(s) for k, s in seeds.items()},
        runs=list(used),
        fmt=spec.get("format", ".3f"),
        formats=dict(spec.get("formats", {})),
        spec=spec,
    )


def _atomic_write(path: Path, write, binary: bool = False) -> Path:
    """Write through write(fh) to a temp file next to path, then rename it over path."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        kwargs = {} if binary else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, "wb" if binary else "w", **kwargs) as fh:
            write(fh)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def draw_figure(table: Table, runs: Sequence[Run], path: Path) -> Path | None:
    """The table's figure spec as a PNG: y against x per hue, one subplot per facet value, error
    bars = std (ddof=1) over the records of each point. None (and a warning) if no records."""
    from matplotlib.figure import Figure  # Agg canvas; no pyplot state
    from matplotlib.ticker import MaxNLocator

    fig_spec = table.spec["figure"]
    x, y, hue, facet = fig_spec["x"], fig_spec["y"], fig_spec.get("hue"), fig_spec.get("facet")
    groups: dict = {}
    where = {**table.spec.get("where", {}), **fig_spec.get("where", {})}
    for run, rec in _records(runs, where):
        keys = [_label(rec, [f]) if f else "" for f in (facet, hue, x)]
        if rec.get(y) is not None and None not in keys:
            groups.setdefault(tuple(keys), []).append(_number(rec[y], y, run))
    if not groups:
        warnings.warn(f"table {table.name}: no records for its figure", stacklevel=2)
        return None
    facets = sorted({k[0] for k in groups}, key=_sort_key)
    hues = list(dict.fromkeys(k[1] for k in groups))
    xs = sorted({k[2] for k in groups}, key=_sort_key)
    numeric_x = fig_spec.get("kind", "line") == "line" and all(_sort_key(v)[0] == 0 for v in xs)
    fig = Figure(figsize=(FACET_WIDTH * len(facets), FIGURE_HEIGHT), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(facets), sharey=True, squeeze=False)[0]
    for ax, f in zip(axes, facets):
        for i, h in enumerate(hues):
            points = [(xv, np.asarray(groups[f, h, xv])) for xv in xs if (f, h, xv) in groups]
            if not points:
                continue
            means = [v.mean() for _, v in points]
            stds = [v.std(ddof=1) if v.size > 1 else 0.0 for _, v in points]
            label = _text(h) if hue else y
            if fig_spec.get("kind", "line") == "line":
                pos = [xv if numeric_x else xs.index(xv) for xv, _ in points]
                ax.errorbar(pos, means, yerr=stds, marker="o", capsize=3, label=label)
            else:
                width = 0.8 / len(hues)
                pos = [xs.index(xv) - 0.4 + width * (i + 0.5) for xv, _ in points]
                ax.bar(pos, means, width, yerr=stds, capsize=3, label=label)
        if not numeric_x:
            ax.set_xticks(range(len(xs)), [_text(v) for v in xs])
        elif all(isinstance(v, int) for v in xs):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(x)
        if facet:
            ax.set_title(f"{facet}={_text(f)}")
        if fig_spec.get("logy"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(y)
    if hue:
        axes[-1].legend(title=hue, fontsize="small")
    fig.suptitle(table.title or table.name)
    return _atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=DPI), binary=True)


def specs_from_runs(runs: Sequence[Run]) -> list[dict]:
    """The table specs of the runs' configs, deduplicated by name in first-seen order; each
    keeps only the runs of the experiment (config ``name``) whose config defines it."""
    specs: dict[str, dict] = {}
    for run in runs:
        tables = run.config.get("tables") or []
        if isinstance(tables, Mapping):  # {name: spec} also works
            tables = [{"name": name, **spec} for name, spec in tables.items()]
        for spec in tables:
            spec = _check_spec(spec)
            # A config's tables describe that experiment's runs: unless its `where` says
            # otherwise, a spec keeps the runs whose config has the same `name`.
            if run.config.get("name") is not None and "name" not in spec.get("where", {}):
                spec = {**spec, "where": {"name": run.config["name"], **spec.get("where", {})}}
            if spec["name"] in specs and specs[spec["name"]] != spec:
                warnings.warn(
                    f"table {spec['name']}: {run.path} has a different spec; keeping the first",
                    stacklevel=2,
                )
            specs.setdefault(spec["name"], spec)
    return list(specs.values())


def render(
    runs: Sequence[Run],
    out_dir: str | os.PathLike,
    specs: Sequence[Mapping] | None = None,
    *,
    only: Sequence[str] | str | None = None,
) -> list[Path]:
    """Writes <name>.md, <name>.csv, <name>.png (with a figure) per table and index.md (the
    rendered tables, in order) into out_dir; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if specs is None:
        specs = specs_from_runs(runs)
    else:
        specs = [_check_spec(s) for s in specs]
        if dup := [n for n, c in Counter(s["name"] for s in specs).items() if c > 1]:
            raise ValueError(f"duplicate table names {dup}")
    if only is not None:
        only = [only] if isinstance(only, str) else list(only)
        if unknown := set(only) - {s["name"] for s in specs}:
            raise ValueError(f"--only names unknown tables {sorted(unknown)}")
        specs = [s for s in specs if s["name"] in only]
    if not specs:
        warnings.warn("no table specs: writing an empty index.md", stacklevel=2)
    written, sections = [], ["# Tables", ""]
    for spec in specs:
        table, name = build_table(spec, runs), spec["name"]
        if not table.cells:
            warnings.warn(f"table {name}: no records matched", stacklevel=2)
        elif table.missing:
            cells = ", ".join(f"{_text(r)}/{_text(c)}" for r, c in table.missing[:10])
            warnings.warn(f"table {name}: {len(table.missing)} empty cells: {cells}", stacklevel=2)
        md = table.markdown()
        written.append(_atomic_write(out / f"{name}.md", lambda fh, md=md: fh.write(md)))
        rows = table.to_csv_rows()
        written.append(
            _atomic_write(
                out / f"{name}.csv",
                lambda fh, rows=rows: csv.writer(fh, lineterminator="\n").writerows(rows),
            )
        )
        if "figure" in spec and (png := draw_figure(table, runs, out / f"{name}.png")):
            written.append(png)
            md += f"\n![{name}]({name}.png)\n"
        sections.append(md)
    index = "\n".join(sections)
    written.append(_atomic_write(out / "index.md", lambda fh: fh.write(index)))
    return written


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    runs = load_runs(flags.FLAGS.runs)
    if not runs:
        raise app.UsageError(
            f"no run folders (config.json + metrics.json) under {flags.FLAGS.runs}"
        )
    paths = render(runs, flags.FLAGS.out, only=flags.FLAGS.only)
    print(f"{len(runs)} runs -> {len(paths)} files in {flags.FLAGS.out}")
    for p in paths:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    from absl import app, flags

    # flags are defined here, not at import, so importing this module next to other absl apps
    # (experiments/run.py) defines no clashing flags
    flags.DEFINE_list("runs", None, "Comma-separated roots searched for run folders.")
    flags.DEFINE_string("out", None, "Output folder for the tables and figures.")
    flags.DEFINE_list("only", None, "Render only these tables (comma-separated names).")
    flags.mark_flags_as_required(["runs", "out"])
    app.run(main)
