"""Shared fixtures: a tiny model and data, and the real data folder when CI provides it.

Under `FLEET_NO_SKIPS=1` (what .ci/run sets) a skipped test fails: CI has the data, Prometheus,
root and sshd, so a skip there means a test silently stopped testing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from skip2fleet.shared.model import init_model


@pytest.fixture
def tiny():
    """A 7-5-4-3 model with non-trivial batch norm, and 40 labelled samples."""
    rng = np.random.default_rng(7)
    model = init_model(7, 3, rng, hidden=5)
    model["W2"] = rng.uniform(-1, 1, (5, 3)).astype(np.float32)  # 5 -> 4 would need its own init
    model["W1"] = rng.uniform(-1, 1, (5, 5)).astype(np.float32)
    for k in (0, 1):
        model[f"gamma{k}"] = rng.uniform(0.5, 1.5, 5).astype(np.float32)
        model[f"beta{k}"] = rng.uniform(-0.5, 0.5, 5).astype(np.float32)
        model[f"mean{k}"] = rng.uniform(-0.5, 0.5, 5).astype(np.float32)
        model[f"var{k}"] = rng.uniform(0.5, 2.0, 5).astype(np.float32)
    model["in_mean"] = rng.normal(size=7).astype(np.float32)
    model["in_std"] = rng.uniform(0.5, 2, 7).astype(np.float32)
    x = rng.normal(size=(40, 7))
    y = rng.integers(0, 3, 40)
    return model, x, y


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data sets (FLEET_DATA_DIR); tests that need them skip, saying so, without it."""
    value = os.environ.get("FLEET_DATA_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("FLEET_DATA_DIR is not set to the real data folder (CI sets ../shared/data)")
    return Path(value)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("FLEET_NO_SKIPS") == "1":
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under FLEET_NO_SKIPS=1 (CI must run every test): {reason}"
