"""netmemtrace: eBPF observability for Linux network memory."""

__version__ = "0.1.0"
