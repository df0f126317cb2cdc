"""The parts methods are made of, registered by name: adapters beside a weighted layer, the skip
adapters into the logits, and optimizers. A method (`shared.methods`) names its adapter and its
optimizer; the engine and the layout look them up here. They follow what a method declares (what
it trains, its adapter, skip adapters, the cache), never its name."""

from skip2fleet.shared.peft.dora import DoRA
from skip2fleet.shared.peft.galore import GaLore
from skip2fleet.shared.peft.lora import LoRA
from skip2fleet.shared.peft.sgd import SGD

ADAPTERS = {"lora": LoRA, "dora": DoRA}
OPTIMIZERS = {"sgd": SGD, "galore": GaLore}
