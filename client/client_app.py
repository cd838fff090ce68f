"""The hospital's Flower ``ClientApp``: unpack the message, train or evaluate locally, pack the reply.

The site's own config (data, state, privacy budget and policy file) comes from the
SuperNode's node config (``site-config=/path/site.yaml``), which the server cannot
change. Only in a local simulation, where there is no real site, may the run config name
one site file per simulated partition.

A reply carries the trainable weights, numeric metrics and the site's public name;
errors reach the server as a category and a reason with no local path in it. Every task
is written to the site's audit log, whatever its outcome. Before any data is read, every
task must come from app code the site's policy approves, and a memorisation-audit query
must pass the policy's audit limits (``client/audit_policy.py``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit_log import TaskRecord, append_task_record
from client.audit_policy import enforce_audit_policy, is_query
from client.policy import SitePolicy, check_app, check_model_size, load_site_policy, running_app_hash
from client.task_config import checked_task_config, config_summary
from client.memorisation_audit import AuditRequest, answer_audit, unpack_request
from common import keys
from common.config import FedsynthConfig, SiteConfig, config_from_dict, load_site_config
from common.errors import ConfigError, FedsynthError, PolicyError, PrivacyBudgetError, SiteDataError
from common.transfer import encode_update

if TYPE_CHECKING:
    from client.site_data import SiteSlices
    from client.training import TrainResult

# torch, MONAI and Opacus are imported by the handlers that need them, not here: a deployed
# SuperNode starts a fresh process for every message, and a module-level import of the
# training code cost seconds before any handler ran (docs/performance.md).

log = logging.getLogger("fedsynth.client")
app = ClientApp()

_ERROR_CODES = {PrivacyBudgetError: keys.ERROR_PRIVACY_BUDGET, PolicyError: keys.ERROR_POLICY,
                SiteDataError: keys.ERROR_SITE_DATA, ConfigError: keys.ERROR_CONFIG}


@dataclass
class SiteTask:
    """Everything a handler needs, parsed once from the message and the site's own files."""

    cfg: FedsynthConfig
    site: SiteConfig
    policy: SitePolicy | None
    slices: SiteSlices
    arrays: dict
    record: TaskRecord
    audit: AuditRequest | None = None
    """A query's request, exactly as the site policy checked it."""


def site_config_path(context: Context) -> str:
    node = context.node_config
    if keys.NODE_SITE_CONFIG in node:
        return str(node[keys.NODE_SITE_CONFIG])
    sim_sites = str(context.run_config.get(keys.RUN_SIM_SITES, "") or "")
    if keys.NODE_PARTITION_ID in node and sim_sites:
        paths = [p for p in sim_sites.split(",") if p]
        pid = int(node[keys.NODE_PARTITION_ID])
        if pid >= len(paths):
            raise ConfigError(f"simulated partition {pid} has no site config ({len(paths)} given in run config '{keys.RUN_SIM_SITES}')")
        return paths[pid]
    raise ConfigError(
        f"this SuperNode has no site config: start it with --node-config '{keys.NODE_SITE_CONFIG}=\"/path/site.yaml\"'",
        public="site is not configured",
    )


def _received_config(msg: Message) -> dict:
    """The task's ConfigRecord as plain data, the federation config parsed, for the audit log.

    Raises:
        ConfigError: a key, type or size the site does not accept (client/task_config.py).
    """
    return checked_task_config(dict(msg.content[keys.CONFIG].items()))


def _sent_values(msg: Message) -> int:
    """Values in the arrays the server sent, from their shapes: nothing is unpacked to count them."""
    return sum(math.prod(array.shape) for array in msg.content[keys.ARRAYS].values())


def _set_threads(context: Context) -> None:
    threads = context.node_config.get(keys.NODE_NUM_THREADS)
    if threads is None and keys.NODE_PARTITION_ID in context.node_config:
        threads = 1  # simulated sites share the machine's cores: oversubscription costs far more than it gains
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def _prepare(msg: Message, site: SiteConfig, record: TaskRecord) -> SiteTask:
    from client.site_data import load_site_slices_cached, require_readable

    raw = msg.content[keys.CONFIG].get(keys.FEDERATION_CONFIG)
    if raw is None:
        raise ConfigError(f"message has no '{keys.FEDERATION_CONFIG}' entry", public="message has no federation config")
    cfg = config_from_dict(FedsynthConfig, json.loads(str(raw)), "federation config sent by the server")
    policy = load_site_policy(site.policy_file) if site.policy_file else None
    if not is_query(record.message_type):  # a query's arrays are images, bounded by the audit policy
        check_model_size(policy, cfg, _sent_values(msg))
    arrays = {name: array.numpy() for name, array in msg.content[keys.ARRAYS].items()}
    audit = _check_policy(msg, policy, site, arrays, record)
    slices = load_site_slices_cached(site.data_dir, cfg.model.classes, cfg.data, site.labels_csv or None)
    require_readable(slices, site.data_dir, site.skip_bad_files)
    return SiteTask(cfg, site, policy, slices, arrays, record, audit)


def _check_policy(msg: Message, policy: SitePolicy | None, site: SiteConfig, arrays: dict,
                  record: TaskRecord) -> AuditRequest | None:
    """The policy checks every task type passes before the site's data is read; a query's checked request.

    Train tasks are checked again, in full, by ``train_round`` (it also needs the patient count).
    """
    check_app(policy, record.app_hash)
    if not is_query(record.message_type):
        return None
    request = unpack_request(arrays, dict(msg.content[keys.CONFIG].items()))
    return enforce_audit_policy(policy, request, site.state_dir)


