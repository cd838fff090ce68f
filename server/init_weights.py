"""Where a federation's weights start: a seeded random init, or ``model.init_checkpoint``.

The start is part of what a model is: every round checkpoint and the final model carry
``provenance["init"]``, either ``{"kind": "random", "seed"}`` or ``{"kind": "checkpoint", "path",
"sha256", "description", "pretraining"}`` (the init checkpoint's own provenance, e.g. the public
data set ``fedsynth pretrain`` used). A resumed run checks the configured file is still the one
it started from, byte for byte.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from common.checkpoint import Checkpoint, file_sha256, load_checkpoint
from common.config import FedsynthConfig
from common.errors import CheckpointError, ConfigError

log = logging.getLogger("fedsynth.server")

INIT = "init"


def _shown(value: Any) -> str:
    return repr(list(value) if isinstance(value, tuple) else value)


def load_init_checkpoint(cfg: FedsynthConfig, config_source: str) -> Checkpoint:
    """The checkpoint ``model.init_checkpoint`` names, once it is known to fit the federation's model.

    Raises:
        CheckpointError: the file is missing or not a loadable fedsynth checkpoint.
        ConfigError: its model settings or ``data.image_size`` differ from the config's; the
            message names both files and the first field that differs.
    """
    path = Path(cfg.model.init_checkpoint)
    try:
        init = load_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"model.init_checkpoint in {config_source}: {err}") from None
    theirs, mine = init.config.model.architecture(), cfg.model.architecture()
    for f in dataclasses.fields(mine):
        if getattr(theirs, f.name) != getattr(mine, f.name):
            raise ConfigError(f"model.init_checkpoint {path} does not fit {config_source}: its model.{f.name} is "
                              f"{_shown(getattr(theirs, f.name))}, the config's is {_shown(getattr(mine, f.name))}")
    if init.config.data.image_size != cfg.data.image_size:
        raise ConfigError(f"model.init_checkpoint {path} does not fit {config_source}: its data.image_size is "
                          f"{init.config.data.image_size}, the config's is {cfg.data.image_size}")
    if init.config.diffusion != cfg.diffusion:  # still a valid start: fine-tuning adapts to the schedule
        log.warning("model.init_checkpoint %s was trained with diffusion settings %s; this federation uses %s",
                    path, init.config.diffusion, cfg.diffusion)
    return init


def init_record(cfg: FedsynthConfig, init: Checkpoint | None = None) -> dict[str, Any]:
    """``provenance["init"]`` of a fresh run: the seeded random start, or ``init`` (the loaded init checkpoint)."""
    if not cfg.model.init_checkpoint:
        return {"kind": "random", "seed": cfg.training.seed}
    if init is None:
        raise ValueError("init_record: the config sets model.init_checkpoint but no loaded checkpoint was given")
    path = Path(cfg.model.init_checkpoint)
    return {"kind": "checkpoint", "path": str(path), "sha256": file_sha256(path),
            "description": str(init.provenance.get("description", "")), "pretraining": init.provenance}


def resumed_init_record(cfg: FedsynthConfig, ckpt: Checkpoint, config_source: str) -> dict[str, Any]:
    """``provenance["init"]`` of the run ``ckpt`` belongs to, once the config is known to start where it did.

    Raises:
        ConfigError: the configured init file is missing, differs from the recorded SHA-256, or the
            config adds or drops ``model.init_checkpoint`` relative to how the run started.
        CheckpointError: the checkpoint's init record is malformed.
    """
    where = cfg.federation.checkpoint_dir
    configured = cfg.model.init_checkpoint
    recorded = ckpt.provenance.get(INIT)
    if recorded is None:  # a run from before provenance existed: it started from the seeded random init
        if configured:
            raise ConfigError(f"{where}: cannot resume with model.init_checkpoint {configured} from {config_source}: "
                              "the run's checkpoints record no init checkpoint (it started from random weights)")
        return init_record(cfg)
    if not isinstance(recorded, dict) or recorded.get("kind") not in ("random", "checkpoint"):
        raise CheckpointError(f"{where}: the newest checkpoint's provenance 'init' is malformed ({recorded!r:.100})")
    if recorded["kind"] == "random":
        if configured:
            raise ConfigError(f"{where}: cannot resume: the run started from random weights, but {config_source} now "
                              f"sets model.init_checkpoint {configured}; remove it to resume this run")
        return recorded
    if not configured:
        raise ConfigError(f"{where}: cannot resume: the run started from model.init_checkpoint {recorded.get('path')} "
                          f"(SHA-256 {recorded.get('sha256')}), which {config_source} no longer sets")
    if not Path(configured).is_file():
        raise ConfigError(f"{configured}: model.init_checkpoint in {config_source} not found; the run in {where} "
                          f"started from a file with SHA-256 {recorded.get('sha256')}")
    sha = file_sha256(configured)
    if sha != recorded.get("sha256"):
        raise ConfigError(f"{configured}: model.init_checkpoint in {config_source} has SHA-256 {sha}, but the run in "
                          f"{where} started from {recorded.get('path')} with SHA-256 {recorded.get('sha256')}; "
                          "restore that file to resume, or start a new run in another federation.output_dir")
    return {**recorded, "path": str(configured)}
