"""A round's replies, each checked alone (validate): who sent it, its shape, its values.

A reply is its node's device. In a deployment the coordinator registered every node's key under a
device name (`trusted`), so a reply is that device's whatever it claims, and one that claims
another name is refused; in a simulation a node is the device its first reply names. Then the
reply's figures must read, its adapters must be float32 of the device's layout size (checked on
the record's metadata before any array is built, `shared.records`) and finite, and its sample
count (the weight fedavg and svd give it) an integer in [1, training.max_samples]: the
coordinator bounds what it cannot check. A device whose own hold-out rejected its new adapters
(`accepted` 0) sends none (`client.acceptance`); one that sends them all the same is refused, so
adapters a device rejected never count. An error reply is
a refusal in the device's own words (cut to `MAX_REASON` characters), or the device's loss when
Flower answered for the node. Every device of the fleet ends up named once in a `Ledger`; a node
that cannot be named (not registered, or naming no device of the fleet) is only counted, by why:
a node id is never written where a device's name goes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import Error, Message, RecordDict
from flwr.common.constant import ErrorCode as FlowerError

from skip2fleet.server.federation.exchange import Exchange
from skip2fleet.shared.datasets.samples import DEFAULT_MAX_SAMPLES
from skip2fleet.shared.protocol import DEVICE_NAME, Figures, Part
from skip2fleet.shared.records import record_adapters

MAX_REASON = 300  # characters of a device's own words kept (an error reason, a claimed name)


@dataclass
class Roster:
    """Who may answer a round: every device of the fleet (in its order) with its rank and the
    size of its adapters, and node -> device as far as the coordinator knows it."""

    ranks: dict[str, int]
    sizes: dict[str, int]  # values in a device's packed adapters (`shared.layout`)
    device_of: dict[int, str]  # registered keys (trusted), else learnt from first replies
    trusted: bool  # deployments: registered keys; simulations learn nodes from replies
    max_samples: int = DEFAULT_MAX_SAMPLES  # training.max_samples: the most a reply may claim


@dataclass(frozen=True)
class Reply:
    """A reply that passed validation."""

    device: str
    adapters: np.ndarray | None  # packed, as received; None: the device kept its active model
    figures: Figures


class Refused(Exception):
    """Why a reply is not used; `device` None when the node cannot be named."""

    def __init__(self, device: str | None, why: str) -> None:
        super().__init__(why)
        self.device, self.why = device, why


class Lost(Refused):
    """The node never replied: Flower answered for it."""


@dataclass
class Ledger:
    """A round's replies: every device once, accepted, refused (why) or missing (why); nodes
    that cannot be named only counted, by why."""

    accepted: dict[str, Reply] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    unnamed: dict[str, int] = field(default_factory=dict)  # why -> how many nodes

    def refuse(self, device: str | None, why: str, lost: bool = False) -> None:
        if device is None:
            self.unnamed[why] = self.unnamed.get(why, 0) + 1
            return
        self.accepted.pop(device, None)
        (self.missing if lost else self.refused)[device] = why

    def summary(self, roster: Roster) -> dict:
        """The ledger as a round's record holds it, devices in the fleet's order."""
        return {
            "devices": {
                d: vars(self.accepted[d].figures) for d in roster.ranks if d in self.accepted
            },
            "refused": self.refused,
            "missing": list(self.missing),
            "missing_why": self.missing,
            "unnamed_nodes": self.unnamed,
        }

    def received(self, roster: Roster) -> dict[str, np.ndarray]:
        """The accepted replies' adapters as received, in the fleet's order (a device that kept
        its active model sent none)."""
        return {
            d: reply.adapters
            for d in roster.ranks
            if (reply := self.accepted.get(d)) is not None and reply.adapters is not None
        }


def validate(answers: Exchange, roster: Roster) -> Ledger:
    """Every reply checked on its own; a device that neither replied nor was waited for was
    offline when the round started."""
    ledger = Ledger()
    for node in answers.unanswered:
        why = f"no answer within {answers.waited_s:.0f} s"
        ledger.refuse(roster.device_of.get(node), why, lost=True)
    for node, message in answers.replies.items():
        try:
            reply = validate_reply(node, message, answers.seconds[node], roster)
        except Refused as refused:
            ledger.refuse(refused.device, refused.why, lost=isinstance(refused, Lost))
        else:
            ledger.accepted[reply.device] = reply
    for device in roster.ranks:
        if not any(device in part for part in (ledger.accepted, ledger.refused, ledger.missing)):
            ledger.missing[device] = "offline when the round started"
    return ledger


def validate_reply(node: int, message: Message, seconds: float, roster: Roster) -> Reply:
    """The reply of `node`, `seconds` after its plan was sent: identity, shape, finiteness;
    raises `Refused` (or `Lost`) saying why not."""
    if message.has_error():
        raise _error_verdict(node, message.error, seconds, roster)
    content = message.content
    device = identify(node, _claimed(content), roster)
    try:
        figures = Figures.from_record(content[Part.FIGURES])
        sent = Part.ADAPTERS in content
        if figures.accepted == 0 and sent:
            raise Refused(device, "sent adapters its own hold-out rejected (accepted 0)")
        adapters = record_adapters(content[Part.ADAPTERS], roster.sizes[device]) if sent else None
    except (KeyError, ValueError, TypeError) as exc:
        raise Refused(device, f"malformed reply ({_bounded(str(exc))})") from None
    check_samples(device, figures.samples, roster.max_samples)
    if adapters is not None and not np.isfinite(adapters).all():
        raise Refused(device, "adapters hold NaN or Inf")
    return Reply(device, adapters, figures)


def check_samples(device: str, samples: object, most: int) -> None:
    """A reply's sample count is its weight: an integer in [1, `most`], or the reply is refused."""
    whole = isinstance(samples, int | float) and not isinstance(samples, bool)
    if not (whole and float(samples).is_integer() and 1 <= samples <= most):
        raise Refused(
            device, f"sample count {_bounded(repr(samples))} is not an integer in [1, {most}]"
        )


