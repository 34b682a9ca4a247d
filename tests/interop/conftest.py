"""Fixtures of the interop tests."""

from tests.support.toxdht import private_dht  # noqa: F401
