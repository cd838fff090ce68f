"""A Flower ``Grid`` that collects the sites' replies promptly.

Flower 1.42's deployment grid (``GrpcGrid``/HTTP grid) waits 3 s between two pulls of the
replies in ``send_and_receive``: on average 1.5 s lost per phase of every round, whatever the
sites' compute. ``Grid.send_and_receive`` is documented as ``push_messages`` followed by
``pull_messages`` until every reply is in or the timeout passes; this wrapper does exactly
that through the same grid, first after 0.1 s (as Flower's in-memory simulation grid does),
then less and less often up to once a second: a short round loses little to the wait, and a
long one does not flood the SuperLink (and its access log) with pulls. Everything else goes
straight to the wrapped grid.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.superlink.grid import HttpGrid

if TYPE_CHECKING:
    from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
    from flwr.supercore.run import Run

FIRST_POLL_S = 0.1
MAX_POLL_S = 1.0
POLL_GROWTH = 1.5


def prompt(grid: Grid) -> Grid:
    """Flower's deployment grid (``HttpGrid``, what ``flwr-serverapp`` hands the ServerApp) wrapped in
    :class:`PromptGrid`; any other grid as it is. The in-memory simulation grid already pulls every
    0.1 s, and a grid that wraps Flower's own (a test's recorder) must keep its ``send_and_receive``."""
    return PromptGrid(grid) if type(grid) is HttpGrid else grid


class PromptGrid(Grid):
    """Delegates to ``grid``; only the wait for replies in :meth:`send_and_receive` is shorter."""

    def __init__(self, grid: Grid, first_poll_s: float = FIRST_POLL_S, max_poll_s: float = MAX_POLL_S) -> None:
        if not 0 < first_poll_s <= max_poll_s:
            raise ValueError(f"need 0 < first_poll_s <= max_poll_s, got {first_poll_s} and {max_poll_s}")
        self._grid = grid
        self.first_poll_s, self.max_poll_s = first_poll_s, max_poll_s

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = {mid for mid in self.push_messages(list(messages)) if mid}
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = self.first_poll_s
        while pending:
            received = list(self.pull_messages(pending))
            replies.extend(received)
            pending -= {msg.metadata.reply_to_message_id for msg in received}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(wait if deadline is None else min(wait, max(0.0, deadline - time.monotonic())))
            wait = min(self.max_poll_s, wait * POLL_GROWTH)
        return replies
