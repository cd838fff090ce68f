"""The ``fedsynth`` command: demo, simulate, sample, pretrain and the hospital's ``site`` tools."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from client.site_cli import register_site_commands
from common.errors import FedsynthError
from server.deploy_cli import add_deploy_commands
from server.termination import Terminated, stop_signals_raise


def _demo(args: argparse.Namespace) -> int:
    from server.demo import DemoSettings, run_demo

    settings = DemoSettings(rounds=args.rounds, local_steps=args.local_steps, use_pretrained=not args.random_init)
    summary = run_demo(Path(args.out), settings)
    print(f"\nDemo finished: {summary['rounds_completed']} rounds, checkpoint {summary['checkpoint']}")
    for site in summary["sites"]:
        print(f"  {site['site_id']}: {site['num_examples']} training patients, epsilon {site['epsilon']:.2f} at delta {site['delta']:g}")
    print(f"Contact sheet: {summary['contact_sheet']}\nSummary: {Path(args.out).resolve() / 'summary.json'}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from client.ledger import PrivacyLedger
    from common.config import load_federation_config, load_site_config
    from server.simulation import run_simulation

    cfg = load_federation_config(args.config)
    sites = [Path(p) for p in args.site]
    for site in sites:  # fail now, not once Flower has started: each site's admin runs `fedsynth site init`
        PrivacyLedger.open(load_site_config(site).state_dir)
    workdir = Path(args.workdir or cfg.federation.output_dir)
    result = run_simulation(cfg, Path(args.config), sites, workdir)
    print(f"run {result.run_id} {result.status}: {result.rounds_completed} rounds in {result.seconds:.0f} s; "
          f"final model {cfg.federation.final_model_path}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from server.synthetic_set import SampleRequest, generate_synthetic_set

    eta = {} if args.eta is None else {"eta": args.eta}  # else the sampler's own default
    req = SampleRequest(checkpoint=Path(args.checkpoint), num=args.num, out=Path(args.out), classes=tuple(args.class_ or ()),
                        steps=args.steps, guidance=args.guidance, seed=args.seed, batch_size=args.batch_size,
                        overwrite=args.overwrite, weights=args.weights, **eta)
    manifest = generate_synthetic_set(req)
    print(f"{len(manifest['images'])} images from the {manifest['weights']} weights written to {args.out} "
          "(manifest.json, contact_sheet.png, model_card.md)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsynth", description="Federated, differentially private diffusion models of brain MRI.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="simulate 3 hospitals on the shipped demo data, then sample")
    demo.add_argument("--out", required=True, help="new folder for configs, ledgers, checkpoints, samples, summary.json")
    demo.add_argument("--rounds", type=int, default=4)
    demo.add_argument("--local-steps", type=int, default=30)
    demo.add_argument("--random-init", action="store_true",
                      help="start from random weights even when common/pretrained/demo.pt is shipped")
    demo.set_defaults(func=_demo)

    sim = sub.add_parser("simulate", help="run a federation config as a local Flower simulation")
    sim.add_argument("--config", required=True, help="federation YAML")
    sim.add_argument("--site", action="append", required=True, help="site YAML, once per simulated hospital")
    sim.add_argument("--workdir", help="where Flower's files and logs go (default: federation.output_dir)")
    sim.set_defaults(func=_simulate)

    sample = sub.add_parser("sample", help="generate a synthetic set from a checkpoint")
    sample.add_argument("--checkpoint", required=True)
    sample.add_argument("--num", type=int, required=True, help="number of images")
    sample.add_argument("--class", dest="class_", action="append", metavar="NAME", help="class to sample (repeatable; default all)")
    sample.add_argument("--steps", type=int, default=50, help="DDIM steps")
    sample.add_argument("--guidance", type=float, default=1.0, help="CFG scale: 0 unconditional, 1 conditional, >1 guided")
    sample.add_argument("--eta", type=float, default=None,
                        help="noise added by each DDIM step: 0 deterministic, 1 ancestral (the default, measured better)")
    sample.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    sample.add_argument("--batch-size", type=int, default=32)
    sample.add_argument("--out", required=True)
    sample.add_argument("--overwrite", action="store_true", help="replace an existing synthetic set in --out")
    sample.add_argument("--weights", choices=("ema", "global"), default=None,
                        help="sample the EMA of the global weights (the default when the checkpoint has one) "
                             "or the last round's global weights")
    sample.set_defaults(func=_sample)

    register_site_commands(sub)

    from server.evaluation.command import add_evaluate_parser  # torch and MONAI load only when it runs
    add_evaluate_parser(sub)
    add_deploy_commands(sub)  # provision, run: server/deploy_cli.py
    from server.plan_command import add_plan_parser
    add_plan_parser(sub)
    from server.pretrain_command import add_pretrain_parser
    add_pretrain_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with stop_signals_raise():
            return int(args.func(args))
    except Terminated as stop:
        print(f"fedsynth {args.command}: stopped by {stop.name}; every process it started has been stopped",
              file=sys.stderr)
        return stop.exit_code
    except FedsynthError as err:
        print(f"fedsynth {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
