"""Real-process tests of `cluster start --workers N` (cross-shard relaying, faults)."""
