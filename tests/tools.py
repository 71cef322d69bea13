"""Programs that some tests need and .ci/run installs (headless Chromium, a PostgreSQL server), and what a
test does where one is missing: it skips, saying why, except under CI (``CI=true``), where .ci/run has
installed them, so a missing one is a failure rather than a silent skip."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def missing(why: str) -> None:
    """A test cannot run here for ``why``: skip it, or, under CI, fail it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why} (CI=true: .ci/run installs it, so it must be here)", pytrace=False)
    pytest.skip(why)


def need_chromium() -> str:
    """The headless Chromium to render pages with (see :func:`missing` when there is none)."""
    if CHROMIUM is None:
        missing("headless Chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
    return CHROMIUM
