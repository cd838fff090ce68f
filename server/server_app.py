"""The coordinator's Flower ``ServerApp``: load the config, resume or initialise, run the strategy, save."""

from __future__ import annotations

import logging

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common import audit_protocol, keys
from common.checkpoint import Checkpoint, check_output_dir, latest_checkpoint, save_checkpoint
from common.config import FedsynthConfig, config_to_json, load_federation_config
from common.errors import ConfigError
from common.model import build_unet, trainable_state
from server.audit_app import run_audit_app
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


def _starting_point(cfg: FedsynthConfig) -> tuple[dict, int, dict, Checkpoint | None]:
    """Initial weights, rounds already done, per-site state and the checkpoint resumed (None when fresh)."""
    ckpt = check_output_dir(cfg)
    if ckpt is not None:
        log.info("resuming after round %d from %s", ckpt.rounds_completed, cfg.federation.checkpoint_dir)
        return ckpt.arrays, ckpt.rounds_completed, ckpt.sites, ckpt
    torch.manual_seed(cfg.training.seed)
    return trainable_state(build_unet(cfg.model)), 0, {}, None


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = _load_config(context)
    if str(context.run_config.get(audit_protocol.RUN_MODE, audit_protocol.MODE_TRAIN)) == audit_protocol.MODE_AUDIT:
        run_audit_app(grid, context, cfg)  # a memorisation audit of a synthetic set instead of training
        return
    arrays, rounds_done, sites, resumed = _starting_point(cfg)
    # The server optimiser's state and the EMA continue from the checkpoint (checked to match the config).
    optimizer, ema = (resumed.optimizer, resumed.ema) if resumed is not None else (None, None)
    remaining = cfg.federation.num_rounds - rounds_done
    if remaining > 0:
        strategy = build_strategy(cfg, rounds_done=rounds_done, sites=sites, optimizer=optimizer, ema=ema)
        message_config = ConfigRecord({keys.FEDERATION_CONFIG: config_to_json(cfg)})
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
    save_checkpoint(cfg.federation.final_model_path, Checkpoint(cfg, arrays, done, sites, optimizer=optimizer, ema=ema))
    log.info("final model (%d rounds) saved to %s", done, cfg.federation.final_model_path)
