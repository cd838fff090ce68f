"""Finding a hospital's files: class folders or a labels CSV, and the patient each file belongs to.

Nothing is read here but names and folder listings; :mod:`client.site_data` loads the files.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common.errors import SiteDataError
from common.images import is_image_path
from common.nifti import is_nifti_path

_CSV_COLUMNS = ("file", "label")
_BIDS_SUBJECT = re.compile(r"^(sub-[^_]+)_")


@dataclass(frozen=True)
class SkippedFile:
    """A file that contributed nothing, with why (``path`` relative to the data folder)."""

    path: str
    reason: str
    unreadable: bool = False
    """True for a file that should have been usable (an image or volume that failed to load);
    False for one that was simply not meant for training (another class, not an image)."""


@dataclass(frozen=True)
class FileEntry:
    path: Path
    rel: str
    label: int
    patient: str


def _patient_id(rel: str) -> str:
    """Images: one patient per file. NIfTI: the BIDS subject when there is one, else the file."""
    parts = Path(rel).parts
    if not is_nifti_path(Path(rel)):
        return str(Path(rel).with_suffix("").as_posix())
    for part in parts[:-1]:
        if part.startswith("sub-"):
            return part
    name = parts[-1]
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".gz") else name[: -len(".nii")]
    match = _BIDS_SUBJECT.match(stem)
    return match.group(1) if match else stem


def walk_files(top: Path, skipped: list[SkippedFile], root: Path) -> Iterator[Path]:
    """Non-hidden files below ``top``; linked folders are entered once, so loops end."""
    seen: set[tuple[int, int]] = set()

    def on_error(err: OSError) -> None:
        skipped.append(SkippedFile(_rel(Path(err.filename or top), root), f"cannot list folder ({err.strerror})", True))

    for dirpath, dirnames, filenames in os.walk(top, onerror=on_error, followlinks=True):
        try:
            stat = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (stat.st_dev, stat.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _is_supported(path: Path) -> bool:
    return is_image_path(path) or is_nifti_path(path)


def entries_from_folders(root: Path, classes: tuple[str, ...]) -> tuple[list[FileEntry], list[SkippedFile]]:
    entries: list[FileEntry] = []
    skipped: list[SkippedFile] = []
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            continue
        if not child.is_dir():
            skipped.append(SkippedFile(child.name, "not inside a class sub-folder"))
            continue
        for path in walk_files(child, skipped, root):
            rel = _rel(path, root)
            if child.name not in classes:
                reason = f"class folder '{child.name}' is not in the federation's classes {list(classes)}"
                skipped.append(SkippedFile(rel, reason))
            elif not _is_supported(path):
                skipped.append(SkippedFile(rel, "not an image or NIfTI file"))
            else:
                entries.append(FileEntry(path, rel, classes.index(child.name), _patient_id(rel)))
    return entries, skipped


def _read_csv_rows(csv_path: Path) -> list[dict[str, str]]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [name.strip() for name in reader.fieldnames or []]
            reader.fieldnames = columns
            missing = [c for c in _CSV_COLUMNS if c not in columns]
            if missing:
                raise SiteDataError(
                    f"{csv_path}: labels CSV is missing column '{missing[0]}' "
                    f"(found {columns}; expected file,label and optionally patient_id)"
                )
            return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except FileNotFoundError:
        raise SiteDataError(f"{csv_path}: labels CSV not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SiteDataError(f"{csv_path}: cannot read labels CSV ({err})") from None


def entries_from_csv(
    csv_path: Path, root: Path, classes: tuple[str, ...]
) -> tuple[list[FileEntry], list[SkippedFile]]:
    entries: dict[str, FileEntry] = {}
    skipped: list[SkippedFile] = []
    for line, row in enumerate(_read_csv_rows(csv_path), start=2):
        rel, label = row["file"], row["label"]
        path = root / rel
        if not rel:
            skipped.append(SkippedFile(f"{csv_path.name} line {line}", "row has no file name"))
        elif label not in classes:
            skipped.append(SkippedFile(rel, f"label '{label}' is not in the federation's classes {list(classes)}"))
        elif rel in entries:
            skipped.append(SkippedFile(rel, f"listed again in the labels CSV (line {line})"))
        elif not _is_supported(path):
            skipped.append(SkippedFile(rel, "not an image or NIfTI file"))
        elif not path.is_file():
            skipped.append(SkippedFile(rel, "listed in the labels CSV but not found", True))
        else:
            patient = row.get("patient_id") or _patient_id(rel)
            entries[rel] = FileEntry(path, rel, classes.index(label), patient)
    return list(entries.values()), skipped
