"""Tunable behaviour of the server core: limits, the reference version followed,
and the documented differences from tox-bootstrapd (docs/differences.md).
Validation of user input lives in ``cluster.config``; this module only holds the
values."""

from dataclasses import dataclass

from relaycore.bootstrap_info import DEFAULT_VERSION, MAX_VERSION

# The reference versions whose wire behaviour a relay can follow where they differ
# (docs/protocol-changes.md): the newest by default, Debian's for byte-exact
# comparison with its daemon.
COMPAT_VERSIONS = ("0.2.23", "0.2.18")


@dataclass(frozen=True, slots=True)
class RelayOptions:
    # Seconds an INCOMING or UNCONFIRMED connection may take to send its hello
    # and first valid frame; 0 disables (tox-bootstrapd has none, R-TIME-2).
    handshake_timeout: float = 10.0
    # Kill a confirmed connection as soon as its socket closes (R-KILL-4
    # SHOULD); False keeps it registered until the ping timeout, as 0.2.18.
    close_on_peer_eof: bool = True
    # All connections of this process, any state; 0 = unlimited.
    max_connections: int = 0
    # Connections from one source address, any state; 0 = unlimited.
    max_connections_per_ip: int = 0
    # INCOMING + UNCONFIRMED at once. At the cap a new connection evicts the
    # oldest handshake of the address (IPv4 address / IPv6 /64) that holds the
    # most, so a half-open flood from a few addresses cannot lock honest
    # newcomers out (0.2.18's rings evict the oldest of anyone). 0 = no cap.
    max_unconfirmed: int = 8192
    # INCOMING + UNCONFIRMED from one address (IPv6: one /64) at once; further
    # connections from it are refused (closed at once). 0 = no cap.
    max_unconfirmed_per_ip: int = 256
    # Non-priority packets (relayed data, OOB, onion/forward responses) are
    # dropped while the receiver has more than this many bytes unsent (R-OUT-2).
    output_soft_limit: int = 64 * 1024
    # A connection whose unsent output would grow past this is killed (R-OUT-1
    # has no bound in 0.2.18; ours must have one).
    output_hard_limit: int = 1024 * 1024
    # Onion (type 8) and forward (type 10) requests a client may send: a
    # token bucket of this rate per second and burst; further ones are dropped
    # and counted (the reference has no limit). 0 = unlimited.
    onion_rate_per_client: float = 50.0
    onion_burst_per_client: float = 200.0
    # The same for all connections of one address (IPv6: one /64) together,
    # so a new connection brings no fresh burst.
    onion_rate_per_ip: float = 200.0
    onion_burst_per_ip: float = 400.0
    # The same for all clients of one worker together (burst = one second's);
    # its last quarter is kept for addresses that have spent less than half
    # of their own burst, so heavy senders cannot starve light ones.
    onion_rate_per_worker: float = 20000.0
    # Send onion / forward datagrams to non-global next hops (loopback, RFC
    # 1918, link-local, CGNAT, ULA...) and to the host's own addresses: for
    # tests on loopback and LAN-only relays. The relay's own UDP endpoint is
    # refused either way.
    allow_private_next_hops: bool = False
    # OOB packets to a key the worker's replica does not know are offered to
    # every other worker: at most this many per second per address (IPv6: one
    # /64) with this burst, and per worker (burst = one second's); further
    # ones are dropped and counted. 0 = unlimited.
    oob_broadcast_rate_per_ip: float = 10.0
    oob_broadcast_burst_per_ip: float = 40.0
    oob_broadcast_rate_per_worker: float = 1000.0
    # "0.2.18" drops group announce responses (0x88) in onion replies as that
    # daemon does (R-ORET-2); "0.2.23" passes them like 0x84/0x86 (R-ORET-2a).
    compat: str = COMPAT_VERSIONS[0]
    # The answer to UDP bootstrap-info requests (0xF0), which status pages use
    # as tox-bootstrapd's MOTD: a template (relaycore.bootstrap_info.MOTD_FIELDS);
    # "" = no answer. info_version: the version number announced with it.
    motd: str = "Tox relay cluster (TCP relay), up $worker_uptime"
    info_version: int = DEFAULT_VERSION
    # Answers per second per worker: an answer is up to 3.3x the request, so this
    # bounds what spoofed requests can reflect (tox-bootstrapd: no bound). 0 = none.
    info_rate_per_worker: float = 20.0
    ping_interval: float = 30.0  # R-PING-2
    ping_timeout: float = 10.0  # R-PING-4

    def __post_init__(self) -> None:
        if not 0 <= self.info_version <= MAX_VERSION:
            raise ValueError("info_version must fit in 32 bits")
        if self.compat not in COMPAT_VERSIONS:
            raise ValueError(f"compat must be one of {', '.join(COMPAT_VERSIONS)}")
        # R-ORDER-1 checks "ping due" before "ping timed out": with a timeout
        # that is not shorter than the interval, R-PING-4 could never fire.
        if not 0 < self.ping_timeout < self.ping_interval:
            raise ValueError("ping_timeout must be positive and shorter than ping_interval")
