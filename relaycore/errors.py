"""Error types of the core. A ProtocolViolation means: close this connection only."""


class ProtocolViolation(Exception):
    """The peer broke a rule; the connection must be killed (never the process).

    ``rule`` is the spec id (e.g. ``"R-FRAME-2"``) so logs and metrics can say
    which rule fired.
    """

    def __init__(self, rule: str, detail: str = "") -> None:
        super().__init__(f"{rule}: {detail}" if detail else rule)
        self.rule = rule
        self.detail = detail


class HandshakeError(ProtocolViolation):
    """The 128-byte hello or the 96-byte reply did not open."""


class InvariantBroken(Exception):
    """The relay table contradicts itself (a bug, never a client's doing):
    the process must end so that its supervisor starts a clean one."""
