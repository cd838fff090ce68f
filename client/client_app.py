"""The hospital's Flower ``ClientApp``: unpack the message, train or evaluate locally, pack the reply.

The site's own config (data, state and privacy budget) comes from the SuperNode's node
config (``site-config=/path/site.yaml``), which the server cannot change. Only in a local
simulation, where there is no real site, may the run config name one site file per
simulated partition.

A reply carries the trainable weights, numeric metrics and the site's public name;
errors reach the server as a category and a reason with no local path in it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site_data import load_site_slices_cached
from client.training import train_round, validation_loss
from common import keys
from common.config import FedsynthConfig, SiteConfig, config_from_dict, load_site_config
from common.errors import ConfigError, FedsynthError, PrivacyBudgetError, SiteDataError

log = logging.getLogger("fedsynth.client")
app = ClientApp()


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


def _federation_config(msg: Message) -> FedsynthConfig:
    raw = msg.content[keys.CONFIG].get(keys.FEDERATION_CONFIG)
    if raw is None:
        raise ConfigError(f"message has no '{keys.FEDERATION_CONFIG}' entry", public="message has no federation config")
    return config_from_dict(FedsynthConfig, json.loads(str(raw)), "federation config sent by the server")


def _prepare(msg: Message, context: Context) -> tuple[FedsynthConfig, SiteConfig, object, dict]:
    threads = context.node_config.get(keys.NODE_NUM_THREADS)
    if threads is None and keys.NODE_PARTITION_ID in context.node_config:
        threads = 1  # simulated sites share the machine's cores: oversubscription costs far more than it gains
    if threads:
        torch.set_num_threads(int(threads))
    site = load_site_config(site_config_path(context))
    cfg = _federation_config(msg)
    slices = load_site_slices_cached(site.data_dir, cfg.model.classes, cfg.data, site.labels_csv or None)
    arrays = {name: array.numpy() for name, array in msg.content[keys.ARRAYS].items()}
    return cfg, site, slices, arrays


def _error_reply(msg: Message, err: Exception) -> Message:
    if isinstance(err, FedsynthError):
        code = {PrivacyBudgetError: keys.ERROR_PRIVACY_BUDGET, SiteDataError: keys.ERROR_SITE_DATA,
                ConfigError: keys.ERROR_CONFIG}.get(type(err), keys.ERROR_INTERNAL)
        log.error("task refused: %s", err)
        return Message(Error(code=code, reason=err.public), reply_to=msg)
    log.exception("task failed")
    return Message(Error(code=keys.ERROR_INTERNAL, reason=f"internal error at the site ({type(err).__name__}); see the site's log"), reply_to=msg)


def _guarded(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as err:  # every failure becomes a clean reply, never a crashed node
            return _error_reply(msg, err)
    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper


@app.train()
@_guarded
def train(msg: Message, context: Context) -> Message:
    """One round of DP-SGD on the site's data from the global weights."""
    cfg, site, slices, arrays = _prepare(msg, context)
    result = train_round(cfg, site, slices, arrays, run_id=str(msg.metadata.run_id),
                         server_round=int(msg.content[keys.CONFIG].get(keys.SERVER_ROUND, 0)))
    metrics = MetricRecord({
        keys.NUM_EXAMPLES: result.num_examples,
        keys.TRAIN_LOSS: result.loss,
        keys.EPSILON: result.epsilon,
        keys.DELTA: result.delta,
        keys.STEPS: result.steps,
    })
    content = RecordDict({
        keys.ARRAYS: ArrayRecord(array_dict={k: Array(v) for k, v in result.arrays.items()}),
        keys.METRICS: metrics,
        keys.SITE: ConfigRecord({keys.SITE_ID: site.site_id}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
@_guarded
def evaluate(msg: Message, context: Context) -> Message:
    """Validation loss of the global weights on the site's held-out patients."""
    cfg, site, slices, arrays = _prepare(msg, context)
    loss, count = validation_loss(cfg, slices, arrays)
    if count == 0:
        loss = 0.0  # carries no weight in the average; NaN would poison it
    content = RecordDict({
        keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: count, keys.VAL_LOSS: loss}),
        keys.SITE: ConfigRecord({keys.SITE_ID: site.site_id}),
    })
    return Message(content=content, reply_to=msg)
