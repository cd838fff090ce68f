"""The public data set ``fedsynth pretrain`` trains on, read exactly as a site reads its own.

Three guarantees the checkpoint's provenance records:

* the images went through the sites' loader and preprocessing (:mod:`client.site_data`), so
  pretraining sees what sites see;
* the class folders are exactly the federation's ``model.classes``;
* no image nearly duplicates one under an ``--exclude`` folder (Pearson r > 0.95 at 32 x 32,
  the threshold bench/make_demo_data.py uses for the shipped demo set), so a public set can be
  shown disjoint from data a federation trains or is evaluated on.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.site_data import SiteSlices, load_file_slices, load_site_slices, require_readable
from client.site_files import SkippedFile, entries_from_folders, walk_files
from common.checkpoint import file_sha256
from common.config import DataConfig
from common.errors import ConfigError, SiteDataError
from common.images import is_image_path
from common.nifti import is_nifti_path
from common.preprocess import resize_to_model
from common.similarity import nearest_pearson

log = logging.getLogger("fedsynth.pretrain")

NEAR_DUPLICATE_R = 0.95
COMPARE_SIZE = 32


@dataclass(frozen=True)
class PublicData:
    """The slices to pretrain on (near-duplicates of excluded images already removed)."""

    slices: SiteSlices
    num_files: int
    excluded: int
    data_sha256: str

    def per_class(self) -> dict[str, int]:
        return self.slices.counts_per_class()


def check_class_folders(root: Path, classes: Sequence[str], config: Path) -> None:
    """Refuse a folder whose class sub-folders are not exactly ``classes``: a stray folder would be
    silently ignored and a missing class left untrained."""
    if not root.is_dir():
        raise SiteDataError(f"{root}: public data folder not found (or not a folder)")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for name in folders:
        if name not in classes:
            raise ConfigError(f"{root / name}: class folder '{name}' is not one of model.classes {list(classes)} "
                              f"in {config}")
    for name in classes:
        if name not in folders:
            raise ConfigError(f"{root / name}: missing; every class of model.classes in {config} needs a folder "
                              f"(found {folders})")


def data_digest(entries: Sequence[tuple[str, Path]]) -> str:
    """SHA-256 over ``<relative path>\\0<SHA-256 of the file's bytes>\\n`` for each file, sorted by path.

    Names and contents together: renaming, adding, removing or changing any file changes it.
    """
    digest = hashlib.sha256()
    for rel, path in sorted(entries):
        digest.update(f"{rel}\0{file_sha256(path)}\n".encode("utf-8"))
    return digest.hexdigest()


def at_compare_size(images: np.ndarray) -> np.ndarray:
    """``(N, 1, S, S)`` model-ready slices as ``(N, 32, 32)``, resized the way the loader resizes."""
    if images.shape[-1] == COMPARE_SIZE:
        return images.reshape(len(images), COMPARE_SIZE, COMPARE_SIZE)
    out = np.empty((len(images), COMPARE_SIZE, COMPARE_SIZE), dtype=np.float32)
    for i, image in enumerate(images):
        out[i] = resize_to_model(image.reshape(image.shape[-2:]), COMPARE_SIZE)
    return out


def load_reference_slices(folder: Path, data_cfg: DataConfig) -> np.ndarray:
    """Every usable slice of every image or volume below ``folder`` (any layout), as ``(N, 32, 32)``."""
    folder = folder.expanduser()
    if not folder.is_dir():
        raise SiteDataError(f"{folder}: --exclude folder not found (or not a folder)")
    skipped: list[SkippedFile] = []
    slices: list[np.ndarray] = []
    unusable = 0
    for path in walk_files(folder, skipped, folder):
        if not (is_image_path(path) or is_nifti_path(path)):
            continue
        try:
            slices.extend(load_file_slices(path, data_cfg))
        except (SiteDataError, PermissionError) as err:
            # Kept out of the comparison, so a bad file cannot hide a duplicate: it is reported.
            unusable += 1
            log.warning("--exclude %s: %s not compared (%s)", folder, path, err)
    unreadable = [s for s in skipped if s.unreadable]
    if unreadable or unusable:
        log.warning("--exclude %s: %d file(s) could not be compared", folder, len(unreadable) + unusable)
    if not slices:
        raise SiteDataError(f"{folder}: --exclude folder holds no usable image or volume")
    return at_compare_size(np.stack(slices)[:, np.newaxis])


def near_duplicates(images: np.ndarray, references: np.ndarray, threshold: float = NEAR_DUPLICATE_R) -> np.ndarray:
    """Boolean mask over ``images`` (``(N, 1, S, S)``): Pearson r above ``threshold`` with any reference at 32 x 32."""
    if len(references) == 0 or len(images) == 0:
        return np.zeros(len(images), dtype=bool)
    _, distance = nearest_pearson(at_compare_size(images), references)
    return distance < 1.0 - threshold


def _subset(slices: SiteSlices, keep: np.ndarray) -> SiteSlices:
    index = np.flatnonzero(keep)
    return SiteSlices(images=slices.images[index], labels=slices.labels[index],
                      patients=[slices.patients[i] for i in index], classes=slices.classes,
                      skipped=slices.skipped, shapes=slices.shapes, files_per_patient=slices.files_per_patient)


def load_public_data(root: Path, classes: Sequence[str], data_cfg: DataConfig, config: Path,
                     exclude: Sequence[Path] = (), skip_bad_files: bool = False, progress: bool = False) -> PublicData:
    """Load ``root`` with the sites' loader, check its classes and drop near-duplicates of ``exclude``.

    Raises:
        ConfigError: the class folders are not exactly ``classes``.
        SiteDataError: a folder is missing, holds nothing usable, or (without ``skip_bad_files``)
            has unreadable files; or every image was a near-duplicate of an excluded one.
    """
    root = root.expanduser().resolve()
    classes = tuple(classes)
    check_class_folders(root, classes, config)
    entries, _ = entries_from_folders(root, classes)
    slices = load_site_slices(root, classes, data_cfg, progress=progress)
    require_readable(slices, root, skip_bad_files)
    for name, count in slices.counts_per_class().items():
        if count == 0:
            raise SiteDataError(f"{root / name}: no usable image for class '{name}'")
    digest = data_digest([(e.rel, e.path) for e in entries])

    keep = np.ones(len(slices), dtype=bool)
    for folder in exclude:
        references = load_reference_slices(Path(folder), data_cfg)
        hits = near_duplicates(slices.images, references)
        log.info("--exclude %s: %d public slice(s) nearly duplicate one of its %d", folder, int(hits.sum()), len(references))
        keep &= ~hits
    excluded = int(len(keep) - keep.sum())
    if not keep.any():
        raise SiteDataError(f"{root}: every image nearly duplicates one under --exclude; nothing left to pretrain on")
    return PublicData(slices=_subset(slices, keep) if excluded else slices, num_files=len(entries),
                      excluded=excluded, data_sha256=digest)
