"""``python -m worker``: one shard process of a cluster, started by the supervisor.

Reads its whole specification as one JSON object on standard input (so the
secret key is never in argv or the environment), binds its ports with
SO_REUSEPORT, joins the cluster, and prints ``READY <shard> <address>...``
when it accepts connections. After a SIGTERM/SIGINT stop it prints
``FINAL <report as JSON>``: the counters of its whole life, read by the
supervisor after the process has exited (the periodic reports miss the last
second and the connections the stop closed).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import uvloop

from relaycore.onion import OnionSecrets
from relaycore.options import RelayOptions
from runtime.logs import configure_logging
from runtime.sockets import open_listening_socket, open_udp_socket
from worker.process import (
    ClusterSpec,
    ListenSpec,
    OnionSpec,
    bind_listeners,
    raise_open_file_limit,
    serve_until_stopped,
)


def main() -> int:
    line = sys.stdin.readline()
    if not line:
        return 1  # the supervisor went away before it sent our specification
    spec = json.loads(line)
    shard_id = spec["shard"]
    configure_logging(spec["log_level"], spec["log_format"], f"worker[{shard_id}]")
    raise_open_file_limit(spec["min_open_files"])
    try:
        sockets = bind_listeners(ListenSpec(spec["host"], spec["ports"], spec["backlog"]))
        shared = len(sockets)
        if spec.get("private_port"):  # tests and diagnostics: reach this shard directly
            sockets.append(open_listening_socket(spec["host"], 0, spec["backlog"]))
        onion = None
        if spec.get("udp_port") is not None:
            onion = OnionSpec(
                open_udp_socket(spec["host"], spec["udp_port"]),
                OnionSecrets(bytes.fromhex(spec["onion_secret"])),
            )
    except OSError as error:
        # One line for the supervisor to report (issue 14 point 5), not a traceback.
        print(f"ERROR {error.strerror or error}", flush=True)
        return 1

    def announce(addresses: list[str]) -> None:
        private = addresses[shared:]
        line = f"READY {shard_id} " + " ".join(addresses[:shared])
        if private:
            line += f" private={private[0]}"
        print(line, flush=True)

    def hand_over(report: dict) -> None:
        with contextlib.suppress(OSError):  # the supervisor is gone (why we stopped)
            print("FINAL " + json.dumps(report, separators=(",", ":")), flush=True)

    uvloop.run(  # until SIGINT / SIGTERM
        serve_until_stopped(
            bytes.fromhex(spec["secret_key"]),
            RelayOptions(**spec["options"]),
            sockets,
            announce,
            ClusterSpec(shard_id, Path(spec["runtime_dir"])),
            spec["backlog"],
            onion,
            hand_over,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
