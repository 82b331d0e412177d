"""The README's main job and the notebooks run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_demo_main_job_runs_and_reports(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "experiments/demo.py",
            "--config=configs/demo.py:smoke",
            "--config.num_experts=4",
            f"--workdir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "manifold_merge demo: 4 experts" in out.stdout
    reports = json.loads((tmp_path / "report.json").read_text())["reports"]
    assert set(reports) == {"task_arithmetic", "nre", "multislerp", "ties", "karcher"}
    karcher, linear = reports["karcher"], reports["task_arithmetic"]
    assert len(karcher) == 4 and all(r["converged"] for r in karcher.values())
    # Karcher on the spherical proxy keeps the mean norm of the task vectors; averaging
    # random (near-orthogonal) task vectors shrinks it
    assert all(abs(r["norm_ratio"] - 1) < 1e-5 for r in karcher.values())
    assert all(r["norm_ratio"] < 0.9 for t, r in linear.items() if r["shape"] != [4])
    assert "karcher steps" in out.stdout


def test_demo_rejects_a_bad_config_value(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "experiments/demo.py",
            "--config=configs/demo.py:smoke",
            "--config.mode=everything",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0 and "config.mode" in out.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_executes(path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()


def test_there_is_a_notebook():
    assert list((ROOT / "notebooks").glob("*.ipynb"))


def test_readme_python_examples_run():
    text = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    runnable = [b for b in blocks if "karcher_mean(manifold, points" not in b]  # signature only
    assert len(runnable) >= 2
    for block in runnable:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
