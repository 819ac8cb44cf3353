"""Real Flower reply messages for server-side tests (no simulation needed)."""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from fl import protocol as P


def train_reply(node: int, arrays: dict[str, torch.Tensor], examples: int = 5,
                metrics: dict | None = None) -> Message:
    """A device's reply to a training message, as the server receives it."""
    metadata = Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=f"train-{node}", group_id="1",
                        created_at=time.time(), ttl=60.0, message_type="train")
    content = RecordDict({P.ARRAYS: ArrayRecord(arrays),
                          P.METRICS: MetricRecord({P.WEIGHT_KEY: examples, **(metrics or {})})})
    return Message(metadata=metadata, content=content)
