"""The deployment commands of ``fedsynth``: ``provision`` (keys and kits) and ``run`` (on a deployed SuperLink)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_deploy_commands(sub: argparse._SubParsersAction) -> None:
    prov = sub.add_parser("provision", help="create the CA, the server certificate and one key + kit per site")
    prov.add_argument("--sites", required=True, help="comma-separated site names, e.g. hospital-a,hospital-b")
    prov.add_argument("--server-host", required=True, help="the host name or IP address the sites dial")
    prov.add_argument("--extra-host", action="append", default=[], metavar="HOST",
                      help="another name the server certificate must be valid for (repeatable)")
    prov.add_argument("--port", type=int, default=9093, help="the SuperLink's port (default 9093)")
    prov.add_argument("--out", required=True, help="folder for the CA, the server kit and the site kits")
    prov.add_argument("--epsilon", type=float, default=8.0, help="privacy budget written into each site.yaml")
    prov.add_argument("--delta", type=float, default=1e-5, help="delta written into each site.yaml")
    prov.add_argument("--valid-days", type=int, default=825, help="validity of the CA and server certificates")
    prov.add_argument("--force-new-sites", action="store_true",
                      help="add kits for sites not yet in --out; existing keys are never replaced")
    prov.set_defaults(func=_provision)

    run = sub.add_parser("run", help="run a federation on a deployed SuperLink and follow it")
    run.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the deployed SuperLink")
    run.add_argument("--ca", required=True, metavar="CA.pem", help="the federation's CA certificate (server kit)")
    run.add_argument("--config", required=True, metavar="FED.yaml", help="federation YAML (read here for rounds and outputs)")
    run.add_argument("--server-config", metavar="PATH",
                     help="the federation YAML's path on the SuperLink host, if not the same as --config")
    run.add_argument("--app", metavar="DIR", help="the Flower app to submit (default: this installation)")
    run.add_argument("--log", metavar="FILE", help="where to write the run's log as it happens (default: ./fedsynth-run-ID.log)")
    run.add_argument("--timeout", type=float, default=7 * 24 * 3600.0, help="seconds to wait for the run")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=_run)


def _provision(args: argparse.Namespace) -> int:
    from server.provision import ProvisionRequest, provision

    sites = tuple(s.strip() for s in args.sites.split(",") if s.strip())
    req = ProvisionRequest(out=Path(args.out), sites=sites, server_host=args.server_host,
                           extra_hosts=tuple(args.extra_host), port=args.port, epsilon=args.epsilon,
                           delta=args.delta, add_sites=args.force_new_sites, valid_days=args.valid_days)
    result = provision(req)
    layout = result.layout
    if result.created_ca:
        print(f"CA and server certificate for {args.server_host}:{args.port} in {layout.root}")
        print(f"  keep {layout.ca_key} offline: it is in no kit")
    for site in result.created_sites:
        print(f"  site kit {layout.site_dir(site)}  (hand it to {site} only: it holds their private key)")
    for site in result.kept_sites:
        print(f"  kept {layout.site_dir(site)} unchanged")
    print(f"Server kit {layout.server_dir}; after starting the SuperLink, register the new keys there with:\n"
          f"  {layout.server_dir / 'register-sites.sh'} 127.0.0.1:{args.port} {' '.join(result.created_sites)}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from server.remote_run import RemoteRunRequest, run_remote

    req = RemoteRunRequest(superlink=args.superlink, ca=Path(args.ca), config=Path(args.config),
                           server_config=args.server_config or "", app=Path(args.app) if args.app else None,
                           log_file=Path(args.log) if args.log else None, timeout_s=args.timeout,
                           progress=not args.no_progress)
    result = run_remote(req)
    print(f"run {result.run_id} {result.status}: {result.rounds_completed} round(s) seen here in "
          f"{result.seconds:.0f} s; log {result.log_file}")
    return 0
