"""ClientApp: "training" adds noise to the global projector it received and sends it back."""
from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flower_noop.projector import add_noise

app = ClientApp()
NUM_EXAMPLES = 100  # every client counts alike, as the fedcmp no-op clients do


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    seed = int(context.node_id) % 2**32 * 1000 + int(msg.content["config"]["server-round"])
    content = RecordDict({"arrays": ArrayRecord(add_noise(arrays, seed)),
                          "metrics": MetricRecord({"num-examples": NUM_EXAMPLES})})
    return Message(content=content, reply_to=msg)
