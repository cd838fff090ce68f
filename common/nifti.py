"""NIfTI reading and writing: the one module that imports nibabel.

Every volume is brought to RAS+ voxel order on load, so "slice axis 2" means axial for
every site whatever its scanner wrote. Writes carry an explicit affine, dtype and
qform/sform codes so that any viewer places a synthetic slice the same way.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from common.errors import SiteDataError
from common.fileio import write_bytes_atomic

NIFTI_SUFFIXES = (".nii", ".nii.gz")

# Headers are checked before any voxel is read: a 61-byte .nii.gz whose header claims
# 32767^3 voxels would otherwise make nibabel allocate terabytes. 512^3 voxels (512 MiB as
# float32) is far above any clinical MRI volume; nibabel reads exactly the header's implied
# byte count, so this also bounds how much of a gzip stream is ever decompressed.
MAX_VOXELS = 512**3
# |det| of the direction part over the product of voxel sizes: the volume of the unit voxel
# after normalising each axis. Near 0 the axes are (nearly) parallel and positions collapse.
_MIN_AXIS_INDEPENDENCE = 1e-6

# Everything nibabel, gzip or the OS raise for a file that is not a readable NIfTI:
# nibabel does not wrap them, and a truncated .nii.gz only fails once the data is read.
_READ_ERRORS = (
    nib.filebasedimages.ImageFileError,
    nib.spatialimages.HeaderDataError,
    EOFError,
    OSError,
    zlib.error,
    ValueError,
    TypeError,
    np.linalg.LinAlgError,
)


def _read_failure(err: Exception, path: Path) -> str:
    """A short reason without the path (nibabel quotes it), so equal failures group in summaries."""
    if path.is_file() and path.stat().st_size == 0:
        return "empty file"
    if isinstance(err, (EOFError, zlib.error, gzip.BadGzipFile)):
        return "truncated or corrupt gzip data"
    if isinstance(err, nib.filebasedimages.ImageFileError):
        return "unrecognised content"
    if isinstance(err, nib.spatialimages.HeaderDataError):
        return "invalid header"
    if isinstance(err, OSError):
        return f"truncated or unreadable data ({err.strerror})" if err.strerror else "truncated or unreadable data"
    return f"unsupported voxel data ({type(err).__name__})"


def is_nifti_path(path: Path) -> bool:
    """Whether ``path`` ends in ``.nii`` or ``.nii.gz`` (any case)."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _check_header(img: nib.Nifti1Image | nib.Nifti2Image, path: Path) -> None:
    """Refuse a header whose shape, datatype or geometry is impossible, before any voxel is read."""
    header = img.header
    ndim = int(header["dim"][0])
    shape = tuple(int(n) for n in header["dim"][1 : ndim + 1]) if 1 <= ndim <= 7 else ()
    if not shape:
        raise SiteDataError(f"{path}: invalid header: dim[0] = {ndim}, must be 1 to 7")
    if any(n < 1 for n in shape):
        raise SiteDataError(f"{path}: invalid header: dimensions {shape} must all be positive")
    voxels = math.prod(shape)
    if voxels > MAX_VOXELS:
        raise SiteDataError(
            f"{path}: header claims {shape} = {voxels} voxels, more than the {MAX_VOXELS} limit "
            "(corrupt header or not a single MRI volume)"
        )
    dtype = header.get_data_dtype()
    if dtype.kind not in "uif" or dtype.fields is not None:
        raise SiteDataError(f"{path}: unsupported voxel datatype {dtype} (need integer or real floating point grey values)")
    zooms = header.get_zooms()[: min(ndim, 3)]
    if not all(math.isfinite(float(z)) for z in zooms):
        raise SiteDataError(f"{path}: invalid header: voxel sizes (pixdim) {tuple(float(z) for z in zooms)} are not finite")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise SiteDataError(f"{path}: invalid header: the voxel-to-world affine has NaN or infinite entries")
    with np.errstate(over="ignore"):
        sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if not (np.isfinite(sizes).all() and (sizes > 0).all()):
        raise SiteDataError(f"{path}: invalid header: the affine is singular (voxel sizes {tuple(sizes.tolist())} mm)")
    independence = abs(float(np.linalg.det(affine[:3, :3]))) / float(np.prod(sizes))
    if not independence > _MIN_AXIS_INDEPENDENCE:
        raise SiteDataError(f"{path}: invalid header: the affine is singular (voxel axes are parallel or zero)")


