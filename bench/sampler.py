"""CPU cost of the sampler on 8 GPUs through the NVML code path (fake pynvml), and the RSS.

Run: python bench/sampler.py [--gpus 8] [--seconds 10]

Two figures: the CPU time of one sampling round (every GPU read once, through the real
NvmlGpuSource and Sampler, driven in a tight loop), and the share of one core that the
scheduled sampler uses at 10 Hz (APScheduler jobs included) over `--seconds`. The fake's
calls cost far less than real NVML calls, so this is the agent's own overhead; the real
cost on a GPU node is measured in docs/gpu-validation.md where a GPU was available.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fake_pynvml import FakeNvml  # the scripted fake that the tests use

from agent.devices.nvml import NvmlGpuSource
from agent.sampler import Sampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()

    fake = FakeNvml(clock=time.monotonic)
    for i in range(args.gpus):
        # A constant trace: the fake integrates it in O(1), so the figure is the agent's cost.
        fake.add_gpu(200.0 + 10 * i, idle_w=70.0, limit_w=700.0)
    sys.modules["pynvml"] = fake.module
    source = NvmlGpuSource.open()
    process = psutil.Process()

    sampler = Sampler(source, interval_s=0.1)
    cpu0 = time.process_time()
    for _ in range(args.rounds):
        sampler.sample_all()
    cpu_per_round = (time.process_time() - cpu0) / args.rounds

    scheduled = Sampler(source, interval_s=0.1)
    scheduled.start()
    time.sleep(1.0)  # let the jobs settle
    cpu0, wall0 = time.process_time(), time.monotonic()  # ns resolution, unlike /proc ticks
    time.sleep(args.seconds)
    cpu1, wall1 = time.process_time(), time.monotonic()
    scheduled.stop()
    core_fraction = (cpu1 - cpu0) / (wall1 - wall0)
    samples = sum(g.samples_total for g in scheduled.snapshot().gpus)
    rss_mb = process.memory_info().rss / 2**20

    print(f"GPUs (fake pynvml, NVML code path):      {args.gpus}")
    print(f"CPU per sampling round (all GPUs):       {cpu_per_round * 1e6:.0f} µs "
          f"({cpu_per_round / args.gpus * 1e6:.0f} µs per GPU read)")
    print(f"scheduled at 10 Hz for {args.seconds:.0f} s: {samples} reads, "
          f"{core_fraction * 100:.2f} % of one core")
    print(f"RSS:                                     {rss_mb:.1f} MiB")
    print(json.dumps({
        "cpu_s_per_sample": cpu_per_round,
        "cpu_s_per_gpu_read": cpu_per_round / args.gpus,
        "core_fraction_at_10hz": core_fraction,
        "gpus": args.gpus,
        "rss_mb": round(rss_mb, 1),
    }))


if __name__ == "__main__":
    main()
