"""Shared fixtures. Every run draws fresh random inputs from one seed, printed in the header;
re-run a failure with ``MM_TEST_SEED=<seed> pytest ...``."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

# The CLI keeps a persistent XLA compilation cache by default; the tests must not write one.
os.environ["MM_COMPILE_CACHE"] = "0"
# Drawn once in the controlling process and inherited by pytest-xdist's workers (which start
# after this module is imported), so one printed seed reproduces the whole run.
os.environ.setdefault("MM_TEST_SEED", str(secrets.randbelow(2**31)))
SEED = int(os.environ["MM_TEST_SEED"])


def pytest_report_header(config):
    return f"manifold_merge test seed: MM_TEST_SEED={SEED}"


@pytest.fixture
def seed(request) -> int:
    """A per-test seed derived from the session seed and the test's name."""
    return (SEED + sum(map(ord, request.node.nodeid)) * 7919) % (2**31)


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture
def key(seed) -> jax.Array:
    return jax.random.key(seed)
