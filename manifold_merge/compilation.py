"""JAX's persistent compilation cache, shared by the CLI and the experiment runner.

A merge compiles one XLA program per (method, tensor shape, dtype); on a CPU compilation can
take longer than the merge itself. With the cache on, later merges (and sweep points) with
the same shapes load the compiled programs from disk instead.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$MM_CACHE_DIR/xla`` if set, else ``~/.cache/manifold_merge/xla``."""
    root = os.environ.get("MM_CACHE_DIR")
    return Path(root).expanduser() / "xla" if root else Path.home() / ".cache/manifold_merge/xla"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Keep compiled XLA programs in ``path`` (default :func:`default_cache_dir`); programs
    that took at least 0.2 s to compile are stored. A cache already configured (by the user,
    or ``JAX_COMPILATION_CACHE_DIR``) is left as it is. Returns the directory in use.

    Example::

        from manifold_merge.compilation import enable_compilation_cache
        enable_compilation_cache("/scratch/xla")  # before the first merge
    """
    import jax  # noqa: PLC0415

    if jax.config.jax_compilation_cache_dir is None:
        path = Path(path) if path is not None else default_cache_dir()
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    current = jax.config.jax_compilation_cache_dir
    return Path(current) if current else None
