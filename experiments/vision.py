"""Vision merging experiment: one pretrained MLP backbone, N fully fine-tuned task experts.

1. **Base**: an MLP pretrained on a mixture of the image sources (Fashion-MNIST, MNIST,
   digits), one shared 10-way head (``config.base``).
2. **Experts**: the base fine-tuned, all weights, on one task each (``config.tasks[:N]``, e.g.
   ``"fashion_mnist@90"`` = rotated by 90 degrees; ``config.expert``, with per-expert step and
   learning-rate multipliers for heterogeneity). Every task is 10-way, so all experts share the
   label space and the merged model is one whole network (no per-task heads).
3. **Merge** every method of ``config.methods`` (entries like ``"ties(density=0.3)"``) on the
   experts' full parameter trees, with the base as the base model; methods that need Fisher
   or Gram statistics get them from each expert on its own training inputs.
4. **Measure** (ALGORITHMS.md section 8) per task: accuracy, normalised accuracy (merged /
   expert), KL from the expert to the merged model; over a probe set drawn from every task's
   test inputs: activation variance per hidden layer and its ratio to the experts', effective
   rank of the activation covariance, the Fisher–Rao distance to the barycenter of the
   experts' predictions; per tensor: the task-vector norm ratio.

Bases and experts are cached by config hash (:func:`manifold_merge.training.cached`).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import (
    cache_dir,
    check_keys,
    function_space,
    mean_norm_ratio,
    parse_method,
    softmax,
    task_records,
)
from manifold_merge import diagnostics, merge
from manifold_merge.data import Task, image_task
from manifold_merge.merging.registry import get_method
from manifold_merge.models import MLP
from manifold_merge.stats import diagonal_fisher, input_grams
from manifold_merge.training import cached, cross_entropy_loss, evaluate, train

NUM_CLASSES = 10
KEYS = (
    "experiment", "name", "seed", "num_experts", "tasks", "data", "model", "base", "expert",
    "methods", "progress", "cache_dir", "tables", "heterogeneity",
)  # fmt: skip


def parse_task(entry: str) -> tuple[str, int]:
    """``"mnist@90"`` -> ``("mnist", 90)``; ``"digits"`` -> ``("digits", 0)``."""
    source, _, rot = entry.partition("@")
    return source, int(rot or 0)


def _task(entry: str, data, seed: int) -> Task:
    source, rotation = parse_task(entry)
    return image_task(
        source,
        rotation=rotation,
        n_train=data.n_train,
        n_test=data.n_test,
        seed=seed,
        name=entry,
    )


def _model(config) -> MLP:
    return MLP(
        widths=tuple(config.model.widths),
        num_classes=NUM_CLASSES,
        activation=config.model.activation,
    )


def _apply(model):
    return jax.jit(lambda p, x: model.apply({"params": p}, x))


def _train_base(config, model, progress: bool) -> dict:
    cfg = config.base
    xs, ys = [], []
    for i, source in enumerate(cfg.sources):
        t = image_task(source, n_train=cfg.n_train, n_test=1, seed=config.seed + i)
        xs.append(t.x_train)
        ys.append(t.y_train)
    x, y = np.concatenate(xs), np.concatenate(ys)
    init = model.init(jax.random.key(config.seed), jnp.zeros((1, x.shape[1])))["params"]
    params, _ = train(
        cross_entropy_loss(_apply(model)),
        init,
        (x, y),
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        optimizer="adam",
        seed=config.seed,
        progress=progress,
        desc="base",
    )
    return params


def _scale(values, i: int) -> float:
    return float(values[i]) if len(values) > i else 1.0


def _expert_cfg(config, i: int, entry: str) -> dict:
    e = config.expert
    return {
        "task": entry,
        "n_train": config.data.n_train,
        "steps": int(round(e.steps * _scale(e.steps_scale, i))),
        "learning_rate": e.learning_rate * _scale(e.lr_scale, i),
        "batch_size": e.batch_size,
        "seed": config.seed * 1000 + i,
    }


def _base_cfg(config) -> dict:
    return {
        "kind": "vision_base",
        "model": config.model.to_dict(),
        "base": config.base.to_dict(),
        "seed": config.seed,
    }


def _collect_stats(names, experts, tasks, model, config, progress):
    """Fisher / Gram statistics for the methods that need them, each expert on its task."""
    needed = {s for n in names for s in get_method(n).stats}
    stats: dict[str, list] = {}
    # Not jitted: the statistics trace the model themselves (input_grams intercepts the Dense
    # calls at trace time, which a cached jitted function would skip).
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    n = config.data.n_stats
    if "fishers" in needed:
        stats["fishers"] = [
            diagonal_fisher(
                apply,
                p,
                t.x_train[:n],
                kind="true",
                key=jax.random.key(config.seed + i),
                progress=progress,
            )
            for i, (p, t) in enumerate(zip(experts, tasks))
        ]
    if "grams" in needed:
        stats["grams"] = [
            input_grams(apply, p, t.x_train[:n], progress=progress) for p, t in zip(experts, tasks)
        ]
    return stats


def _hidden(model, params, x) -> list[np.ndarray]:
    _, hidden = model.apply({"params": params}, x, return_hidden=True)
    return [np.asarray(h, np.float64) for h in hidden]


def _experts_to_barycenter(expert_logits) -> float:
    """Mean over experts of the Fisher–Rao distance of their predictions to the barycenter of
    all experts' predictions: how far apart the experts are in function space."""
    probs = [softmax(z) for z in expert_logits]
    bary = diagnostics.fisher_rao_barycenter(probs)
    return float(np.mean([np.mean(diagnostics.fisher_rao_distance(p, bary)) for p in probs]))


