"""Build the small demo set shipped in common/demo_data from ../shared/data/brain-tumor-mri.

Takes a fixed, seeded choice of images per class, drops near-duplicates (Pearson r > 0.95
at 32x32, as the source has re-encoded copies), converts to 1-channel grey and stores
64x64 PNGs. Re-running gives the same files.

    python bench/make_demo_data.py [--source DIR] [--per-class 60]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "brain-tumor-mri" / "train"
OUT = ROOT / "common" / "demo_data"


def _thumb(path: Path, size: int) -> Image.Image:
    with Image.open(path) as img:
        grey = img.convert("L")
        side = max(grey.size)
        canvas = Image.new("L", (side, side), 0)  # pad to square on black, keeping aspect ratio
        canvas.paste(grey, ((side - grey.size[0]) // 2, (side - grey.size[1]) // 2))
        return canvas.resize((size, size), Image.Resampling.LANCZOS)


def _pick(files: list[Path], count: int, seed: int) -> list[Path]:
    rng = random.Random(seed)
    rng.shuffle(files)
    chosen: list[Path] = []
    feats: list[np.ndarray] = []
    for path in files:
        v = np.asarray(_thumb(path, 32), dtype=np.float64).ravel()
        v = (v - v.mean()) / (v.std() + 1e-8)
        if any(float(v @ f) / len(v) > 0.95 for f in feats):
            continue
        chosen.append(path)
        feats.append(v)
        if len(chosen) == count:
            break
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    for class_dir in sorted(p for p in args.source.iterdir() if p.is_dir()):
        files = sorted(class_dir.glob("*.jpg"))
        out = OUT / class_dir.name
        out.mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(_pick(files, args.per_class, seed=1234)):
            _thumb(path, args.size).save(out / f"{class_dir.name}-{i:03d}.png", optimize=True)
        print(f"{class_dir.name}: {len(list(out.glob('*.png')))} images")


if __name__ == "__main__":
    main()
