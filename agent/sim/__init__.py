"""Everything simulated, in one place and always labelled so: GPUs that follow a power
model, a request load with known ground truth, and an OpenAI-compatible upstream."""
