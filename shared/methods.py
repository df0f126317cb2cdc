"""The fine-tuning methods, declared in one table.

Each method says what of the base it trains (weight matrices, biases, batch-norm scale and shift:
on every weighted layer or on the last), which adapter (`shared.peft.ADAPTERS`) sits beside which
weighted layers, whether adapters run from every block's input straight into the logits (skip),
whether its forward pass reads the Skip2 cache, and its optimizer (`shared.peft.OPTIMIZERS`). How
an adapter merges for inference and which state an optimizer keeps are the adapter's and the
optimizer's own. The engine (`shared.engine`) derives everything else, including how far back the
backward pass has to go. LoRA and DoRA sit only beside linear and conv1d layers, never beside a
depthwise one (see `shared.spec.Placed.adaptable`); with `last`, beside the head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from skip2fleet.shared.errors import FleetError
from skip2fleet.shared.spec import Placed, Spec

Where = Literal["none", "last", "all"]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    weights: Where = "none"  # base weight matrices that train
    biases: Where = "none"
    batchnorm: bool = False  # batch-norm scale and shift (statistics stay frozen)
    adapter: str | None = None  # a key of shared.peft.ADAPTERS
    adapt: Where = "none"  # weighted layers the adapter sits beside
    skip: bool = False  # an adapter from every block's input straight into the logits
    cached: bool = False  # forward gathers the skip taps and base logits from the Skip2 cache
    optimizer: str = "sgd"  # a key of shared.peft.OPTIMIZERS

    def __post_init__(self) -> None:
        if self.cached and not self.skip:
            raise ValueError(f"{self.name}: only skip adapters can read the cache")
        trains_base = self.weights != "none" or self.biases != "none" or self.batchnorm
        if self.skip and (trains_base or self.adapt != "none"):
            raise ValueError(f"{self.name}: skip adapters assume a frozen base")

    def adapted(self, spec: Spec) -> list[Placed]:
        """The weighted layers with an adapter beside them."""
        return [p for p in _where(self.adapt, spec) if p.adaptable]

    def trained(self, what: str, spec: Spec) -> set[int]:
        """Weight indices k whose base `what` ("weights" or "biases") train."""
        return {p.k for p in _where(getattr(self, what), spec)}


def _where(where: Where, spec: Spec) -> list[Placed]:
    weighted = spec.weighted()
    return {"none": [], "last": weighted[-1:], "all": weighted}[where]


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ft-all", "all weights and biases", weights="all", biases="all"),
        Method("ft-last", "the last layer's weight and bias", weights="last", biases="last"),
        Method("ft-bias", "every bias", biases="all"),
        Method(
            "ft-all-lora",
            "all weights and biases, plus LoRA beside each layer",
            weights="all",
            biases="all",
            adapter="lora",
            adapt="all",
        ),
        Method("lora-all", "LoRA beside each layer", adapter="lora", adapt="all"),
        Method("lora-last", "LoRA beside the last layer", adapter="lora", adapt="last"),
        Method(
            "skip-lora", "adapters from every block's input straight into the logits", skip=True
        ),
        Method(
            "skip2-lora",
            "Skip-LoRA reading the frozen base's taps and logits from a cache",
            skip=True,
            cached=True,
        ),
        Method(
            "bn-head",
            "batch-norm scale and shift plus the last layer (TinyTL-style BN+H)",
            weights="last",
            biases="last",
            batchnorm=True,
        ),
        Method("dora", "DoRA beside each layer", adapter="dora", adapt="all"),
        Method(
            "galore",
            "all weights and biases, each weight gradient projected to rank r",
            weights="all",
            biases="all",
            optimizer="galore",
        ),
    )
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise FleetError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def parse_methods(text: str | None) -> list[Method]:
    """A comma-separated list of method names; None or empty means all of them."""
    if not text:
        return list(METHODS.values())
    return [get_method(name.strip()) for name in text.split(",") if name.strip()]
