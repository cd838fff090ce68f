"""Site updates that carry only the trained parameters (``training.trainable``, common/trainable.py).

A site that fine-tunes a subset sends only that subset. The server checks a reply against
exactly that subset of the global weights (a missing or extra array is rejected, naming the
setting), then fills the frozen arrays in from the global weights before aggregation, so FedAvg
(and any server optimiser on top of it) sees whole models, and pins them to the global values
after averaging, where float rounding of a weighted mean of equal values could move them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from common.config import FedsynthConfig
from common.trainable import FIELD, is_partial, trainable_names


class PartialUpdates:
    """What a train reply must carry under the federation's ``training.trainable``, and the completion of it.

    Raises:
        ConfigError: (at construction) a pattern matches no parameter of the configured model: the
            run stops before any site trains.
    """

    def __init__(self, cfg: FedsynthConfig) -> None:
        spec = cfg.training.trainable
        self.partial = is_partial(spec)
        self.trained: tuple[str, ...] = trainable_names(cfg) if self.partial else ()
        self.note = f" ({FIELD} {spec!r}: a reply carries exactly {len(self.trained)} arrays)" if self.partial else ""

    def expected(self, global_arrays: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """The global arrays a reply must match, name for name and shape for shape."""
        if not self.partial:
            return global_arrays
        return {name: global_arrays[name] for name in self.trained}

    def completed(self, record: ArrayRecord, global_arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
        """``record`` (float32, already checked) with every frozen array taken from ``global_arrays``, in model order."""
        if not self.partial:
            return record
        return ArrayRecord({name: record[name] if name in record else Array(np.asarray(value))
                            for name, value in global_arrays.items()})

    def pinned(self, record: ArrayRecord, global_arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
        """The aggregate with every frozen array exactly the global one (a weighted mean of equal
        float32 values can differ from them in the last bit)."""
        if not self.partial:
            return record
        trained = set(self.trained)
        return ArrayRecord({name: record[name] if name in trained else Array(np.asarray(global_arrays[name]))
                            for name in record.keys()})
