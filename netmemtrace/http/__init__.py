"""The exporter's HTTP layer: a bounded server (server.py) and the exporter-toolkit web
configuration, TLS and basic auth (webconfig.py)."""
