"""Write a synthetic set: one NIfTI and one PNG per image, a contact sheet and a manifest.

Layout of ``out``::

    manifest.json                 what was generated, from which checkpoint, with which knobs
    model_card.md                 the checkpoint's model card (server/model_card.py)
    contact_sheet.png             one row per class
    images/<class>/<class>-0000.nii.gz   float32, shape (H, W, 1), affine = pixel spacing
    images/<class>/<class>-0000.png      8-bit preview
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.checkpoint import file_sha256, load_checkpoint
from common.errors import ConfigError
from common.fileio import write_bytes_atomic, write_json_atomic
from common.images import to_uint8, write_png
from common.model import pick_device
from common.nifti import write_nifti_slice
from server.model_card import MODEL_CARD, write_model_card
from server.sampler import DEFAULT_ETA, build_sampling_model, sample_images, sampling_problem, sampling_weights

MANIFEST = "manifest.json"
CONTACT_SHEET = "contact_sheet.png"


@dataclass(frozen=True)
class SampleRequest:
    checkpoint: Path
    num: int
    out: Path
    classes: tuple[str, ...] = ()
    steps: int = 50
    guidance: float = 1.0
    eta: float = DEFAULT_ETA
    seed: int = 0
    batch_size: int = 32
    overwrite: bool = False
    weights: str | None = None
    """"ema" or "global"; None: the EMA when the checkpoint has one, else the global weights."""


def plan_labels(all_classes: Sequence[str], wanted: Sequence[str], num: int) -> list[int]:
    """Class index per image, round-robin over the wanted classes (all of them by default)."""
    unknown = [c for c in wanted if c not in all_classes]
    if unknown:
        raise ConfigError(f"--class {unknown[0]!r} is not a class of this checkpoint (classes: {', '.join(all_classes)})")
    names = list(wanted) or list(all_classes)
    return [all_classes.index(names[i % len(names)]) for i in range(num)]


def write_contact_sheet(path: Path, images: np.ndarray, class_names: Sequence[str], columns: int = 8) -> Path:
    """One row of up to ``columns`` images per class, the class name at the row's left, 2-pixel gaps."""
    rows = [(name, images[[i for i, c in enumerate(class_names) if c == name]][:columns]) for name in dict.fromkeys(class_names)]
    size = images.shape[-1]
    scale = max(1, 64 // size)  # tiny images are hard to judge: show them at least 64 px
    cell = size * scale + 2
    font = ImageFont.load_default()
    label_width = 6 + max((int(font.getbbox(name)[2]) for name, _ in rows), default=0)
    sheet = Image.new("L", (label_width + columns * cell + 2, len(rows) * cell + 2), 255)
    draw = ImageDraw.Draw(sheet)
    for r, (name, row) in enumerate(rows):
        # Without the name a reader cannot tell which class a row was asked to show.
        draw.text((4, 2 + r * cell + cell // 2), name, fill=0, font=font, anchor="lm")
        for c, img in enumerate(row):
            tile = Image.fromarray(to_uint8(img)).resize((size * scale, size * scale), Image.Resampling.NEAREST)
            sheet.paste(tile, (label_width + 2 + c * cell, 2 + r * cell))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return write_bytes_atomic(path, buffer.getvalue())


def init_summary(provenance: dict) -> dict | None:
    """What a synthetic set says of its model's start: the init block's kind, SHA-256 and description."""
    init = provenance.get("init")
    if not isinstance(init, dict):
        return None
    return {k: init[k] for k in ("kind", "sha256", "description", "seed") if k in init}


def generate_synthetic_set(req: SampleRequest, progress: bool = True) -> dict:
    """Sample ``req.num`` images from a checkpoint and write them with their manifest.

    Returns:
        The manifest that was written.
    """
    checks = [(req.num >= 1, f"--num must be >= 1, got {req.num}"),
              (req.batch_size >= 1, f"--batch-size must be >= 1, got {req.batch_size}")]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if (req.out / MANIFEST).exists() and not req.overwrite:
        raise ConfigError(f"{req.out} already holds a synthetic set ({MANIFEST}); choose another --out or pass --overwrite")
    ckpt = load_checkpoint(req.checkpoint)
    cfg = ckpt.config
    problem = sampling_problem(req.steps, req.guidance, req.eta, cfg.diffusion.num_train_timesteps)
    if problem:
        raise ConfigError(problem)
    labels = plan_labels(cfg.model.classes, req.classes, req.num)
    seeds = [req.seed + i for i in range(req.num)]
    arrays, weights = sampling_weights(ckpt, req.weights, str(req.checkpoint))
    model = build_sampling_model(cfg, arrays, pick_device())
    started = time.time()
    images = sample_images(cfg, model, labels, seeds, req.steps, req.guidance, req.batch_size, progress, req.eta)
    seconds = time.time() - started

    entries = []
    counters: dict[str, int] = {}
    for image, label, seed in zip(images, labels, seeds):
        name = cfg.model.classes[label]
        index = counters.get(name, 0)
        counters[name] = index + 1
        stem = Path("images") / name / f"{name}-{index:04d}"
        write_nifti_slice(req.out / f"{stem}.nii.gz", image, cfg.data.pixel_spacing_mm)
        write_png(req.out / f"{stem}.png", image)
        entries.append({"file": f"{stem}.nii.gz", "png": f"{stem}.png", "class": name, "seed": seed,
                        "steps": req.steps, "guidance": req.guidance, "eta": req.eta})
    write_contact_sheet(req.out / CONTACT_SHEET, images, [cfg.model.classes[i] for i in labels])
    manifest = {
        "checkpoint": str(Path(req.checkpoint).resolve()),
        "checkpoint_sha256": file_sha256(req.checkpoint),
        "rounds_completed": ckpt.rounds_completed,
        "init": init_summary(ckpt.provenance),
        "model_card": MODEL_CARD,
        "weights": weights,
        "ema_decay": ckpt.ema.decay if weights == "ema" and ckpt.ema is not None else None,
        "classes": list(cfg.model.classes),
        "image_size": cfg.data.image_size,
        "pixel_spacing_mm": cfg.data.pixel_spacing_mm,
        "steps": req.steps,
        "guidance": req.guidance,
        "eta": req.eta,
        "seed": req.seed,
        "sampling_seconds": round(seconds, 3),
        "contact_sheet": CONTACT_SHEET,
        "images": entries,
    }
    write_model_card(req.out / MODEL_CARD, ckpt, req.checkpoint)
    write_json_atomic(req.out / MANIFEST, manifest)  # last: its presence marks a complete set
    return manifest
