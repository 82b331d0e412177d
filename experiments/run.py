"""Run one experiment config, or its whole sweep, into run folders.

    python experiments/run.py --config=configs/vision_merge.py:smoke --workdir=runs/vision
    python experiments/run.py --config=configs/vision_merge.py --config.num_experts=8 \\
        --config.methods='("linear", "karcher")' --workdir=runs/vision_n8
    python experiments/run.py --config=configs/vision_merge.py --sweep --workdir=runs/a1

A config file defines ``get_config(arg)`` (``arg`` after the colon, e.g. ``smoke``) and may
define ``get_sweep(arg)``: a list of ``{dotted.key: value}`` overrides. ``config.experiment``
names the module of ``experiments/`` whose ``run(config, workdir)`` does the work.

Each run folder holds ``config.json`` (the config as run) and ``metrics.json`` (the tidy
records ``experiments/make_tables.py`` renders), both written atomically. With ``--sweep``
every point goes to ``WORKDIR/<key=value,...>/``; points whose folder already holds a
``metrics.json`` for the same config are skipped (``--force`` reruns them), so an interrupted
sweep resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments.common import cache_dir, quiet_logs, write_json  # noqa: E402
from manifold_merge.compilation import enable_compilation_cache  # noqa: E402


def define_flags() -> None:
    """The command line's flags, defined only when this file runs as a script, so that other
    modules (reproduce.py, the tests) import its functions without defining absl flags."""
    config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    flags.DEFINE_string("workdir", None, "Run folder (the sweep's root with --sweep).")
    flags.DEFINE_bool("sweep", False, "Run every point of the config's get_sweep().")
    flags.DEFINE_bool("force", False, "Rerun points that already have metrics.json.")


def experiment_module(config):
    """The ``experiments.<config.experiment>`` module (it must define ``run``)."""
    name = config.get("experiment")
    if not name:
        raise ValueError("the config has no 'experiment' field naming the experiment to run")
    try:
        module = importlib.import_module(f"experiments.{name}")
    except ModuleNotFoundError as e:
        raise ValueError(f"config.experiment={name!r}: no module experiments/{name}.py") from e
    if not hasattr(module, "run"):
        raise ValueError(f"experiments/{name}.py has no run(config, workdir) function")
    return module


def set_dotted(config, key: str, value) -> None:
    """``config.a.b = value`` for ``key = "a.b"``, refusing keys the config does not have."""
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        if p not in node:
            raise KeyError(f"sweep override {key!r}: the config has no field {p!r}")
        node = node[p]
    if leaf not in node:
        raise KeyError(f"sweep override {key!r}: the config has no field {leaf!r}")
    with node.unlocked() if hasattr(node, "unlocked") else contextlib.nullcontext():
        node[leaf] = value


def point_name(overrides: dict) -> str:
    """A folder name for one sweep point: ``num_experts=4,seed=1``."""
    return ",".join(f"{k}={_short(v)}" for k, v in overrides.items()) or "default"


def _short(v) -> str:
    text = "-".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:60]


def run_one(config, workdir: str | Path, *, force: bool = False) -> dict:
    """Run ``config`` into ``workdir`` (config.json, metrics.json); returns the metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    as_dict = json.loads(config.to_json_best_effort())
    metrics_path = workdir / "metrics.json"
    if not force and metrics_path.exists() and (workdir / "config.json").exists():
        if json.loads((workdir / "config.json").read_text()) == as_dict:
            print(f"run.py: {workdir} is up to date (use --force to rerun)", flush=True)
            return json.loads(metrics_path.read_text())
    module = experiment_module(config)
    enable_compilation_cache(cache_dir(config) / "xla")
    write_json(workdir / "config.json", as_dict)
    start = time.perf_counter()
    metrics = module.run(config, str(workdir))
    metrics.setdefault("runtime_s", time.perf_counter() - start)
    write_json(metrics_path, metrics)
    print(f"run.py: wrote {metrics_path} ({metrics['runtime_s']:.1f} s)", flush=True)
    return metrics


def sweep_points(config_path: str, arg: str) -> list[dict]:
    """The config file's ``get_sweep(arg)`` (``[{}]`` when it has none)."""
    spec = importlib.util.spec_from_file_location("_mm_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        return [{}]
    return list(module.get_sweep(arg))


def run_sweep(config, config_path: str, arg: str, workdir: str | Path, *, force=False):
    """Every point of the sweep, each in ``workdir/<point name>/``; returns the folders."""
    points = sweep_points(config_path, arg)
    folders = []
    for k, overrides in enumerate(points, start=1):
        cfg = copy.deepcopy(config)
        for key, value in overrides.items():
            set_dotted(cfg, key, value)
        folder = Path(workdir) / point_name(overrides)
        print(f"run.py: sweep point {k}/{len(points)}: {point_name(overrides)}", flush=True)
        run_one(cfg, folder, force=force)
        folders.append(folder)
    return folders


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_logs()
    f = flags.FLAGS
    if f.config is None or f.workdir is None:
        raise app.UsageError("--config and --workdir are required")
    if f.sweep:
        path, _, arg = config_flags.get_config_filename(f["config"]).partition(":")
        run_sweep(f.config, path, arg, f.workdir, force=f.force)
    else:
        run_one(f.config, f.workdir, force=f.force)


if __name__ == "__main__":
    define_flags()
    app.run(main)
