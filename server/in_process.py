"""Flower's strategy loop with the sites as functions of this process: no SuperLink, no messages on a wire.

``strategy.start(grid=InProcessGrid(...), ...)`` runs the very rounds the ServerApp runs
(configure, the sites' replies, the reply checks, Flower's aggregation and server optimiser, the
EMA), which is how the quality benchmark trains federated models without Flower's fixed start-up
cost. Replies are returned in node order, so the float32 sums of the average do not depend on
the order in which Flower happened to sample the nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

IN_PROCESS_RUN_ID = 0

# A site: the message the server sent it -> the content of its reply.
SiteFunction = Callable[[Message], RecordDict]


class InProcessGrid(Grid):
    """A Grid whose nodes are the given functions, called in turn on each message sent to them."""

    def __init__(self, sites: list[SiteFunction]) -> None:
        self._sites = {node_id: site for node_id, site in enumerate(sites, start=SUPERLINK_NODE_ID + 1)}
        _claim_server_identity()

    def get_node_ids(self) -> Iterable[int]:
        return list(self._sites)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = sorted(messages, key=lambda m: m.metadata.dst_node_id)
        return [Message(self._sites[msg.metadata.dst_node_id](msg), reply_to=msg) for msg in sent]

    # The rest of Grid's interface is the SuperLink's; nothing in a strategy's loop calls it.
    def set_run(self, run: object) -> None:
        raise NotImplementedError("InProcessGrid has no run")

    @property
    def run(self) -> object:
        raise NotImplementedError("InProcessGrid has no run")

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("InProcessGrid only sends and receives in one call")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("InProcessGrid only sends and receives in one call")


def _claim_server_identity() -> None:
    """Let Flower build messages here: it stamps each with this process's task identity, which the
    SuperLink sets for a real ServerApp (and Flower's legacy in-process app sets as done here)."""
    try:
        TaskIdentity.run_id
    except RuntimeError:
        TaskIdentity.task_id = 0
        TaskIdentity.run_id = IN_PROCESS_RUN_ID
        TaskIdentity.node_id = SUPERLINK_NODE_ID