def identify(node: int, claimed: str | None, roster: Roster) -> str:
    """The device that sent a reply claiming to be `claimed`: the node's registered device in a
    deployment, else the device the node first named (learnt here)."""
    device = roster.device_of.get(node)
    if device is None and roster.trusted:
        raise Refused(None, "not a node this coordinator registered")
    if device is None:
        if claimed not in roster.ranks:
            raise Refused(None, "names no device of this fleet")
        device = roster.device_of[node] = claimed
    if claimed != device:
        whose = "its key is" if roster.trusted else "it answered before as"
        raise Refused(device, f"reply claims to be {claimed!r}; {whose} {device}'s")
    if device not in roster.ranks:
        raise Refused(device, "not a device of this fleet")
    return device


def _claimed(content: RecordDict) -> str | None:
    """The device name a reply gives, if any."""
    try:
        return _bounded(str(content[Part.DEVICE][DEVICE_NAME]))
    except (KeyError, ValueError, TypeError):
        return None


def _error_verdict(node: int, error: Error, seconds: float, roster: Roster) -> Refused:
    """An error reply: the node lost (Flower answered for it), or refused in the device's words
    (a device starts them with its name, `client.clientapp.run_round`, which names an unknown
    node's device in a simulation)."""
    reason = _bounded(error.reason or f"error code {error.code}")
    named = reason.split(":", 1)[0]
    claimed = named if not roster.trusted and named in roster.ranks else None
    device = roster.device_of.get(node) or claimed
    if error.code == FlowerError.NODE_UNAVAILABLE:
        why = f"lost: no heartbeat, declared unavailable by Flower after {seconds:.0f} s"
        return Lost(device, why)
    if error.code in (FlowerError.MESSAGE_UNAVAILABLE, FlowerError.REPLY_MESSAGE_UNAVAILABLE):
        why = f"lost: Flower could not deliver the plan or the reply (after {seconds:.0f} s)"
        return Lost(device, why)
    return Refused(device, reason)


def _bounded(text: str) -> str:
    """A device's words as one line of at most MAX_REASON characters."""
    line = " ".join(text.split())
    return line if len(line) <= MAX_REASON else line[: MAX_REASON - 1] + "…"
