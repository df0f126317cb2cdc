"""The Flower ClientApp: one device's round of Skip2-LoRA fine-tuning.

Every plan names the base model by its sha256; the first message a device gets in a run also
carries the base itself: the device checks the hash, keeps the base on disk and builds its Skip2
cache there. Every round it trains its adapters (from the coordinator's merged ones when the fleet
aggregates, else from its own) and replies with the packed adapters and its figures. A device
without the plan's base (a wiped disk, a base refused for its hash) replies BASE_MISSING, and the
coordinator sends the base with its next plan; a device that cannot find itself or its data gets
an error reply that says why.

A device with its own samples (`devices[].data.path`) reads that folder each round (again when a
file is added) and holds out a quarter of each class. Its new adapters become the active model
(what `fleet predict` uses) only when they are not worse on that hold-out than the base and the
active adapters (`training.accept: if-better`); otherwise it keeps the active ones and says so.
"""

from __future__ import annotations

import resource
from pathlib import Path
from time import perf_counter

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from skip2fleet.client.model import adapted_predictor
from skip2fleet.client.store import DeviceStore
from skip2fleet.client.telemetry.power import PowerSampler
from skip2fleet.client.telemetry.probes import NoProbe, power_probe
from skip2fleet.shared import model as base_model
from skip2fleet.shared.adapters import pack, packed_size, unpack
from skip2fleet.shared.datasets import Split, TaskOptions
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.methods import get_method
from skip2fleet.shared.protocol import (
    ADAPTERS,
    ADAPTERS_BY_DEVICE,
    BASE,
    BASE_MISSING,
    DEVICE_ERROR,
    FIGURES,
    PLAN,
    Figures,
    RoundPlan,
)
from skip2fleet.shared.records import record_model, record_vector, vector_record, wire_bytes
from skip2fleet.shared.spec import form_of
from skip2fleet.shared.train import FineTuneConfig, finetune

app = ClientApp()


class BaseMissing(FleetError):
    """This device does not hold the plan's base model: the coordinator should send it."""


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        return Message(content=run_round(msg.content, context.node_config), reply_to=msg)
    except (FleetError, ValueError, KeyError) as exc:
        code = BASE_MISSING if isinstance(exc, BaseMissing) else DEVICE_ERROR
        return Message(error=Error(code=code, reason=str(exc)), reply_to=msg)


def identify(plan: RoundPlan, node_config: dict) -> int:
    """This device's index in the plan: by its configured name, or its simulation partition."""
    if "device" in node_config:
        name = str(node_config["device"])
        if name not in plan.devices:
            raise FleetError(f"device {name!r} is not in the fleet ({', '.join(plan.devices)})")
        return plan.devices.index(name)
    index = int(node_config["partition-id"])
    if not 0 <= index < len(plan.devices):
        raise FleetError(f"partition {index} has no device in the fleet")
    return index


def run_round(content: RecordDict, node_config: dict) -> RecordDict:
    """One round on this device; any refusal is raised with the device's name in front."""
    plan = RoundPlan.from_record(content[PLAN])
    index = identify(plan, node_config)
    name = plan.devices[index]
    try:
        return _fine_tune(content, node_config, plan, index)
    except (FleetError, ValueError, KeyError) as exc:
        message = str(exc)
        prefixed = message if message.startswith(f"{name}:") else f"{name}: {message}"
        raise (BaseMissing if isinstance(exc, BaseMissing) else FleetError)(prefixed) from exc


