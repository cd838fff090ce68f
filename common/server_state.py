"""What the server carries from round to round besides the weights: its optimiser's state and an EMA.

Both are kept in every checkpoint so that a resumed federation continues exactly where it
stopped. Both are server-side post-processing of the aggregated (DP) site updates: they read
nothing a site did not already send, so no site's epsilon changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The arrays each of Flower's server optimisers keeps between rounds, named after the attributes
# of Flower's classes (flwr.serverapp.strategy); a slot Flower has not filled yet is absent.
OPTIMIZER_SLOTS: dict[str, tuple[str, ...]] = {
    "fedavg": (),
    "fedavgm": ("current_arrays", "momentum_vector"),
    "fedadam": ("current_arrays", "m_t", "v_t"),
    "fedyogi": ("current_arrays", "m_t", "v_t"),
    "fedadagrad": ("current_arrays", "m_t", "v_t"),
}


@dataclass
class ServerOptimizerState:
    """The server optimiser's arrays after a round: ``slots[slot][parameter name]`` float32 arrays."""

    name: str
    slots: dict[str, dict[str, np.ndarray]]


@dataclass
class EmaState:
    """An exponential moving average of the global weights over rounds, bias-corrected.

    ``accumulator`` is ``a_t = d * a_{t-1} + (1 - d) * w_t`` from ``a_0 = 0`` and ``weights`` is
    ``a_t / (1 - d**t)``: without the correction a short run would sample from weights that
    are still mostly the zero start (after round 1 the EMA equals that round's weights).
    """

    decay: float
    steps: int
    accumulator: dict[str, np.ndarray]
    weights: dict[str, np.ndarray]


def ema_update(state: EmaState | None, decay: float, arrays: dict[str, np.ndarray]) -> EmaState:
    """The EMA after one more round whose global weights are ``arrays``.

    Computed in float64 and stored in float32, the dtype a checkpoint holds, so a run resumed
    from its checkpoint continues with exactly the numbers an uninterrupted run would have.
    """
    if not 0 < decay < 1:
        raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
    if state is not None and state.decay != decay:
        raise ValueError(f"EMA decay {decay} differs from the running EMA's {state.decay}")
    steps = 1 if state is None else state.steps + 1
    correction = 1.0 - decay ** steps
    accumulator: dict[str, np.ndarray] = {}
    weights: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        previous = 0.0 if state is None else state.accumulator[name].astype(np.float64)
        acc = decay * previous + (1.0 - decay) * np.asarray(value, np.float64)
        accumulator[name] = acc.astype(np.float32)
        # From the unrounded sum: after round 1 this is the round's weights exactly.
        weights[name] = (acc / correction).astype(np.float32)
    return EmaState(decay, steps, accumulator, weights)


def ema_problem(state: EmaState) -> str | None:
    """Why ``state``'s weights are not its bias-corrected accumulator, or None: a damaged checkpoint."""
    correction = 1.0 - state.decay ** state.steps
    for name, acc in state.accumulator.items():
        expected = acc.astype(np.float64) / correction
        if not np.allclose(state.weights[name], expected, rtol=1e-5, atol=1e-6):
            return f"EMA weights {name!r} are not the accumulator divided by 1 - decay**steps"
    return None
