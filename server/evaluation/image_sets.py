"""The image sets an evaluation compares, loaded through the sites' own pipeline.

Real and synthetic images go through ``client.site_data.load_site_slices`` at one fixed
size, so both see the same normalisation, resizing and padding: any difference the
metrics find is in the images, not in how they were read. A sampler output folder
(``manifest.json`` + ``images/<class>/``) is read through its manifest, which lists each
image once (the folder holds a NIfTI and a PNG of each).
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.site_data import load_site_slices
from common.config import DataConfig
from common.errors import ConfigError, SiteDataError

MANIFEST = "manifest.json"
DEFAULT_IMAGE_SIZE = 32


@dataclass(frozen=True)
class ImageSet:
    """Images of one set, model-ready.

    Attributes:
        images: ``(N, 1, S, S)`` float32 in [-1, 1].
        labels: ``(N,)`` int64 indices into ``classes``.
        classes: class names shared by every set of one evaluation.
        names: a short name per image (file relative to its folder), for the report.
        source: where the set came from (a folder, or a description).
        skipped: files that gave no image.
    """

    images: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    classes: tuple[str, ...]
    names: list[str] = field(repr=False)
    source: str = ""
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(counts[i]) for i, name in enumerate(self.classes)}

    def subset(self, index: np.ndarray) -> ImageSet:
        index = np.asarray(index, dtype=np.int64)
        return ImageSet(self.images[index], self.labels[index], self.classes, [self.names[i] for i in index],
                        self.source, self.skipped)

    def of_class(self, label: int) -> ImageSet:
        return self.subset(np.flatnonzero(self.labels == label))


def read_manifest(folder: Path) -> dict | None:
    """The sampler's manifest of ``folder``, or None when it is a plain ``<class>/`` folder."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable sampler manifest ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("images"), list):
        raise ConfigError(f"{path}: sampler manifest has no 'images' list")
    return manifest


def folder_classes(folder: Path) -> tuple[str, ...]:
    """Class names of a plain ``<class>/`` folder, or of a sampler manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is not None and manifest.get("classes"):
        return tuple(str(c) for c in manifest["classes"])
    if not folder.is_dir():
        raise SiteDataError(f"{folder}: image folder not found (or not a folder)")
    return tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))


def evaluation_size(synthetic: Path, requested: int | None) -> int:
    """The size every set is compared at: the one asked for, else the sampler's, else 32."""
    if requested:
        return int(requested)
    manifest = read_manifest(Path(synthetic))
    if manifest is not None and manifest.get("image_size"):
        return int(manifest["image_size"])
    return DEFAULT_IMAGE_SIZE


def _manifest_csv(folder: Path, manifest: dict, classes: tuple[str, ...]) -> str:
    """A labels CSV listing each manifest image once (its PNG when there is one)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["file", "label"])
    for i, entry in enumerate(manifest["images"]):
        rel = entry.get("png") or entry.get("file")
        if not rel or "class" not in entry:
            raise ConfigError(f"{folder / MANIFEST}: images[{i}] needs 'class' and 'png' or 'file'")
        writer.writerow([rel, entry["class"]])
    return buffer.getvalue()


def load_image_set(folder: str | Path, classes: tuple[str, ...], image_size: int, progress: bool = False) -> ImageSet:
    """Load a ``<class>/`` folder or a sampler output folder at ``image_size``.

    Raises:
        SiteDataError: the folder is missing or holds no usable image.
        ConfigError: a manifest is malformed.
    """
    folder = Path(folder).expanduser().resolve()
    data_cfg = DataConfig(image_size=image_size)
    manifest = read_manifest(folder)
    if manifest is None:
        slices = load_site_slices(folder, classes, data_cfg, progress=progress)
    else:
        with tempfile.TemporaryDirectory(prefix="fedsynth-eval-") as tmp:
            labels_csv = Path(tmp) / "labels.csv"
            labels_csv.write_text(_manifest_csv(folder, manifest, classes), encoding="utf-8")
            slices = load_site_slices(folder, classes, data_cfg, labels_csv, progress=progress)
    names = _unique_names(slices.patients)
    return ImageSet(slices.images, slices.labels, classes, names, str(folder), len(slices.skipped))


def _unique_names(patients: list[str]) -> list[str]:
    """A volume gives many slices with one patient id: number them so every image has its own name."""
    total = Counter(patients)
    seen: Counter = Counter()
    names = []
    for p in patients:
        names.append(p if total[p] == 1 else f"{p}#{seen[p]}")
        seen[p] += 1
    return names
