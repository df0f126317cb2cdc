"""One round's messages out and replies in (exchange), every node accounted for.

`wait_for_nodes` says which nodes are online once enough of them are; in a deployment only nodes
whose keys this coordinator registered count, so a stranger's node is never sent a plan.

Flower's `Grid.send_and_receive` returns a list of replies: a node that never answers is simply
absent, and the error the SuperLink makes for a node whose heartbeat stopped comes from node 1
(the SuperLink itself). Here each reply is matched to the node it was sent to by message id, with
the seconds it took, so a round can say who was waited for, how long, and why.

`STOP` ends every exchange of the process at its next poll: Ctrl-C in `fleet simulate`, whose
ServerApp runs in a thread of the process, stops the run within a second instead of waiting for
replies that will never come.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from skip2fleet.shared.errors import FleetError, Interrupted

POLL_S = 1.0
NODE_POLL_S = 1.0
STOP = threading.Event()  # set: exchanges end with `Interrupted`; a simulation clears it first


@dataclass
class Exchange:
    replies: dict[int, Message] = field(default_factory=dict)  # node -> its reply (or error)
    seconds: dict[int, float] = field(default_factory=dict)  # node -> seconds until it came
    unanswered: list[int] = field(default_factory=list)  # nodes with no reply at the deadline
    waited_s: float = 0.0  # from the push to the last reply or the deadline


def wait_for_nodes(
    grid: Grid,
    wanted: int,
    timeout: float,
    registered: set[int] | None = None,
    door: Callable[[], str] = lambda: "",
) -> list[int]:
    """The nodes online now, once `wanted` of them are; with `registered`, only those count.
    Too few: the message adds what `door()` says (what the front door refused lately)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(n for n in grid.get_node_ids() if registered is None or n in registered)
        if len(nodes) >= wanted:
            return nodes
        if time.monotonic() > deadline:
            raise FleetError(
                f"only {len(nodes)} of the {wanted} devices needed are connected to the "
                f"SuperLink after {timeout:.0f} s{door()}"
            )
        time.sleep(NODE_POLL_S)


def exchange(grid: Grid, contents: dict[int, RecordDict], timeout: float) -> Exchange:
    """Send each node its content and collect the replies until all came or `timeout` seconds
    passed."""
    messages = [
        Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)
        for node, content in contents.items()
    ]
    ids = list(grid.push_messages(messages))
    node_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=True)}
    started = time.monotonic()
    done = Exchange()
    while True:
        pending = [mid for mid in ids if node_of[mid] not in done.replies]
        if not pending or time.monotonic() - started >= timeout:
            break
        if STOP.is_set():
            raise Interrupted(f"interrupted while waiting for {len(pending)} replies")
        for reply in grid.pull_messages(pending):
            node = node_of.get(reply.metadata.reply_to_message_id)
            if node is not None and node not in done.replies:
                done.replies[node] = reply
                done.seconds[node] = time.monotonic() - started
        if len(done.replies) < len(ids):
            time.sleep(POLL_S)
    done.unanswered = [node_of[mid] for mid in ids if node_of[mid] not in done.replies]
    done.waited_s = time.monotonic() - started
    return done
