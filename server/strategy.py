"""Flower's strategies made to checkpoint every round, check and log each site's update, and resume.

:class:`CheckpointingFedAvg` holds that behaviour; mixed in before another of Flower's classes
(FedAvgM, FedAdam, FedYogi, FedAdagrad) it adds the same to that class's server optimiser.
:func:`build_strategy` picks the class ``federation.server_optimizer`` names.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from common import keys
from common.checkpoint import Checkpoint, round_checkpoint_path, save_checkpoint
from common.config import FedsynthConfig
from common.errors import ConfigError, FederationError
from common.fileio import append_jsonl
from common.server_state import OPTIMIZER_SLOTS, EmaState, ServerOptimizerState, ema_update
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

    Also the base of :class:`CheckpointingFedAvgM` and the others below, which put it in front of
    another of Flower's classes: Flower's class averages and applies its server optimiser, this
    one checks the replies before and checkpoints the result (optimiser state and EMA included).

    Args:
        cfg: the federation config (saved inside every checkpoint).
        rounds_done: rounds completed before this start; Flower's round 1 is round
            ``rounds_done + 1`` of the federation.
        sites: per-site privacy state carried over from the resumed checkpoint.
        provenance: saved in every round checkpoint (where the run's weights started).
        optimizer: the server optimiser's state from the resumed checkpoint.
        ema: the EMA of the global weights from the resumed checkpoint.
        checkpoints: write a checkpoint every round (the in-process benchmark turns it off).
    """

    server_optimizer = "fedavg"

    def __init__(self, cfg: FedsynthConfig, rounds_done: int = 0, sites: dict[str, dict[str, float]] | None = None,
                 optimizer: ServerOptimizerState | None = None, ema: EmaState | None = None,
                 checkpoints: bool = True, provenance: dict[str, Any] | None = None) -> None:
        fed = cfg.federation
        if fed.server_optimizer != self.server_optimizer:
            raise ConfigError(f"federation.server_optimizer is {fed.server_optimizer!r}, but {type(self).__name__} "
                              f"runs {self.server_optimizer!r}: build the strategy with build_strategy(cfg)")
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
            **self._flower_options(cfg),
        )
        self.cfg = cfg
        self.checkpoints = checkpoints
        self.ema = ema
        if optimizer is not None:
            self.load_optimizer_state(optimizer)
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

    @classmethod
    def _flower_options(cls, cfg: FedsynthConfig) -> dict[str, float]:
        """The server optimiser's arguments of Flower's class, from the config keys of the same names."""
        fed = cfg.federation
        if cls.server_optimizer == "fedavgm":
            return {"server_learning_rate": fed.server_learning_rate, "server_momentum": fed.server_momentum}
        if cls.server_optimizer == "fedavg":
            return {}
        # eta_l is the sites' learning rate; Flower's FedOpt only prints it in its summary.
        options = {"eta_l": cfg.training.learning_rate, "tau": fed.tau}
        if fed.eta > 0:  # 0 keeps Flower's default eta of the class
            options["eta"] = fed.eta
        if cls.server_optimizer != "fedadagrad":
            options.update(beta_1=fed.beta_1, beta_2=fed.beta_2)
        return options

    def optimizer_state(self) -> ServerOptimizerState | None:
        """The server optimiser's arrays as float32 numpy, by slot (Flower's attribute names); None for FedAvg."""
        if self.server_optimizer == "fedavg":
            return None
        slots: dict[str, dict[str, np.ndarray]] = {}
        for slot in OPTIMIZER_SLOTS[self.server_optimizer]:
            value = getattr(self, slot, None)
            if value is None or len(value) == 0:
                continue  # not filled yet: Flower starts it on the next aggregation
            if isinstance(value, ArrayRecord):
                value = arrays_to_numpy(value)
            elif isinstance(value, list):  # FedAvgM's momentum: one array per entry of current_arrays, in order
                value = dict(zip(self._momentum_order(), value, strict=True))
            slots[slot] = {k: np.asarray(v, dtype=np.float32) for k, v in value.items()}
        return ServerOptimizerState(self.server_optimizer, slots)

    def load_optimizer_state(self, state: ServerOptimizerState) -> None:
        """Put ``state`` (from :meth:`optimizer_state` or a checkpoint) back into Flower's attributes."""
        if state.name != self.server_optimizer:
            raise ConfigError(f"federation.server_optimizer is {self.server_optimizer!r}, but the saved optimiser state "
                              f"is {state.name!r}'s")
        for slot in OPTIMIZER_SLOTS[self.server_optimizer]:
            arrays = state.slots.get(slot)
            if arrays is None:
                setattr(self, slot, None)
            elif isinstance(self, FedAvgM) and slot == "current_arrays":
                self.current_arrays = ArrayRecord({k: Array(np.array(v, dtype=np.float32)) for k, v in arrays.items()})
            elif slot == "momentum_vector":
                self.momentum_vector = [np.array(arrays[k], dtype=np.float32) for k in self._momentum_order()]
            else:
                setattr(self, slot, {k: np.array(v, dtype=np.float32) for k, v in arrays.items()})

    def _momentum_order(self) -> list[str]:
        current = getattr(self, "current_arrays", None)
        if current is None:
            raise ConfigError("the saved FedAvgM state has a momentum vector but no current_arrays to order it by")
        return list(current.keys())

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
        # Flower's FedAdam bias-corrects by the round number: the federation's, so a resumed run continues it.
        arrays, metrics = super().aggregate_train(fed_round, self._in_global_order(accepted))
        if arrays is None:
            raise FederationError(f"round {fed_round}: aggregation produced no model")
        arrays = self._after_server_step(self._partial.pinned(arrays, self._global))
        for msg in accepted:
            m = msg.content[keys.METRICS]
            site_id = self._site_id(msg)
            entry = self.sites.setdefault(site_id, {"rounds": 0})
            entry.update(epsilon=float(m[keys.EPSILON]), delta=float(m[keys.DELTA]), num_examples=int(m[keys.NUM_EXAMPLES]))
            entry["rounds"] = int(entry.get("rounds", 0)) + 1
        path = round_checkpoint_path(self.cfg.federation.checkpoint_dir, fed_round) if self.checkpoints else None
        if path is not None:
            save_checkpoint(path, Checkpoint(self.cfg, arrays_to_numpy(arrays), fed_round, self.sites,
                                             optimizer=self.optimizer_state(), ema=self.ema,
                                             provenance=self.provenance))
        append_jsonl(self.cfg.federation.metrics_file, {
            "round": fed_round, "phase": "train", "kind": "aggregate", "time": time.time(),
            "round_seconds": time.time() - self._round_started, "sites": len(accepted),
            "failures": len([r for r in replies if r.has_error()]), "rejected": len(replies) - len(accepted) - len([r for r in replies if r.has_error()]),
            "checkpoint": str(path) if path else None,
            **({k: _finite_or_none(float(v)) for k, v in metrics.items()} if metrics else {}),
        })
        if path is not None:
            log.info("round %d: checkpoint written to %s", fed_round, path)
        return arrays, metrics

    def _in_global_order(self, replies: list[Message]) -> list[Message]:
        """Replies whose arrays are keyed in the global weights' order: FedAvgM pairs arrays by position."""
        order = list(self._global)
        for msg in replies:
            record = msg.content[keys.ARRAYS]
            if order and list(record.keys()) != order and set(record.keys()) == set(order):
                msg.content[keys.ARRAYS] = ArrayRecord({k: record[k] for k in order})
        return replies

    def _after_server_step(self, arrays: ArrayRecord) -> ArrayRecord:
        """float32 weights and optimiser state (what a checkpoint holds), then the EMA's update.

        Flower's FedAdam returns float64 (its bias-corrected step size is a float64 scalar). Kept in
        float32, the state a resumed run reads back is exactly the state it would have had.
        """
        weights = {k: np.asarray(v, dtype=np.float32) for k, v in arrays_to_numpy(arrays).items()}
        state = self.optimizer_state()
        if state is not None:
            self.load_optimizer_state(state)
        if self.cfg.federation.ema_decay > 0:
            self.ema = ema_update(self.ema, self.cfg.federation.ema_decay, weights)
        return ArrayRecord({k: Array(v) for k, v in weights.items()})

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


