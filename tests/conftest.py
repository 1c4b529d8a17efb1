"""Shared fixtures: the real-data folder and tiny random-weight HF models built on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of real test data (`../shared/data`), named by JAXRL_RM_SHARED_DATA in CI.

    If the variable is set and the folder is missing, the test fails; if it is unset, the
    folder next to the checkout is used and the test is skipped only when it is absent.
    """
    env = os.environ.get("JAXRL_RM_SHARED_DATA")
    if env:
        path = Path(env)
        if not path.is_dir():
            pytest.fail(f"JAXRL_RM_SHARED_DATA={env} is set but the folder does not exist")
        return path
    path = REPO.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip("shared data not found (set JAXRL_RM_SHARED_DATA)")
    return path
