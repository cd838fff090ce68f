"""Damaged, foreign or hostile checkpoints given to ``fedsynth sample`` and to a resume.

Each one must end in one clear line that names the file and what is wrong (exit 2), never a
traceback, and never in building a model the checkpoint's config inflates to any size.
"""

from __future__ import annotations

import io
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from common.checkpoint import Checkpoint, round_checkpoint_path, save_checkpoint
from common.config import FedsynthConfig, config_from_dict
from common.model import build_unet, trainable_state
from server.cli import main
from tests.conftest import tiny_federation, write_shapes_dataset, write_site

REPO = Path(__file__).resolve().parents[2]
FIRST = "time_embed.0.weight"  # a parameter every UNet has


def _payload(tmp_path: Path) -> dict:
    """A valid checkpoint's contents, to be damaged one way per test."""
    cfg = config_from_dict(FedsynthConfig, tiny_federation(tmp_path / "server"), "test")
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "valid.pt", Checkpoint(cfg, trainable_state(build_unet(cfg.model)), 2))
    return torch.load(path, weights_only=True)


def _saved(path: Path, payload: object) -> Path:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.write_bytes(buffer.getvalue())
    return path


def _missing(p: dict) -> None:
    del p["arrays"][FIRST]


def _extra(p: dict) -> None:
    p["arrays"]["injected.weight"] = torch.zeros(3)


def _shape(p: dict) -> None:
    p["arrays"][FIRST] = torch.zeros(7, 7)


def _dtype(p: dict) -> None:
    p["arrays"][FIRST] = p["arrays"][FIRST].double()


def _not_tensor(p: dict) -> None:
    p["arrays"][FIRST] = "weights"


def _nan(p: dict) -> None:
    p["arrays"][FIRST][0, 0] = float("nan")


def _arrays_list(p: dict) -> None:
    p["arrays"] = list(p["arrays"].values())


def _bad_rounds(p: dict) -> None:
    p["metadata"]["rounds_completed"] = "two"


DAMAGE: dict[str, tuple[Callable[[dict], None], str]] = {
    "missing array": (_missing, "1 missing"),
    "extra array": (_extra, "1 unexpected"),
    "wrong shape": (_shape, "has shape (7, 7)"),
    "wrong dtype": (_dtype, "torch.float64, expected torch.float32"),
    "not a tensor": (_not_tensor, "is a str, not a dense tensor"),
    "not finite": (_nan, "NaN or infinite"),
    "arrays not a mapping": (_arrays_list, "not a mapping"),
    "malformed metadata": (_bad_rounds, "metadata is malformed"),
}


def _sample(checkpoint: Path, out: Path) -> int:
    return main(["sample", "--checkpoint", str(checkpoint), "--num", "2", "--steps", "2", "--out", str(out)])


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_sample_names_the_file_and_the_damage(case: str, tmp_path: Path, capsys) -> None:
    damage, expected = DAMAGE[case]
    payload = _payload(tmp_path)
    damage(payload)
    bad = _saved(tmp_path / "bad.pt", payload)
    assert _sample(bad, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("fedsynth sample: error: ") and str(bad) in err and expected in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["text", "truncated", "foreign"])
def test_sample_refuses_what_is_not_a_checkpoint(content: str, tmp_path: Path, capsys) -> None:
    valid = tmp_path / "valid.pt"
    _payload(tmp_path)
    data = {"text": b"this is a site.yaml, not a model\n", "truncated": valid.read_bytes()[: valid.stat().st_size // 2],
            "foreign": None}[content]
    bad = tmp_path / "bad.pt"
    if data is None:
        _saved(bad, {"state_dict": {"w": torch.zeros(2)}})  # some other program's torch file
    else:
        bad.write_bytes(data)
    assert _sample(bad, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert str(bad) in err and ("not a readable checkpoint" in err or "not a fedsynth checkpoint" in err), err


def _limit_memory() -> None:
    # Old code built the model it was told to: bound it so a regression fails, not swaps.
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def test_huge_model_config_is_refused_before_it_is_built(tmp_path: Path) -> None:
    payload = _payload(tmp_path)
    # ~10 billion parameters (40 GB): valid as a config, absurd as a model to build.
    payload["config"]["model"].update(channels=[32768, 32768], norm_num_groups=4, num_head_channels=8)
    bad = _saved(tmp_path / "huge.pt", payload)
    proc = subprocess.run([sys.executable, "-m", "server.cli", "sample", "--checkpoint", str(bad), "--num", "1",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=REPO,
                          preexec_fn=_limit_memory)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(bad) in proc.stderr and "parameters, more than the 1,000,000,000" in proc.stderr, proc.stderr


def test_resume_on_a_damaged_newest_checkpoint_refuses_and_keeps_it(tmp_path: Path, capsys) -> None:
    data = write_shapes_dataset(tmp_path / "data", per_class=6)
    sites = [write_site(tmp_path / "sites", s, data) for s in ("site-a", "site-b")]
    fed = tiny_federation(tmp_path / "server")
    fed["federation"]["resume"] = True
    fed_path = tmp_path / "federation.yaml"
    fed_path.write_text(yaml.safe_dump(fed))
    cfg = config_from_dict(FedsynthConfig, fed, "test")
    payload = _payload(tmp_path)
    _shape(payload)
    bad = round_checkpoint_path(cfg.federation.checkpoint_dir, 1)
    bad.parent.mkdir(parents=True)
    _saved(bad, payload)
    before = bad.read_bytes()
    argv = ["simulate", "--config", str(fed_path), *(a for s in sites for a in ("--site", str(s))),
            "--workdir", str(tmp_path / "work")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and str(bad) in err and "has shape (7, 7)" in err, err
    assert bad.read_bytes() == before
    assert not (tmp_path / "work").exists()  # refused before Flower was started
