"""``model_card.md``: what a checkpoint is, how it was trained, what it started from, what it is for.

Written next to a federation's final model (by the ServerApp) and into every synthetic set
(``fedsynth sample``), so whoever receives either learns the privacy each site spent, the
public data the weights may have started from, and that the images are not for diagnosis.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from common.checkpoint import Checkpoint, file_sha256
from common.fileio import write_bytes_atomic
from common.model import trainable_shapes

MODEL_CARD = "model_card.md"

INTENDED_USE = (
    "Generating synthetic 2D brain MRI slices for research: method development, benchmarking, teaching and "
    "data-sharing experiments. **Not for diagnosis, treatment or any clinical decision**, and not a substitute "
    "for real patient data when validating a clinical tool: synthetic images can hold artefacts and "
    "anatomically implausible detail, and their class labels are what the model was asked for, not a finding."
)


def _one_line(value: Any) -> str:
    """User-supplied text (a description) kept on one line, so it cannot restructure the card."""
    return " ".join(str(value).split()) or "(none given)"


def _epsilon(value: Any) -> str:
    try:
        eps = float(value)
    except (TypeError, ValueError):
        return "?"
    return "no DP (unbounded)" if not math.isfinite(eps) else f"{eps:.3g}"


def _pretraining_lines(p: dict[str, Any]) -> list[str]:
    per_class = ", ".join(f"{k} {v}" for k, v in dict(p.get("per_class", {})).items())
    return [
        f"- Data: {_one_line(p.get('description', ''))}",
        f"- Data SHA-256 (sorted relative file names and each file's SHA-256): `{p.get('data_sha256', '?')}`",
        f"- Images: {p.get('num_images', '?')} ({per_class}); {p.get('excluded', 0)} dropped as near-duplicates "
        f"(Pearson r > {p.get('exclude_threshold_r', 0.95)} at 32x32) of {len(p.get('exclude_dirs', []))} excluded folder(s)",
        f"- Recipe: {p.get('steps', '?')} steps, batch size {p.get('batch_size', '?')}, learning rate "
        f"{p.get('learning_rate', '?')}, weight EMA decay {p.get('ema_decay', '?')}, seed {p.get('seed', '?')}",
        "- Trained centrally **without differential privacy**: only data the coordinator may use openly belongs "
        "here; no DP guarantee covers it.",
    ]


def _init_lines(ckpt: Checkpoint) -> list[str]:
    prov = ckpt.provenance
    if prov.get("kind") == "pretrained":
        return ["## Pretraining", "", "This checkpoint was pretrained centrally (`fedsynth pretrain`); no federated "
                "round has trained it.", "", *_pretraining_lines(prov)]
    init = prov.get("init")
    lines = ["## Initial weights", ""]
    if not isinstance(init, dict):
        return [*lines, "- Not recorded (a checkpoint written before fedsynth recorded its provenance)."]
    if init.get("kind") == "random":
        return [*lines, f"- Seeded random initialisation (seed {init.get('seed', '?')})."]
    lines += [f"- Init checkpoint: `{Path(str(init.get('path', '?'))).name}`, SHA-256 `{init.get('sha256', '?')}`",
              f"- Description: {_one_line(init.get('description', ''))}"]
    pretraining = init.get("pretraining")
    if isinstance(pretraining, dict) and pretraining.get("kind") == "pretrained":
        lines += ["", "Pretraining of the init checkpoint:", "", *_pretraining_lines(pretraining)]
    return lines


def render_model_card(ckpt: Checkpoint, checkpoint_path: str | Path | None = None) -> str:
    cfg = ckpt.config
    m, d, t, p = cfg.model, cfg.diffusion, cfg.training, cfg.privacy
    params = sum(math.prod(shape) for shape in trainable_shapes(m).values())
    lines = ["# Model card: fedsynth diffusion model", ""]
    if checkpoint_path is not None and Path(checkpoint_path).is_file():
        lines.append(f"Checkpoint `{Path(checkpoint_path).name}`, SHA-256 `{file_sha256(checkpoint_path)}`, written "
                     f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(ckpt.created))}.")
        lines.append("")
    lines += ["## Intended use", "", INTENDED_USE, "",
              "## Model", "",
              f"- MONAI `DiffusionModelUNet`, 2D, one channel, class-conditional with classifier-free guidance "
              f"(a null class): {params:,} trainable parameters",
              f"- Channels {list(m.channels)}, attention levels {list(m.attention_levels)}, "
              f"{m.num_res_blocks} residual block(s) per level",
              f"- Images {cfg.data.image_size} x {cfg.data.image_size} px ({cfg.data.pixel_spacing_mm} mm pixels), "
              f"intensities in [-1, 1]",
              f"- Classes: {', '.join(m.classes)}",
              f"- Diffusion: {d.schedule} schedule over {d.num_train_timesteps} steps", "",
              "## Federated training", ""]
    if ckpt.rounds_completed == 0:
        lines.append("- No federated round completed.")
    else:
        privacy = (f"DP-SGD per patient, noise multiplier {p.noise_multiplier}, clipping norm {p.max_grad_norm}, "
                   f"{p.accountant} accountant" if p.enabled else "**without differential privacy**")
        lines += [f"- {ckpt.rounds_completed} round(s) of FedAvg; {t.local_steps} local steps per round, batch size "
                  f"{t.batch_size}, learning rate {t.learning_rate}", f"- Privacy: {privacy}"]
    if ckpt.sites:
        lines += ["", "Privacy spent by each site on its own patients (cumulative, per patient, at that site's delta):", "",
                  "| site | epsilon | delta | training patients | rounds |", "|---|---|---|---|---|"]
        for site, info in sorted(ckpt.sites.items()):
            lines.append(f"| {_one_line(site)} | {_epsilon(info.get('epsilon'))} | {info.get('delta', '?')} | "
                         f"{info.get('num_examples', '?')} | {info.get('rounds', '?')} |")
    lines += ["", *_init_lines(ckpt), ""]
    return "\n".join(lines)


def write_model_card(path: str | Path, ckpt: Checkpoint, checkpoint_path: str | Path | None = None) -> Path:
    """Render and write the card atomically."""
    return write_bytes_atomic(path, render_model_card(ckpt, checkpoint_path).encode("utf-8"))