def _fine_tune(content: RecordDict, node_config: dict, plan: RoundPlan, index: int) -> RecordDict:
    started = perf_counter()
    name, rank, method = plan.devices[index], plan.ranks[index], get_method(plan.method)
    root = node_config.get("state-dir") or Path(plan.state_root) / name
    store = DeviceStore(Path(str(root)))
    if BASE in content:
        received = record_model(content[BASE])
        digest = base_model.sha256(received)
        if digest != plan.base_sha256:
            raise BaseMissing(
                f"{name}: base model hash {digest[:12]} does not match the announced "
                f"{plan.base_sha256[:12]}; refusing it"
            )
        store.save_base(received)
    model = store.load_base(plan.base_sha256)
    if model is None:
        raise BaseMissing(f"{name}: no base model {plan.base_sha256[:12]} on this device")
    spec = base_model.spec_of(model)
    data_dir = node_config.get("data-dir") or plan.data_dir or None
    options = TaskOptions(
        Path(str(data_dir)) if data_dir else None,
        plan.source_room,
        seed=plan.seed,
        form=form_of(spec),
    )
    own = plan.data_path(index)
    if own:
        classes = base_model.classes_of(model)
        tune, test = store.own_data(
            Path(own), classes, plan.label_column, plan.holdout, plan.max_samples
        )
    else:
        tune, test = store.data(plan.dataset, plan.partitions[index], options)
    if tune.x.shape[1] != spec.width:
        raise FleetError(
            f"{name}: the base takes {spec.width} values per sample, "
            f"this device's {own or plan.dataset} data has {tune.x.shape[1]}"
        )
    cache, built = (None, False)
    if method.cached:
        cache, built = store.cache(model, plan.base_sha256, tune.x, plan.cache)
    if ADAPTERS in content:
        start = unpack(record_vector(content[ADAPTERS]), method, spec, rank)
    elif ADAPTERS_BY_DEVICE in content and name in content[ADAPTERS_BY_DEVICE]:
        start = unpack(content[ADAPTERS_BY_DEVICE][name].numpy(), method, spec, rank)
    else:
        size = packed_size(method, spec, rank)
        start = (
            store.load_adapters(plan.base_sha256, method.name, rank, size)
            if plan.round > 1
            else None
        )
    config = FineTuneConfig(
        plan.epochs, plan.batch_size, rank, None, plan.lr, plan.seed + index, cache=plan.cache
    )
    probe = power_probe(
        plan.probes[index],
        Path(str(node_config.get("sys-root", "/sys"))),
        Path(str(node_config.get("proc-root", "/proc"))),
        plan.idle_watts[index],
        plan.full_watts[index],
    )
    with PowerSampler(probe or NoProbe()) as meter:
        result = finetune(model, method, tune.x, tune.y, config, cache, start=start)
    predict = result.tuner.merged()
    acc_before = base_model.accuracy(base_model.logits(model, test.x), test.y)
    acc_after = base_model.accuracy(predict(test.x), test.y)
    accepted, acc_active = make_active(
        store, model, plan, rank, result.tuner.theta, (acc_before, acc_after), test
    )
    split = result.times.per_batch_ms()
    reply = RecordDict(
        {
            ADAPTERS: vector_record(pack(result.tuner.theta, method, spec, rank)),
            "device": ConfigRecord({"name": name}),
        }
    )
    figures = Figures(
        samples=len(tune),
        loss=base_model.cross_entropy(predict(tune.x), tune.y),
        acc_before=acc_before,
        acc_after=acc_after,
        forward_ms=split["forward"],
        backward_ms=split["backward"],
        update_ms=split["update"],
        train_batch_ms=split["total"],
        finetune_s=perf_counter() - started,
        cache_bytes=int(cache.nbytes) if cache is not None else 0,
        cache_built=int(built),
        uplink_bytes=0.0,
        rank=rank,
        peak_rss_bytes=peak_rss_bytes(),
        energy_joules=meter.joules if probe else 0.0,
        mean_watts=meter.mean_watts if probe else 0.0,
        peak_watts=meter.peak_watts if probe else 0.0,
        power_estimated=int(bool(probe and probe.estimated)),
        accepted=int(accepted),
        acc_active=acc_active,
    )
    finish_reply(reply, figures)
    store.save_figures({"device": name, "round": plan.round, **reply[FIGURES]})
    return reply


def make_active(
    store: DeviceStore,
    model: base_model.Model,
    plan: RoundPlan,
    rank: int,
    theta: np.ndarray,
    accuracies: tuple[float, float],
    test: Split,
) -> tuple[bool, float]:
    """Make the new adapters active unless they are worse on the hold-out than the base or than
    the active adapters (`accept: if-better`); returns (accepted, the active one's accuracy).

    Rejected adapters are not continued from either: the next round starts from the active
    ones (or afresh)."""
    before, after = accuracies
    digest, method = plan.base_sha256, plan.method
    active = store.active()
    current = active.version if active else None
    if current and (current.base_sha256, current.method, current.rank) != (digest, method, rank):
        current = None  # adapters for another base or shape: they cannot answer any more
    kept_theta = store.version_theta(current) if current else None
    if kept_theta is not None and kept_theta.shape != theta.shape:
        current = kept_theta = None  # saved by an older skip2fleet with another adapter layout
    kept = before
    if current is not None:
        kept = base_model.accuracy(
            adapted_predictor(model, method, rank, kept_theta)(test.x), test.y
        )
    if plan.accept == "always" or after >= max(before, kept):
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


def finish_reply(reply: RecordDict, figures: Figures) -> None:
    """Add the figures to a reply, `uplink_bytes` measured on the reply as it will be sent
    (a double: setting it does not change the reply's size)."""
    reply[FIGURES] = figures.record()
    reply[FIGURES]["uplink_bytes"] = float(wire_bytes(reply))


def peak_rss_bytes() -> int:
    """The peak resident memory of this process (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