def _as_3d(data: np.ndarray, path: Path) -> np.ndarray:
    """Fold 2D and trailing-singleton 4D+ arrays into (X, Y, Z); refuse real 4D."""
    if data.ndim == 2:
        return data[:, :, np.newaxis]
    if data.ndim > 3:
        extra = data.shape[3:]
        if any(n != 1 for n in extra):
            raise SiteDataError(
                f"{path}: {data.ndim}D volume of shape {data.shape} holds {int(np.prod(extra))} volumes; "
                "store one 3D volume per file"
            )
        return data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise SiteDataError(f"{path}: expected a 2D or 3D image, got {data.ndim}D of shape {data.shape}")
    return data


def load_volume(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a NIfTI file as a float32 volume in RAS+ voxel order.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        ``(volume, spacing)``: ``volume`` of shape (X, Y, Z) with X towards Right, Y towards
        Anterior and Z towards Superior (a 2D image comes back as (X, Y, 1)); ``spacing`` is
        the voxel size in mm along those three axes.

    Raises:
        SiteDataError: the file is missing, unreadable, not NIfTI, has an impossible header
            (dimensions, more than :data:`MAX_VOXELS` voxels, complex or RGB datatype,
            singular or non-finite affine), holds several volumes, has NaN/Inf voxels, or
            has no signal.
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise SiteDataError(f"{path}: not a NIfTI image (nibabel read it as {type(img).__name__})")
        _check_header(img, path)
        # dataobj applies scl_slope/scl_inter; reading it is where truncated files fail.
        data = np.asarray(img.dataobj, dtype=np.float32)
        affine = img.affine
    except SiteDataError:
        raise
    except FileNotFoundError:
        raise SiteDataError(f"{path}: file not found") from None
    except PermissionError:
        raise SiteDataError(f"{path}: permission denied") from None
    except MemoryError:
        raise SiteDataError(f"{path}: volume too large to load into memory") from None
    except _READ_ERRORS as err:
        raise SiteDataError(f"{path}: not a readable NIfTI file: {_read_failure(err, path)}") from None

    if data.size == 0:
        raise SiteDataError(f"{path}: empty image of shape {data.shape}")
    # A scanner or a pipeline that writes NaN/Inf has produced something we cannot
    # normalise faithfully; zero-filling would silently invent background.
    non_finite = int(data.size - np.count_nonzero(np.isfinite(data)))
    if non_finite:
        raise SiteDataError(f"{path}: {non_finite} of {data.size} voxels are NaN or infinite")
    data = _as_3d(data, path)
    # Rebuilding the image from the folded array lets as_closest_canonical work on
    # exactly three axes; the affine is what positions the voxels, not the old header.
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    volume = np.asarray(canonical.dataobj, dtype=np.float32)
    spacing = np.sqrt((canonical.affine[:3, :3] ** 2).sum(axis=0))

    if volume.min() == volume.max():
        raise SiteDataError(f"{path}: constant volume, no signal")
    return np.ascontiguousarray(volume), (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def write_nifti_slice(path: Path, image: np.ndarray, spacing_mm: float) -> None:
    """Write one 2D image as a single-slice float32 NIfTI, atomically.

    Args:
        path: destination ending in ``.nii`` or ``.nii.gz`` (then gzip-compressed).
        image: array of shape (H, W); stored as voxel grid (H, W, 1).
        spacing_mm: in-plane pixel size; the slice thickness is written as 1 mm.

    Raises:
        ValueError: wrong suffix, shape or spacing (a caller bug, not user data).
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise ValueError(f"write_nifti_slice: path must end in .nii or .nii.gz, got {path}")
    if image.ndim != 2:
        raise ValueError(f"write_nifti_slice: image must be 2D (H, W), got shape {image.shape}")
    if not spacing_mm > 0:
        raise ValueError(f"write_nifti_slice: spacing_mm must be > 0, got {spacing_mm}")

    data = np.asarray(image, dtype=np.float32)[:, :, np.newaxis]
    affine = np.diag([spacing_mm, spacing_mm, 1.0, 1.0])
    nifti = nib.Nifti1Image(data, affine)
    nifti.set_data_dtype(np.float32)
    nifti.set_qform(affine, code="scanner")
    nifti.set_sform(affine, code="aligned")
    nifti.header.set_xyzt_units(xyz="mm")
    payload = nifti.to_bytes()
    if path.name.lower().endswith(".gz"):
        # mtime=0 keeps the bytes reproducible for the same image.
        payload = gzip.compress(payload, mtime=0)
    write_bytes_atomic(path, payload)
