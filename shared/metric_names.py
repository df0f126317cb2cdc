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
ACTIVE_MODEL = Metric(
    "skip2fleet_device_active_model_accuracy_ratio",
    "Hold-out accuracy of the model fleet predict uses, labelled by its base and adapters "
    "(round 0: the base alone).",
    ("base_sha256", "round", "version"),
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

# The ServerApp's pushes, one group per run, labelled by round.
ROUND_NUMBER = Metric("skip2fleet_round_number", "Last completed round.")
ROUND_DURATION = Metric("skip2fleet_round_duration_seconds", "Wall time of the round.", ("round",))
ROUND_DEVICES = Metric("skip2fleet_round_devices", "Devices by outcome.", ("round", "outcome"))
ROUND_REFUSED = Metric(
    "skip2fleet_round_refused_replies", "Replies refused in the round.", ("round",)
)
ROUND_SVD_ERROR = Metric(
    "skip2fleet_round_svd_relative_error", "Error left by SVD re-factorisation.", ("round",)
)
_PER_DEVICE = ("round", "device", "method")
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
