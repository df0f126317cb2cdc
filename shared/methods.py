"""The paper's eight fine-tuning methods, declared in one table.

Each method says what of the base it trains (per Linear layer), where its adapters sit, and whether
its forward pass reads the Skip2 cache. The engine (`shared.engine`) derives everything else from
this declaration, including how far back the backward pass has to go.
"""

from __future__ import annotations

from dataclasses import dataclass

from skip2fleet.shared.errors import FleetError

LAYERS = (0, 1, 2)


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    base: tuple[str, str, str] = ("frozen", "frozen", "frozen")  # per layer: frozen | bias | all
    lora: tuple[int, ...] = ()  # Linear layers with a LoRA adapter beside them
    skip: tuple[int, ...] = ()  # activations x_k with an adapter straight into the logits
    cached: bool = False  # forward gathers x0, x1, x2 and base logits from the Skip2 cache

    @property
    def reaches(self) -> int:
        """The lowest layer whose input gradient is never needed: backward stops above it.

        The backward pass must deliver a gradient to the output of every layer below the highest
        trainable one; 3 means no back-propagation through any base layer at all.
        """
        trained = [k for k in LAYERS if self.base[k] != "frozen" or k in self.lora]
        return min(trained, default=3)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ft-all", "all weights and biases", base=("all", "all", "all")),
        Method("ft-last", "last layer's weight and bias", base=("frozen", "frozen", "all")),
        Method("ft-bias", "the three biases", base=("bias", "bias", "bias")),
        Method(
            "ft-all-lora",
            "all weights and biases, plus a LoRA adapter beside each Linear",
            base=("all", "all", "all"),
            lora=LAYERS,
        ),
        Method("lora-all", "a LoRA adapter beside each Linear", lora=LAYERS),
        Method("lora-last", "a LoRA adapter beside the last Linear", lora=(2,)),
        Method("skip-lora", "adapters from x0, x1, x2 straight into the logits", skip=LAYERS),
        Method(
            "skip2-lora",
            "Skip-LoRA reading the frozen base's outputs from a cache",
            skip=LAYERS,
            cached=True,
        ),
    )
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise FleetError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def parse_methods(text: str | None) -> list[Method]:
    """A comma-separated list of method names; None or empty means all eight."""
    if not text:
        return list(METHODS.values())
    return [get_method(name.strip()) for name in text.split(",") if name.strip()]
