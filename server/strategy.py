"""FedAvg that checkpoints every round, logs per-site metrics and resumes mid-federation."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from common import keys
from common.checkpoint import Checkpoint, round_checkpoint_path, save_checkpoint
from common.config import FedsynthConfig
from common.errors import FederationError
from common.fileio import append_jsonl
from common.transfer import decode_update
from server.partial_updates import PartialUpdates
from server.update_checks import update_problem

log = logging.getLogger("fedsynth.server")


def arrays_to_numpy(record: ArrayRecord) -> dict[str, Any]:
    return {name: array.numpy() for name, array in record.items()}


def aggregate_nonempty_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Weighted mean over the replies that carry weight: a site with no held-out patient
    reports zero examples and must not turn the average into a division by zero."""
    weighted = [r for r in records if float(next(iter(r.metric_records.values()))[weighting_key]) > 0]
    if not weighted:
        return MetricRecord({weighting_key: 0})
    return aggregate_metricrecords(weighted, weighting_key)


def keep_shared_metrics(replies: list[Message]) -> None:
    """Drop, in place, the metrics not every reply carries (each site's own are already logged).

    Flower's FedAvg refuses to aggregate replies whose metric keys differ, and one site without
    a metric (a DP site keeps its training loss) must not cost the round.
    """
    records = [msg.content[keys.METRICS] for msg in replies]
    shared = set.intersection(*(set(r.keys()) for r in records)) if records else set()
    for record in records:
        for key in set(record.keys()) - shared:
            del record[key]


def aggregate_train_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """FedAvg's weighted mean of the train metrics, except the validation loss: a train reply
    weighs by its training patients, the validation loss by the site's held-out slices (sites
    without any carry no weight)."""
    metrics = aggregate_metricrecords(records, weighting_key)
    val = [next(iter(r.metric_records.values())) for r in records]
    val = [m for m in val if keys.VAL_LOSS in m and float(m.get(keys.VAL_EXAMPLES, 0)) > 0]
    metrics.pop(keys.VAL_LOSS, None)
    metrics.pop(keys.VAL_EXAMPLES, None)
    if val:
        count = sum(float(m[keys.VAL_EXAMPLES]) for m in val)
        metrics[keys.VAL_LOSS] = sum(float(m[keys.VAL_LOSS]) * float(m[keys.VAL_EXAMPLES]) for m in val) / count
        metrics[keys.VAL_EXAMPLES] = int(count)
    return metrics


def _finite_or_none(value: float) -> float | None:
    """JSON has no infinity: a non-private site's epsilon is written as null."""
    return value if math.isfinite(value) else None


