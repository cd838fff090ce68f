"""2D image reading and PNG writing with Pillow.

Hospital exports are grey MRI slices saved in whatever form a viewer produced: 8-bit grey,
3-channel grey, RGBA, palette or 16-bit PNG. All of them come back as one float32 grey
channel; colour is folded to luminance in float so 16-bit and 8-bit detail survive.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import SiteDataError
from common.fileio import write_bytes_atomic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# A decompression-bomb guard far below Pillow's own (~89 Mpx warning, ~179 Mpx error):
# no MRI slice is anywhere near 8192 x 8192.
MAX_PIXELS = 8192 * 8192

# ITU-R 601-2 luma, the weights Pillow's own "L" conversion uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def is_image_path(path: Path) -> bool:
    """Whether ``path`` ends in ``.png``, ``.jpg`` or ``.jpeg`` (any case)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def _to_grey(img: Image.Image) -> np.ndarray:
    """Pixels of a decoded Pillow image as (H, W) float32 grey, without 8-bit rounding."""
    mode = img.mode
    if mode in ("L", "F", "I") or mode.startswith("I;16"):
        return np.asarray(img, dtype=np.float32)
    if mode == "1":
        return np.asarray(img.convert("L"), dtype=np.float32)
    if mode == "LA":
        return np.asarray(img.getchannel("L"), dtype=np.float32)
    if mode != "RGB":
        # Palette, RGBA, CMYK, YCbCr...: Pillow's RGB conversion drops alpha and resolves palettes.
        img = img.convert("RGB")
    rgb = np.asarray(img, dtype=np.float32)
    return rgb @ _LUMA


def load_image(path: Path) -> np.ndarray:
    """Read a PNG or JPEG as one grey channel.

    Args:
        path: image file; the format is detected from its content, not its suffix.

    Returns:
        float32 array of shape (H, W) in the file's own intensity units (0-255 for 8-bit,
        0-65535 for 16-bit).

    Raises:
        SiteDataError: the file is missing, empty, truncated, not an image, or larger
            than 8192 x 8192 pixels.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Our own size limit below is stricter than Pillow's warning threshold.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise SiteDataError(
                        f"{path}: image of {width}x{height} pixels exceeds the {MAX_PIXELS} pixel limit"
                    )
                img.load()
                img = ImageOps.exif_transpose(img)
                grey = _to_grey(img)
    except SiteDataError:
        raise
    except Image.DecompressionBombError:
        raise SiteDataError(f"{path}: image exceeds the decompression-bomb pixel limit") from None
    except FileNotFoundError:
        raise SiteDataError(f"{path}: file not found") from None
    except PermissionError:
        raise SiteDataError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        raise SiteDataError(f"{path}: not a readable image (empty, corrupt or unknown format)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        # Pillow reports truncated and corrupt data as OSError (and a few decoders as the others).
        raise SiteDataError(f"{path}: corrupt or truncated image ({err})") from None
    if grey.ndim != 2 or grey.size == 0:
        raise SiteDataError(f"{path}: expected a 2D image, got shape {grey.shape}")
    return np.ascontiguousarray(grey, dtype=np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Map model-range values to 8-bit grey levels.

    Args:
        image: any shape, values nominally in [-1, 1]; outside values are clipped and
            NaN is treated as background (-1).

    Returns:
        uint8 array of the same shape, -1 -> 0 and 1 -> 255.
    """
    clean = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=-1.0, posinf=1.0, neginf=-1.0)
    scaled = (np.clip(clean, -1.0, 1.0) + 1.0) * 127.5
    return np.rint(scaled).astype(np.uint8)


def write_png(path: Path, image: np.ndarray) -> None:
    """Write an image in [-1, 1] as an 8-bit grey PNG, atomically.

    Args:
        path: destination file.
        image: array of shape (H, W).

    Raises:
        ValueError: ``image`` is not 2D (a caller bug).
    """
    if image.ndim != 2:
        raise ValueError(f"write_png: image must be 2D (H, W), got shape {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())
