"""Whether a test's body failed, for fixtures that print diagnostics only then.

tests/conftest.py's report hook stores it in the item's stash under
``CALL_FAILED``; a fixture reads ``request.node.stash.get(CALL_FAILED, False)``
in its teardown."""

from __future__ import annotations

import pytest

CALL_FAILED = pytest.StashKey[bool]()
