"""What a test run expects to be able to run: under ``CI=true`` a missing capability that CI
provides (the C++ extension, Triton and its interpreter) fails the run instead of skipping."""
import os

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> None:
    """Skip the calling test module with ``reason``, or fail it under ``CI=true``."""
    if IN_CI:
        pytest.fail(f"CI=true expects this to run, but: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)
