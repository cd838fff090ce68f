"""Hostile and broken input at a site: each bad file is named with its reason; with skip_bad_files the
site trains on the good files and reports the bad ones; without it the site stops with a clear error."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from client.ledger import init_ledger
from client.site_data import load_site_slices, require_readable
from tests.hostile_files import gzip_bomb, nested_folders, raw_nifti
from common.config import DataConfig
from common.errors import SiteDataError

CLASSES = ("glioma", "meningioma", "méningiome ü")
CFG = DataConfig(image_size=16, min_foreground=0.01)


def _volume(shape: tuple[int, ...], fill: float | None = None) -> np.ndarray:
    rng = np.random.default_rng(0)
    data = rng.uniform(10, 100, shape).astype(np.float32) if fill is None else np.full(shape, fill, np.float32)
    return data


def _nii(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)


def _good(root: Path) -> None:
    (root / "glioma").mkdir(parents=True, exist_ok=True)
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(20, 250, (20, 20), dtype=np.uint8)).save(root / "glioma" / f"ok-{i}.png")


def _truncated_gz(p: Path) -> None:
    _nii(p, _volume((8, 8, 8)))
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def _four_d(p: Path) -> None:
    _nii(p, _volume((8, 8, 8, 3)))


def _nan_volume(p: Path) -> None:
    data = _volume((8, 8, 8))
    data[0, 0, :] = np.nan
    data[1, 1, :] = np.inf
    _nii(p, data)


def _sheared(p: Path) -> None:
    affine = np.array([[1.0, 0.3, 0, 0], [0, 0.9, 0.2, 0], [0.1, 0, 1.1, 0], [0, 0, 0, 1]])
    _nii(p, _volume((8, 10, 12)), affine)


def _jpeg_corrupt(p: Path) -> None:
    Image.fromarray(np.full((20, 20), 128, np.uint8)).save(p, format="JPEG")
    p.write_bytes(p.read_bytes()[:60])


def _png16(p: Path) -> None:
    Image.fromarray(np.linspace(0, 65535, 400, dtype=np.uint16).reshape(20, 20)).save(p)


def _rgba(p: Path) -> None:
    rgba = np.random.default_rng(1).integers(0, 255, (20, 20, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(p)


def _huge(p: Path) -> None:
    Image.fromarray(np.tile(np.linspace(0, 255, 4096, dtype=np.uint8), (4096, 1))).save(p)


# (file name, maker, loads: True when the file must be usable, reason expected otherwise)
CASES: list[tuple[str, Callable[[Path], None], bool, str]] = [
    ("truncated.nii.gz", _truncated_gz, False, "truncated"),
    ("not-nifti.nii", lambda p: p.write_bytes(b"<html>not a volume</html>" * 30), False, "unrecognised"),
    ("four-d.nii.gz", _four_d, False, "4D"),
    ("four-d-singleton.nii.gz", lambda p: _nii(p, _volume((8, 8, 8, 1))), True, ""),
    ("two-d.nii.gz", lambda p: _nii(p, _volume((12, 12))), True, ""),
    ("nan-inf.nii.gz", _nan_volume, False, "16 of 512 voxels are NaN or infinite"),
    ("all-zero.nii.gz", lambda p: _nii(p, _volume((8, 8, 8), fill=0.0)), False, "no signal"),
    ("zero-byte.nii.gz", lambda p: p.write_bytes(b""), False, "empty"),
    ("zero-byte.png", lambda p: p.write_bytes(b""), False, ""),
    ("corrupt.jpg", _jpeg_corrupt, False, ""),
    ("sixteen-bit.png", _png16, True, ""),
    ("rgba.png", _rgba, True, ""),
    ("sheared.nii.gz", _sheared, True, ""),
    ("huge.png", _huge, True, ""),
    ("zero-affine.nii", lambda p: raw_nifti(p, _volume((8, 8, 8)), sform=np.zeros((3, 4))), False, "affine is singular"),
    ("nan-affine.nii.gz", lambda p: raw_nifti(p, _volume((8, 8, 8)), sform=np.full((3, 4), np.nan)), False, "NaN or infinite"),
    ("negative-dims.nii", lambda p: raw_nifti(p, _volume((8, 8, 8)), dim=[3, -8, 8, 8, 1, 1, 1, 1]), False, "positive"),
    ("gzip-bomb.nii.gz", gzip_bomb, False, "voxels, more than"),
    ("complex.nii.gz", lambda p: raw_nifti(p, _volume((8, 8, 8)).astype(np.complex64)), False, "datatype complex64"),
    ("one-pixel-wide.nii.gz", lambda p: _nii(p, _volume((1, 40, 8))), False, "slices along RAS axis 2 are 40x1 pixels"),
    ("one-pixel-wide.png", lambda p: Image.fromarray(np.arange(60, dtype=np.uint8).reshape(60, 1)).save(p), False,
     "image of 60x1 pixels"),
]


@pytest.mark.parametrize(("name", "make", "loads", "reason"), CASES, ids=[c[0] for c in CASES])
def test_each_bad_file_is_named_and_good_files_still_train(tmp_path: Path, name: str, make, loads: bool, reason: str) -> None:
    _good(tmp_path)
    make(tmp_path / "glioma" / name)
    slices = load_site_slices(tmp_path, CLASSES, CFG)
    assert np.isfinite(slices.images).all() and slices.images.min() >= -1 and slices.images.max() <= 1
    assert slices.images.shape[1:] == (1, 16, 16)
    bad = {s.path: s.reason for s in slices.unreadable()}
    if loads:
        assert not bad, bad
        assert any(name.split(".")[0] in p for p in slices.patients)
        return
    assert f"glioma/{name}" in bad
    assert reason.lower() in bad[f"glioma/{name}"].lower()
    assert len(slices) == 3  # the three good images
    require_readable(slices, tmp_path, skip_bad_files=True)  # with the skip option: trains on the rest
    with pytest.raises(SiteDataError) as err:
        require_readable(slices, tmp_path, skip_bad_files=False)
    assert name in str(err.value) and "skip_bad_files" in str(err.value)
    assert name not in err.value.public and str(tmp_path) not in err.value.public  # nothing local reaches the server


def test_unicode_and_space_class_folders(tmp_path: Path) -> None:
    _good(tmp_path)
    (tmp_path / "méningiome ü").mkdir()
    shutil.copy(tmp_path / "glioma" / "ok-0.png", tmp_path / "méningiome ü" / "scan 1.png")
    (tmp_path / "glioma grade 2").mkdir()
    shutil.copy(tmp_path / "glioma" / "ok-0.png", tmp_path / "glioma grade 2" / "x.png")
    slices = load_site_slices(tmp_path, CLASSES, CFG)
    assert slices.counts_per_class()["méningiome ü"] == 1
    skipped = {s.path: s.reason for s in slices.skipped}
    assert "not in the federation's classes" in skipped["glioma grade 2/x.png"]
    assert not slices.unreadable()  # another class is not an error, only not ours


def test_folder_of_only_non_images_and_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "glioma").mkdir()
    (tmp_path / "glioma" / "report.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "glioma" / "notes.txt").write_text("x")
    with pytest.raises(SiteDataError, match="no usable slice.*not an image or NIfTI file"):
        load_site_slices(tmp_path, CLASSES, CFG)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SiteDataError, match="no class sub-folders"):
        load_site_slices(empty, CLASSES, CFG)


def test_symlink_loop_ends(tmp_path: Path) -> None:
    _good(tmp_path)
    os.symlink(tmp_path / "glioma", tmp_path / "glioma" / "loop")
    assert len(load_site_slices(tmp_path, CLASSES, CFG)) == 3


def _load_as_nobody(root: Path, queue) -> None:  # runs in a forked child
    os.setgid(65534)
    os.setuid(65534)
    slices = load_site_slices(root, ["glioma"], DataConfig(image_size=16))
    queue.put((len(slices), [(x.path, x.reason) for x in slices.unreadable()]))


@pytest.mark.skipif(not hasattr(os, "setuid") or os.geteuid() != 0, reason="needs root to drop to another user")
def test_unreadable_file_permissions() -> None:
    """Root reads every file, so the loader runs as 'nobody' in a forked child (modules already loaded)."""
    import multiprocessing

    root = Path("/tmp") / f"fedsynth-perm-{os.getpid()}"
    try:
        _good(root)
        load_site_slices(root, ["glioma"], DataConfig(image_size=16))  # import every lazy module first
        secret = root / "glioma" / "secret.png"
        shutil.copy(root / "glioma" / "ok-0.png", secret)
        for path in [root, *root.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.chmod(secret, 0o000)
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_load_as_nobody, args=(root, queue))
        child.start()
        count, bad = queue.get(timeout=60)
        child.join(timeout=30)
        assert count == 3
        assert bad == [("glioma/secret.png", "permission denied")]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _load_with_deadline(root: Path, seconds: float = 60.0, **kwargs) -> object:
    """load_site_slices in a thread: a loader that blocks (on a FIFO) fails the test instead of hanging it."""
    import threading

    result: list[object] = []
    worker = threading.Thread(target=lambda: result.append(load_site_slices(root, CLASSES, CFG, **kwargs)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "loading the site blocked"
    assert result, "loading raised (see the thread's traceback above)"
    return result[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_skipped_without_being_opened(tmp_path: Path) -> None:
    _good(tmp_path)
    os.mkfifo(tmp_path / "glioma" / "pipe.png")
    slices = _load_with_deadline(tmp_path)
    assert len(slices) == 3
    assert {s.path: s.reason for s in slices.unreadable()} == {
        "glioma/pipe.png": "not a regular file (FIFO, socket or device); not opened"}


def test_deeply_nested_folders_are_named_not_a_recursion_error(tmp_path: Path) -> None:
    _good(tmp_path)
    with nested_folders(tmp_path / "glioma", 1100) as deep:
        shutil.copy(tmp_path / "glioma" / "ok-0.png", deep / "buried.png")
        slices = load_site_slices(tmp_path, CLASSES, CFG)
    assert len(slices) == 3
    [bad] = slices.unreadable()
    assert bad.path == "glioma/" + "/".join(["d"] * 33) and "nested more than 32 levels deep" in bad.reason


def test_links_out_of_the_data_folder_are_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "site", tmp_path / "elsewhere"
    _good(root)
    _good(outside)
    os.symlink(outside / "glioma" / "ok-1.png", root / "glioma" / "stolen.png")
    os.symlink(outside / "glioma", root / "glioma" / "stolen-folder")
    os.symlink(outside / "glioma", root / "meningioma")
    os.symlink(root / "glioma" / "ok-0.png", root / "glioma" / "alias.png")  # inside the folder: fine
    slices = load_site_slices(root, CLASSES, CFG)
    assert len(slices) == 4
    bad = {s.path: s.reason for s in slices.unreadable()}
    assert set(bad) == {"glioma/stolen.png", "glioma/stolen-folder", "meningioma"}
    assert all("outside the data folder" in reason for reason in bad.values())


def test_labels_csv_rows_outside_the_data_folder_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "site"
    _good(root)
    _good(tmp_path / "elsewhere")
    secret = tmp_path / "elsewhere" / "glioma" / "ok-2.png"
    os.symlink(secret, root / "glioma" / "link.png")
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\nglioma/ok-0.png,glioma\n../elsewhere/glioma/ok-1.png,glioma\n"
                      f"{secret},glioma\nglioma/link.png,glioma\n")
    slices = load_site_slices(root, CLASSES, CFG, labels_csv=labels)
    assert len(slices) == 1
    bad = {s.path: s.reason for s in slices.unreadable()}
    assert set(bad) == {"../elsewhere/glioma/ok-1.png", str(secret), "glioma/link.png"}
    assert "labels CSV line 3 points outside the data folder" in bad["../elsewhere/glioma/ok-1.png"]


def test_files_of_one_subject_are_one_patient_for_sampling(tmp_path: Path) -> None:
    """T1 and FLAIR volumes, or PNG slices exported from them, of sub-01 are one patient: one Poisson unit."""
    _good(tmp_path)
    for rel in ("glioma/sub-01_T1w.nii.gz", "glioma/sub-01_FLAIR.nii.gz", "glioma/sub-02/anat/sub-02_T1w.nii.gz"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        _nii(tmp_path / rel, _volume((12, 12, 2)))
    for k in range(3):
        shutil.copy(tmp_path / "glioma" / "ok-0.png", tmp_path / "glioma" / f"sub-03_slice-{k}.png")
    slices = load_site_slices(tmp_path, CLASSES, CFG)
    assert sorted(set(slices.patients)) == ["glioma/ok-0", "glioma/ok-1", "glioma/ok-2", "sub-01", "sub-02", "sub-03"]
    assert slices.files_per_patient["sub-01"] == 2 and slices.files_per_patient["sub-03"] == 3
    groups = {slices.patients[int(g[0])]: len(g) for g in slices.patient_index()}
    assert groups["sub-01"] == 4 and groups["sub-03"] == 3  # two 2-slice volumes; three PNG slices


def test_site_check_cli_on_a_folder_of_hostile_files(tmp_path: Path) -> None:
    """The real ``fedsynth site check`` in a subprocess: no traceback, every bad file named with its reason."""
    import subprocess
    import sys

    import yaml

    data, outside = tmp_path / "data", tmp_path / "outside"
    _good(data)
    _good(outside)
    glioma = data / "glioma"
    _nii(glioma / "sub-01_T1w.nii.gz", _volume((12, 12, 3)))
    _nii(glioma / "sub-01_FLAIR.nii.gz", _volume((12, 12, 3)))
    bad = {  # file (relative to data) -> what the report must say about it
        "glioma/zero-affine.nii": "affine is singular",
        "glioma/nan-affine.nii.gz": "affine has NaN or infinite entries",
        "glioma/negative-dims.nii": "must all be positive",
        "glioma/gzip-bomb.nii.gz": "voxels, more than",
        "glioma/complex.nii.gz": "unsupported voxel datatype complex64",
        "glioma/nan-voxels.nii.gz": "voxels are NaN or infinite",
        "glioma/one-pixel.nii.gz": "slices along RAS axis 2 are 30x1 pixels",
        "glioma/one-pixel.png": "image of 30x1 pixels",
        "glioma/pipe.png": "not a regular file",
        "glioma/outside.png": "link to outside the data folder",
        "glioma/[bold red]evil[/bold red.png": "not a readable image",
        "glioma/new\\nline.nii": "not a readable NIfTI file",
        "glioma/" + "/".join(["d"] * 33): "nested more than 32 levels deep",
    }
    raw_nifti(glioma / "zero-affine.nii", _volume((8, 8, 8)), sform=np.zeros((3, 4)))
    raw_nifti(glioma / "nan-affine.nii.gz", _volume((8, 8, 8)), sform=np.full((3, 4), np.nan))
    raw_nifti(glioma / "negative-dims.nii", _volume((8, 8, 8)), dim=[3, -8, 8, 8, 1, 1, 1, 1])
    gzip_bomb(glioma / "gzip-bomb.nii.gz")
    raw_nifti(glioma / "complex.nii.gz", _volume((8, 8, 8)).astype(np.complex64))
    _nan_volume(glioma / "nan-voxels.nii.gz")
    _nii(glioma / "one-pixel.nii.gz", _volume((1, 30, 4)))
    Image.fromarray(np.arange(30, dtype=np.uint8).reshape(30, 1)).save(glioma / "one-pixel.png")
    os.mkfifo(glioma / "pipe.png")
    os.symlink(outside / "glioma" / "ok-0.png", glioma / "outside.png")
    (glioma / "[bold red]evil[").mkdir()
    (glioma / "[bold red]evil[" / "bold red.png").write_bytes(b"[red]not a png")
    (glioma / "new\nline.nii").write_bytes(b"not a volume\n" * 40)

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "COLUMNS": "400", "NO_COLOR": "1"}

    def site_check(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "server.cli", "site", "check", *extra], env=env,
                              capture_output=True, text=True, timeout=600)

    with nested_folders(glioma, 1100) as deep:
        shutil.copy(glioma / "ok-0.png", deep / "buried.png")
        strict = site_check("--data", str(data))
        site = tmp_path / "site.yaml"
        site.write_text(yaml.safe_dump({"site_id": "a", "data_dir": str(data), "state_dir": str(tmp_path / "state"),
                                        "privacy_budget": {"epsilon": 50.0, "delta": 1e-5}, "skip_bad_files": True}))
        init_ledger(tmp_path / "state", "a")  # the admin's one-time step, without which training is refused
        lenient = site_check("--config", str(site))

    for run in (strict, lenient):
        output = run.stdout + run.stderr
        assert "Traceback" not in output and "Error:" not in output, output
        lines = run.stdout.splitlines()
        for name, reason in bad.items():
            assert any(name in line and reason in line for line in lines), (name, reason, run.stdout)
        assert "Warning: 1 patient(s) have several files" in run.stdout and "sub-01 (2 files)" in run.stdout
    assert strict.returncode == 1, strict.stderr
    assert f"would refuse to train: {data}: {len(bad)} unreadable file(s)" in strict.stderr
    assert "skip_bad_files" in strict.stderr
    assert lenient.returncode == 0, lenient.stderr
