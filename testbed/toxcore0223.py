"""c-toxcore 0.2.23 (the newest reference) for the tests: built once from the vendored
tarball by ``ops/build-toxcore-0.2.23`` (cached by the tarball's sha256), giving
``libtoxcore`` with the ``tox_group_*`` API and ``tox-bootstrapd`` 0.2.23.

The library has the same soname (``libtoxcore.so.2``) as Debian's 0.2.18: it is only
ever loaded by its full path (``tests/interop/toxcore.py`` checks
``tox_version_patch()``), and the daemon carries an rpath to it.

Public API:

* :func:`toxcore_0223` - the install prefix's two paths, or ``None`` (see
  :func:`toxcore_0223_error`); builds on first use.
* :func:`require_toxcore_0223` - the same for a test: skip when unavailable, or fail
  when ``$CI`` is set (CI builds it, so a skip there would hide a gap).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.bootstrapd import _in_ci

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "ops" / "build-toxcore-0.2.23"
BUILD_TIMEOUT_S = 900.0
VERSION = (0, 2, 23)


@dataclass(frozen=True)
class Toxcore0223:
    prefix: Path

    @property
    def library(self) -> Path:
        return self.prefix / "lib" / "libtoxcore.so"

    @property
    def bootstrapd(self) -> str:
        return str(self.prefix / "bin" / "tox-bootstrapd")


_built: Toxcore0223 | None = None
_error: str | None = None


def toxcore_0223() -> Toxcore0223 | None:
    """The built 0.2.23 install (building it if the cache has none), or ``None``."""
    global _built, _error
    if _built is not None or _error is not None:
        return _built
    try:
        done = subprocess.run(
            [str(BUILD_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as error:
        _error = f"{BUILD_SCRIPT}: {error}"
        return None
    if done.returncode != 0:
        _error = f"{BUILD_SCRIPT} failed: {done.stderr.strip()[-2000:]}"
        return None
    built = Toxcore0223(Path(done.stdout.strip().splitlines()[-1]))
    if not built.library.is_file() or not os.access(built.bootstrapd, os.X_OK):
        _error = f"{built.prefix} lacks {built.library} or {built.bootstrapd}"
        return None
    _built = built
    return built


def toxcore_0223_error() -> str:
    """Why :func:`toxcore_0223` returned ``None`` (empty when it did not)."""
    toxcore_0223()
    return _error or ""


def require_toxcore_0223() -> Toxcore0223:
    """:func:`toxcore_0223` for a test: skips (outside CI) or fails (CI) without it."""
    built = toxcore_0223()
    if built is None:
        reason = f"c-toxcore 0.2.23 not available: {toxcore_0223_error()}"
        if _in_ci():
            pytest.fail(f"{reason}; required when CI is set")
        pytest.skip(reason)
    return built
