"""LoRA merging on the real all-MiniLM-L6-v2: one LoRA expert per text task, merged with every
LoRA method.

1. **Experts**: for each task (``config.tasks``: WordNet gloss -> part of speech, gloss ->
   lexicographer category, fortune -> topic), LoRA factors on ``config.lora.targets`` and a
   task head are trained on the frozen pretrained encoder (optax Adam, fixed-length token
   batches). Each expert is cached by config hash: its adapter as a PEFT folder (loadable by
   peft), its head as an Orbax checkpoint.
2. **Merge**: the adapters (scaling folded in) with every method of ``config.methods``
   (``lora_svd(rank=8)``, ``geomerge``, ...); each task keeps its own head.
3. **Measure** per task: accuracy of the merged encoder with the task's head, normalised by
   the expert's; KL from the expert to the merged model; the Fisher–Rao distance of the
   merged predictions to the barycenter of all experts' predictions through that task's head
   (on the task's test inputs). And whether the merge changes when every input adapter is
   reparametrised by a random well-conditioned G in GL(r) (b G, G^-1 a): the merged Delta W of
   each module is compared, relative Frobenius difference above 1e-3 = "changes".
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
    parse_method,
    task_records,
)
from manifold_merge import diagnostics, merge
from manifold_merge.data import text_task
from manifold_merge.io import write_peft_adapter
from manifold_merge.manifolds.lora import LoraFactors
from manifold_merge.models import (
    fold_lora,
    init_lora,
    init_text_classifier,
    load_minilm,
    lora_scaled,
    lora_to_peft,
    mean_pool,
    peft_to_lora,
)
from manifold_merge.training import cached, cached_folder, train

KEYS = (
    "experiment", "name", "seed", "tasks", "data", "lora", "train", "methods", "progress",
    "cache_dir", "tables", "gl_check",
)  # fmt: skip
GL_TOL = 1e-3


def _task(entry: str, data, seed: int):
    return text_task(
        entry,
        classes=int(data.num_classes),
        n_train=data.n_train,
        n_test=data.n_test,
        max_chars=data.max_chars,
        seed=seed,
        name=entry,
    )


def _tokens(tokenizer, texts, max_length: int) -> dict:
    return tokenizer.encode(list(texts), max_length=max_length)


def _train_expert(config, clf, params, lora, task, toks, key_seed, progress):
    """LoRA factors (raw, PEFT's convention) and the head, trained on the frozen encoder."""
    alpha, rank = float(config.lora.alpha), int(config.lora.rank)

    def loss_fn(p, batch, key):
        del key
        (ids, mask), y = batch
        variables = {"params": {"bert": p["bert"], "head": p["head"]}}
        logits = clf.apply(variables, ids, mask, lora=lora_scaled(p["lora"], alpha, rank))
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    start = {"bert": params["bert"], "head": params["head"], "lora": lora}
    data = ((toks["input_ids"], toks["attention_mask"]), task.y_train)
    trained, _ = train(
        loss_fn,
        start,
        data,
        steps=int(config.train.steps),
        batch_size=int(config.train.batch_size),
        learning_rate=float(config.train.learning_rate),
        optimizer="adam",
        seed=key_seed,
        trainable=lambda name: not name.startswith("bert"),
        progress=progress,
        desc=f"LoRA expert {task.name}",
    )
    return trained["lora"], trained["head"]


def _as_tree(lora) -> dict:
    return {m: {"b": np.asarray(f.b), "a": np.asarray(f.a)} for m, f in lora.items()}


def _reparametrised(lora, rng) -> dict:
    """Every module's factors moved within their GL(r) class: (b G, G^-1 a)."""
    out = {}
    for m, f in lora.items():
        r = f.b.shape[1]
        q, _ = np.linalg.qr(rng.standard_normal((r, r)))
        g = q @ np.diag(np.exp(rng.uniform(-1.0, 1.0, r)))  # condition number <= e^2
        out[m] = LoraFactors(np.asarray(f.b, np.float64) @ g, np.linalg.solve(g, f.a))
    return {m: LoraFactors(f.b.astype(np.float32), f.a.astype(np.float32)) for m, f in out.items()}


def _dense(lora) -> dict:
    return {m: np.asarray(f.b, np.float64) @ np.asarray(f.a, np.float64) for m, f in lora.items()}


def run(config, workdir: str | None = None) -> dict[str, Any]:
    """Train (or load) the LoRA experts, merge with every method, return the metrics."""
    check_keys(config, KEYS, "text_lora experiment")
    start = time.perf_counter()
    progress = bool(config.progress)
    module, encoder, tokenizer = load_minilm()
    tasks = [_task(e, config.data, config.seed) for e in config.tasks]
    max_len = int(config.data.max_length)
    cache = cache_dir(config)
    rank, alpha = int(config.lora.rank), float(config.lora.alpha)

    # Pooled features of an encoder (LoRA folded into the dense weights: one compile for all).
    @jax.jit
    def pooled(bert, ids, mask):
        states = module.apply({"params": bert}, ids, mask)
        return mean_pool(states, mask)

    def features(bert, toks, batch=64):
        ids, mask = toks["input_ids"], toks["attention_mask"]
        out = []
        for i in range(0, len(ids), batch):
            chunk = slice(i, i + batch)
            pad = batch - len(ids[chunk])
            cid = np.pad(ids[chunk], ((0, pad), (0, 0)))
            cmask = np.pad(mask[chunk], ((0, pad), (0, 0)))
            out.append(np.asarray(pooled(bert, cid, cmask))[: batch - pad])
        return np.concatenate(out)

    test_toks = [_tokens(tokenizer, t.x_test, max_len) for t in tasks]
    adapters, heads, experts_cfg = [], [], []
    for i, task in enumerate(tasks):
        ecfg = {
            "kind": "text_lora_expert",
            "task": task.name,
            "data": config.data.to_dict(),
            "lora": config.lora.to_dict(),
            "train": config.train.to_dict(),
            "seed": config.seed * 1000 + i,
        }
        clf, params = init_text_classifier(jax.random.key(ecfg["seed"]), encoder, task.num_classes)
        state: dict = {}

        def train_once(ecfg=ecfg, clf=clf, params=params, task=task):
            if not state:
                lora0 = init_lora(
                    jax.random.key(ecfg["seed"] + 1),
                    encoder,
                    rank=rank,
                    alpha=alpha,
                    targets=tuple(config.lora.targets),
                )
                toks = _tokens(tokenizer, task.x_train, max_len)
                state["lora"], state["head"] = _train_expert(
                    config, clf, params, lora0, task, toks, ecfg["seed"], progress
                )
            return state

        def write_adapter(path, train_once=train_once):
            adapter = lora_to_peft(train_once()["lora"], rank=rank, alpha=alpha)
            write_peft_adapter(path, adapter)

        folder = cached_folder(cache, ecfg, write_adapter)
        head = cached(cache, {**ecfg, "item": "head"}, lambda t=train_once: t()["head"])
        adapters.append(peft_to_lora(folder))  # scaled: Delta W = b @ a
        heads.append(head)
        experts_cfg.append(str(folder))

    def logits(feats, head):
        return feats @ np.asarray(head["kernel"]) + np.asarray(head["bias"])

    # Experts: features of every expert's encoder on every task's test inputs.
    expert_feats = [
        [features(fold_lora(encoder, ad), toks) for toks in test_toks] for ad in adapters
    ]
    expert_acc = [
        diagnostics.accuracy(logits(expert_feats[i][i], heads[i]), t.y_test)
        for i, t in enumerate(tasks)
    ]
    records: list[dict] = []
    for i, t in enumerate(tasks):
        records.append(
            {
                "method": "expert",
                "task": t.name,
                "accuracy": expert_acc[i],
                "normalized_accuracy": 1.0,
                "kl": 0.0,
            }  # fmt: skip
        )
    # How far each expert is from the barycenter of all experts' predictions through its
    # task's head (the reference for the merges' fr_distance).
    expert_fr = [
        function_space(
            [logits(expert_feats[j][i], heads[i]) for j in range(len(tasks))],
            logits(expert_feats[i][i], heads[i]),
        )["fr_distance"]
        for i in range(len(tasks))
    ]
    records.append(
        {
            "method": "expert",
            "task": "avg",
            "accuracy": float(np.mean(expert_acc)),
            "normalized_accuracy": 1.0,
            "kl": 0.0,
            "fr_distance": float(np.mean(expert_fr)),
            # an expert's Delta W = b a does not change when (b, a) moves in its GL(r) class
            **({"gl_invariant": True, "gl_change": 0.0} if config.gl_check else {}),
        }
    )

    def measure(label: str, lora, extra: dict) -> None:
        bert = encoder if lora is None else fold_lora(encoder, lora)
        accs, kls, frs = [], [], []
        for i, (t, toks) in enumerate(zip(tasks, test_toks)):
            z = logits(features(bert, toks), heads[i])
            acc = diagnostics.accuracy(z, t.y_test)
            through_head = [logits(expert_feats[j][i], heads[i]) for j in range(len(tasks))]
            fs = function_space(through_head, z)
            kl = diagnostics.mean_kl(logits(expert_feats[i][i], heads[i]), z)
            accs.append(acc)
            kls.append(kl)
            frs.append(fs["fr_distance"])
        rows, avg = task_records(label, [t.name for t in tasks], accs, expert_acc, kls, frs)
        records.extend(rows)
        records.append({**avg, **extra})

    measure("base", None, {"gl_invariant": True, "gl_change": 0.0} if config.gl_check else {})
    rng = np.random.default_rng(config.seed)
    timings = {}
    for label, name, params in (parse_method(m) for m in config.methods):
        t0 = time.perf_counter()
        merged = merge(name, adapters, **params).params
        timings[label] = time.perf_counter() - t0
        extra = {}
        if config.gl_check:
            moved = merge(name, [_reparametrised(a, rng) for a in adapters], **params).params
            d0, d1 = _dense(merged), _dense(moved)
            rel = max(np.linalg.norm(d1[m] - d0[m]) / max(np.linalg.norm(d0[m]), 1e-30) for m in d0)
            extra = {"gl_invariant": bool(rel < GL_TOL), "gl_change": float(rel)}
        measure(label, merged, extra)
    return {
        "records": records,
        "expert_accuracy": dict(zip([t.name for t in tasks], expert_acc)),
        "adapters": experts_cfg,
        "merge_time_s": timings,
        "runtime_s": time.perf_counter() - start,
    }
