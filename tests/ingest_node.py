"""The scripted two-GPU node that the ingest API's tests (unit, fuzz and flood) post to: its
clocks, its GPUs and their steady power."""

from __future__ import annotations

from agent.devices.base import GpuInfo

NOW = 5_000.0
"""What the app's monotonic clock reads."""
WALL_OFFSET = 1_700_000_000.0
"""time.time() − time.monotonic() in the scripted clocks."""
T0 = NOW - 100.0
"""The timelines run from T0 to T0 + 200 at 1 s steps."""
LATER = T0 + 1_000.0
"""An advance() time when everything has settled."""
POWER_W = {0: 100.0, 1: 200.0}

UUID0 = "GPU-5d1f0c3a-9b7e-4f6a-8c2d-1e3f5a7b9c0d"
UUID1 = "GPU-a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
GPUS = [
    GpuInfo(0, UUID0, "NVIDIA H100 80GB HBM3", "counter", "instant"),
    GpuInfo(1, UUID1, "NVIDIA H100 80GB HBM3", "counter", "instant"),
]
