"""Discover a hospital's data folder and turn it into model-ready 2D slices.

Two layouts are understood:

* ``<data_dir>/<class>/**/<file>``: the folder name is the label;
* a labels CSV with columns ``file,label[,patient_id]``, ``file`` relative to ``data_dir``.

Files are ``.png``, ``.jpg``, ``.jpeg`` (one slice each) or ``.nii``/``.nii.gz`` volumes
(sliced along one RAS axis). A file that cannot be used is recorded as a
:class:`SkippedFile` with the reason and loading goes on; only a folder with no usable
slice at all is an error. Details stay in the site's log: none of this is sent anywhere.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.config import DataConfig
from common.errors import SiteDataError
from client.site_files import SkippedFile, entries_from_csv, entries_from_folders, walk_files
from common.images import load_image
from common.nifti import is_nifti_path, load_volume
from common.preprocess import foreground_fraction, normalise_intensity, resize_to_model

__all__ = ["SiteSlices", "SkippedFile", "load_file_slices", "load_site_slices", "load_site_slices_cached",
           "require_readable"]

log = logging.getLogger(__name__)

SUPPORTED = ".png .jpg .jpeg .nii .nii.gz"
# A slice narrower than this is a line or a localiser, not anatomy: resizing it to the model's
# square would smear a few pixels into a whole training image.
MIN_SLICE_SIDE = 4


@dataclass
class SiteSlices:
    """All usable slices of one site. Treat the arrays as read-only: results are cached.

    Attributes:
        images: (N, 1, S, S) float32 in [-1, 1].
        labels: (N,) int64 indices into ``classes``.
        patients: patient id of each slice (N entries).
        classes: the federation's class names.
        skipped: files that gave no slice, with the reason.
        shapes: original (H, W) of every kept slice, before resizing.
        files_per_patient: number of files that gave slices, per patient id.
    """

    images: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    patients: list[str] = field(repr=False)
    classes: tuple[str, ...]
    skipped: list[SkippedFile] = field(default_factory=list, repr=False)
    shapes: Counter = field(default_factory=Counter, repr=False)
    files_per_patient: Counter = field(default_factory=Counter, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_patients(self) -> int:
        return len(set(self.patients))

    def counts_per_class(self) -> dict[str, int]:
        """Number of slices per class name (zero for absent classes)."""
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(counts[i]) for i, name in enumerate(self.classes)}

    def patients_per_class(self) -> dict[str, int]:
        """Number of distinct patients with at least one slice of each class."""
        seen: dict[int, set[str]] = {i: set() for i in range(len(self.classes))}
        for patient, label in zip(self.patients, self.labels.tolist()):
            seen[label].add(patient)
        return {name: len(seen[i]) for i, name in enumerate(self.classes)}

    def unreadable(self) -> list[SkippedFile]:
        return [s for s in self.skipped if s.unreadable]

    def patient_index(self) -> list[np.ndarray]:
        """Slice indices grouped per patient, patients in sorted order (the DP unit is a patient)."""
        groups: dict[str, list[int]] = {}
        for index, patient in enumerate(self.patients):
            groups.setdefault(patient, []).append(index)
        return [np.asarray(groups[p], dtype=np.int64) for p in sorted(groups)]


def _require_slice_side(shape: tuple[int, int], path: Path, what: str) -> None:
    if min(shape) < MIN_SLICE_SIDE:
        raise SiteDataError(
            f"{path}: {what} {shape[0]}x{shape[1]} pixels; need at least {MIN_SLICE_SIDE}x{MIN_SLICE_SIDE}"
        )


def _volume_slices(path: Path, cfg: DataConfig) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    volume, spacing = load_volume(path)
    axis = cfg.slice_axis
    first, second = (a for a in range(3) if a != axis)
    _require_slice_side((volume.shape[second], volume.shape[first]), path, f"slices along RAS axis {axis} are")
    volume = normalise_intensity(volume)  # one scale for the whole volume
    # rot90 puts the later RAS axis on the rows (reversed, so anterior/superior is up).
    row_col_spacing = (spacing[second], spacing[first])
    slices, shapes = [], []
    for k in range(volume.shape[axis]):
        slice2d = np.rot90(np.take(volume, k, axis=axis))
        if foreground_fraction(slice2d) < cfg.min_foreground:
            continue
        slices.append(resize_to_model(slice2d, cfg.image_size, row_col_spacing))
        shapes.append(slice2d.shape)
    if not slices:
        raise SiteDataError(
            f"{path}: no slice along RAS axis {axis} has at least {cfg.min_foreground:.0%} foreground"
        )
    return slices, shapes


def _image_slices(path: Path, cfg: DataConfig) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    image = load_image(path)
    _require_slice_side(image.shape, path, "image of")
    if not np.isfinite(image).all():
        raise SiteDataError(f"{path}: image has NaN or infinite pixels")
    if image.min() == image.max():
        raise SiteDataError(f"{path}: constant image, no signal")
    return [resize_to_model(normalise_intensity(image), cfg.image_size)], [image.shape]


def load_file_slices(path: Path, cfg: DataConfig) -> list[np.ndarray]:
    """The ``(S, S)`` slices one image or volume gives a site, whatever folder it lies in.

    Raises:
        SiteDataError: the file is unreadable or holds no usable slice.
    """
    load = _volume_slices if is_nifti_path(path) else _image_slices
    return load(path, cfg)[0]


def _reason(err: SiteDataError, path: Path) -> str:
    """The loaders' message without its leading path, which SkippedFile already holds."""
    message, prefix = str(err), f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def _nothing_usable(
    root: Path, classes: tuple[str, ...], labels_csv: Path | None, skipped: list[SkippedFile]
) -> SiteDataError:
    if skipped:
        top = Counter(s.reason for s in skipped).most_common(3)
        reasons = "; ".join(f"{reason} ({n} file(s))" for reason, n in top)
        return SiteDataError(f"{root}: no usable slice; {len(skipped)} file(s) skipped, most often: {reasons}")
    if labels_csv is not None:
        return SiteDataError(f"{labels_csv}: labels CSV lists no files")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if any(name in classes for name in folders):
        return SiteDataError(f"{root}: class folders {folders} hold no {SUPPORTED} files")
    return SiteDataError(
        f"{root}: no class sub-folders matching {list(classes)} (found {folders}) and no labels CSV; "
        f"put files in <data_dir>/<class>/ or set labels_csv"
    )


