"""Energy sources: where joules come from (NVML, RAPL, a stated host model, simulated GPUs)."""
