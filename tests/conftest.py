"""Fixtures shared by every test directory."""

from tests.support.bootstrapd import reference_relay  # noqa: F401
from tests.support.relay_process import relay_process  # noqa: F401
