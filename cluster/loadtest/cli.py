"""The ``cluster loadtest`` subcommand: validate, check limits, run the pool, report.

Exit status: 0 when the run completed, 1 when it failed (no connection could
be set up, a worker died, a timeout or the deadline passed, or a failure,
disconnect or loss fraction passed its --max-...-fraction limit), 2 for unusable
arguments or limits, 128 + signal number when stopped by SIGINT (130) or
SIGTERM (143) -- with the partial report printed first.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cluster.loadtest.options import UsageError, add_arguments, options_from_args

DESCRIPTION = """\
Load-test a Tox TCP relay with many clients, from several processes.

modes:
  throughput  P client pairs, linked to each other, each client keeping W routed
              data packets of S bytes in flight, echoed by its partner:
              relayed frames/s, payload MB/s, RTT percentiles, lost packets
  oob         the same with OOB packets sent to the partner's public key
  handshake   C connections, K at a time: handshake + one PING round trip, close:
              handshakes/s, latency percentiles, failures by cause
  idle        N connections held for D seconds answering the relay's pings:
              how many survived; with --server-pid the relay's memory per connection

The run fails (status failed, exit status 1, the cause in the report) when
failed handshakes or set-ups, connections closed by the relay, or lost packets
pass their limits (--max-failure-fraction, --max-disconnect-fraction,
--max-loss-fraction; 1 % each by default). Rates are reported over the whole
measured window and over the part of it in which traffic flowed.

Loopback targets only unless --allow-remote. Ctrl-C stops the run and prints
the partial report (exit status 130).
"""

EPILOG = """\
examples:
  cluster loadtest throughput 127.0.0.1 33445 @relay.keys
  cluster loadtest handshake -C 5000 -K 128 127.0.0.1 33445 <64 hex digits> --json
  cluster loadtest idle -N 10000 -D 60 --server-pid $(pgrep -o -f 'cluster start') \\
      127.0.0.1 33445 @relay.keys
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``loadtest`` on the ``cluster`` command's subparsers."""
    parser = subparsers.add_parser(
        "loadtest",
        help="load-test a relay (throughput, oob, handshake, idle)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(handler=run_command)
    return parser


def _error(message: str) -> None:
    print(f"cluster loadtest: error: {message}", file=sys.stderr)


def run_command(args: argparse.Namespace) -> int:
    """Run one load test from parsed arguments; the exit status."""
    from cluster.loadtest.limits import LimitError, check_limits
    from cluster.loadtest.plot import PlotUnavailable, require_matplotlib, write_plot

    try:
        options = options_from_args(args)
        if options.plot is not None:
            require_matplotlib()
        check_limits(options)
    except (UsageError, LimitError, PlotUnavailable) as error:
        _error(str(error))
        return 2

    from cluster.loadtest.pool import Pool
    from cluster.loadtest.progress import ProgressLine
    from cluster.loadtest.report import build_report, render_json, render_table

    try:
        outcome = Pool(options, ProgressLine(sys.stderr, enabled=not options.quiet)).run()
    except KeyboardInterrupt:
        _error("interrupted twice: workers stopped without a report")
        return 130
    report = build_report(options, outcome)
    print(render_json(report) if options.json else render_table(report), flush=True)
    status = 0
    if options.plot is not None:
        try:
            write_plot(options.plot, report, outcome.result)
        except Exception as error:  # the report is printed; the plot is extra
            _error(f"--plot {options.plot}: {error}")
            status = 1
    if outcome.stop_signal is not None:
        return 128 + outcome.stop_signal
    if report["status"] != "ok":
        return 1
    return status
