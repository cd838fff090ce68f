"""Checkpoints: the weights, the config that produced them and the run's metadata, in one file.

A checkpoint is a ``torch.save`` of plain data (tensors, strings, numbers), so it loads
with ``weights_only=True``: opening a checkpoint never executes code from it. Files are
written atomically, so a crash leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import io
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import FedsynthConfig, config_from_dict, config_to_dict, without_moved_keys
from common.errors import CheckpointError, ConfigError
from common.fileio import write_bytes_atomic

FORMAT = "fedsynth-checkpoint"
VERSION = 1
_ROUND_FILE = re.compile(r"^round-(\d{4,})\.pt$")


@dataclass
class Checkpoint:
    config: FedsynthConfig
    arrays: dict[str, np.ndarray]
    rounds_completed: int
    sites: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per site id: latest ``epsilon``, ``delta``, ``num_examples`` and ``rounds`` joined."""
    created: float = field(default_factory=time.time)


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "config": config_to_dict(ckpt.config),
        "arrays": {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in ckpt.arrays.items()},
        "metadata": {
            "rounds_completed": ckpt.rounds_completed,
            "sites": ckpt.sites,
            "created": ckpt.created,
        },
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return write_bytes_atomic(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except Exception as err:  # torch raises many types for a damaged or foreign file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fedsynth checkpoint (no '{FORMAT}' marker)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')} is not supported (expected {VERSION})")
    try:
        config = config_from_dict(FedsynthConfig, without_moved_keys(payload["config"]), f"{path} (embedded config)")
        meta = payload["metadata"]
        return Checkpoint(
            config=config,
            arrays={k: v.numpy() for k, v in payload["arrays"].items()},
            rounds_completed=int(meta["rounds_completed"]),
            sites=dict(meta.get("sites", {})),
            created=float(meta.get("created", 0.0)),
        )
    except (KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: checkpoint is missing {err}") from None
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def round_checkpoint_path(checkpoint_dir: str | Path, server_round: int) -> Path:
    return Path(checkpoint_dir) / f"round-{server_round:04d}.pt"


def list_round_checkpoints(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _ROUND_FILE.match(p.name))]
    return sorted(found)


def latest_checkpoint(checkpoint_dir: str | Path) -> Checkpoint | None:
    """The newest round checkpoint that loads; damaged newer files are skipped, not trusted."""
    for _, path in reversed(list_round_checkpoints(checkpoint_dir)):
        try:
            return load_checkpoint(path)
        except CheckpointError:
            continue
    return None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output_dir(cfg: FedsynthConfig) -> Checkpoint | None:
    """The checkpoint to resume from, if any; refuses to start over on top of another run's."""
    existing = list_round_checkpoints(cfg.federation.checkpoint_dir)
    if not cfg.federation.resume:
        if existing:
            raise ConfigError(
                f"{cfg.federation.checkpoint_dir} already holds {len(existing)} round checkpoint(s): set "
                "federation.resume: true to continue that run, or choose another federation.output_dir"
            )
        return None
    ckpt = latest_checkpoint(cfg.federation.checkpoint_dir)
    if ckpt is not None and ckpt.config.model != cfg.model:
        raise ConfigError(f"{cfg.federation.checkpoint_dir}: cannot resume, the checkpoint's model settings differ from the config's")
    return ckpt
