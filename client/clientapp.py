"""The Flower ClientApp: one device's round of Skip2-LoRA fine-tuning, in four phases.

load (`client.inputs`: the base, checked by its hash; the device's data; the Skip2 cache; the
adapters to start from) -> train (here: the plan's epochs, under the device's power probe) ->
evaluate and accept (`client.acceptance`: the hold-out accuracy decides whether the new adapters
become the active model) -> reply (here: the packed adapters and the device's figures).

Every plan names the base model by its sha256; the first message a device gets in a run also
carries the base itself. A device without the plan's base (a wiped disk, a base refused for its
hash) replies BASE_MISSING, and the coordinator sends the base with its next plan; a device that
cannot find itself or its data gets an error reply that says why, its name in front.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from skip2fleet.client.acceptance import Verdict, evaluate_and_accept, sends_adapters
from skip2fleet.client.inputs import BaseMissing, RoundInputs, load_inputs
from skip2fleet.client.telemetry.power import PowerSampler
from skip2fleet.client.telemetry.probes import NoProbe, power_probe
from skip2fleet.client.untrained import record_trained, seen_files
from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.protocol import DEVICE_NAME, ErrorCode, Figures, NodeConfig, Part, RoundPlan
from skip2fleet.shared.records import adapters_record, figures_record, record_roster, wire_bytes
from skip2fleet.shared.train import FineTuneConfig, FineTuneResult, finetune

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        return Message(content=run_round(msg.content, context.node_config), reply_to=msg)
    except (FleetError, ValueError, KeyError) as exc:
        code = ErrorCode.BASE_MISSING if isinstance(exc, BaseMissing) else ErrorCode.DEVICE_ERROR
        return Message(error=Error(code=int(code), reason=str(exc)), reply_to=msg)


def own_plan(content: RecordDict, node_config: dict) -> RoundPlan:
    """This device's plan: addressed to it, or found in the roster an unaddressed plan comes
    with (by its configured name, or its simulation partition)."""
    plan = RoundPlan.from_record(content[Part.PLAN])
    configured = node_config.get(NodeConfig.DEVICE)
    if not plan.device:
        try:
            return plan.for_node(record_roster(content[Part.ROSTER]), node_config)
        except ValueError as exc:
            raise FleetError(str(exc)) from None
    if configured is not None and str(configured) != plan.device:
        raise FleetError(f"{configured}: got {plan.device}'s plan")
    return plan


def run_round(content: RecordDict, node_config: dict) -> RecordDict:
    """One round on this device; any refusal is raised with the device's name in front (the
    coordinator reads it there when it cannot tell the node's device otherwise)."""
    plan = own_plan(content, node_config)
    name = plan.device
    try:
        started = perf_counter()
        seen = seen_files(Path(plan.data_path) if plan.data_path else None)
        inputs = load_inputs(content, node_config, plan)
        trained = train_adapters(inputs, node_config)
        verdict = evaluate_and_accept(inputs, trained.result.tuner.theta)
        record_trained(inputs.store.root, seen)
        return reply(inputs, trained, verdict, perf_counter() - started)
    except (FleetError, ValueError, KeyError) as exc:
        message = str(exc)
        prefixed = message if message.startswith(f"{name}:") else f"{name}: {message}"
        raise (BaseMissing if isinstance(exc, BaseMissing) else FleetError)(prefixed) from exc


@dataclass(frozen=True)
class Trained:
    """The fine-tune and the energy its power probe saw (zeros without a probe)."""

    result: FineTuneResult
    joules: float = 0.0
    mean_watts: float = 0.0
    peak_watts: float = 0.0
    estimated: bool = False  # the probe is the CPU-load model


def train_adapters(inputs: RoundInputs, node_config: dict) -> Trained:
    """Phase two: the plan's epochs from the start adapters, sampled by the power probe."""
    plan = inputs.plan
    config = FineTuneConfig(
        epochs=plan.epochs,
        batch_size=plan.batch_size,
        rank=inputs.layout.rank,
        lr=plan.lr,
        seed=plan.seed + plan.index,
        cache=plan.cache,
    )
    probe = power_probe(
        plan.probe,
        Path(str(node_config.get(NodeConfig.SYS_ROOT, "/sys"))),
        Path(str(node_config.get(NodeConfig.PROC_ROOT, "/proc"))),
        plan.idle_watts,
        plan.full_watts,
    )
    tune = inputs.tune
    with PowerSampler(probe or NoProbe()) as meter:
        result = finetune(
            inputs.model, inputs.method, tune.x, tune.y, config, inputs.cache, start=inputs.start
        )
    if probe is None:
        return Trained(result)
    return Trained(result, meter.joules, meter.mean_watts, meter.peak_watts, probe.estimated)


def reply(inputs: RoundInputs, trained: Trained, verdict: Verdict, seconds: float) -> RecordDict:
    """Phase four: the packed adapters (only when they became active, `sends_adapters`), who
    sends them, and the figures (also left on disk for the device's agent)."""
    content = RecordDict({Part.DEVICE: ConfigRecord({DEVICE_NAME: inputs.name})})
    if sends_adapters(verdict):
        content[Part.ADAPTERS] = adapters_record(trained.result.tuner.theta, inputs.layout.size)
    finish_reply(content, figures_of(inputs, trained, verdict, seconds))
    inputs.store.save_figures(
        {"device": inputs.name, "round": inputs.plan.round, **content[Part.FIGURES]}
    )
    return content


def figures_of(inputs: RoundInputs, trained: Trained, verdict: Verdict, seconds: float) -> Figures:
    split = trained.result.times.per_batch_ms()
    cache = inputs.cache
    return Figures(
        samples=len(inputs.tune),
        loss=verdict.loss,
        acc_before=verdict.acc_before,
        acc_after=verdict.acc_after,
        forward_ms=split["forward"],
        backward_ms=split["backward"],
        update_ms=split["update"],
        train_batch_ms=split["total"],
        finetune_s=seconds,
        cache_bytes=int(cache.nbytes) if cache is not None else 0,
        cache_built=int(inputs.cache_built),
        uplink_bytes=0.0,
        rank=inputs.layout.rank,
        peak_rss_bytes=peak_rss_bytes(),
        energy_joules=trained.joules,
        mean_watts=trained.mean_watts,
        peak_watts=trained.peak_watts,
        power_estimated=int(trained.estimated),
        accepted=int(verdict.accepted),
        acc_active=verdict.acc_active,
    )


def finish_reply(reply: RecordDict, figures: Figures) -> None:
    """Add the figures to a reply, `uplink_bytes` measured on the reply as it will be sent
    (a double: setting it does not change the reply's size)."""
    reply[Part.FIGURES] = figures_record(figures)
    reply[Part.FIGURES]["uplink_bytes"] = float(wire_bytes(reply))


def peak_rss_bytes() -> int:
    """The peak resident memory of this process (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
