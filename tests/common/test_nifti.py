"""NIfTI loading (RAS reorientation, shape rules, bad files) and single-slice writing."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.errors import SiteDataError
from common.nifti import load_volume, write_nifti_slice
from tests.hostile_files import gzip_bomb, raw_nifti

REAL_NIFTI = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "nifti"


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def _ramp(shape: tuple[int, ...]) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) + 1.0


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".NII.GZ"])
def test_ras_volume_loads_unchanged(tmp_path: Path, suffix: str) -> None:
    data = _ramp((4, 5, 6))
    volume, spacing = load_volume(_save(tmp_path / f"v{suffix}", data, np.diag([2.0, 3.0, 4.0, 1.0])))
    assert volume.dtype == np.float32
    np.testing.assert_array_equal(volume, data)
    assert spacing == (2.0, 3.0, 4.0)


def test_las_volume_is_flipped_to_ras(tmp_path: Path) -> None:
    data = _ramp((4, 5, 6))
    volume, spacing = load_volume(_save(tmp_path / "las.nii.gz", data, np.diag([-2.0, 3.0, 4.0, 1.0])))
    np.testing.assert_array_equal(volume, data[::-1])
    assert spacing == (2.0, 3.0, 4.0)


def test_psr_volume_is_permuted_to_ras(tmp_path: Path) -> None:
    # Voxel axes point Posterior, Superior, Right (the IXI layout).
    affine = np.array([[0, 0, 2.0, 0], [-3.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 0, 1]])
    data = _ramp((4, 5, 6))
    volume, spacing = load_volume(_save(tmp_path / "psr.nii", data, affine))
    expected = np.transpose(data, (2, 0, 1))[:, ::-1, :]
    np.testing.assert_array_equal(volume, expected)
    assert spacing == (2.0, 3.0, 4.0)


@pytest.mark.parametrize("shape", [(4, 5, 6, 1), (4, 5, 6, 1, 1)])
def test_trailing_singleton_axes_load_as_3d(tmp_path: Path, shape: tuple[int, ...]) -> None:
    volume, _ = load_volume(_save(tmp_path / "v.nii", _ramp(shape)))
    assert volume.shape == (4, 5, 6)


def test_real_4d_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError, match=r"holds 3 volumes"):
        load_volume(_save(tmp_path / "fmri.nii.gz", _ramp((4, 5, 6, 3))))


@pytest.mark.parametrize("shape", [(7, 9), (7, 9, 1)])
def test_2d_nifti_is_one_slice(tmp_path: Path, shape: tuple[int, ...]) -> None:
    data = _ramp(shape)
    volume, _ = load_volume(_save(tmp_path / "slice.nii", data))
    assert volume.shape == (7, 9, 1)
    np.testing.assert_array_equal(volume[:, :, 0], data.reshape(7, 9))


def test_non_finite_voxels_reject_the_file(tmp_path: Path) -> None:
    data = _ramp((4, 5, 6))
    data[0, 0, 0], data[1, 1, 1], data[2, 2, 2] = np.nan, np.inf, -np.inf
    with pytest.raises(SiteDataError, match=r"nan\.nii: 3 of 120 voxels are NaN or infinite"):
        load_volume(_save(tmp_path / "nan.nii", data))
    with pytest.raises(SiteDataError, match="120 of 120 voxels are NaN"):
        load_volume(_save(tmp_path / "all-nan.nii", np.full((4, 5, 6), np.nan, dtype=np.float32)))


def test_volume_without_signal_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError, match="constant volume, no signal"):
        load_volume(_save(tmp_path / "flat.nii", np.full((4, 5, 6), 5.0, dtype=np.float32)))


_RGB = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
HOSTILE_HEADERS = [
    ("zero-affine.nii", lambda p: raw_nifti(p, _ramp((8, 8, 8)), sform=np.zeros((3, 4))), "affine is singular"),
    ("nan-affine.nii", lambda p: raw_nifti(p, _ramp((8, 8, 8)), sform=np.full((3, 4), np.nan)), "NaN or infinite"),
    ("parallel-axes.nii", lambda p: raw_nifti(p, _ramp((8, 8, 8)), sform=np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0.0]])),
     "affine is singular"),
    ("nan-pixdim.nii", lambda p: raw_nifti(p, _ramp((8, 8, 8)), qform_code=0, sform_code=0, pixdim=[1, np.nan, 1, 1, 1, 1, 1, 1]),
     "pixdim"),
    ("negative-dims.nii", lambda p: raw_nifti(p, _ramp((8, 8, 8)), dim=[3, -8, 8, 8, 1, 1, 1, 1]), "must all be positive"),
    ("zero-ndim.nii", lambda p: raw_nifti(p, _ramp((8, 8, 8)), dim=[0, 8, 8, 8, 1, 1, 1, 1]), "dim[0] = 0"),
    ("huge-dims.nii.gz", gzip_bomb, "voxels, more than"),
    ("complex.nii", lambda p: raw_nifti(p, _ramp((8, 8, 8)).astype(np.complex64)), "unsupported voxel datatype complex64"),
    ("rgb.nii", lambda p: raw_nifti(p, np.zeros((8, 8, 8), _RGB)), "unsupported voxel datatype"),
    ("unknown-dtype.nii", lambda p: raw_nifti(p, _ramp((8, 8, 8)), datatype=1234), "invalid header"),
]


@pytest.mark.parametrize(("name", "make", "reason"), HOSTILE_HEADERS, ids=[c[0] for c in HOSTILE_HEADERS])
def test_hostile_header_is_refused_before_reading_data(tmp_path: Path, name: str, make, reason: str) -> None:
    path = tmp_path / name
    make(path)
    with pytest.raises(SiteDataError) as err:
        load_volume(path)
    assert str(err.value).startswith(f"{path}: ")
    assert reason in str(err.value)


def testgzip_bomb_is_tiny_and_refused_without_memory_error(tmp_path: Path) -> None:
    path = gzip_bomb(tmp_path / "bomb.nii.gz")
    assert path.stat().st_size < 100
    with pytest.raises(SiteDataError, match=r"32767, 32767, 32767\) = 35181150961663 voxels"):
        load_volume(path)


def _truncated_gz(path: Path) -> Path:
    payload = gzip.compress(nib.Nifti1Image(_ramp((8, 8, 8)), np.eye(4)).to_bytes())
    path.write_bytes(payload[: len(payload) // 2])
    return path


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: p.write_bytes(b""), id="zero-byte"),
        pytest.param(lambda p: p.write_bytes(b"this is not a nifti file" * 20), id="garbage"),
        pytest.param(lambda p: p.write_bytes(nib.Nifti1Image(_ramp((8, 8, 8)), np.eye(4)).to_bytes()[:600]),
                     id="truncated"),
        pytest.param(lambda p: None, id="missing"),
    ],
)
def test_unreadable_nii_names_the_file(tmp_path: Path, make) -> None:
    path = tmp_path / "bad.nii"
    make(path)
    with pytest.raises(SiteDataError, match=r"bad\.nii: "):
        load_volume(path)


def test_truncated_gzip_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError, match=r"cut\.nii\.gz: not a readable NIfTI"):
        load_volume(_truncated_gz(tmp_path / "cut.nii.gz"))


@pytest.mark.parametrize("name", ["slice.nii", "slice.nii.gz"])
def test_write_nifti_slice_reads_back(tmp_path: Path, name: str) -> None:
    image = np.linspace(-1, 1, 6 * 4, dtype=np.float64).reshape(6, 4)
    path = tmp_path / "out" / name
    write_nifti_slice(path, image, 0.8)
    if name.endswith(".gz"):
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    img = nib.load(str(path))
    assert img.shape == (6, 4, 1)
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, np.diag([0.8, 0.8, 1.0, 1.0]))
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 2
    np.testing.assert_allclose(np.asarray(img.dataobj)[:, :, 0], image, atol=1e-6)
    assert not list(path.parent.glob(".*.tmp")), "atomic write left a temp file"


def test_write_nifti_slice_round_trips_through_load_volume(tmp_path: Path) -> None:
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_nifti_slice(tmp_path / "s.nii.gz", image, 2.0)
    volume, spacing = load_volume(tmp_path / "s.nii.gz")
    np.testing.assert_array_equal(volume[:, :, 0], image)
    assert spacing == (2.0, 2.0, 1.0)


@pytest.mark.parametrize(
    ("name", "image", "spacing"),
    [("x.png", np.zeros((2, 2)), 1.0), ("x.nii", np.zeros((2, 2, 2)), 1.0), ("x.nii", np.zeros((2, 2)), 0.0)],
)
def test_write_nifti_slice_rejects_bad_arguments(tmp_path: Path, name: str, image: np.ndarray, spacing: float) -> None:
    with pytest.raises(ValueError, match="write_nifti_slice"):
        write_nifti_slice(tmp_path / name, image, spacing)


def _expected_ras(path: Path) -> np.ndarray:
    """Reorient by hand from the affine's dominant axes, independently of nibabel's helpers."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    directions = img.affine[:3, :3]
    world_axis = np.abs(directions).argmax(axis=0)  # which RAS axis each voxel axis follows
    order = np.argsort(world_axis)
    data = np.transpose(data, order)
    for out_axis, voxel_axis in enumerate(order):
        if directions[world_axis[voxel_axis], voxel_axis] < 0:
            data = np.flip(data, axis=out_axis)
    return data


@pytest.mark.parametrize("name", ["IXI012-HH-1211_T1.nii.gz", "IXI015-HH-1258_T1.nii.gz",
                                  "mni_icbm152_t1_2009a.nii.gz", "niivue_FLAIR.nii.gz"])
def test_real_volumes_load_in_ras(name: str) -> None:
    path = REAL_NIFTI / name
    if not path.is_file():
        pytest.skip(f"real data not available: {path} (needs ../shared/data next to the repository)")
    volume, spacing = load_volume(path)
    np.testing.assert_array_equal(volume, _expected_ras(path))
    assert np.isfinite(volume).all() and volume.max() > volume.min()
    expected_spacing = 2.0 if name.startswith("IXI") else 1.0
    np.testing.assert_allclose(spacing, [expected_spacing] * 3, rtol=1e-5)
    if name.startswith("IXI"):
        assert volume.shape == (90, 120, 120)  # stored P-S-R, so the last stored axis becomes X
