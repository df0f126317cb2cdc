"""Every metric the fleet exports, named once: the agent, the ServerApp's pushes and the dashboard
all read these. Names follow Prometheus' rules: base units, with the unit as suffix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    help: str
    labels: tuple[str, ...] = ()


# A device's agent, on every scrape (labels `device` and `instance` come from Prometheus).
DEVICE_POWER = Metric(
    "skip2fleet_device_power_watts", "Power drawn by the board.", ("source", "estimated")
)
DEVICE_ENERGY = Metric(
    "skip2fleet_device_energy_joules", "Energy since the agent started.", ("source", "estimated")
)
DEVICE_TEMPERATURE = Metric("skip2fleet_device_temperature_celsius", "Hottest thermal zone.")
DEVICE_CPU_BUSY = Metric(
    "skip2fleet_device_cpu_busy_ratio", "CPU busy share since the previous scrape."
)
DEVICE_MEMORY = "skip2fleet_device_memory_{kind}_bytes"  # kind: total | available
PROBE_ERRORS = Metric(
    "skip2fleet_probe_errors", "Probe readings skipped, by probe and kind.", ("probe", "kind")
)
LAST_FINETUNE = "skip2fleet_last_finetune_{figure}"  # round, seconds, energy_joules, ...
LAST_FINETUNE_ROUND = LAST_FINETUNE.format(figure="round")
LAST_FINETUNE_ACCURACY = Metric(
    LAST_FINETUNE.format(figure="accuracy_ratio"),
    "Accuracy on the device's held-out data.",
    ("phase",),
)
# The active model's identity as values, not labels: a label per round, version or base would
# make new series every round (or every pretraining); a value that changes makes none.
ACTIVE_MODEL = Metric(
    "skip2fleet_device_active_model_accuracy_ratio",
    "Hold-out accuracy of the model fleet predict uses.",
)
ACTIVE_MODEL_ROUND = Metric(
    "skip2fleet_device_active_model_round",
    "Round of the adapters fleet predict uses (0: the base alone).",
)
ACTIVE_MODEL_VERSION = Metric(
    "skip2fleet_device_active_model_version",
    "Kept version number of those adapters (0: the base alone).",
)
ACTIVE_MODEL_BASE = Metric(
    "skip2fleet_device_active_model_base",
    "The base model fleet predict uses: its sha256's first 12 hex digits as a number (exact).",
)
BASE_ID_HEX = 12  # 48 bits: a float64 holds them exactly


def base_id(sha256: str) -> int:
    """A base's identity as a metric value: the first BASE_ID_HEX hex digits of its sha256."""
    return int(sha256[:BASE_ID_HEX], 16)


def base_hex(value: float) -> str:
    """The hex digits `base_id` made a number of, back."""
    return f"{int(value):0{BASE_ID_HEX}x}"


UNTRAINED_SAMPLES = Metric(
    "skip2fleet_device_untrained_samples",
    "Samples in the device's own folder no round has trained on (0 on a built-in partition "
    "once trained; absent before).",
)
CLOCK_OFFSET = Metric(
    "skip2fleet_device_clock_offset_seconds",
    "The device's clock minus the front door's (its HTTP Date), at the last check.",
)
SUPERNODE_RESTARTS = Metric(
    "skip2fleet_device_supernode_restarts",
    "SuperNodes the watchdog stopped for having no connection to the coordinator.",
)
LAST_FINETUNE_BATCH = Metric(
    LAST_FINETUNE.format(figure="train_batch_seconds"), "Time per training batch.", ("phase",)
)

