"""An attacker process for tests/adversarial/test_floods.py: one client that
streams empty frames (00 00, R-FRAME-3) as fast as the relay reads them.

    python -m tests.adversarial.zero_flood HOST PORT SERVER_PK_HEX SOURCE_IP SECONDS

Run in its own process so that the honest clients' event loop in the test is
not the one busy writing. Prints the number of bytes the relay accepted.
"""

from __future__ import annotations

import asyncio
import sys

from cluster.client import RelayClient

CHUNK = bytes(256 * 1024)
WRITE_BUFFER = 2 * 1024 * 1024  # what may wait in our transport


async def flood(host: str, port: int, server_pk: bytes, source: str, seconds: float) -> int:
    client = await RelayClient.connect(host, port, server_pk, local_addr=(source, 0))
    transport = client.transport
    assert transport is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    written = 0
    while loop.time() < deadline and not client.closed.done():
        if transport.get_write_buffer_size() < WRITE_BUFFER:
            transport.write(CHUNK)
            written += len(CHUNK)
        else:
            await asyncio.sleep(0.001)
    accepted = written - transport.get_write_buffer_size()
    client.abort()
    return accepted


def main() -> None:
    host, port, server_pk, source, seconds = sys.argv[1:6]
    accepted = asyncio.run(flood(host, int(port), bytes.fromhex(server_pk), source, float(seconds)))
    print(accepted, flush=True)


if __name__ == "__main__":
    main()
