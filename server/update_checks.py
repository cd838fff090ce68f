"""Checks on a site's update before it may enter the average.

One bad site (a bug, a broken GPU, an attack) must not be able to wreck the global model:
an update whose arrays do not match the global model exactly, that holds NaN/Inf, or
whose distance from the global weights exceeds a bound is rejected, and the site named.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from common.transfer import wire_dtype

NUMERIC_METRICS = ("num-examples",)


def update_problem(
    update: Mapping[str, np.ndarray],
    global_arrays: Mapping[str, np.ndarray],
    metrics: Mapping[str, float],
    max_update_norm: float = 0.0,
    transfer_dtype: str = "float32",
    note: str = "",
) -> str | None:
    """Why ``update`` must be rejected, or ``None`` when it is acceptable.

    ``transfer_dtype`` is the federation's ``transfer_dtype``: exactly that dtype is accepted.
    ``global_arrays`` holds exactly the arrays the update must carry (the trained subset under
    ``training.trainable``); ``note`` says why, after a missing or unexpected array.
    """
    expected_dtype = wire_dtype(transfer_dtype)
    missing = sorted(set(global_arrays) - set(update))
    extra = sorted(set(update) - set(global_arrays))
    if missing:
        return f"{len(missing)} array(s) missing, e.g. {missing[0]}{note}"
    if extra:
        return f"{len(extra)} unexpected array(s), e.g. {extra[0]}{note}"
    squared = 0.0
    for name, reference in global_arrays.items():
        value = update[name]
        if value.dtype != expected_dtype:
            return f"{name} has dtype {value.dtype}, expected {expected_dtype}"
        if value.shape != reference.shape:
            return f"{name} has shape {tuple(value.shape)}, expected {tuple(reference.shape)}"
        if not np.isfinite(value).all():
            return f"{name} holds NaN or Inf"
        squared += float(np.sum((value.astype(np.float64) - reference) ** 2))
    norm = math.sqrt(squared)
    if max_update_norm > 0 and norm > max_update_norm:
        return f"update norm {norm:.3g} exceeds the bound {max_update_norm:g}"
    for key in NUMERIC_METRICS:
        value = metrics.get(key)
        if value is None or not math.isfinite(float(value)) or float(value) <= 0:
            return f"metric '{key}' is {value!r}, expected a positive number"
    return None
