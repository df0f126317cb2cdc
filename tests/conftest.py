"""Shared fixtures: tiny models of every built-in kind and data, and the real data folder when CI
provides it.

Under `FLEET_NO_SKIPS=1` (what .ci/run sets) a skipped test fails: CI has the data, Prometheus,
root and sshd, so a skip there means a test silently stopped testing."""

from __future__ import annotations

import os
from pathlib import Path

from skip2fleet.shared.process import apply_process_settings

apply_process_settings()  # the tests are an entry point too: before NumPy or Flower load

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from skip2fleet.shared.model import init_model  # noqa: E402
from skip2fleet.shared.spec import (  # noqa: E402
    Layer,
    Spec,
    cnn,
    cnn2d,
    dscnn,
    dscnn2d,
    mlp,
    resnet2d,
)


def _zoo2d() -> Spec:
    """Every 2-D option the built-ins leave out, as imported graphs may have them: a grouped
    convolution, a depthwise one with a channel multiplier, strides, uneven pads, overlapping
    padded max pooling, average pooling, ReLU6, a flatten, and channels-last input rows."""
    conv = Layer("conv2d", 4, window=(3, 3), pads=(1, 1, 1, 1), groups=2)
    pool = Layer("maxpool2d", window=(3, 3), stride=(2, 2), pads=(1, 1, 1, 1))
    depthwise = Layer("conv2d", 8, window=(3, 2), stride=(2, 1), pads=(1, 0, 0, 1), groups=4)
    branch = (
        Layer("conv2d", 8, window=(1, 1)),
        Layer("batchnorm"),
        Layer("relu"),
        Layer("conv2d", 8, window=(3, 3), pads=(1, 1, 1, 1)),
    )
    return Spec(
        (4, 7, 6),
        (
            (conv, Layer("batchnorm"), Layer("relu6"), pool),
            (depthwise, Layer("relu"), Layer("residual", branch=branch)),
            (Layer("avgpool2d", window=(2, 1)), Layer("flatten"), Layer("linear", 3)),
        ),
        channels_last=True,
    )


TINY_SPECS = {
    "mlp": mlp(7, 3, hidden=5),
    "cnn": cnn(2, 12, 3, widths=(3, 4, 5)),
    "dscnn": dscnn(2, 12, 3, widths=(3, 4, 5)),
    "cnn2d": cnn2d(2, 8, 8, 3, widths=(3, 4, 5)),
    "dscnn2d": dscnn2d(2, 8, 8, 3, widths=(3, 4, 5)),
    "resnet2d": resnet2d(2, 6, 6, 3, widths=(3, 4)),
    "zoo2d": _zoo2d(),
}


def tiny_model(kind: str, seed: int = 7):
    """A tiny model with non-trivial weights and batch norm, and 40 labelled samples."""
    spec = TINY_SPECS[kind]
    rng = np.random.default_rng(seed)
    model = init_model(spec, rng)
    bound = 0.5 if kind.endswith("2d") else 1.0  # 3x3 kernels add 9 taps a channel: logits O(1)
    for name, array in model.items():
        if name[0] == "W" and name != "W0":  # Kaiming keeps small layers' logits tiny
            model[name] = rng.uniform(-bound, bound, array.shape).astype(np.float32)
        elif name.startswith(("gamma", "var")):
            model[name] = rng.uniform(0.5, 1.5, array.shape).astype(np.float32)
        elif name.startswith(("beta", "mean", "b")):
            model[name] = rng.uniform(-0.5, 0.5, array.shape).astype(np.float32)
    model["in_mean"] = rng.normal(size=spec.width).astype(np.float32)
    model["in_std"] = rng.uniform(0.5, 2, spec.width).astype(np.float32)
    x = rng.normal(size=(40, spec.width))
    y = rng.integers(0, 3, 40)
    return model, x, y


@pytest.fixture
def tiny():
    """The tiny 7-5-5-3 MLP, and 40 labelled samples."""
    return tiny_model("mlp")


@pytest.fixture
def task_identity(monkeypatch):
    """What Flower sets in a ServerApp's process, for building messages in a test."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


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
