"""A small CNN slice classifier: the feature network for FID and the model behind TSTR/TRTR.

No pretrained network (Inception, RadImageNet) can be downloaded here, so fedsynth trains
its own on real slices. Training is deterministic: fixed seed, one CPU thread while it
trains (multi-threaded reductions change the last bits), a fixed number of steps and a
batch order drawn from a seeded generator. The result is cached on disk under a hash of
the training images, labels, classes and settings, so re-evaluating against the same
real data reuses the same network and FID values stay comparable between reports.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from common.errors import ConfigError
from common.fileio import write_bytes_atomic

CACHE_ENV = "FEDSYNTH_CACHE"
_FORMAT = "fedsynth-eval-classifier-v1"


@dataclass(frozen=True)
class ClassifierSettings:
    """Hyperparameters; all of them enter the cache key."""

    steps: int = 400
    batch_size: int = 64
    learning_rate: float = 2e-3
    width: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.width < 4 or not 0 < self.learning_rate < 1:
            raise ConfigError(f"classifier settings out of range: {self}")


class SliceClassifier(nn.Module):
    """Four conv stages (the last three stride 2), global average pooling, a linear head.

    ``features`` is the pooled ``4 * width``-vector: the embedding FID is computed on.
    """

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        chans = (width, 2 * width, 4 * width, 4 * width)
        layers: list[nn.Module] = []
        previous = 1
        for i, c in enumerate(chans):
            layers += [nn.Conv2d(previous, c, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(4, c), nn.SiLU()]
            previous = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(previous, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1, H, W)`` -> ``(N, 4 * width)``."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@contextmanager
def single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedsynth") / "classifiers"


def cache_key(images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], settings: ClassifierSettings) -> str:
    """SHA-256 of everything that determines the trained weights."""
    digest = hashlib.sha256(_FORMAT.encode())
    digest.update(repr((classes, asdict(settings), images.shape)).encode())
    digest.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, settings: ClassifierSettings,
                     progress: bool = False, desc: str = "classifier") -> SliceClassifier:
    """Train from scratch on ``(N, 1, S, S)`` images; random left-right flips as augmentation."""
    if len(labels) == 0:
        raise ConfigError("cannot train a classifier on an empty image set")
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    x_all, y_all = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)), torch.from_numpy(labels)
    model = SliceClassifier(num_classes, settings.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.learning_rate, total_steps=settings.steps)
    model.train()
    with single_thread():
        for _ in tqdm(range(settings.steps), desc=desc, unit="step", disable=not progress, leave=False):
            batch = torch.randint(0, len(y_all), (min(settings.batch_size, len(y_all)),), generator=generator)
            x = x_all[batch]
            flip = torch.rand(len(batch), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = nn.functional.cross_entropy(model(x), y_all[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def _save(path: Path, model: SliceClassifier, num_classes: int, settings: ClassifierSettings) -> None:
    buffer = io.BytesIO()
    torch.save({"format": _FORMAT, "num_classes": num_classes, "settings": asdict(settings),
                "state": model.state_dict()}, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def _load(path: Path) -> SliceClassifier | None:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model = SliceClassifier(int(payload["num_classes"]), int(payload["settings"]["width"]))
        model.load_state_dict(payload["state"])
        return model.eval()
    except Exception:  # a damaged or foreign cache file is retrained, never trusted
        return None


def load_or_train(images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], settings: ClassifierSettings,
                  cache_dir: Path | None = None, progress: bool = False, desc: str = "classifier") -> tuple[SliceClassifier, str, bool]:
    """The cached classifier for this training data, trained and cached first if needed.

    Returns:
        ``(model, cache key, whether it came from the cache)``.
    """
    key = cache_key(images, labels, classes, settings)
    path = (cache_dir or default_cache_dir()) / f"{key}.pt"
    if path.is_file():
        model = _load(path)
        if model is not None:
            return model, key, True
    model = train_classifier(images, labels, len(classes), settings, progress, desc)
    _save(path, model, len(classes), settings)
    return model, key, False


def _batches(images: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        yield torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size], dtype=np.float32))


@torch.no_grad()
def predict(model: SliceClassifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class index per image, ``(N,)`` int64."""
    out = [model(x).argmax(dim=1).numpy() for x in _batches(images, batch_size)]
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


@torch.no_grad()
def extract_features(model: SliceClassifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``(N, 4 * width)`` float64 embeddings."""
    out = [model.features(x).double().numpy() for x in _batches(images, batch_size)]
    return np.concatenate(out) if out else np.empty((0, model.head.in_features))
