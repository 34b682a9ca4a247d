"""Model-based tests of the relay cluster: N shards against one plain server."""
