"""Hostile NIfTI files for tests: headers written as given, which nibabel's own save would refuse."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np


def raw_nifti(path: Path, data: np.ndarray, sform: np.ndarray | None = None, **fields: object) -> Path:
    """Write header fields as given, bypassing nibabel's own checks on save (a hostile file)."""
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    header.set_sform(np.eye(4), code="scanner")
    header.set_qform(np.eye(4), code="scanner")
    header["vox_offset"] = 352
    if sform is not None:
        header["srow_x"], header["srow_y"], header["srow_z"] = sform
        header["qform_code"] = 0
    for key, value in fields.items():
        header[key] = value
    payload = header.binaryblock + b"\0" * 4 + np.asarray(data).tobytes(order="F")
    path.write_bytes(gzip.compress(payload) if path.name.endswith(".gz") else payload)
    return path


def gzip_bomb(path: Path) -> Path:
    """A header claiming 32767^3 float32 voxels (128 TiB) and no data: nibabel alone raises MemoryError."""
    raw_nifti(path, np.zeros((1, 1, 1), np.float32), dim=[3, 32767, 32767, 32767, 1, 1, 1, 1])
    return path


@contextmanager
def nested_folders(top: Path, depth: int, name: str = "d") -> Iterator[Path]:
    """``top/d/d/.../d`` ``depth`` levels deep, removed afterwards.

    Made and removed one level at a time: pathlib's mkdir(parents=True) and shutil.rmtree
    (hence pytest's tmp_path cleanup) both recurse and fail beyond ~1000 levels.
    """
    chain = [top]
    try:
        for _ in range(depth):
            chain.append(chain[-1] / name)
            chain[-1].mkdir()
        yield chain[-1]
    finally:
        for folder in reversed(chain[1:]):
            for child in folder.iterdir():
                if not child.is_dir() or child.is_symlink():
                    child.unlink()
            folder.rmdir()
