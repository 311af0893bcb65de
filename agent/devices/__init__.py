"""Where joules come from on a real node: NVML for the GPUs, RAPL or a stated model for
the host. Every device error is mapped here, once, into a reading's error field."""
