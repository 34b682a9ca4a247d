"""Fixtures and hooks shared by every test directory."""

import pytest

from testbed.bootstrapd import reference_relay  # noqa: F401
from testbed.relay_process import relay_process  # noqa: F401
from tests.support.outcome import CALL_FAILED


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed
    return report