# `fleet serve`, exported by the agent from the service's snapshot (`client/serving/tally.py`).
SERVE_PREDICTIONS = Metric(
    "skip2fleet_serve_predictions",
    "Samples the prediction service classified, by class.",
    ("class",),
)
SERVE_REJECTED = Metric(
    "skip2fleet_serve_rejected",
    "Requests and spool files refused: width, values (NaN/Inf), garbage, file, model (none yet).",
    ("kind",),
)
SERVE_CONFIDENCE = Metric(
    "skip2fleet_serve_confidence", "The winning class's probability, per sample."
)
SERVE_LATENCY = Metric(
    "skip2fleet_serve_latency_seconds", "Time to classify one request or spool block."
)
SERVE_VERSION = Metric(
    "skip2fleet_serve_version", "Adapters version serving (0: the base alone, -1: none yet)."
)
SERVE_ROUND = Metric("skip2fleet_serve_round", "Round whose adapters are serving (0: the base).")
SERVE_SWITCHES = Metric("skip2fleet_serve_model_switches", "Times the service changed model.")
SERVE_LOAD_FAILURES = Metric(
    "skip2fleet_serve_model_load_failures",
    "Active models that failed to load (the one before kept).",
)
SERVE_BACKLOG = Metric("skip2fleet_serve_spool_backlog", "Spool files waiting to be answered.")
SERVE_UPDATED = Metric(
    "skip2fleet_serve_snapshot_timestamp_seconds", "When the service last wrote its figures."
)

# `fleet schedule`'s pushes (its own group, replaced by every scheduled run): the outcome is a
# label of four values, the time and rounds are values.
SCHEDULE_LAST_RUN = Metric(
    "skip2fleet_schedule_last_run_timestamp_seconds", "When the last scheduled run started."
)
SCHEDULE_LAST_ROUNDS = Metric(
    "skip2fleet_schedule_last_run_rounds", "Rounds the last scheduled run completed."
)
SCHEDULE_OUTCOME = Metric(
    "skip2fleet_schedule_last_outcome",
    "1 for the last scheduled run's outcome: completed, failed, skipped-overlap (a run was "
    "going), skipped-no-new-samples (fewer than min_devices devices had new samples).",
    ("outcome",),
)
SCHEDULE_NEW_SAMPLES = Metric(
    "skip2fleet_schedule_devices_with_new_samples",
    "Devices that had samples they had not trained on when the last scheduled run looked.",
)

# The ServerApp's pushes: one group for the fleet, replaced after every round. The round is a
# value, never a label: the series are the same after 1 round as after 100.
RUN_INFO = Metric(
    "skip2fleet_run_info",
    "The run whose rounds are pushed (always 1): its folder's name, method and aggregation.",
    ("run", "method", "aggregation"),
)
ROUND_NUMBER = Metric("skip2fleet_round_number", "Last completed round.")
ROUND_DURATION = Metric(
    "skip2fleet_round_duration_seconds", "Wall time of the last completed round."
)
ROUND_DEVICES = Metric(
    "skip2fleet_round_devices", "Devices of the last completed round, by outcome.", ("outcome",)
)
ROUND_REFUSED = Metric(
    "skip2fleet_round_refused_replies", "Replies refused in the last completed round."
)
ROUND_SVD_ERROR = Metric(
    "skip2fleet_round_svd_relative_error", "Error left by SVD re-factorisation, last round."
)
# A device's figures of the last completed round; a device that did not reply has none.
_PER_DEVICE = ("device", "method")
DEVICE_ACCURACY = Metric(
    "skip2fleet_device_accuracy_ratio",
    "Accuracy on the device's held-out data.",
    (*_PER_DEVICE, "phase"),
)
DEVICE_TRAIN_BATCH = Metric(
    "skip2fleet_device_train_batch_seconds", "Time per training batch.", (*_PER_DEVICE, "phase")
)
DEVICE_FINETUNE_POWER = Metric(
    "skip2fleet_device_finetune_power_watts", "Power during the fine-tune.", (*_PER_DEVICE, "stat")
)
DEVICE_FINETUNE_SECONDS = Metric(
    "skip2fleet_device_finetune_seconds", "Fine-tune wall time.", _PER_DEVICE
)
DEVICE_UPLINK = Metric("skip2fleet_device_uplink_bytes", "Bytes of the reply.", _PER_DEVICE)
DEVICE_FINETUNE_ENERGY = Metric(
    "skip2fleet_device_finetune_energy_joules", "Energy of the fine-tune.", _PER_DEVICE
)
DEVICE_CACHE = Metric("skip2fleet_device_cache_bytes", "Skip2 cache size.", _PER_DEVICE)
