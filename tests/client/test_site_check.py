"""``fedsynth site check`` tells an admin what the client will see, and fails clearly on nothing usable."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import main as cli_main
from tests.conftest import write_shapes_dataset


def test_reports_counts_and_skipped_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_shapes_dataset(tmp_path / "data", per_class=3)
    (data / "disc" / "notes.txt").write_text("not an image")
    (data / "disc" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (data / "fracture").mkdir()
    (data / "fracture" / "x.png").write_bytes((data / "disc" / "disc-00.png").read_bytes())
    fed = tmp_path / "fed.yaml"
    fed.write_text("federation: {output_dir: out}\nmodel: {classes: [disc, ring], channels: [8, 8], attention_levels: [false, true], "
                   "norm_num_groups: 4}\ndata: {image_size: 16}\n")
    assert cli_main(["site", "check", "--data", str(data), "--federation", str(fed)]) == 0
    out = capsys.readouterr().out
    assert "disc" in out and "ring" in out
    assert "24x24: 6" in out  # original shapes before resizing
    assert "broken.jpg" in out
    assert "notes.txt" in out
    assert "fracture" in out and "not in the federation's classes" in out


def test_nothing_usable_exits_non_zero_with_reason(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["site", "check", "--data", str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no class sub-folders" in err
    assert cli_main(["site", "check", "--data", str(tmp_path / "absent")]) == 2
    assert "data folder not found" in capsys.readouterr().err
