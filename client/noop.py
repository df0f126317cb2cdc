"""A ClientApp that does no work: zero adapters of the right size, straight back.

Run in place of `client/clientapp.py` (`fleet bench round`), it measures what Flower itself costs
per round and what a ClientApp process weighs before any model, so the real app's overhead can be
told apart from Flower's.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from skip2fleet.client.clientapp import finish_reply, own_plan, peak_rss_bytes
from skip2fleet.shared import model as base_model
from skip2fleet.shared.layout import layout
from skip2fleet.shared.methods import get_method
from skip2fleet.shared.protocol import DEVICE_NAME, Figures, Part
from skip2fleet.shared.records import adapters_record, record_model
from skip2fleet.shared.spec import Spec

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    plan = own_plan(msg.content, context.node_config)
    if Part.BASE in msg.content:
        spec = base_model.spec_of(record_model(msg.content[Part.BASE]))
        context.state["noop"] = ConfigRecord({"spec": spec.to_json()})
    spec = Spec.from_json(str(context.state["noop"]["spec"]))
    size = layout(get_method(plan.method), spec, plan.rank).size
    reply = RecordDict(
        {
            Part.ADAPTERS: adapters_record(np.zeros(size, np.float32), size),
            Part.DEVICE: ConfigRecord({DEVICE_NAME: plan.device}),
        }
    )
    figures = Figures(
        0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0,
        0,
        0.0,
        plan.rank,
        peak_rss_bytes(),
        0.0,
        0.0,
        0.0,
        0,
    )
    finish_reply(reply, figures)
    return Message(content=reply, reply_to=msg)
