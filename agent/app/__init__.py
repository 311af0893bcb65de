"""The wiring: the one place that builds a node from its stages (devices, sampler,
attribution, intake, store) and hands their results to the exporters."""
