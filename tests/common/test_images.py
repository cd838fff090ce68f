"""2D image loading (grey from any Pillow mode, bad files) and PNG writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import common.images as images
from common.errors import SiteDataError
from common.images import load_image, to_uint8, write_png


@pytest.fixture
def grey() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(24, 32), dtype=np.uint8)


def test_grey_png_keeps_values(tmp_path: Path, grey: np.ndarray) -> None:
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.dtype == np.float32 and out.shape == (24, 32)
    np.testing.assert_array_equal(out, grey)


def test_three_channel_grey_png_equals_grey(tmp_path: Path, grey: np.ndarray) -> None:
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgb.png")
    np.testing.assert_allclose(load_image(tmp_path / "rgb.png"), grey, atol=1e-3)


def test_three_channel_grey_jpeg_matches_grey_jpeg(tmp_path: Path, grey: np.ndarray) -> None:
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgb.jpg", quality=90)
    Image.fromarray(grey).save(tmp_path / "l.jpg", quality=90)
    np.testing.assert_allclose(load_image(tmp_path / "rgb.jpg"), load_image(tmp_path / "l.jpg"), atol=1.0)


def test_rgba_drops_alpha(tmp_path: Path, grey: np.ndarray) -> None:
    alpha = np.zeros_like(grey)  # fully transparent must not blank the image
    Image.fromarray(np.stack([grey, grey, grey, alpha], axis=-1)).save(tmp_path / "rgba.png")
    np.testing.assert_allclose(load_image(tmp_path / "rgba.png"), grey, atol=1e-3)


def test_grey_with_alpha_drops_alpha(tmp_path: Path, grey: np.ndarray) -> None:
    Image.merge("LA", (Image.fromarray(grey), Image.fromarray(np.zeros_like(grey)))).save(tmp_path / "la.png")
    np.testing.assert_array_equal(load_image(tmp_path / "la.png"), grey)


def test_sixteen_bit_png_keeps_full_range(tmp_path: Path) -> None:
    data = (np.arange(24 * 32, dtype=np.uint32).reshape(24, 32) * 85).astype(np.uint16)
    Image.fromarray(data).save(tmp_path / "deep.png")
    out = load_image(tmp_path / "deep.png")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, data.astype(np.float32))
    assert out.max() > 255


def test_palette_png_uses_palette_colours(tmp_path: Path, grey: np.ndarray) -> None:
    palette_image = Image.fromarray(grey).convert("P")
    palette_image.save(tmp_path / "p.png")
    expected = np.asarray(palette_image.convert("RGB"), dtype=np.float32) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(load_image(tmp_path / "p.png"), expected, atol=1e-3)


def _truncated_jpeg(path: Path, grey: np.ndarray) -> None:
    Image.fromarray(grey).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p, g: p.write_bytes(b""), "not a readable image"),
        (lambda p, g: p.write_bytes(b"<html>not an image</html>"), "not a readable image"),
        (_truncated_jpeg, "corrupt or truncated"),
        (lambda p, g: None, "file not found"),
    ],
    ids=["zero-byte", "garbage", "truncated", "missing"],
)
def test_bad_image_names_file_and_reason(tmp_path: Path, grey: np.ndarray, make, reason: str) -> None:
    path = tmp_path / "scan.jpg"
    make(path, grey)
    with pytest.raises(SiteDataError, match=rf"scan\.jpg: {reason}"):
        load_image(path)


def test_oversized_image_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("L", (20, 20)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    with pytest.raises(SiteDataError, match="exceeds the 100 pixel limit"):
        load_image(tmp_path / "big.png")


def test_pillow_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("L", (20, 20)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    with pytest.raises(SiteDataError, match="decompression-bomb"):
        load_image(tmp_path / "bomb.png")


def test_to_uint8_maps_range_and_clips() -> None:
    values = np.array([-2.0, -1.0, 0.0, 1.0, 3.0, np.nan], dtype=np.float32)
    np.testing.assert_array_equal(to_uint8(values), [0, 0, 128, 255, 255, 0])
    assert to_uint8(values).dtype == np.uint8


def test_write_png_reads_back_as_8bit_grey(tmp_path: Path) -> None:
    image = np.linspace(-1.0, 1.0, 16 * 8, dtype=np.float32).reshape(16, 8)
    path = tmp_path / "sub" / "x.png"
    write_png(path, image)
    with Image.open(path) as img:
        assert img.mode == "L" and img.size == (8, 16)
        pixels = np.asarray(img)
    np.testing.assert_array_equal(pixels, to_uint8(image))
    assert pixels[0, 0] == 0 and pixels[-1, -1] == 255


def test_write_png_rejects_non_2d(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be 2D"):
        write_png(tmp_path / "x.png", np.zeros((1, 4, 4)))
