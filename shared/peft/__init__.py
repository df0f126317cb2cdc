"""The parts methods are made of, registered by name: adapters beside a weighted layer, the skip
adapters into the logits, and optimizers. `shared.methods` refers to them by these names; the
engine looks them up here and never asks which method it runs."""

from skip2fleet.shared.peft.dora import DoRA
from skip2fleet.shared.peft.galore import GaLore
from skip2fleet.shared.peft.lora import LoRA
from skip2fleet.shared.peft.sgd import SGD

ADAPTERS = {"lora": LoRA, "dora": DoRA}
OPTIMIZERS = {"sgd": SGD, "galore": GaLore}
