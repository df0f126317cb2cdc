"""A ClientApp that misbehaves on purpose, for the fault-injection suite (`tests/test_faults.py`).

It is the real ClientApp, except that a device whose state folder holds `inject-fault.json`
(`{"<round>": "nan" | "shape" | "scale1000"}`) corrupts its reply in those rounds: finite but
1000x too large adapters, a NaN, or one value too many. The suite can so poison chosen rounds of a
real deployment without restarting a SuperNode.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from skip2fleet.client.clientapp import train as real_train
from skip2fleet.shared.protocol import THETA, NodeConfig, Part, RoundPlan

FAULT_FILE = "inject-fault.json"
FAULTS = {
    "nan": lambda v: np.where(np.arange(v.size) == 3, np.nan, v).astype(np.float32),
    "shape": lambda v: np.append(v, np.float32(0)),
    "scale1000": lambda v: v * np.float32(1000),
}

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = real_train(msg, context)
    path = Path(str(context.node_config.get(NodeConfig.STATE_DIR, ""))) / FAULT_FILE
    if reply.has_content() and Part.ADAPTERS in reply.content and path.is_file():
        fault = json.loads(path.read_text()).get(
            str(RoundPlan.from_record(msg.content[Part.PLAN]).round)
        )
        if fault:
            vector = reply.content[Part.ADAPTERS][THETA].numpy()  # past the wire check, on purpose:
            reply.content[Part.ADAPTERS] = ArrayRecord({THETA: Array(FAULTS[fault](vector))})
    return reply
