"""Weights on the wire: the dtype a site sends its update in (``federation.transfer_dtype``).

float16 halves the upload. The cast happens after DP noise was added, so it is
post-processing and changes no privacy guarantee; the server casts back to float32 before
checking and averaging, so the average and the checkpoints stay float32.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

WIRE_DTYPES: dict[str, type[np.floating]] = {"float32": np.float32, "float16": np.float16}


def wire_dtype(transfer_dtype: str) -> np.dtype:
    try:
        return np.dtype(WIRE_DTYPES[transfer_dtype])
    except KeyError:
        raise ValueError(f"transfer_dtype must be one of {sorted(WIRE_DTYPES)}, got {transfer_dtype!r}") from None


def encode_update(arrays: Mapping[str, np.ndarray], transfer_dtype: str) -> dict[str, np.ndarray]:
    """The site's trainable float32 weights as they leave the site."""
    dtype = wire_dtype(transfer_dtype)
    return {name: np.asarray(value).astype(dtype, copy=False) for name, value in arrays.items()}


def decode_update(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Back to float32 at the server, before averaging."""
    return {name: np.asarray(value).astype(np.float32, copy=False) for name, value in arrays.items()}
