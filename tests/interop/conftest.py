"""Fixtures of the interop tests."""

from testbed.toxdht import private_dht  # noqa: F401
