"""``cluster loadtest``: drive a relay with many Tox clients and measure it.

    cluster loadtest throughput 127.0.0.1 33445 <64 hex digits | @relay.keys>

Modes (``modes/``): ``throughput`` and ``oob`` (pairs of clients echoing
windows of routed data or OOB packets), ``handshake`` (connection set-up rate)
and ``idle`` (connections held open, optionally with the relay's memory).

Several worker processes (``pool``/``worker``) each run one uvloop event
loop over the project's own client (``cluster.client.RelayClient`` on the
sans-IO ``relaycore.client.ClientConnection``); the parent merges their
counters, latency histograms (``stats``) and timelines (``results``) and
prints a table or one JSON line (``report``), optionally a plot (``plot``).
"""
