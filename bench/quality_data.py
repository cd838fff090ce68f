"""The quality benchmark's images: real slices (loaded once, cached as .npz) and synthetic samples.

Synthetic images are normalised exactly as ``fedsynth evaluate`` would after reading
them back from the sampler's PNGs (``normalise_intensity`` per image), so the in-memory
benchmark and the CLI score the same thing; only the PNG's 8-bit rounding is skipped.
"""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

import numpy as np

from client.site_data import SiteSlices, load_site_slices
from common.config import DataConfig
from common.fileio import write_bytes_atomic
from common.model import pick_device
from common.preprocess import normalise_intensity
from quality_train import ModelPreset, federation_config
from server.evaluation.image_sets import ImageSet
from server.sampler import DEFAULT_ETA, build_sampling_model, sample_images
from server.synthetic_set import plan_labels

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


def _fingerprint(root: Path, size: int) -> str:
    """Names and sizes of every file: a changed data folder is re-read, not served stale."""
    digest = hashlib.sha256(f"{size}".encode())
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(f"{path.relative_to(root)}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def load_slices(root: Path, size: int, cache_dir: Path) -> SiteSlices:
    """All slices of ``root`` at ``size`` px, through the sites' own loader (about a minute for 4,578 JPEGs)."""
    cache = cache_dir / f"slices-{size}-{_fingerprint(root, size)}.npz"
    if cache.is_file():
        data = np.load(cache, allow_pickle=False)
        return SiteSlices(images=data["images"], labels=data["labels"], patients=[str(p) for p in data["patients"]],
                          classes=tuple(str(c) for c in data["classes"]))
    slices = load_site_slices(root, CLASSES, DataConfig(image_size=size), progress=True)
    buffer = io.BytesIO()
    np.savez(buffer, images=slices.images, labels=slices.labels, patients=np.array(slices.patients),
             classes=np.array(slices.classes))
    write_bytes_atomic(cache, buffer.getvalue())
    return slices


def sample_set(p: ModelPreset, classes: tuple[str, ...], arrays: dict[str, np.ndarray], num: int, steps: int,
               guidance: float, seed: int, progress: bool = True, eta: float = DEFAULT_ETA) -> tuple[ImageSet, float]:
    """``num`` images, classes round-robin, image ``i`` from seed ``seed + i``; and the sampling seconds."""
    cfg = federation_config(p, classes, Path("."), 1, dp=False)
    model = build_sampling_model(cfg, arrays, pick_device())
    labels = plan_labels(classes, (), num)
    started = time.time()
    images = sample_images(cfg, model, labels, [seed + i for i in range(num)], steps, guidance, batch_size=50,
                           progress=progress, eta=eta)
    seconds = time.time() - started
    normalised = np.stack([normalise_intensity(im) for im in images])[:, None].astype(np.float32)
    return ImageSet(normalised, np.asarray(labels, dtype=np.int64), classes, [f"sample-{i:04d}" for i in range(num)],
                    f"{steps} DDIM steps, guidance {guidance}, eta {eta}"), seconds
