"""What a test needs installed: skipped where it is missing, a failure under CI (``CI=true``), where
`make setup` installed everything and a missing piece is a broken setup, not a reason to skip."""

from __future__ import annotations

import os

import pytest


def skip_or_fail(reason: str) -> None:
    """Skip the test with ``reason``, or fail it under CI."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI installs everything, yet {reason}")
    pytest.skip(reason)
