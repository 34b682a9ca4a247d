"""Routing-map coordinator of the relay cluster (key -> shard, epoch) and the
client workers use to reach it. Built by the cluster issue; the single-shard
relay does not need it yet."""
