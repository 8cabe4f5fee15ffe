"""Views of a Snapshot: JSON dump, terminal top, Prometheus exporter. None touches BPF."""
