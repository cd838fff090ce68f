"""The sampler's files read back with nibabel and PIL; the same seed gives the same images."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from common.checkpoint import Checkpoint, file_sha256, load_checkpoint, save_checkpoint
from common.config import DiffusionConfig, FedsynthConfig, config_from_dict
from common.model import build_ddim_sampler, build_unet, trainable_state
from server.cli import main as cli_main
from server.sampler import build_sampling_model, ddim_step, sample_images
from server.synthetic_set import SampleRequest, generate_synthetic_set
from tests.conftest import tiny_federation


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    cfg = config_from_dict(FedsynthConfig, tiny_federation(tmp_path / "server", data={"pixel_spacing_mm": 0.8}), "test")
    torch.manual_seed(0)
    # MONAI zero-initialises the output layer: perturb every weight so labels and guidance matter.
    rng = np.random.default_rng(0)
    arrays = {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in trainable_state(build_unet(cfg.model)).items()}
    return save_checkpoint(tmp_path / "model.pt", Checkpoint(cfg, arrays, 2))


def _sample(checkpoint: Path, out: Path, **kw: object) -> dict:
    req = SampleRequest(checkpoint=checkpoint, out=out, **{"num": 4, "steps": 5, "guidance": 2.0, "seed": 7, **kw})
    return generate_synthetic_set(req, progress=False)


def test_files_read_back_with_nibabel(checkpoint: Path, tmp_path: Path) -> None:
    manifest = _sample(checkpoint, tmp_path / "s")
    assert manifest["checkpoint_sha256"] == file_sha256(checkpoint)
    assert len(manifest["images"]) == 4
    assert {e["class"] for e in manifest["images"]} == {"disc", "ring"}
    for entry in manifest["images"]:
        assert set(entry) >= {"file", "png", "class", "seed", "steps", "guidance", "eta"}
        img = nib.load(tmp_path / "s" / entry["file"])
        data = np.asarray(img.dataobj)
        assert data.shape == (16, 16, 1)
        assert data.dtype == np.float32
        assert np.isfinite(data).all() and data.min() >= -1 and data.max() <= 1
        assert np.allclose(np.diag(img.affine), [0.8, 0.8, 1.0, 1.0])
        png = Image.open(tmp_path / "s" / entry["png"])
        assert png.size == (16, 16) and png.mode == "L"
    sheet = Image.open(tmp_path / "s" / "contact_sheet.png")
    assert sheet.size[0] > 64 and sheet.size[1] > 64
    on_disk = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert on_disk == manifest


def _arrays(folder: Path) -> list[np.ndarray]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return [np.asarray(nib.load(folder / e["file"]).dataobj) for e in manifest["images"]]


def test_same_seed_same_images_other_seed_other_images(checkpoint: Path, tmp_path: Path) -> None:
    _sample(checkpoint, tmp_path / "a")
    _sample(checkpoint, tmp_path / "b")
    _sample(checkpoint, tmp_path / "c", seed=8)
    a, b, c = _arrays(tmp_path / "a"), _arrays(tmp_path / "b"), _arrays(tmp_path / "c")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.allclose(a[0], c[0])  # seeds 7 and 8, same class


def test_guidance_changes_images_and_class_filter(checkpoint: Path, tmp_path: Path) -> None:
    _sample(checkpoint, tmp_path / "g0", guidance=0.0, classes=("ring",))
    _sample(checkpoint, tmp_path / "g1", guidance=1.0, classes=("ring",))
    manifest = json.loads((tmp_path / "g1" / "manifest.json").read_text())
    assert {e["class"] for e in manifest["images"]} == {"ring"}
    assert not all(np.array_equal(x, y) for x, y in zip(_arrays(tmp_path / "g0"), _arrays(tmp_path / "g1")))


def test_cli_errors_are_clear_and_nothing_is_overwritten(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "s"
    assert cli_main(["sample", "--checkpoint", str(checkpoint), "--num", "2", "--steps", "3", "--out", str(out)]) == 0
    before = (out / "manifest.json").read_bytes()
    assert json.loads(before)["eta"] == 1.0  # the sampler's default
    assert cli_main(["sample", "--checkpoint", str(checkpoint), "--num", "2", "--steps", "3", "--eta", "0",
                     "--out", str(tmp_path / "d")]) == 0
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["eta"] == 0.0
    assert cli_main(["sample", "--checkpoint", str(checkpoint), "--num", "2", "--out", str(out)]) == 2
    assert "already holds a synthetic set" in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == before
    assert cli_main(["sample", "--checkpoint", str(checkpoint), "--num", "2", "--class", "cube", "--out", str(tmp_path / "x")]) == 2
    assert "'cube' is not a class of this checkpoint" in capsys.readouterr().err
    assert cli_main(["sample", "--checkpoint", str(tmp_path / "none.pt"), "--num", "2", "--out", str(tmp_path / "y")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    for flag, value, message in [("--eta", "1.5", "--eta must be in [0, 1], got 1.5"),
                                  ("--steps", "0", "--steps must be >= 1, got 0"),
                                  ("--steps", "101", "--steps 101 is more than the 100 timesteps"),
                                  ("--guidance", "-1", "--guidance must be >= 0, got -1.0")]:
        args = ["sample", "--checkpoint", str(checkpoint), "--num", "2", flag, value, "--out", str(out), "--overwrite"]
        assert cli_main(args) == 2
        assert message in capsys.readouterr().err
        assert (out / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_ddim_step_is_monais_step_with_the_noise_passed_in(eta: float) -> None:
    cfg = config_from_dict(FedsynthConfig, tiny_federation(Path("unused")), "test")
    scheduler = build_ddim_sampler(cfg.diffusion, 7)
    gen = torch.Generator().manual_seed(3)
    x, eps = torch.randn((3, 1, 8, 8), generator=gen), torch.randn((3, 1, 8, 8), generator=gen)
    for t in scheduler.timesteps.tolist():  # the last step (t = 0) uses the final alpha of 1
        expected, _ = scheduler.step(eps, t, x, eta=eta, generator=torch.Generator().manual_seed(11))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(11))
        got = ddim_step(scheduler, eps, t, x, eta, noise if eta > 0 else None)
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("steps", [1, 2, 3, 10])
def test_a_stochastic_step_stays_finite_where_the_cosine_schedule_ends_near_zero(steps: int) -> None:
    """The cosine schedule's alpha at t = 999 is ~1e-9: a step from there used to be NaN in every pixel."""
    scheduler = build_ddim_sampler(DiffusionConfig(schedule="cosine"), steps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((4, 1, 8, 8), generator=gen)
    for t in scheduler.timesteps.tolist():
        x = ddim_step(scheduler, torch.randn(x.shape, generator=gen), t, x, 1.0, torch.randn(x.shape, generator=gen))
        assert torch.isfinite(x).all(), f"step from t = {t} of {steps}"
    assert x.abs().max() <= 1.0 + 1e-5  # the last step lands on the clipped estimate of the image


def test_stochastic_sampling_depends_on_each_image_seed_alone(checkpoint: Path) -> None:
    ckpt = load_checkpoint(checkpoint)
    model = build_sampling_model(ckpt.config, ckpt.arrays, torch.device("cpu"))
    labels, seeds = [0, 1, 0, 1, 0], [5, 6, 7, 8, 9]

    def run(batch_size: int, eta: float, some_seeds: list[int] = seeds) -> np.ndarray:
        return sample_images(ckpt.config, model, labels[:len(some_seeds)], some_seeds, steps=4, guidance=2.0,
                             batch_size=batch_size, progress=False, eta=eta)

    together = run(5, 1.0)
    # other batch-mates, the same images (to float rounding: a convolution's sums depend on the batch size)
    np.testing.assert_allclose(together, run(2, 1.0), atol=1e-4)
    np.testing.assert_allclose(together[:2], run(5, 1.0, seeds[:2]), atol=1e-4)
    deterministic = run(5, 0.0)
    assert not np.allclose(together, deterministic)  # the steps' noise is really added
    assert not np.allclose(together, run(5, 1.0, [s + 100 for s in seeds]))


def test_contact_sheet_rows_carry_their_class_names(tmp_path: Path) -> None:
    from server.synthetic_set import write_contact_sheet

    images = np.full((4, 16, 16), 1.0, dtype=np.float32)  # white tiles: any dark pixel left of them is the label
    names = ["glioma", "glioma", "pituitary", "pituitary"]
    write_contact_sheet(tmp_path / "sheet.png", images, names, columns=2)
    sheet = np.asarray(Image.open(tmp_path / "sheet.png"))
    cell = 16 * 4 + 2
    label_width = sheet.shape[1] - 2 * cell - 2
    assert label_width > 20, "no room for the class names"
    for row in range(2):
        strip = sheet[2 + row * cell: (row + 1) * cell, :label_width]
        assert (strip < 128).sum() > 20, f"row {row} has no label text"
    # different names draw different text
    first, second = (sheet[2 + r * cell: (r + 1) * cell, :label_width] for r in range(2))
    assert not np.array_equal(first, second)
