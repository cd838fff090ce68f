"""Finding a hospital's files: class folders or a labels CSV, and the patient each file belongs to.

Nothing is read here but names and folder listings; :mod:`client.site_data` loads the files.
"""

from __future__ import annotations

import csv
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common.errors import SiteDataError
from common.images import is_image_path
from common.nifti import is_nifti_path

_CSV_COLUMNS = ("file", "label")
_BIDS_SUBJECT = re.compile(r"^(sub-[^_]+)_")
# Class folder plus a BIDS tree (sub-/ses-/anat/) is 4 levels; 32 leaves room for any export
# layout while keeping a hostile tree from being walked forever.
MAX_FOLDER_DEPTH = 32


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
    """The BIDS subject (a ``sub-XX`` folder or ``sub-XX_`` name prefix) when there is one, else the file.

    The subject is the unit of privacy: the T1 and FLAIR of sub-01, or the PNG slices
    exported from them, are one patient, not several.
    """
    parts = Path(rel).parts
    for part in parts[:-1]:
        if part.startswith("sub-"):
            return part
    name = parts[-1]
    if is_nifti_path(Path(rel)):
        stem = name[: -len(".nii.gz")] if name.lower().endswith(".gz") else name[: -len(".nii")]
    else:
        stem = Path(name).stem
    match = _BIDS_SUBJECT.match(stem)
    if match:
        return match.group(1)
    return stem if is_nifti_path(Path(rel)) else str(Path(rel).with_suffix("").as_posix())


def _inside(path: Path, boundary: str) -> bool:
    """Whether ``path``, every link resolved, lies in the folder ``boundary`` (already resolved)."""
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError):
        return False
    return real == boundary or real.startswith(boundary.rstrip(os.sep) + os.sep)


def _not_regular(path: Path) -> str:
    """Why ``path`` cannot be read as a file ('' when it can), without opening it: opening a FIFO blocks."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "not found (or a broken link)"
    except (OSError, ValueError) as err:
        return f"cannot be examined ({getattr(err, 'strerror', None) or type(err).__name__})"
    if stat.S_ISREG(mode):
        return ""
    return "a folder, not a file" if stat.S_ISDIR(mode) else "not a regular file (FIFO, socket or device); not opened"


def walk_files(top: Path, skipped: list[SkippedFile], root: Path) -> Iterator[Path]:
    """Regular, non-hidden files below ``top``, folder by folder in name order.

    Iterative, so a folder tree thousands of levels deep cannot exhaust the stack; folders
    more than :data:`MAX_FOLDER_DEPTH` below ``top`` are reported and not searched. Linked
    folders are entered once, so loops end; links resolving outside ``root`` are refused, as
    are FIFOs, sockets and devices, all without being opened.
    """
    boundary = os.path.realpath(root)
    seen: set[tuple[int, int]] = set()
    pending: list[tuple[Path, int]] = [(Path(top), 0)]
    while pending:
        folder, depth = pending.pop()
        try:
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            with os.scandir(folder) as listing:
                names = sorted(entry.name for entry in listing if not entry.name.startswith("."))
        except OSError as err:
            skipped.append(SkippedFile(_rel(folder, root), f"cannot list folder ({err.strerror})", True))
            continue
        subfolders: list[Path] = []
        for name in names:
            path = folder / name
            if os.path.islink(path) and not _inside(path, boundary):
                skipped.append(SkippedFile(_rel(path, root), "link to outside the data folder; refused", True))
            elif os.path.isdir(path):
                if depth >= MAX_FOLDER_DEPTH:
                    reason = f"folder nested more than {MAX_FOLDER_DEPTH} levels deep; not searched"
                    skipped.append(SkippedFile(_rel(path, root), reason, True))
                else:
                    subfolders.append(path)
            elif reason := _not_regular(path):
                skipped.append(SkippedFile(_rel(path, root), reason, _is_supported(path)))
            else:
                yield path
        pending.extend((sub, depth + 1) for sub in reversed(subfolders))


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
    boundary = os.path.realpath(root)
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_symlink() and not _inside(child, boundary):
            skipped.append(SkippedFile(child.name, "link to outside the data folder; refused", True))
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
    boundary = os.path.realpath(root)
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
        elif not _inside(path, boundary):
            reason = f"labels CSV line {line} points outside the data folder (absolute path, '..' or a link); refused"
            skipped.append(SkippedFile(rel, reason, True))
        elif reason := _not_regular(path):
            skipped.append(SkippedFile(rel, f"listed in the labels CSV but {reason}", True))
        else:
            patient = row.get("patient_id") or _patient_id(rel)
            entries[rel] = FileEntry(path, rel, classes.index(label), patient)
    return list(entries.values()), skipped
