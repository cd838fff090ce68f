"""Communication: bytes a site sends per round vs the model's float32 size, and what float16 transfer costs in quality.

Bytes: the train reply exactly as client/client_app.py builds it (``train_reply_content``),
counted as its audit log counts it (``count_bytes()`` of every record), for several model
sizes and both transfer dtypes; plus ``bytes_sent`` from the audit logs of real simulation
runs when given.

Quality: FedAvg emulated in this process (each site's ``train_round``, the reply's arrays
encoded as on the wire, decoded and averaged in float32 as server/strategy.py does) for a
few rounds with float32 and with float16 transfer, same seeds, so the only difference is
the float16 rounding. Compared: final weights, validation loss, and DDIM samples from the
same seeds. For scale, the same comparison between two float32 runs whose only difference
is the DP noise (another training seed).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from bench.perf_sites import TINY_32, Federation, fresh_site_copy, make_federation
from client.client_app import train_reply_content
from client.site_data import load_site_slices
from client.training import TrainResult, train_round, validation_loss
from common.config import FedsynthConfig, ModelConfig
from common.model import build_unet, count_parameters, trainable_state
from common.transfer import decode_update, encode_update
from server.sampler import build_sampling_model, sample_images

MODELS = {"tiny 0.28M": (16, 32, 32), "small 1.1M": (32, 64, 64), "medium 4.4M": (64, 128, 128), "10M": (96, 192, 192)}


def reply_bytes(channels: tuple[int, ...], transfer_dtype: str) -> dict:
    torch.manual_seed(0)
    arrays = trainable_state(build_unet(ModelConfig(channels=channels)))
    params = sum(v.size for v in arrays.values())
    result = TrainResult(arrays=arrays, num_examples=100, loss=0.5, steps=20, epsilon=3.2, delta=1e-5, epsilon_before=2.0)
    content = train_reply_content(result, "site-00", transfer_dtype)
    sent = sum(record.count_bytes() for record in content.values())
    return {"params": params, "float32_bytes": 4 * params, "bytes_sent": sent, "ratio": sent / (4 * params),
            "arrays": len(arrays)}


def audit_bytes(state_dirs: list[Path], params: int) -> dict:
    """``bytes_sent`` of the ok train tasks in real sites' audit logs."""
    sent = [row["bytes_sent"] for d in state_dirs for row in map(json.loads, (d / "audit.jsonl").read_text().splitlines())
            if row["message_type"] == "train" and row["outcome"] == "ok"]
    return {"tasks": len(sent), "bytes_sent_median": float(np.median(sent)), "float32_bytes": 4 * params,
            "ratio": float(np.median(sent)) / (4 * params)}


def emulate_fedavg(fed: Federation, root: Path, transfer_dtype: str, rounds: int) -> dict[str, np.ndarray]:
    cfg = fed.cfg
    # The comparison needs the same DP noise in both runs, which only the sites' unsafe switch gives.
    sites = [dataclasses.replace(fresh_site_copy(p, root / f"{transfer_dtype}-{cfg.training.seed}"), unsafe_reproducible_dp=True)
             for p in fed.site_paths]
    slices = [load_site_slices(s.data_dir, cfg.model.classes, cfg.data) for s in sites]
    torch.manual_seed(cfg.training.seed)
    weights = trainable_state(build_unet(cfg.model))
    for rnd in range(1, rounds + 1):
        results = [train_round(cfg, s, sl, weights, server_round=rnd) for s, sl in zip(sites, slices)]
        total = sum(r.num_examples for r in results)
        received = [decode_update(encode_update(r.arrays, transfer_dtype)) for r in results]
        weights = {k: sum(a[k] * (r.num_examples / total) for a, r in zip(received, results)).astype(np.float32)
                   for k in weights}
    return weights


def _compare(cfg: FedsynthConfig, fed: Federation, a: dict, b: dict, start: dict, samples_a: np.ndarray) -> dict:
    flat = lambda w: np.concatenate([w[k].ravel() for k in sorted(w)])  # noqa: E731
    diff = float(np.linalg.norm(flat(a) - flat(b)))
    moved = float(np.linalg.norm(flat(a) - flat(start)))
    samples_b = _samples(cfg, b)
    return {"weights_max_abs_diff": float(np.abs(flat(a) - flat(b)).max()),
            "weights_diff_over_update": diff / moved if moved else float("nan"),
            "samples_mean_abs_diff": float(np.abs(samples_a - samples_b).mean()),
            "val_loss": _val_loss(cfg, fed, b)}


def _samples(cfg: FedsynthConfig, weights: dict) -> np.ndarray:
    model = build_sampling_model(cfg, weights, torch.device("cpu"))
    n = 8
    return sample_images(cfg, model, [i % len(cfg.model.classes) for i in range(n)], list(range(n)), steps=20,
                         guidance=1.0, batch_size=n, progress=False)


def _val_loss(cfg: FedsynthConfig, fed: Federation, weights: dict) -> float:
    losses = []
    for site in fed.sites():
        slices = load_site_slices(site.data_dir, cfg.model.classes, cfg.data)
        loss, count = validation_loss(cfg, slices, weights, site.val_fraction)
        if count:
            losses.append(loss)
    return float(np.mean(losses))


def quality(root: Path, rounds: int) -> dict:
    torch.set_num_threads(1)
    fed = make_federation(root / "fed", 2, model=TINY_32, image_size=32, training={"local_steps": 5, "batch_size": 8},
                          patients_per_class=16)
    cfg = fed.cfg
    torch.manual_seed(cfg.training.seed)
    start = trainable_state(build_unet(cfg.model))
    w32 = emulate_fedavg(fed, root, "float32", rounds)
    w16 = emulate_fedavg(fed, root, "float16", rounds)
    other_seed = dataclasses.replace(fed, cfg=dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, seed=1)))
    w32_other_noise = emulate_fedavg(other_seed, root, "float32", rounds)
    samples32 = _samples(cfg, w32)
    return {"rounds": rounds, "sites": 2, "params": count_parameters(build_unet(cfg.model)),
            "val_loss_float32": _val_loss(cfg, fed, w32),
            "float16_vs_float32": _compare(cfg, fed, w32, w16, start, samples32),
            "other_dp_noise_vs_float32": _compare(cfg, fed, w32, w32_other_noise, start, samples32)}


def run(quick: bool, workdir: Path, audit_state_dirs: dict[str, tuple[list[Path], int]] | None = None) -> dict:
    models = {k: v for k, v in MODELS.items() if not quick or k != "10M"}
    sizes = {name: {dtype: reply_bytes(ch, dtype) for dtype in ("float32", "float16")} for name, ch in models.items()}
    audits = {name: audit_bytes(dirs, params) for name, (dirs, params) in (audit_state_dirs or {}).items()}
    q = quality(workdir / "quality", rounds=3 if quick else 5)
    reference = "small 1.1M"
    return {"reply_bytes": sizes, "audit_logs": audits, "quality": q,
            "bytes_ratio": sizes[reference]["float32"]["ratio"], "bytes_ratio_float16": sizes[reference]["float16"]["ratio"],
            "bytes_ratio_model": reference}
