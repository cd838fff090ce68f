"""The quality benchmark's data: real slices split into non-IID hospitals plus a validation set.

* Near-duplicates (Pearson r > 0.98 at the evaluation size, 32 or 64 px: the same slice
  re-encoded or re-sized) are joined into groups by union-find, and a group is never
  split: a validation image never has a copy in any hospital, and for DP a group is one
  patient (one gradient per step however many copies it has).
* A **public** set (what the coordinator may use openly, for ``fedsynth pretrain``): about
  ``PUBLIC_GROUPS_PER_CLASS`` groups of each class, drawn before anything else, so it shares
  no near-duplicate group with any hospital or with validation. It is class-balanced and
  mixes sources on purpose: no source of this data set holds all four classes (512 px cluster
  0 has 5 notumor images, cluster 1 none, other sizes no glioma), so a single-source public
  set would teach a pretrained model nothing about at least one class.
* About 10% of the remaining groups form the validation set (held-out real images for FID,
  TSTR and the memorisation baseline).
* The rest go to 4 hospitals that differ in case mix *and* in acquisition: each group's
  "source" is its original size (512 x 512 or other) and, for 512 px images, one of two
  appearance clusters (k-means on 8 x 8 thumbnails, seeded), standing in for scanners
  and protocols. A group goes to hospital ``h`` with probability proportional to
  ``CLASS_MIX[h][class] * SOURCE_MIX[h][source]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from client.site_data import SiteSlices
from common.similarity import standardise_rows

NEAR_DUPLICATE_R = 0.98
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c", "hospital-d")
# rows: hospitals; columns: glioma, meningioma, notumor, pituitary
CLASS_MIX = np.array([[0.55, 0.15, 0.15, 0.15], [0.15, 0.55, 0.15, 0.15], [0.15, 0.15, 0.55, 0.15], [0.15, 0.15, 0.15, 0.55]])
# rows: hospitals; columns: sources "512/cluster-0", "512/cluster-1", "other size"
SOURCE_MIX = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.4, 0.4, 0.2]])
SOURCES = ("512/cluster-0", "512/cluster-1", "other-size")
# Expected near-duplicate groups per class in the public set (fewer where a class has fewer groups).
PUBLIC_GROUPS_PER_CLASS = 90
PUBLIC = "public"


@dataclass(frozen=True)
class Split:
    """Index arrays into the loaded slices, and the group (patient) id of every slice."""

    hospitals: dict[str, np.ndarray]
    validation: np.ndarray
    public: np.ndarray
    groups: np.ndarray
    sources: np.ndarray
    near_duplicate_images: int


def near_duplicate_groups(images: np.ndarray, threshold: float = NEAR_DUPLICATE_R, chunk: int = 1024) -> np.ndarray:
    """Group id per image: connected components of the graph "Pearson r > threshold"."""
    parent = np.arange(len(images))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    z = standardise_rows(images)
    for start in range(0, len(z), chunk):
        r = z[start:start + chunk] @ z.T
        rows, cols = np.nonzero(r > threshold)
        for i, j in zip(rows + start, cols):
            if i < j:
                a, b = find(int(i)), find(int(j))
                if a != b:
                    parent[max(a, b)] = min(a, b)
    return np.array([find(i) for i in range(len(images))])


def original_sizes(root: Path, patients: list[str]) -> list[tuple[int, int]]:
    """(width, height) of each slice's source file (the patient id is the file without suffix)."""
    by_stem = {p.relative_to(root).with_suffix("").as_posix(): p for p in root.rglob("*") if p.is_file()}
    sizes = []
    for pid in patients:
        with Image.open(by_stem[pid]) as img:  # reads the header only
            sizes.append(img.size)
    return sizes


def appearance_clusters(images: np.ndarray, seed: int, iterations: int = 25) -> np.ndarray:
    """Two-means on 8 x 8 thumbnails: a cheap, deterministic stand-in for "which scanner"."""
    n, _, s, _ = images.shape
    thumbs = images.reshape(n, 8, s // 8, 8, s // 8).mean(axis=(2, 4)).reshape(n, 64).astype(np.float64)
    rng = np.random.default_rng(seed)
    centres = thumbs[rng.choice(n, 2, replace=False)]
    for _ in range(iterations):
        assign = np.argmin(((thumbs[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
        centres = np.stack([thumbs[assign == k].mean(0) if np.any(assign == k) else centres[k] for k in range(2)])
    # name clusters by mean brightness so cluster 0 is the darker one whatever the seed
    return assign if centres[0].mean() <= centres[1].mean() else 1 - assign


def split_hospitals(slices: SiteSlices, root: Path, seed: int = 0, val_fraction: float = 0.1,
                    public_groups_per_class: int = PUBLIC_GROUPS_PER_CLASS) -> Split:
    """Assign every near-duplicate group to the public set, the validation set or one hospital (seeded)."""
    groups = near_duplicate_groups(slices.images)
    is_512 = np.array([size == (512, 512) for size in original_sizes(root, slices.patients)])
    sources = np.where(is_512, appearance_clusters(slices.images, seed), 2)
    rng = np.random.default_rng(seed)
    leaders = np.unique(groups)  # each group takes its lowest-index member's class and source
    groups_per_class = np.bincount(slices.labels[leaders], minlength=len(slices.classes))
    public_p = np.minimum(0.5, public_groups_per_class / np.maximum(groups_per_class, 1))
    owner = {}
    for g in leaders:
        if rng.random() < public_p[slices.labels[g]]:
            owner[g] = PUBLIC
            continue
        if rng.random() < val_fraction:
            owner[g] = "validation"
            continue
        p = CLASS_MIX[:, slices.labels[g]] * SOURCE_MIX[:, sources[g]]
        owner[g] = HOSPITALS[rng.choice(len(HOSPITALS), p=p / p.sum())]
    where = np.array([owner[g] for g in groups])
    counts = np.bincount(groups, minlength=len(groups))
    return Split(hospitals={h: np.flatnonzero(where == h) for h in HOSPITALS}, validation=np.flatnonzero(where == "validation"),
                 public=np.flatnonzero(where == PUBLIC),
                 groups=groups, sources=sources, near_duplicate_images=int(np.sum(counts[groups] > 1)))


def site_slices(slices: SiteSlices, index: np.ndarray, groups: np.ndarray) -> SiteSlices:
    """The slices at ``index`` as a site's data, one DP patient per near-duplicate group."""
    return SiteSlices(images=slices.images[index], labels=slices.labels[index],
                      patients=[f"group-{groups[i]}" for i in index], classes=slices.classes)


def describe(split: Split, slices: SiteSlices) -> dict:
    """Per hospital (and validation, public): images, patients (groups), and counts per class and source."""
    out = {}
    for name, index in [*split.hospitals.items(), ("validation", split.validation), (PUBLIC, split.public)]:
        labels = slices.labels[index]
        out[name] = {"images": int(len(index)), "patients": int(len(np.unique(split.groups[index]))),
                     "classes": {c: int(np.sum(labels == i)) for i, c in enumerate(slices.classes)},
                     "sources": {s: int(np.sum(split.sources[index] == k)) for k, s in enumerate(SOURCES)}}
    return out