def run(config, workdir: str | None = None) -> dict[str, Any]:
    """Train (or load) the base and experts, merge with every method, return the metrics:
    ``{"records": [...], "runtime_s": ...}`` (see the module docstring for the fields)."""
    check_keys(config, KEYS, "vision experiment")
    start = time.perf_counter()
    progress = bool(config.progress)
    n = int(config.num_experts)
    if not 1 <= n <= len(config.tasks):
        raise ValueError(f"num_experts must be in 1..{len(config.tasks)}, got {n}")
    model = _model(config)
    apply = _apply(model)
    cache = cache_dir(config)
    base_cfg = _base_cfg(config)
    base = cached(cache, base_cfg, lambda: _train_base(config, model, progress))
    entries = list(config.tasks[:n])
    tasks = [_task(e, config.data, config.seed) for e in entries]
    experts = []
    for i, (entry, task) in enumerate(zip(entries, tasks)):
        ecfg = _expert_cfg(config, i, entry)

        def build(ecfg=ecfg, task=task):
            params, _ = train(
                cross_entropy_loss(apply),
                base,
                (task.x_train, task.y_train),
                steps=ecfg["steps"],
                batch_size=ecfg["batch_size"],
                learning_rate=ecfg["learning_rate"],
                optimizer="adam",
                seed=ecfg["seed"],
                progress=progress,
                desc=f"expert {task.name}",
            )
            return params

        experts.append(cached(cache, {"kind": "vision_expert", "base": base_cfg, **ecfg}, build))

    # Probe set for the collapse diagnostics: test inputs of every task, equally many each.
    probe = np.concatenate([t.x_test[: config.data.n_probe] for t in tasks])
    records: list[dict] = []
    expert_test_logits = [
        [evaluate(apply, p, t.x_test, t.y_test).logits for t in tasks] for p in experts
    ]
    expert_acc = [diagnostics.accuracy(expert_test_logits[i][i], tasks[i].y_test) for i in range(n)]
    expert_hidden = [_hidden(model, p, probe) for p in experts]
    expert_probe_logits = [np.asarray(apply(p, probe)) for p in experts]
    num_layers = len(expert_hidden[0])

    def measure(label: str, params) -> None:
        accs, kls = [], []
        for i, t in enumerate(tasks):
            logits = evaluate(apply, params, t.x_test, t.y_test).logits
            acc = diagnostics.accuracy(logits, t.y_test)
            kl = diagnostics.mean_kl(expert_test_logits[i][i], logits)
            accs.append(acc)
            kls.append(kl)
        rows, avg = task_records(label, [t.name for t in tasks], accs, expert_acc, kls)
        records.extend(rows)
        hidden = _hidden(model, params, probe)
        fs = function_space(expert_probe_logits, np.asarray(apply(params, probe)))
        ratios = diagnostics.layer_variance_ratios(hidden, expert_hidden)
        ranks = diagnostics.layer_effective_ranks(hidden)
        for layer in range(num_layers):
            records.append(
                {
                    "method": label,
                    "layer": layer + 1,
                    "activation_variance": diagnostics.activation_variance(hidden[layer]),
                    "variance_ratio": ratios[layer],
                    "effective_rank": ranks[layer],
                }
            )
        records.append(
            {
                **avg,
                "fr_distance": fs["fr_distance"],
                "variance_ratio": float(np.mean(ratios)),
                "effective_rank": ranks[-1],
                "norm_ratio": mean_norm_ratio(params, experts, base),
            }
        )

    # Reference rows: the experts themselves (per-layer figures averaged over experts) and
    # the base model.
    for i, t in enumerate(tasks):
        records.append(
            {
                "method": "expert",
                "task": t.name,
                "accuracy": expert_acc[i],
                "normalized_accuracy": 1.0,
                "kl": 0.0,
            }
        )
    records.append(
        {
            "method": "expert",
            "task": "avg",
            "accuracy": float(np.mean(expert_acc)),
            "normalized_accuracy": 1.0,
            "kl": 0.0,
            "fr_distance": _experts_to_barycenter(expert_probe_logits),
            "norm_ratio": 1.0,  # mean_i ||tau_i|| / mean_j ||tau_j||, by definition
            "variance_ratio": 1.0,
            "effective_rank": float(
                np.mean([diagnostics.effective_rank(h[-1]) for h in expert_hidden])
            ),
        }
    )
    for layer in range(num_layers):
        records.append(
            {
                "method": "expert",
                "layer": layer + 1,
                "activation_variance": float(
                    np.mean([diagnostics.activation_variance(h[layer]) for h in expert_hidden])
                ),
                "variance_ratio": 1.0,
                "effective_rank": float(
                    np.mean([diagnostics.effective_rank(h[layer]) for h in expert_hidden])
                ),
            }
        )
    measure("base", base)

    specs = [parse_method(m) for m in config.methods]
    stats = _collect_stats([s[1] for s in specs], experts, tasks, model, config, progress)
    timings = {}
    for label, name, params in specs:
        spec = get_method(name)
        kwargs = dict(params)
        for sname in spec.stats:
            if sname in stats:
                kwargs[sname] = stats[sname]
        t0 = time.perf_counter()
        result = merge(name, experts, base=base if spec.uses_base else None, **kwargs)
        timings[label] = time.perf_counter() - t0
        measure(label, jax.tree.map(np.asarray, result.params))
    return {
        "records": records,
        "expert_accuracy": dict(zip(entries, expert_acc)),
        "merge_time_s": timings,
        "runtime_s": time.perf_counter() - start,
    }
