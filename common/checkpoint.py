"""Checkpoints: the weights, the config that produced them and the run's metadata, in one file.

A checkpoint is a ``torch.save`` of plain data (tensors, strings, numbers), so it loads
with ``weights_only=True``: opening a checkpoint never executes code from it. Files are
written atomically, so a crash leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import io
import json
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
from common.model import trainable_shapes
from common.server_state import OPTIMIZER_SLOTS, EmaState, ServerOptimizerState, ema_problem

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
    provenance: dict[str, Any] = field(default_factory=dict)
    """Where the weights come from, as plain JSON-able data: a pretraining run's data and settings
    (``kind: pretrained``, server/pretrain.py) or a federation's initial weights (``init``)."""
    optimizer: ServerOptimizerState | None = None
    """The server optimiser's state (``federation.server_optimizer``); None for fedavg and old checkpoints."""
    ema: EmaState | None = None
    """The EMA of the global weights (``federation.ema_decay``); None when off."""


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "config": config_to_dict(ckpt.config),
        "arrays": _tensors(ckpt.arrays),
        "metadata": {
            "rounds_completed": ckpt.rounds_completed,
            "sites": ckpt.sites,
            "created": ckpt.created,
            # A JSON round trip: only plain data goes in, so the file still loads with weights_only=True.
            "provenance": json.loads(json.dumps(ckpt.provenance)),
        },
    }
    # Optional entries, written only when present: a checkpoint without them reads as before.
    if ckpt.optimizer is not None:
        payload["server_optimizer"] = {"name": ckpt.optimizer.name,
                                       "slots": {k: _tensors(v) for k, v in ckpt.optimizer.slots.items()}}
    if ckpt.ema is not None:
        payload["ema"] = {"decay": ckpt.ema.decay, "steps": ckpt.ema.steps,
                          "accumulator": _tensors(ckpt.ema.accumulator), "weights": _tensors(ckpt.ema.weights)}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return write_bytes_atomic(path, buffer.getvalue())


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in arrays.items()}


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
        arrays = _checked_arrays(path, payload["arrays"], config)
        meta = payload["metadata"]
        provenance = meta.get("provenance", {})  # absent in checkpoints written before it existed
        if not isinstance(provenance, dict):
            raise CheckpointError(f"{path}: checkpoint provenance is a {type(provenance).__name__}, not a mapping")
        return Checkpoint(
            config=config,
            arrays=arrays,
            rounds_completed=int(meta["rounds_completed"]),
            sites=dict(meta.get("sites", {})),
            created=float(meta.get("created", 0.0)),
            provenance=provenance,
            optimizer=_checked_optimizer(path, payload.get("server_optimizer"), config),
            ema=_checked_ema(path, payload.get("ema"), config, int(meta["rounds_completed"])),
        )
    except KeyError as err:
        raise CheckpointError(f"{path}: checkpoint is missing {err}") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: checkpoint metadata is malformed ({err})") from None
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def _checked_arrays(path: Path, arrays: Any, config: FedsynthConfig, field_name: str = "arrays") -> dict[str, np.ndarray]:
    """The weights as numpy arrays, once they are known to fit the model the embedded config describes.

    Checked against shapes measured without building the model, so neither a huge config
    nor a mismatched array gets as far as allocating or loading a UNet. ``field_name`` names
    the entry in messages (the optimiser's and the EMA's arrays are checked the same way).
    """
    what = "the weights" if field_name == "arrays" else f"'{field_name}'"
    prefix = "array" if field_name == "arrays" else f"{field_name} array"
    if not isinstance(arrays, dict):
        raise CheckpointError(f"{path}: '{field_name}' is a {type(arrays).__name__}, not a mapping of parameter names to tensors")
    try:
        expected = trainable_shapes(config.model)
    except ValueError as err:
        raise CheckpointError(f"{path} (embedded config): {err}") from None
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(str(k) for k in set(arrays) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{path}: {what} do not fit the model its config describes: {len(missing)} missing "
                              f"(e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})")
    for name, shape in expected.items():
        value = arrays[name]
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            raise CheckpointError(f"{path}: {prefix} {name!r} is a {type(value).__name__}, not a dense tensor")
        if value.dtype != torch.float32:
            raise CheckpointError(f"{path}: {prefix} {name!r} is {value.dtype}, expected torch.float32 (what fedsynth writes)")
        if tuple(value.shape) != shape:
            raise CheckpointError(f"{path}: {prefix} {name!r} has shape {tuple(value.shape)}, the model expects {shape}")
        if not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: {prefix} {name!r} holds NaN or infinite values (a diverged or damaged model)")
    return {name: arrays[name].numpy() for name in expected}


