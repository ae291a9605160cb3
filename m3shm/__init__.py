"""m3shm: a Prometheus long-term metrics store with a shared-memory C core."""

__version__ = "0.1.0"
