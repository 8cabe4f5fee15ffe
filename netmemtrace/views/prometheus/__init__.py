"""The Prometheus view: catalogue (every metric family as data), collector (a Snapshot to
families, one loop), encode (the text and OpenMetrics formats)."""
