"""``fedsynth site check`` tells an admin what the client will see, and fails clearly on nothing usable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from client.ledger import PrivacyLedger
from server.cli import main as cli_main

from tests.conftest import tiny_federation, write_shapes_dataset, write_site


def _fed(tmp_path: Path, **overrides: dict) -> Path:
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(tiny_federation(tmp_path / "out", **overrides)))
    return path


def test_reports_counts_and_skipped_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_shapes_dataset(tmp_path / "data", per_class=3)
    (data / "disc" / "notes.txt").write_text("not an image")
    (data / "disc" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (data / "fracture").mkdir()
    (data / "fracture" / "x.png").write_bytes((data / "disc" / "disc-00.png").read_bytes())
    fed = tmp_path / "fed.yaml"
    fed.write_text("federation: {output_dir: out}\nmodel: {classes: [disc, ring], channels: [8, 8], attention_levels: [false, true], "
                   "norm_num_groups: 4}\ndata: {image_size: 16}\n")
    # skip_bad_files defaults to false: the client would stop on broken.jpg, so the check fails.
    assert cli_main(["site", "check", "--data", str(data), "--federation", str(fed)]) == 1
    captured = capsys.readouterr()
    out = captured.out
    assert "disc" in out and "ring" in out
    assert "24x24: 6" in out  # original shapes before resizing
    assert "broken.jpg" in out
    assert "notes.txt" in out
    assert "fracture" in out and "not in the federation's classes" in out
    assert "would refuse to train" in captured.err and "skip_bad_files" in captured.err
    site = write_site(tmp_path, "site-a", data, skip_bad_files=True)
    assert cli_main(["site", "check", "--config", str(site), "--federation", str(fed)]) == 0
    assert "would refuse" not in capsys.readouterr().err


def test_nothing_usable_exits_non_zero_with_reason(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["site", "check", "--data", str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no class sub-folders" in err
    assert cli_main(["site", "check", "--data", str(tmp_path / "absent")]) == 2
    assert "data folder not found" in capsys.readouterr().err


def test_policy_min_patients_fails_the_check(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_shapes_dataset(tmp_path / "data", per_class=3)
    policy = tmp_path / "policy.yaml"
    policy.write_text("max_epsilon: 50\nmax_delta: 1.0e-5\nmin_patients: 100\n")
    site = write_site(tmp_path, "site-a", data, policy_file=str(policy))
    assert cli_main(["site", "check", "--config", str(site), "--federation", str(_fed(tmp_path))]) == 1
    assert "fewer than the policy's minimum 100" in capsys.readouterr().err
    policy.write_text("max_epsilon: 50\nmax_delta: 1.0e-5\nmin_patients: 2\n")
    assert cli_main(["site", "check", "--config", str(site), "--federation", str(_fed(tmp_path))]) == 0


def test_budget_too_small_for_one_round_fails_the_check(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_shapes_dataset(tmp_path / "data", per_class=3)
    site = write_site(tmp_path, "site-a", data, epsilon=0.05)
    assert cli_main(["site", "check", "--config", str(site), "--federation", str(_fed(tmp_path))]) == 1
    err = capsys.readouterr().err
    assert "would raise epsilon from 0.000" in err and "over the site's budget of 0.05" in err
    assert PrivacyLedger.open(tmp_path / "site-a" / "state").total_steps == 0  # a check spends nothing


def test_names_with_markup_and_control_characters_print_literally(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_shapes_dataset(tmp_path / "data", per_class=3)
    for name in ("[bold red]x.txt", "a\nb.txt", ":thumbs_up: \u202egpj.exe", "[link=http:x]ok.png"):
        (data / "disc" / name).write_text("not an image")
    site = write_site(tmp_path, "site-a", data, skip_bad_files=True)
    assert cli_main(["site", "check", "--config", str(site), "--federation", str(_fed(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "disc/[bold red]x.txt" in out
    assert "disc/a\\nb.txt" in out
    assert "disc/:thumbs_up: \\u202egpj.exe" in out
    assert "disc/[link=http:x]ok.png" in out


def test_several_volumes_of_one_subject_are_one_patient_and_warned(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import nibabel as nib

    data = write_shapes_dataset(tmp_path / "data", per_class=3)
    rng = np.random.default_rng(0)
    for rel in ("disc/sub-01_T1w.nii.gz", "disc/sub-01_FLAIR.nii.gz", "ring/sub-02/anat/sub-02_T1w.nii.gz",
                "ring/sub-02/anat/sub-02_T2w.nii.gz", "ring/sub-02/anat/sub-02_FLAIR.nii.gz"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(rng.uniform(10, 100, (12, 12, 2)).astype(np.float32), np.eye(4)), data / rel)
    site = write_site(tmp_path, "site-a", data)
    assert cli_main(["site", "check", "--config", str(site), "--federation", str(_fed(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "2 patient(s) have several files" in out
    assert "sub-02 (3 files)" in out and "sub-01 (2 files)" in out
