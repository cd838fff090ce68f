"""The site's optimiser state between rounds of one run: AdamW's moments and the run's step count.

Restarting AdamW every round throws its second-moment estimates away just as they settle,
and under DP the first steps of a fresh AdamW (tiny ``v``, noisy ``g``) are the largest. The
state is post-processing of the noisy DP gradients the site already took, so keeping it costs
no privacy; it never leaves the site (it is not part of a reply) and is not privacy relevant:
a missing, corrupt or foreign file only means a fresh start, with a warning.

The file is keyed by the run id and the model's trainable parameter shapes: a new run, or a
different model, starts fresh. It is used only by a later round than the one that saved it: a
round sent again (a retry, a resumed run) starts from what it started from the first time
would need the older state, which is gone, so it starts fresh, and a non-private round stays
reproducible from its config. The global weights always come from the server; only the
moments and the step count persist.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.fileio import write_atomic

log = logging.getLogger("fedsynth.client")

OPTIMIZER_STATE_FILE = "optimizer_state.pt"


@dataclass
class RunOptimizerState:
    """What one run carries from round to round at this site."""

    steps: int = 0  # optimiser steps this site took in the run: drives the warm-up
    moments: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # ``optimizer.state_dict()["state"]``


def parameter_shapes(params: list[torch.nn.Parameter]) -> list[list[int]]:
    return [list(p.shape) for p in params]


def load_run_state(state_dir: str | Path, run_id: str, server_round: int,
                   params: list[torch.nn.Parameter]) -> RunOptimizerState:
    """The state saved by an earlier round of this run for these parameters, or a fresh one."""
    path = Path(state_dir) / OPTIMIZER_STATE_FILE
    if not path.is_file():
        return RunOptimizerState()
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and containers only
        problem = _check(saved, params)
    except Exception as err:  # any unreadable file is only a fresh start: nothing private depends on it
        problem = f"unreadable ({type(err).__name__}: {err})"
    if problem is not None:
        log.warning("%s: %s; the optimiser starts fresh", path, problem)
        return RunOptimizerState()
    if saved["run_id"] != run_id or saved["shapes"] != parameter_shapes(params):
        log.info("optimiser state of another run or model in %s: starting fresh", path)
        return RunOptimizerState()
    if saved["server_round"] >= server_round:
        log.info("optimiser state in %s is from round %d, not before round %d: starting fresh", path,
                 saved["server_round"], server_round)
        return RunOptimizerState()
    return RunOptimizerState(steps=saved["steps"], moments=saved["moments"])


def save_run_state(state_dir: str | Path, run_id: str, server_round: int, params: list[torch.nn.Parameter],
                   steps: int, optimizer: torch.optim.Optimizer | None) -> Path:
    """Replace the saved state (atomically, mode 0600); ``optimizer=None`` keeps the step count only."""
    moments = {}
    if optimizer is not None:
        moments = {int(i): {k: v.detach().to("cpu", copy=True) for k, v in entry.items()}
                   for i, entry in optimizer.state_dict()["state"].items()}
    payload = {"run_id": run_id, "server_round": int(server_round), "shapes": parameter_shapes(params),
               "steps": int(steps), "moments": moments}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return write_atomic(Path(state_dir) / OPTIMIZER_STATE_FILE, lambda handle: handle.write(buffer.getvalue()))


def restore_moments(optimizer: torch.optim.Optimizer, moments: dict[int, dict[str, torch.Tensor]]) -> None:
    """Load saved moments into ``optimizer``, keeping its current hyper-parameters (learning rate, betas)."""
    if not moments:
        return
    current = optimizer.state_dict()
    current["state"] = moments  # param_groups stay this round's: the config may have changed the rate
    optimizer.load_state_dict(current)


def _check(saved: Any, params: list[torch.nn.Parameter]) -> str | None:
    """What is wrong with a loaded file, or ``None``; moments of the wrong shape would break AdamW's step."""
    if not isinstance(saved, dict) or not {"run_id", "server_round", "shapes", "steps", "moments"} <= set(saved):
        return "not a fedsynth optimiser state"
    steps, moments = saved["steps"], saved["moments"]
    if not isinstance(saved["run_id"], str) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (steps, saved["server_round"])):
        return "bad run id, round or step count"
    if saved["shapes"] != parameter_shapes(params):
        return None  # another model: ignored, not corrupt
    if not isinstance(moments, dict):
        return "bad moments"
    for index, entry in moments.items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entry, dict):
            return f"bad moments entry {index!r}"
        shape = params[index].shape
        for key in ("exp_avg", "exp_avg_sq"):
            value = entry.get(key)
            if not isinstance(value, torch.Tensor) or value.shape != shape or not bool(torch.isfinite(value).all()):
                return f"moment {key} of parameter {index} is missing, of the wrong shape or not finite"
        if bool((entry["exp_avg_sq"] < 0).any()):  # its square root divides the update
            return f"negative second moment of parameter {index}"
        step = entry.get("step")
        if not isinstance(step, torch.Tensor) or step.numel() != 1 or not math.isfinite(float(step)) or float(step) < 0:
            return f"step count of parameter {index} is missing or invalid"
        if set(entry) != {"step", "exp_avg", "exp_avg_sq"}:
            return f"unexpected keys in moments of parameter {index}"
    return None
