"""Sans-IO core of the Tox TCP relay protocol (toxcore v0.2.18).

Owns the wire protocol (handshake, framing, nonce counters, packet codec) and
the relay table (slots, links, notifications, OOB, kill decisions). It takes
bytes and ``now`` and returns what to send to whom and which connection to
close. It must not import asyncio, socket, zmq or anything of ``cluster``,
``worker`` or ``coordinator``: the server and the client library both build
on it.
"""
