"""`make bench`: the hub measured next to raw Kafka clients on the same broker (see docs/performance.md)."""
