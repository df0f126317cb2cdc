"""A device's round, phase three: evaluate the new adapters on the hold-out, and accept them or not.

The new adapters become the active model (what `fleet predict` uses) unless they are worse on the
device's hold-out than the base or than the active adapters (`training.accept: if-better`; with
`always` they become active whatever their accuracy). Refused, they are not kept as a version,
and the adapters the device would continue from are the active ones again (or none).

Only accepted adapters leave the device (`sends_adapters`): a device that kept its active model
sends its figures and no adapters, so the coordinator never merges adapters the device's own
hold-out rejected (and does not merge its older active ones either: they were merged, or
rejected by the fleet, when they were new). Without aggregation (`none`) the next round starts
from the kept adapters; in a fleet that aggregates it starts from what the coordinator sends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from skip2fleet.client.inputs import RoundInputs
from skip2fleet.client.store import DeviceStore, Version
from skip2fleet.shared import model as base_model
from skip2fleet.shared.protocol import Accept


@dataclass(frozen=True)
class Verdict:
    """The round's new adapters judged on the device's own data (accuracies in percent)."""

    loss: float  # with the new adapters, on the training samples
    acc_before: float  # the base alone, on the hold-out
    acc_after: float  # the new adapters
    accepted: bool  # the new adapters became the active model
    acc_active: float  # the active model after the round: the new adapters', or the kept one's


def sends_adapters(verdict: Verdict) -> bool:
    """Whether this round's reply carries the new adapters: only when they became active."""
    return verdict.accepted


def evaluate_and_accept(inputs: RoundInputs, theta: np.ndarray) -> Verdict:
    predict = inputs.layout.predictor(inputs.model, theta)
    test = inputs.test
    before = base_model.accuracy(base_model.logits(inputs.model, test.x), test.y)
    after = base_model.accuracy(predict(test.x), test.y)
    accepted, active = make_active(inputs, theta, before, after)
    loss = base_model.cross_entropy(predict(inputs.tune.x), inputs.tune.y)
    return Verdict(loss, before, after, accepted, active)


def make_active(
    inputs: RoundInputs, theta: np.ndarray, before: float, after: float
) -> tuple[bool, float]:
    """Make `theta` active unless the accept rule keeps the active model; returns (accepted,
    the active model's hold-out accuracy)."""
    store, plan, adapters = inputs.store, inputs.plan, inputs.layout
    digest, method, rank = plan.base_sha256, adapters.method.name, adapters.rank
    current, kept_theta = _active_version(store, inputs, digest)
    kept = before
    if kept_theta is not None:
        predict = adapters.predictor(inputs.model, kept_theta)
        kept = base_model.accuracy(predict(inputs.test.x), inputs.test.y)
    if plan.accept == Accept.ALWAYS or after >= max(before, kept):
        store.save_adapters(digest, method, rank, theta)
        version = store.save_version(theta, plan.round, digest, method, rank, after)
        store.activate(digest, version, after)
        return True, after
    if kept_theta is not None:
        store.save_adapters(digest, method, rank, kept_theta)
    else:
        store.adapters_path(digest, method, rank).unlink(missing_ok=True)
    store.activate(digest, current, kept)
    return False, kept


def _active_version(
    store: DeviceStore, inputs: RoundInputs, digest: str
) -> tuple[Version | None, np.ndarray | None]:
    """The active version and its adapters when they can still answer: for this base, method and
    rank, and of this layout's size (another size was saved by an older skip2fleet)."""
    active = store.active()
    current = active.version if active else None
    adapters = inputs.layout
    if current is None or (current.base_sha256, current.method, current.rank) != (
        digest,
        adapters.method.name,
        adapters.rank,
    ):
        return None, None
    theta = store.version_theta(current)
    if theta.shape != (adapters.size,):
        return None, None
    return current, theta.astype(np.float32, copy=False)
