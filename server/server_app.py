"""The coordinator's Flower ``ServerApp``: load the config, resume or initialise, run the strategy, save."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common import audit_protocol, keys
from common.checkpoint import Checkpoint, check_output_dir, latest_checkpoint, save_checkpoint
from common.config import FedsynthConfig, config_to_json, load_federation_config
from common.errors import ConfigError
from common.model import build_unet, trainable_state
from server.audit_app import run_audit_app
from server.init_weights import INIT, init_record, load_init_checkpoint, resumed_init_record
from server.model_card import write_model_card
from server.prompt_grid import prompt
from server.strategy import arrays_to_numpy, build_strategy

log = logging.getLogger("fedsynth.server")
app = ServerApp()


def _load_config(context: Context) -> FedsynthConfig:
    path = str(context.run_config.get(keys.RUN_CONFIG_PATH, "") or "")
    if not path:
        raise ConfigError(
            "run config 'config' is empty: pass the federation YAML, e.g. "
            "flwr run . --run-config 'config=\"/abs/path/federation.yaml\"'"
        )
    return load_federation_config(path)


class StartingPoint(NamedTuple):
    arrays: dict[str, np.ndarray]
    rounds_done: int
    sites: dict[str, dict[str, float]]
    provenance: dict[str, Any]
    """What every checkpoint of the run carries: ``{"init": ...}`` (server/init_weights.py)."""
    resumed: Checkpoint | None = None
    """The checkpoint resumed from (its server optimiser and EMA state continue); None when fresh."""


def _starting_point(cfg: FedsynthConfig, config_source: str = "the federation config") -> StartingPoint:
    """Initial weights, rounds already done, per-site state, provenance and the resumed checkpoint: fresh, or from the last checkpoint.

    A fresh run starts from ``model.init_checkpoint`` when set (checked to fit the model),
    otherwise from the seeded random init; a resumed one checks the init file is unchanged.
    """
    ckpt = check_output_dir(cfg)
    if ckpt is not None:
        provenance = {INIT: resumed_init_record(cfg, ckpt, config_source)}
        log.info("resuming after round %d from %s", ckpt.rounds_completed, cfg.federation.checkpoint_dir)
        return StartingPoint(ckpt.arrays, ckpt.rounds_completed, ckpt.sites, provenance, ckpt)
    if cfg.model.init_checkpoint:
        init = load_init_checkpoint(cfg, config_source)
        log.info("starting from model.init_checkpoint %s", cfg.model.init_checkpoint)
        return StartingPoint(init.arrays, 0, {}, {INIT: init_record(cfg, init)})
    torch.manual_seed(cfg.training.seed)
    return StartingPoint(trainable_state(build_unet(cfg.model)), 0, {}, {INIT: init_record(cfg)})


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = _load_config(context)
    if str(context.run_config.get(audit_protocol.RUN_MODE, audit_protocol.MODE_TRAIN)) == audit_protocol.MODE_AUDIT:
        run_audit_app(grid, context, cfg)  # a memorisation audit of a synthetic set instead of training
        return
    arrays, rounds_done, sites, provenance, resumed = _starting_point(
        cfg, str(context.run_config.get(keys.RUN_CONFIG_PATH, "")) or "the federation config")
    # The server optimiser's state and the EMA continue from the checkpoint (checked to match the config).
    optimizer, ema = (resumed.optimizer, resumed.ema) if resumed is not None else (None, None)
    remaining = cfg.federation.num_rounds - rounds_done
    if remaining > 0:
        strategy = build_strategy(cfg, rounds_done=rounds_done, sites=sites, optimizer=optimizer, ema=ema,
                                  provenance=provenance)
        # Sites receive the weights, not where the coordinator keeps the file they started from.
        site_cfg = dataclasses.replace(cfg, model=cfg.model.architecture())
        message_config = ConfigRecord({keys.FEDERATION_CONFIG: config_to_json(site_cfg)})
        result = strategy.start(
            grid=prompt(grid),
            initial_arrays=ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()}),
            num_rounds=remaining,
            timeout=cfg.federation.round_timeout_s,
            train_config=message_config,
            evaluate_config=message_config,
        )
        arrays, sites = arrays_to_numpy(result.arrays), strategy.sites
        optimizer, ema = strategy.optimizer_state(), strategy.ema
    final = latest_checkpoint(cfg.federation.checkpoint_dir)
    done = final.rounds_completed if final else 0
    final_path = cfg.federation.final_model_path
    final_ckpt = Checkpoint(cfg, arrays, done, sites, provenance=provenance, optimizer=optimizer, ema=ema)
    save_checkpoint(final_path, final_ckpt)
    write_model_card(Path(final_path).parent / "model_card.md", final_ckpt, final_path)
    log.info("final model (%d rounds) saved to %s, its model card next to it", done, final_path)
