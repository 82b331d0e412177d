"""The reproduction: the papers' tables and figures, offline, in one command.

    python experiments/reproduce.py                 # the default set, reduced sizes (17 min
                                                    # measured on 2 cores, empty cache)
    python experiments/reproduce.py --full          # full sizes (not timed: much longer)
    python experiments/reproduce.py --smoke         # seconds-long versions (the tests run it)
    python experiments/reproduce.py --only=a1_vision,b2_toy --out=results

Steps: install the offline data if missing (``manifold_merge.data.fetch``), run every
config's sweep into ``--workdir/<config>/`` (resuming: finished points are skipped), then render
the tables (Markdown + CSV) and figures (PNG) of every config into ``--out`` with an
``index.md``. Trained experts and compiled XLA programs are cached (``$MM_CACHE_DIR``), so a
second run only re-renders.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from absl import app, flags  # noqa: E402

from experiments import make_tables  # noqa: E402
from experiments.common import quiet_logs  # noqa: E402
from experiments.run import run_sweep  # noqa: E402

#: The default set, in run order (A1 first: Figure A, A2 and the ablation reuse its experts).
CONFIGS = ("a1_vision", "fig_a", "a2_heterogeneity", "ablation", "b2_toy", "b1_lora")


def define_flags() -> None:
    """Defined only when run as a script (the tests import :func:`reproduce`)."""
    flags.DEFINE_bool("full", False, "Full sizes instead of the reduced default.")
    flags.DEFINE_bool("smoke", False, "Seconds-long versions of every config.")
    flags.DEFINE_list("only", None, f"Configs to run (default: all of {CONFIGS}).")
    flags.DEFINE_string("workdir", "runs/reproduce", "Root of the run folders.")
    flags.DEFINE_string("out", "results", "Where the tables and figures go.")


def mode(full: bool, smoke: bool) -> str:
    if full and smoke:
        raise app.UsageError("--full and --smoke exclude each other")
    return "smoke" if smoke else ("" if full else "reduced")


def config_arg(name: str, arg: str) -> str:
    """Configs without a ``reduced`` mode run their default size in the main job."""
    module = importlib.import_module(f"configs.{name}")
    if arg == "reduced":
        try:
            module.get_config("reduced")
        except ValueError:
            return ""
    return arg


def reproduce(names, arg: str, workdir: Path, out: Path, *, progress: bool = True) -> list:
    """Run the configs' sweeps and render their tables; returns the written files."""
    from manifold_merge.data import fetch

    start = time.perf_counter()
    print("reproduce: checking the offline data", flush=True)
    fetch(quiet=True)
    for k, name in enumerate(names, start=1):
        module = importlib.import_module(f"configs.{name}")
        this = config_arg(name, arg)
        config = module.get_config(this)
        if "progress" in config:
            config.progress = progress
        print(
            f"reproduce: [{k}/{len(names)}] {name}{':' + this if this else ''} "
            f"({time.perf_counter() - start:.0f} s so far)",
            flush=True,
        )
        run_sweep(config, str(ROOT / "configs" / f"{name}.py"), this, workdir / name)
    runs = make_tables.load_runs([workdir / n for n in names])
    files = make_tables.render(runs, out)
    print(
        f"reproduce: {len(files)} files in {out} ({time.perf_counter() - start:.0f} s in all)",
        flush=True,
    )
    return files


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_logs()
    f = flags.FLAGS
    names = f.only or list(CONFIGS)
    unknown = [n for n in names if not (ROOT / "configs" / f"{n}.py").exists()]
    if unknown:
        raise app.UsageError(f"--only: no config(s) {unknown}; choose from {CONFIGS}")
    reproduce(names, mode(f.full, f.smoke), Path(f.workdir), Path(f.out))


if __name__ == "__main__":
    define_flags()
    app.run(main)