def _error_reply(msg: Message, err: Exception) -> tuple[Message, str]:
    if isinstance(err, FedsynthError):
        log.error("task refused: %s", err)
        return Message(Error(code=_ERROR_CODES.get(type(err), keys.ERROR_INTERNAL), reason=err.public), reply_to=msg), f"refused: {err.public}"
    log.exception("task failed")
    reason = f"internal error at the site ({type(err).__name__}); see the site's log"
    return Message(Error(code=keys.ERROR_INTERNAL, reason=reason), reply_to=msg), f"error: {type(err).__name__}"


def _reply_bytes(reply: Message) -> int:
    if reply.has_error():
        return len((reply.error.reason or "").encode("utf-8"))
    return sum(record.count_bytes() for record in reply.content.values())


def audited(handler: Callable[[Message, SiteTask], Message]) -> Callable[[Message, Context], Message]:
    """Run ``handler`` on a prepared task; every failure becomes a clean reply and every task an audit line."""

    def wrapper(msg: Message, context: Context) -> Message:
        record = TaskRecord(run_id=str(msg.metadata.run_id), message_type=str(msg.metadata.message_type),
                            app_hash=running_app_hash(), config={})
        site = None
        try:
            _set_threads(context)
            record.config = config_summary(msg.content.config_records.get(keys.CONFIG))  # until it is checked
            site = load_site_config(site_config_path(context))
            record.config = _received_config(msg)
            record.server_round = int(record.config.get(keys.SERVER_ROUND, 0))
            reply, record.outcome = handler(msg, _prepare(msg, site, record)), "ok"
        except Exception as err:  # a site's failure never crashes the node or the federation
            reply, record.outcome = _error_reply(msg, err)
        record.bytes_sent = _reply_bytes(reply)
        if site is not None:
            append_task_record(site.state_dir, record)
        return reply

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper


@app.train()
@audited
def train(msg: Message, task: SiteTask) -> Message:
    """One round of DP-SGD on the site's data from the global weights, and the trained model's validation loss."""
    from client.training import train_round, validation_loss

    result = train_round(task.cfg, task.site, task.slices, task.arrays, run_id=task.record.run_id,
                         server_round=task.record.server_round, policy=task.policy, app_hash=task.record.app_hash)
    task.record.steps = result.steps
    task.record.epsilon_before, task.record.epsilon_after = result.epsilon_before, result.epsilon
    task.record.unsafe_reproducible_dp = result.unsafe_reproducible_dp
    content = train_reply_content(result, task.site.site_id, task.cfg.federation.transfer_dtype)
    # In the train reply rather than a separate evaluate message, which costs every site another round
    # trip. Held-out patients are never trained on: this number is outside epsilon, as it always was.
    val_loss, val_count = validation_loss(task.cfg, task.slices, result.arrays, task.site.val_fraction)
    content[keys.METRICS][keys.VAL_LOSS] = val_loss if val_count else 0.0  # weight 0; NaN would poison the mean
    content[keys.METRICS][keys.VAL_EXAMPLES] = val_count
    return Message(content=content, reply_to=msg)


def train_reply_content(result: TrainResult, site_id: str, transfer_dtype: str) -> RecordDict:
    """Everything a train reply carries: the weights in the federation's transfer dtype, numbers, the site's name.

    Under DP the training loss stays at the site: it is computed on the sampled patients without
    noise, so epsilon does not cover it. With ``training.trainable`` a subset only the trained
    arrays travel: the frozen ones are the server's own global weights.
    """
    metrics = MetricRecord({
        keys.NUM_EXAMPLES: result.num_examples,
        keys.EPSILON: result.epsilon,
        keys.DELTA: result.delta,
        keys.STEPS: result.steps,
    })
    if not result.private:
        metrics[keys.TRAIN_LOSS] = result.loss
    sent = {name: result.arrays[name] for name in result.trained} if result.trained else result.arrays
    return RecordDict({
        keys.ARRAYS: ArrayRecord(array_dict={k: Array(v) for k, v in encode_update(sent, transfer_dtype).items()}),
        keys.METRICS: metrics,
        keys.SITE: ConfigRecord({keys.SITE_ID: site_id}),
    })


@app.evaluate()
@audited
def evaluate(msg: Message, task: SiteTask) -> Message:
    """Validation loss of the global weights on the site's held-out patients."""
    from client.training import validation_loss

    loss, count = validation_loss(task.cfg, task.slices, task.arrays, task.site.val_fraction)
    if count == 0:
        loss = 0.0  # carries no weight in the average; NaN would poison it
    return Message(content=RecordDict({
        keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: count, keys.VAL_LOSS: loss}),
        keys.SITE: ConfigRecord({keys.SITE_ID: task.site.site_id}),
    }), reply_to=msg)


@app.query()
@audited
def query(msg: Message, task: SiteTask) -> Message:
    """Memorisation audit: how close the server's synthetic images come to this site's slices.

    Only aggregates leave the site: patients below each threshold (fewer than the policy's
    ``audit_min_count`` sent as 0) and distance quantiles.
    """
    if task.audit is None:
        raise ConfigError("query task without an audit request", public="malformed audit query")
    summary = answer_audit(task.audit, task.slices.images, task.slices.patients)
    return Message(content=RecordDict({
        keys.METRICS: MetricRecord(summary.metrics()),
        keys.SITE: ConfigRecord({keys.SITE_ID: task.site.site_id}),
    }), reply_to=msg)
