"""One relay shard process: listeners, per-connection sessions, the relay
table for its own clients (via ``relaycore``) and the process's timer.
Never imports ``cluster``."""
