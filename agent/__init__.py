"""jouleprobe agent: measures GPU and host energy and attributes it to inference requests."""

__version__ = "0.1.0"