# The same behaviour in front of Flower's other server optimisers (MRO: ours, then Flower's class).
class CheckpointingFedAvgM(CheckpointingFedAvg, FedAvgM):
    server_optimizer = "fedavgm"


class CheckpointingFedAdam(CheckpointingFedAvg, FedAdam):
    server_optimizer = "fedadam"


class CheckpointingFedYogi(CheckpointingFedAvg, FedYogi):
    server_optimizer = "fedyogi"


class CheckpointingFedAdagrad(CheckpointingFedAvg, FedAdagrad):
    server_optimizer = "fedadagrad"


STRATEGIES: dict[str, type[CheckpointingFedAvg]] = {
    cls.server_optimizer: cls
    for cls in (CheckpointingFedAvg, CheckpointingFedAvgM, CheckpointingFedAdam, CheckpointingFedYogi, CheckpointingFedAdagrad)
}


def build_strategy(cfg: FedsynthConfig, rounds_done: int = 0, sites: dict[str, dict[str, float]] | None = None,
                   optimizer: ServerOptimizerState | None = None, ema: EmaState | None = None,
                   checkpoints: bool = True, provenance: dict[str, Any] | None = None) -> CheckpointingFedAvg:
    """The strategy ``federation.server_optimizer`` names, resumed from the given state when there is one."""
    cls = STRATEGIES[cfg.federation.server_optimizer]
    return cls(cfg, rounds_done=rounds_done, sites=sites, optimizer=optimizer, ema=ema, checkpoints=checkpoints,
               provenance=provenance)