def load_site_slices(
    data_dir: str | Path,
    classes: Sequence[str],
    data_cfg: DataConfig,
    labels_csv: str | Path | None = None,
    progress: bool = False,
) -> SiteSlices:
    """Load every usable slice of a site's data folder.

    Args:
        data_dir: the site's data folder.
        classes: the federation's class names; label ``i`` means ``classes[i]``.
        data_cfg: image size, slice axis and foreground threshold.
        labels_csv: a ``file,label[,patient_id]`` CSV; empty or None means class folders.
        progress: show a progress bar over files.

    Returns:
        The slices, in sorted file order, with the files that were skipped and why.

    Raises:
        SiteDataError: the folder or CSV is missing or malformed, or no slice is usable.
    """
    root = Path(data_dir).expanduser()
    classes = tuple(classes)
    if not root.is_dir():
        raise SiteDataError(f"{root}: data folder not found (or not a folder)")
    csv_path = Path(labels_csv).expanduser() if labels_csv else None
    try:
        if csv_path is not None:
            entries, skipped = entries_from_csv(csv_path, root, classes)
        else:
            entries, skipped = entries_from_folders(root, classes)
    except PermissionError as err:
        raise SiteDataError(f"{root}: cannot list the data folder ({err.strerror})") from None
    entries.sort(key=lambda e: e.rel)

    images: list[np.ndarray] = []
    labels: list[int] = []
    patients: list[str] = []
    shapes: Counter = Counter()
    files_per_patient: Counter = Counter()
    for entry in tqdm(entries, desc=f"loading {root.name}", unit="file", disable=not progress):
        load = _volume_slices if is_nifti_path(entry.path) else _image_slices
        try:
            slices, slice_shapes = load(entry.path, data_cfg)
        except SiteDataError as err:
            skipped.append(SkippedFile(entry.rel, _reason(err, entry.path), True))
            continue
        except PermissionError:
            skipped.append(SkippedFile(entry.rel, "permission denied", True))
            continue
        images.extend(slices)
        labels.extend([entry.label] * len(slices))
        patients.extend([entry.patient] * len(slices))
        shapes.update(tuple(s) for s in slice_shapes)
        files_per_patient[entry.patient] += 1

    if not images:
        raise _nothing_usable(root, classes, csv_path, skipped)
    if skipped:
        log.warning("%s: skipped %d file(s); first: %s (%s)", root, len(skipped), skipped[0].path, skipped[0].reason)
    return SiteSlices(
        images=np.stack(images)[:, np.newaxis].astype(np.float32, copy=False),
        labels=np.asarray(labels, dtype=np.int64),
        patients=patients,
        classes=classes,
        skipped=skipped,
        shapes=shapes,
        files_per_patient=files_per_patient,
    )


def require_readable(slices: SiteSlices, data_dir: str | Path, skip_bad_files: bool) -> None:
    """Stop the site on unreadable files unless its admin chose to skip them (they are logged either way)."""
    bad = slices.unreadable()
    if not bad:
        return
    if skip_bad_files:
        for item in bad:
            log.warning("%s: skipping %s (%s)", data_dir, item.path, item.reason)
        return
    raise SiteDataError(
        f"{data_dir}: {len(bad)} unreadable file(s), first {bad[0].path}: {bad[0].reason}; fix them, "
        "or set skip_bad_files: true in the site config to train on the readable ones",
        public=f"site data has {len(bad)} unreadable file(s); the site admin must fix them or allow skipping",
    )


# ----------------------------------------------------------------------------------------
# In-process cache: a site trains many rounds in one process and its files rarely change.

_CACHE: OrderedDict[tuple, SiteSlices] = OrderedDict()
_CACHE_SIZE = 4
_CACHE_LOCK = threading.Lock()


def _fingerprint(root: Path, csv_path: Path | None) -> str:
    """Names, sizes and mtimes of every file: cheap, and changes when any file does."""
    digest = hashlib.sha256()
    listed = [p for p in walk_files(root, [], root)] + ([csv_path] if csv_path else [])
    for path in listed:
        try:
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()


def load_site_slices_cached(
    data_dir: str | Path,
    classes: Sequence[str],
    data_cfg: DataConfig,
    labels_csv: str | Path | None = None,
    progress: bool = False,
) -> SiteSlices:
    """:func:`load_site_slices`, reusing the last result while the folder is unchanged."""
    root = Path(data_dir).expanduser().resolve()
    csv_path = Path(labels_csv).expanduser().resolve() if labels_csv else None
    if not root.is_dir():
        raise SiteDataError(f"{root}: data folder not found (or not a folder)")
    key = (str(root), tuple(classes), data_cfg, str(csv_path) if csv_path else None, _fingerprint(root, csv_path))
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        result = load_site_slices(root, classes, data_cfg, csv_path, progress)
        _CACHE[key] = result
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        return result
