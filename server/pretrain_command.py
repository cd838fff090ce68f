"""The ``fedsynth pretrain`` sub-command (torch and MONAI load only when it runs)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _pretrain(args: argparse.Namespace) -> int:
    from server.pretrain import PretrainRequest, run_pretrain

    req = PretrainRequest(data_dir=Path(args.data), config=Path(args.config), out=Path(args.out), steps=args.steps,
                          batch_size=args.batch_size, learning_rate=args.learning_rate, label_dropout=args.label_dropout,
                          ema_decay=args.ema_decay, exclude=tuple(Path(p) for p in args.exclude or ()),
                          description=args.description, seed=args.seed, log_every=args.log_every,
                          skip_bad_files=args.skip_bad_files, force=args.force)
    result = run_pretrain(req)
    p = result.provenance
    print(f"pretrained {p['steps']} steps on {p['num_images']} images ({', '.join(f'{k} {v}' for k, v in p['per_class'].items())}); "
          f"{p['excluded']} dropped as near-duplicates of --exclude; final loss {result.loss:.4f}")
    print(f"checkpoint {result.checkpoint} (use it as model.init_checkpoint)\nmetrics {result.metrics}")
    return 0


def add_pretrain_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="train centrally, without DP, on a public data set: a federation's starting point")
    p.add_argument("--data", required=True, help="public data folder: <class>/ sub-folders of PNG/JPEG/NIfTI, one per model.classes")
    p.add_argument("--config", required=True, help="federation YAML: its model, diffusion, data and training settings")
    p.add_argument("--out", required=True, help="checkpoint to write (never replaced without --force)")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps (default 2000)")
    p.add_argument("--batch-size", type=int, help="default: training.batch_size")
    p.add_argument("--learning-rate", type=float, help="AdamW rate; default: training.learning_rate")
    p.add_argument("--label-dropout", type=float, help="share of labels replaced by the null class; default: training.label_dropout")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights the checkpoint stores (0 = off; default 0.999)")
    p.add_argument("--exclude", action="append", metavar="DIR",
                   help="drop every public image that nearly duplicates (Pearson r > 0.95 at 32x32) one under DIR (repeatable)")
    p.add_argument("--description", default="", help="what the data is (name, version, licence): recorded in the checkpoint")
    p.add_argument("--seed", type=int, help="initial weights, batch order, noise; default: training.seed")
    p.add_argument("--log-every", type=int, default=50, help="steps per line of <out>.metrics.jsonl (default 50)")
    p.add_argument("--skip-bad-files", action="store_true", help="skip unreadable files instead of stopping")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_pretrain)
