"""Fixtures for the relay-core unit tests (fake clock, in-memory network)."""

from __future__ import annotations

import pytest

from tests.relaycore.harness import Network


@pytest.fixture
def net() -> Network:
    """A relay with default options at ``now = 0``; no clients yet."""
    return Network()
