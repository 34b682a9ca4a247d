"""Fixtures shared by every test directory."""

from testbed.bootstrapd import reference_relay  # noqa: F401
from testbed.relay_process import relay_process  # noqa: F401
