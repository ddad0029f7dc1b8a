"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process; a bf16 run beside fp32 runs needs a reset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