def _checked_optimizer(path: Path, entry: Any, config: FedsynthConfig) -> ServerOptimizerState | None:
    """The server optimiser's state, once it is known to belong to the optimiser the config names."""
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("slots"), dict):
        raise CheckpointError(f"{path}: 'server_optimizer' is malformed (expected a name and a mapping of slots)")
    name = config.federation.server_optimizer
    if entry.get("name") != name:
        raise CheckpointError(f"{path}: 'server_optimizer' holds the state of {entry.get('name')!r}, but the embedded "
                              f"config's federation.server_optimizer is {name!r}")
    unknown = sorted(str(k) for k in entry["slots"] if k not in OPTIMIZER_SLOTS[name])
    if unknown:
        raise CheckpointError(f"{path}: 'server_optimizer' has slot {unknown[0]!r}, which {name} does not keep "
                              f"(it keeps: {', '.join(OPTIMIZER_SLOTS[name]) or 'nothing'})")
    return ServerOptimizerState(name, {slot: _checked_arrays(path, value, config, f"server_optimizer.{slot}")
                                       for slot, value in entry["slots"].items()})


def _checked_ema(path: Path, entry: Any, config: FedsynthConfig, rounds_completed: int) -> EmaState | None:
    """The EMA, once its decay, round count and arrays are known to fit the config and each other."""
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: 'ema' is a {type(entry).__name__}, not a mapping")
    decay, steps = entry.get("decay"), entry.get("steps")
    if decay != config.federation.ema_decay or not isinstance(decay, float) or not 0 < decay < 1:
        raise CheckpointError(f"{path}: 'ema.decay' is {decay!r}, but the embedded config's federation.ema_decay "
                              f"is {config.federation.ema_decay}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= max(rounds_completed, 1):
        raise CheckpointError(f"{path}: 'ema.steps' is {steps!r}, expected a round count in [1, {max(rounds_completed, 1)}]")
    state = EmaState(decay, steps, _checked_arrays(path, entry.get("accumulator"), config, "ema.accumulator"),
                     _checked_arrays(path, entry.get("weights"), config, "ema.weights"))
    problem = ema_problem(state)
    if problem is not None:
        raise CheckpointError(f"{path}: 'ema' is inconsistent: {problem}")
    return state


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
    if not existing:
        return None
    # The newest round only: skipping a bad one would train on from an older round and then
    # write over the file the user has not yet looked at.
    newest = existing[-1][1]
    try:
        ckpt = load_checkpoint(newest)
    except CheckpointError as err:
        raise CheckpointError(f"cannot resume: {err}. Move {newest.name} out of {cfg.federation.checkpoint_dir} "
                              "to resume from the round before it.") from None
    if ckpt.config.model.architecture() != cfg.model.architecture():  # the init file is checked by its SHA-256
        raise ConfigError(f"{cfg.federation.checkpoint_dir}: cannot resume, the checkpoint's model settings differ from the config's")
    # The optimiser's and the EMA's state only mean something to the setting that produced them.
    for key in ("server_optimizer", "ema_decay"):
        saved, wanted = getattr(ckpt.config.federation, key), getattr(cfg.federation, key)
        if saved != wanted:
            raise ConfigError(f"{cfg.federation.checkpoint_dir}: cannot resume with federation.{key} {wanted!r}: "
                              f"{newest.name} was trained with {saved!r} (its state continues only under the same "
                              f"setting); set federation.{key}: {saved!r} or start a new federation.output_dir")
    return ckpt
