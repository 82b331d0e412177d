"""LoRA merging on the real all-MiniLM-L6-v2: one rank-8 LoRA expert (query, value) per text
task -- WordNet gloss -> part of speech, gloss -> lexicographer category, fortune -> topic --
merged with every LoRA method; each task keeps its head.

Commands (2-core CPU; the experts are trained once and cached as PEFT adapter folders):

    python experiments/run.py --config=configs/text_lora.py:smoke --workdir=runs/tl_smoke
        # 25 s measured: 2 tasks, 8 training steps, 3 methods
    python experiments/run.py --config=configs/text_lora.py --workdir=runs/tl
        # 3 tasks x 150 LoRA steps (batch 32 x 32 tokens), 8 methods; not timed end to end yet
    python experiments/run.py --config=configs/text_lora.py --sweep --workdir=runs/tl_sweep
        # 3 seeds
    python experiments/make_tables.py --runs=runs/tl_sweep --out=results

Overrides: ``--config.lora.rank=16``, ``--config.train.steps=300``,
``--config.methods='("lora_svd(rank=8)", "geomerge")'``.
"""

import ml_collections

#: Every LoRA method at the experts' rank (8); lora_cat keeps rank sum_i r_i.
METHODS = (
    "lora_linear",
    "lora_cat",
    "lora_svd(rank=8)",
    "lora_ties_svd(rank=8, density=0.3)",
    "lora_dare_svd(rank=8, density=0.5)",
    "knots(rank=8, density=0.3)",
    "core_space(rank=8)",
    "geomerge(rank=8)",
)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "text_lora"
    c.name = "text_lora"
    c.seed = 0
    c.tasks = ("wordnet_pos", "wordnet_lexname", "fortunes_topic")
    c.data = ml_collections.ConfigDict(
        # classes per task (the k most frequent), examples, characters kept, tokens per text
        {"num_classes": 4, "n_train": 800, "n_test": 240, "max_chars": 200, "max_length": 32}
    )
    c.lora = ml_collections.ConfigDict({"rank": 8, "alpha": 16.0, "targets": ("query", "value")})
    c.train = ml_collections.ConfigDict({"steps": 150, "batch_size": 32, "learning_rate": 2e-3})
    c.methods = METHODS
    c.gl_check = True  # also merge GL(r)-reparametrised adapters and compare
    c.progress = True
    c.cache_dir = ""  # "" = $MM_CACHE_DIR or ~/.cache/manifold_merge/runs
    c.tables = [
        {
            "name": "text_lora",
            "title": "LoRA merges of MiniLM text experts: normalised accuracy per task",
            "rows": "method",
            "columns": "task",
            "value": "normalized_accuracy",
            "format": ".3f",
        },
    ]
    if arg == "smoke":
        c.tasks = ("wordnet_pos", "fortunes_topic")
        c.data.update({"n_train": 64, "n_test": 32, "max_length": 16})
        c.train.update({"steps": 8, "batch_size": 16})
        c.methods = ("lora_linear", "lora_svd(rank=8)", "geomerge(rank=8, max_iter=50)")
    elif arg:
        raise ValueError(f"configs/text_lora.py takes '' or 'smoke', got {arg!r}")
    return c


def get_sweep(arg: str = ""):
    """Seeds {0, 1, 2} (smoke: one)."""
    return [{"seed": s} for s in ((0,) if arg == "smoke" else (0, 1, 2))]