class CheckpointingFedAvg(FedAvg):
    """FedAvg weighted by ``num-examples`` whose round numbers continue a resumed run.

    Args:
        cfg: the federation config (saved inside every checkpoint).
        rounds_done: rounds completed before this start; Flower's round 1 is round
            ``rounds_done + 1`` of the federation.
        sites: per-site privacy state carried over from the resumed checkpoint.
        provenance: saved in every round checkpoint (where the run's weights started).
    """

    def __init__(self, cfg: FedsynthConfig, rounds_done: int = 0, sites: dict[str, dict[str, float]] | None = None,
                 provenance: dict[str, Any] | None = None) -> None:
        fed = cfg.federation
        super().__init__(
            fraction_train=fed.fraction_train,
            fraction_evaluate=fed.fraction_train,
            min_train_nodes=fed.min_train_nodes,
            min_evaluate_nodes=fed.min_train_nodes,
            min_available_nodes=fed.min_available_nodes,
            weighted_by_key=keys.NUM_EXAMPLES,
            arrayrecord_key=keys.ARRAYS,
            configrecord_key=keys.CONFIG,
            train_metrics_aggr_fn=aggregate_train_metrics,
            evaluate_metrics_aggr_fn=aggregate_nonempty_metrics,
        )
        self.cfg = cfg
        self.rounds_done = rounds_done
        self.sites: dict[str, dict[str, float]] = dict(sites or {})
        self.provenance: dict[str, Any] = dict(provenance or {})
        self._round_started = time.time()
        self._global: dict[str, Any] = {}
        # Messages of this phase; Flower fills in their ids when it sends them. A reply names the
        # message it answers, which is how an error made up by the SuperLink is traced to its site.
        self._sent: list[Message] = []
        self._node_sites: dict[int, str] = {}  # learnt from earlier replies, to name a site that later fails
        self._partial = PartialUpdates(cfg)  # training.trainable: what a reply carries, and its completion

    def _wait_for_nodes(self, grid: Grid, fed_round: int) -> None:
        """Flower's FedAvg waits forever for nodes; a consortium needs to stop cleanly instead."""
        need = max(self.min_available_nodes, self.min_train_nodes)
        deadline = time.monotonic() + self.cfg.federation.node_wait_timeout_s
        while (have := len(list(grid.get_node_ids()))) < need:
            if time.monotonic() > deadline:
                raise FederationError(
                    f"round {fed_round}: only {have} of the {need} required sites connected within "
                    f"{self.cfg.federation.node_wait_timeout_s:g} s; stopping, last checkpoint (round {fed_round - 1}) intact"
                )
            time.sleep(1.0)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._round_started = time.time()
        self._wait_for_nodes(grid, self.rounds_done + server_round)
        self._global = arrays_to_numpy(arrays)
        self._sent = list(super().configure_train(self.rounds_done + server_round, arrays, config, grid))
        return self._sent

    def evaluates_in(self, fed_round: int) -> bool:
        """Whether round ``fed_round`` (of the federation, resumed runs included) has an evaluate phase."""
        every = self.cfg.federation.evaluate_every
        return every > 0 and fed_round % every == 0

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if not self.evaluates_in(self.rounds_done + server_round):
            self._sent = []
            return self._sent  # no messages: Flower's loop sends nothing and aggregates nothing
        self._wait_for_nodes(grid, self.rounds_done + server_round)
        self._sent = list(super().configure_evaluate(self.rounds_done + server_round, arrays, config, grid))
        return self._sent

    def _accepted(self, fed_round: int, replies: list[Message]) -> list[Message]:
        """Replies whose update passes :func:`update_problem`; the others are logged with the site's name."""
        accepted = []
        for msg in replies:
            if msg.has_error():
                continue
            content = msg.content
            if keys.ARRAYS not in content.array_records or keys.METRICS not in content.metric_records:
                problem = "reply lacks its arrays or metrics record"
            else:
                update = arrays_to_numpy(content[keys.ARRAYS])
                problem = update_problem(update, self._partial.expected(self._global), content[keys.METRICS],
                                         self.cfg.federation.max_update_norm, self.cfg.federation.transfer_dtype,
                                         note=self._partial.note)
            if problem is None:
                if self.cfg.federation.transfer_dtype != "float32":  # FedAvg must average in float32
                    content[keys.ARRAYS] = ArrayRecord({k: Array(v) for k, v in decode_update(update).items()})
                content[keys.ARRAYS] = self._partial.completed(content[keys.ARRAYS], self._global)
                accepted.append(msg)
                continue
            site_id = self._site_id(msg)
            log.warning("round %d: rejected the update of site %s (node %d): %s", fed_round, site_id, msg.metadata.src_node_id, problem)
            append_jsonl(self.cfg.federation.metrics_file, {"round": fed_round, "phase": "train", "kind": "rejected",
                                                           "time": time.time(), "site_id": site_id,
                                                           "node_id": msg.metadata.src_node_id, "reason": problem})
        return accepted

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        fed_round = self.rounds_done + server_round
        self._log_replies(fed_round, "train", replies)
        accepted = self._accepted(fed_round, replies)
        if len(accepted) < self.cfg.federation.quorum:
            raise FederationError(
                f"round {fed_round}: {len(accepted)} site update(s) accepted of {len(replies)} replies, below the "
                f"quorum of {self.cfg.federation.quorum}; stopping, last checkpoint (round {fed_round - 1}) intact"
            )
        keep_shared_metrics(accepted)
        arrays, metrics = super().aggregate_train(server_round, accepted)
        if arrays is None:
            raise FederationError(f"round {fed_round}: aggregation produced no model")
        arrays = self._partial.pinned(arrays, self._global)
        for msg in accepted:
            m = msg.content[keys.METRICS]
            site_id = self._site_id(msg)
            entry = self.sites.setdefault(site_id, {"rounds": 0})
            entry.update(epsilon=float(m[keys.EPSILON]), delta=float(m[keys.DELTA]), num_examples=int(m[keys.NUM_EXAMPLES]))
            entry["rounds"] = int(entry.get("rounds", 0)) + 1
        path = round_checkpoint_path(self.cfg.federation.checkpoint_dir, fed_round)
        save_checkpoint(path, Checkpoint(self.cfg, arrays_to_numpy(arrays), fed_round, self.sites,
                                         provenance=self.provenance))
        append_jsonl(self.cfg.federation.metrics_file, {
            "round": fed_round, "phase": "train", "kind": "aggregate", "time": time.time(),
            "round_seconds": time.time() - self._round_started, "sites": len(accepted),
            "failures": len([r for r in replies if r.has_error()]), "rejected": len(replies) - len(accepted) - len([r for r in replies if r.has_error()]),
            "checkpoint": str(path),
            **({k: _finite_or_none(float(v)) for k, v in metrics.items()} if metrics else {}),
        })
        log.info("round %d: checkpoint written to %s", fed_round, path)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        fed_round = self.rounds_done + server_round
        self._log_replies(fed_round, "evaluate", replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics:
            append_jsonl(self.cfg.federation.metrics_file, {
                "round": fed_round, "phase": "evaluate", "kind": "aggregate", "time": time.time(),
                **{k: _finite_or_none(float(v)) for k, v in metrics.items()},
            })
        return metrics

    @staticmethod
    def _site_id(msg: Message) -> str:
        site = msg.content.config_records.get(keys.SITE)
        if site is not None and keys.SITE_ID in site:
            return str(site[keys.SITE_ID])
        return f"node-{msg.metadata.src_node_id}"

    def _reply_node(self, msg: Message) -> int:
        for sent in self._sent:
            if sent.metadata.message_id and sent.metadata.message_id == msg.metadata.reply_to_message_id:
                return sent.metadata.dst_node_id
        return msg.metadata.src_node_id

    def _log_replies(self, fed_round: int, phase: str, replies: list[Message]) -> None:
        answered = {self._reply_node(msg) for msg in replies}
        for node_id in sorted({m.metadata.dst_node_id for m in self._sent} - answered):
            reason = f"no reply within {self.cfg.federation.round_timeout_s:g} s (site crashed or disconnected)"
            log.warning("round %d %s: node %d: %s", fed_round, phase, node_id, reason)
            append_jsonl(self.cfg.federation.metrics_file, {"round": fed_round, "phase": phase, "time": time.time(),
                                                           "node_id": node_id, "site_id": self._node_sites.get(node_id),
                                                           "kind": "failure", "reason": reason})
        for msg in replies:
            node_id = self._reply_node(msg)
            base = {"round": fed_round, "phase": phase, "time": time.time(), "node_id": node_id}
            if msg.has_error():
                site_id = self._node_sites.get(node_id)
                log.warning("round %d %s: site %s (node %d) failed: %s", fed_round, phase, site_id or "?",
                            node_id, msg.error.reason)
                append_jsonl(self.cfg.federation.metrics_file, {**base, "kind": "failure", "site_id": site_id,
                                                               "reason": msg.error.reason})
                continue
            self._node_sites[msg.metadata.src_node_id] = self._site_id(msg)
            metrics = msg.content.metric_records.get(keys.METRICS, {})
            values = {k: _finite_or_none(float(v)) for k, v in metrics.items()}
            append_jsonl(self.cfg.federation.metrics_file, {**base, "kind": "site", "site_id": self._site_id(msg), **values})
