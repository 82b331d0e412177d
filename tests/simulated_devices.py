"""Helpers of the tests that run JAX on simulated CPU devices in a subprocess (the device
count is fixed when JAX starts, and the rest of the suite runs on one device)."""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).parent
DEVICES = 8


def simulated(devices: int = DEVICES) -> dict:
    """Environment for a subprocess with ``devices`` simulated CPU devices."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    return env
