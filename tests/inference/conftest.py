"""Fixtures shared by the inference tests."""

from __future__ import annotations

import pytest
from inference_helpers import SIZE

from durian.inference.prepare import Preparer


@pytest.fixture(scope="module")
def prep():
    """A Preparer at the tiny model's resolution (mediapipe and the parser load once)."""
    with Preparer(SIZE) as p:
        yield p
