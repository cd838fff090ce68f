"""Site folder discovery: layouts, slicing, patient ids, skipped files, errors and the cache."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import client.site_data as site_data
from common.config import DataConfig
from common.errors import SiteDataError
from client.site_data import SiteSlices, load_site_slices, load_site_slices_cached

CLASSES = ("glioma", "notumor")
CFG = DataConfig(image_size=16, slice_axis=2, min_foreground=0.05)
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _png(path: Path, shape: tuple[int, int] = (20, 20), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4) if affine is None else affine), str(path))
    return path


def _head(shape: tuple[int, int, int] = (10, 12, 14)) -> np.ndarray:
    """A volume with signal in every voxel, so no slice is dropped."""
    return np.random.default_rng(1).uniform(10, 100, size=shape).astype(np.float32)


def _skip_reasons(slices: SiteSlices) -> dict[str, str]:
    return {s.path: s.reason for s in slices.skipped}


def test_class_folders_of_2d_images(tmp_path: Path) -> None:
    _png(tmp_path / "glioma" / "a.png", seed=1)
    _png(tmp_path / "glioma" / "deeper" / "b.PNG", seed=2)
    _png(tmp_path / "notumor" / "c.JPG", seed=3)
    slices = load_site_slices(tmp_path, CLASSES, CFG)
    assert slices.images.shape == (3, 1, 16, 16) and slices.images.dtype == np.float32
    assert slices.images.min() >= -1.0 and slices.images.max() <= 1.0
    assert slices.labels.dtype == np.int64 and slices.labels.tolist() == [0, 0, 1]
    assert slices.patients == ["glioma/a", "glioma/deeper/b", "notumor/c"]
    assert slices.classes == CLASSES and slices.skipped == []
    assert slices.shapes == {(20, 20): 3}
    assert slices.num_patients == 3 and len(slices) == 3
    assert slices.counts_per_class() == {"glioma": 2, "notumor": 1}
    assert slices.patients_per_class() == {"glioma": 2, "notumor": 1}
    assert [i.tolist() for i in slices.patient_index()] == [[0], [1], [2]]


def test_non_square_image_keeps_aspect_and_pads_with_background(tmp_path: Path) -> None:
    _png(tmp_path / "glioma" / "wide.png", shape=(10, 40))
    slices = load_site_slices(tmp_path, CLASSES, CFG)
    image = slices.images[0, 0]
    assert slices.shapes == {(10, 40): 1}
    # 10x40 -> 4x16: six background rows above and below.
    assert np.all(image[:6] == -1.0) and np.all(image[-6:] == -1.0)
    assert image[6:10].max() > -1.0


@pytest.mark.parametrize(("axis", "count", "shape"), [(0, 10, (14, 12)), (1, 12, (14, 10)), (2, 14, (12, 10))])
def test_volume_sliced_along_each_ras_axis(tmp_path: Path, axis: int, count: int, shape: tuple[int, int]) -> None:
    _nifti(tmp_path / "glioma" / "scan.nii.gz", _head((10, 12, 14)))
    slices = load_site_slices(tmp_path, CLASSES, DataConfig(image_size=16, slice_axis=axis))
    assert len(slices) == count
    assert slices.shapes == {shape: count}
    assert slices.images.shape == (count, 1, 16, 16)
    assert slices.patients == ["scan"] * count and slices.patient_index()[0].tolist() == list(range(count))


def test_slices_are_rotated_so_anterior_is_up(tmp_path: Path) -> None:
    volume = np.zeros((16, 16, 3), dtype=np.float32)
    volume[4:12, 8:, :] = 100.0  # anterior half (high Y) is bright
    _nifti(tmp_path / "glioma" / "half.nii", volume)
    image = load_site_slices(tmp_path, CLASSES, DataConfig(image_size=16, slice_axis=2)).images[0, 0]
    assert image[:8].max() == 1.0 and image[8:].max() == -1.0


def test_near_empty_slices_are_dropped_not_skipped(tmp_path: Path) -> None:
    volume = np.zeros((20, 20, 10), dtype=np.float32)
    volume[5:15, 5:15, 3:8] = 50.0  # 25% of each of 5 slices; the rest is air
    volume[0, 0, 0] = 50.0  # one voxel is not enough foreground
    _nifti(tmp_path / "glioma" / "v.nii", volume)
    slices = load_site_slices(tmp_path, CLASSES, CFG)
    assert len(slices) == 5 and slices.skipped == []


def test_volume_without_usable_slice_is_skipped_with_reason(tmp_path: Path) -> None:
    volume = np.zeros((20, 20, 4), dtype=np.float32)
    volume[9:11, 9:11, :] = 1.0
    _nifti(tmp_path / "glioma" / "tiny.nii", volume)
    _png(tmp_path / "glioma" / "ok.png")
    slices = load_site_slices(tmp_path, CLASSES, DataConfig(image_size=16, min_foreground=0.5))
    assert len(slices) == 1
    assert "foreground" in _skip_reasons(slices)["glioma/tiny.nii"]


@pytest.mark.parametrize(
    ("rel", "patient"),
    [
        ("glioma/scan1.nii.gz", "scan1"),
        ("glioma/sub-01/anat/x.nii.gz", "sub-01"),
        ("glioma/sub-02_T1w.NII", "sub-02"),
        ("glioma/site/y.nii", "y"),
    ],
)
def test_nifti_patient_ids(tmp_path: Path, rel: str, patient: str) -> None:
    _nifti(tmp_path / rel, _head((8, 8, 3)))
    assert set(load_site_slices(tmp_path, CLASSES, CFG).patients) == {patient}


def test_bids_subject_groups_its_volumes(tmp_path: Path) -> None:
    _nifti(tmp_path / "glioma" / "sub-01" / "anat" / "sub-01_T1w.nii.gz", _head((8, 8, 3)))
    _nifti(tmp_path / "glioma" / "sub-01" / "anat" / "sub-01_T2w.nii.gz", _head((8, 8, 3)))
    _nifti(tmp_path / "notumor" / "sub-02" / "anat" / "sub-02_T1w.nii.gz", _head((8, 8, 3)))
    slices = load_site_slices(tmp_path, CLASSES, CFG)
    assert slices.num_patients == 2
    assert [len(i) for i in slices.patient_index()] == [6, 3]
    assert slices.patients_per_class() == {"glioma": 1, "notumor": 1}


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    return path


def test_labels_csv_layout(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _png(data / "img" / "a.png", seed=1)
    _png(data / "img" / "b.png", seed=2)
    _nifti(data / "vol" / "v.nii.gz", _head((8, 8, 3)))
    _png(data / "img" / "unlisted.png")
    labels = _write_csv(tmp_path / "labels.csv", [
        ["file", "label", "patient_id"],
        ["img/a.png", "notumor", "P1"],
        ["img/b.png", "glioma", ""],
        ["vol/v.nii.gz", "glioma", "P1"],
        ["img/gone.png", "glioma", "P2"],
        ["img/a.png", "alien", "P3"],
    ])
    slices = load_site_slices(data, CLASSES, CFG, labels_csv=labels)
    assert len(slices) == 5  # a, b and three slices of v
    assert sorted(set(slices.patients)) == ["P1", "img/b"]
    assert slices.counts_per_class() == {"glioma": 4, "notumor": 1}
    assert slices.patients_per_class() == {"glioma": 2, "notumor": 1}
    reasons = _skip_reasons(slices)
    assert "not found" in reasons["img/gone.png"]
    assert "label 'alien' is not in the federation's classes" in reasons["img/a.png"]
    assert "img/unlisted.png" not in reasons


def test_labels_csv_missing_column_is_an_error(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    labels = _write_csv(tmp_path / "labels.csv", [["file", "class"], ["a.png", "glioma"]])
    with pytest.raises(SiteDataError, match=r"labels\.csv: labels CSV is missing column 'label'"):
        load_site_slices(tmp_path, CLASSES, CFG, labels_csv=labels)


def test_empty_labels_csv_setting_means_class_folders(tmp_path: Path) -> None:
    _png(tmp_path / "glioma" / "a.png")
    assert len(load_site_slices(tmp_path, CLASSES, CFG, labels_csv="")) == 1


def test_unusable_files_are_skipped_with_reasons(tmp_path: Path) -> None:
    _png(tmp_path / "glioma" / "good.png")
    (tmp_path / "glioma" / "zero.nii").write_bytes(b"")
    (tmp_path / "glioma" / "garbage.nii.gz").write_bytes(b"garbage" * 50)
    (tmp_path / "glioma" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    Image.new("L", (8, 8), color=7).save(tmp_path / "glioma" / "flat.png")
    (tmp_path / "glioma" / "notes.txt").write_text("hello")
    (tmp_path / "glioma" / ".DS_Store").write_bytes(b"\x00")
    _png(tmp_path / "meningioma" / "m.png")
    (tmp_path / "README.md").write_text("about")
    slices = load_site_slices(tmp_path, CLASSES, CFG)
    assert len(slices) == 1
    reasons = _skip_reasons(slices)
    assert set(reasons) == {"glioma/zero.nii", "glioma/garbage.nii.gz", "glioma/corrupt.jpg", "glioma/flat.png",
                            "glioma/notes.txt", "meningioma/m.png", "README.md"}
    assert "not a readable NIfTI" in reasons["glioma/zero.nii"]
    assert "not a readable NIfTI" in reasons["glioma/garbage.nii.gz"]
    assert "image" in reasons["glioma/corrupt.jpg"]
    assert reasons["glioma/flat.png"] == "constant image, no signal"
    assert reasons["glioma/notes.txt"] == "not an image or NIfTI file"
    assert reasons["meningioma/m.png"] == (
        "class folder 'meningioma' is not in the federation's classes ['glioma', 'notumor']"
    )


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError, match=r"no class sub-folders matching \['glioma', 'notumor'\]"):
        load_site_slices(tmp_path, CLASSES, CFG)


def test_empty_class_folders_are_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "glioma").mkdir()
    with pytest.raises(SiteDataError, match=r"class folders \['glioma'\] hold no \.png"):
        load_site_slices(tmp_path, CLASSES, CFG)


def test_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError, match="data folder not found"):
        load_site_slices(tmp_path / "nope", CLASSES, CFG)


def test_all_files_skipped_summarises_reasons(tmp_path: Path) -> None:
    for name in ("a.nii", "b.nii"):
        (tmp_path / "glioma" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "glioma" / name).write_bytes(b"")
    with pytest.raises(SiteDataError, match=r"no usable slice; 2 file\(s\) skipped, most often: .*\(2 file\(s\)\)"):
        load_site_slices(tmp_path, CLASSES, CFG)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlink_loop_terminates(tmp_path: Path) -> None:
    _png(tmp_path / "glioma" / "a.png")
    os.symlink(tmp_path / "glioma", tmp_path / "glioma" / "loop")
    assert len(load_site_slices(tmp_path, CLASSES, CFG)) == 1


def test_order_is_deterministic(tmp_path: Path) -> None:
    for i in (3, 1, 2):
        _png(tmp_path / "notumor" / f"n{i}.png", seed=i)
        _png(tmp_path / "glioma" / f"g{i}.png", seed=10 + i)
    first = load_site_slices(tmp_path, CLASSES, CFG, progress=True)
    second = load_site_slices(tmp_path, CLASSES, CFG)
    assert first.patients == sorted(first.patients)
    np.testing.assert_array_equal(first.images, second.images)


def test_cache_reuses_until_files_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(site_data, "_CACHE", type(site_data._CACHE)())
    _png(tmp_path / "glioma" / "a.png")
    first = load_site_slices_cached(tmp_path, CLASSES, CFG)
    assert load_site_slices_cached(str(tmp_path), list(CLASSES), CFG) is first
    assert load_site_slices_cached(tmp_path, CLASSES, DataConfig(image_size=8)) is not first
    _png(tmp_path / "notumor" / "b.png")
    changed = load_site_slices_cached(tmp_path, CLASSES, CFG)
    assert changed is not first and len(changed) == 2


# ----------------------------------------------------------------------------------------
# Real data (skipped when ../shared/data is absent, as in a fresh clone)


def _need(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"real data not available: {path} (needs ../shared/data next to the repository)")
    return path


def test_real_jpegs_load(tmp_path: Path) -> None:
    source = _need(SHARED_DATA / "brain-tumor-mri" / "train")
    classes = ("glioma", "meningioma", "notumor", "pituitary")
    for name in classes:
        for jpeg in sorted((source / name).glob("*.jpg"))[:3]:
            (tmp_path / name).mkdir(exist_ok=True)
            shutil.copy(jpeg, tmp_path / name / jpeg.name)
    slices = load_site_slices(tmp_path, classes, DataConfig(image_size=32))
    assert slices.skipped == []
    assert slices.counts_per_class() == dict.fromkeys(classes, 3)
    assert slices.images.shape == (12, 1, 32, 32)
    assert np.isfinite(slices.images).all()
    assert slices.images.min() == -1.0 and slices.images.max() <= 1.0
    assert all(image.max() > 0.0 for image in slices.images[:, 0])  # the brain is not crushed into the dark


@pytest.mark.parametrize("name", ["IXI012-HH-1211_T1.nii.gz", "IXI015-HH-1258_T1.nii.gz",
                                  "mni_icbm152_t1_2009a.nii.gz", "niivue_FLAIR.nii.gz"])
@pytest.mark.parametrize("axis", [0, 2])
def test_real_nifti_volumes_slice(tmp_path: Path, name: str, axis: int) -> None:
    source = _need(SHARED_DATA / "nifti") / name
    (tmp_path / "notumor").mkdir()
    shutil.copy(source, tmp_path / "notumor" / name)  # a link out of the data folder would be refused
    slices = load_site_slices(tmp_path, CLASSES, DataConfig(image_size=32, slice_axis=axis))
    assert slices.skipped == [] and len(slices) > 0
    assert slices.patients[0] == name.removesuffix(".nii.gz")
    assert np.isfinite(slices.images).all()
    assert slices.images.min() >= -1.0 and slices.images.max() <= 1.0
    # Slices of one volume share a scale, so some reach the top of the range.
    assert slices.images.max() > 0.9
